"""``skipconv bench export``: the zoo's float vs integer accuracy and golden vs torch's quantized conv.

For each zoo model: training time and float top-1 (from the zoo's cache record), the exported
network's float and integer top-1 on the MNIST test split (every engine layer run by the
golden model), and per engine layer the share of outputs within 1 LSB of PyTorch's quantized
``ConvReLU2d`` with the qnnpack engine (int32 accumulation) and the fbgemm engine (on CPUs
without VNNI it sums pairs of u8 x s8 products in saturating int16; see docs/export.md).
"""

from __future__ import annotations

HELP = "zoo accuracy float vs integer (golden), and golden vs torch quantized conv per layer"


def add_arguments(parser):
    parser.add_argument("--models", nargs="+", default=None, metavar="NAME",
                        help="zoo models (default: all)")
    parser.add_argument("--images", type=int, default=100, metavar="N",
                        help="test images for the per-layer torch comparison (default 100)")


def run(args) -> dict:
    import numpy as np

    from . import data, export, quant, zoo

    names = args.models or zoo.list_models()
    test = data.mnist_split("test")
    calib = data.mnist_split("calib").x
    out = {"test_images": len(test), "compare_images": args.images, "models": {}}
    for name in names:
        model = zoo.get_model(name)
        info = zoo.model_info(name)
        net = export.export(model, calib, spec={"zoo": name})
        acc = net.evaluate(test, export.golden_conv, progress=True)
        ins = net.layer_inputs(test.x[:args.images], export.dense_conv)
        layers = []
        for L, x in zip(net.layers, ins):
            g = export.golden_conv(L, x)
            row = {"name": L.name, "signed_input": bool(L.act_signed),
                   "dense_macs": int(L.dense_macs)}
            for engine in ("qnnpack", "fbgemm"):
                d = np.abs(g - quant.torch_quantized_conv(L, x, engine=engine))
                row[f"{engine}_within_1lsb"] = float(np.mean(d <= 1))
                row[f"{engine}_max_diff"] = int(d.max())
            layers.append(row)
        out["models"][name] = {
            "train_seconds": info["train_seconds"], "float_top1": acc["float_top1"],
            "int_top1": acc["int_top1"], "engine_layers": len(net.layers),
            "torch_convs": len(net.skipped), "layers": layers,
        }
    return out
