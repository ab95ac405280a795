"""``skipconv export MODEL -o DIR``: quantize a zoo model (or your own) into engine layers."""

from __future__ import annotations

import json
import sys

HELP = "export a CNN (zoo name or your module) to engine layer packages; print the layer table"


def add_arguments(parser):
    parser.add_argument("model", nargs="?", default=None,
                        help="zoo model name (lenet, vgg_small, resnet_small); omit with --module")
    parser.add_argument("--module", metavar="FILE.py:FACTORY",
                        help="your own model: FACTORY() in FILE.py returns the nn.Module")
    parser.add_argument("--weights", metavar="FILE.pt",
                        help="state_dict to load into --module's model (torch.save format)")
    parser.add_argument("-o", "--output", required=True, metavar="DIR",
                        help="folder for the layer packages, weights and manifest.json")
    parser.add_argument("--preset", default="default",
                        help="EngineConfig preset giving the bit widths (default: default)")
    parser.add_argument("--calib", type=int, default=500, metavar="N",
                        help="calibration images from the MNIST calibration split (default 500)")
    parser.add_argument("--conv", choices=("golden", "dense"), default="golden",
                        help="how the integer top-1 runs each engine layer: the golden model "
                             "(default) or the fast exact dense path")
    parser.add_argument("--no-eval", action="store_true",
                        help="skip the float vs integer top-1 on the test split")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def _fmt_shape(s):
    return "x".join(str(v) for v in s) if s else "?"


def run(args) -> int:
    import torch

    from . import data, export, zoo
    from .config import PRESETS

    if (args.model is None) == (args.module is None):
        print("skipconv export: give either a zoo MODEL or --module FILE.py:FACTORY",
              file=sys.stderr)
        return 2
    if args.weights and not args.module:
        print("skipconv export: --weights goes with --module", file=sys.stderr)
        return 2
    if args.preset not in PRESETS:
        print(f"skipconv export: --preset {args.preset!r}: known presets are "
              f"{', '.join(PRESETS)}", file=sys.stderr)
        return 2
    try:
        if args.model is not None:
            model = zoo.get_model(args.model)
            spec = {"zoo": args.model}
        else:
            model = export.load_module_spec(args.module)
            if args.weights:
                model.load_state_dict(torch.load(args.weights, map_location="cpu",
                                                 weights_only=True))
            spec = {"module": args.module}
        calib = data.mnist_split("calib").x[:args.calib]
        net = export.export(model, calib, config=PRESETS[args.preset], spec=spec)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"skipconv export: {e}", file=sys.stderr)
        return 2
    net.save(args.output)

    rows = net.table()
    summary = {"model": args.model or args.module, "output": args.output, "layers": rows}
    if not args.no_eval:
        conv = export.golden_conv if args.conv == "golden" else export.dense_conv
        summary.update(net.evaluate(data.mnist_split("test"), conv, progress=True))
        summary["conv"] = args.conv
    if args.json:
        print(json.dumps(summary, indent=2, default=list))
        return 0
    print(f"{'conv':<22} {'runs on':<9} {'input':<11} {'output':<11} {'MACs':>9}  note")
    for r in rows:
        where = f"engine {r['engine']}" if r["engine"] is not None else "torch"
        macs = r.get("dense_macs", "")
        note = r["reason"] or (f"K={r['k']} S={r['stride']} P={r['pad']} "
                               f"{'signed' if r['signed'] else 'unsigned'} input")
        print(f"{r['name']:<22} {where:<9} {_fmt_shape(r['in_shape']):<11} "
              f"{_fmt_shape(r['out_shape']):<11} {macs:>9}  {note}")
    if "int_top1" in summary:
        print(f"test top-1: float {summary['float_top1']:.2%}, integer {summary['int_top1']:.2%} "
              f"({args.conv} conv layers)")
    print(f"wrote {args.output}/manifest.json and {len(net.layers)} layer packages")
    return 0
