"""The main job (``skipconv demo``): the example network end to end, with a report under out/.

Steps (each prints one line, long ones show a progress bar):

1. the example MNIST network (``zoo.get_model("lenet")``: trained once, then cached);
2. export to engine layers with the calibration images; float and int8-dense top-1;
3. a skip configuration under the accuracy budget ``eps`` from the methods (when available);
4. the engine device: the Verilator simulation of the generated engine when it can be built,
   else the golden model (the output says which);
5. the conv layers of a batch of real MNIST test images run on that device and checked bit
   for bit against the golden model, then the same images with the layers dense (the
   dense-engine baseline, measured where the device counts cycles); a per-layer table
   (dense / performed MACs, savings by reason, cycles against the dense engine);
6. top-1 with skipping on the whole test split by golden execution;

then ``out/demo/report.md``, ``results.json``, ``layers.csv`` and the plots.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ..layer import atomic_write_bytes
from .offload import OffloadResult, offload

__all__ = ["DemoOptions", "run_demo", "format_table"]

REASONS = ("early_term", "zero_pred", "velcro", "perforation")

#: The demo engine's buffers: the example network's layers fit ``max_taps``/``max_k``/``max_p``;
#: the ofmap buffer is deliberately smaller than conv1's 8x28x28 output, so the demo also runs
#: a layer tiled into row bands on the engine.
DEMO_BUFFERS = dict(max_taps=256, max_ifmap=2048, max_cout=32, max_ofmap=2048, max_k=5,
                    max_p=4)


#: Share of the accuracy budget the configuration search may spend on the calibration images.
SEARCH_MARGIN = 0.25


def demo_config(lanes: int = 8):
    """The engine the demo generates and simulates (all four mechanisms, trace on)."""
    from ..config import EngineConfig
    return EngineConfig(lanes=lanes, **DEMO_BUFFERS)


class DemoOptions:
    """The demo's knobs (the command line's options)."""

    def __init__(self, *, model="lenet", images=16, eps=1.0, lanes=8, device="auto",
                 out="out/demo", method="auto", progress=True, plots=True, test_images=None,
                 calib_images=None):
        self.model, self.images, self.eps, self.lanes = model, images, eps, lanes
        self.test_images, self.calib_images = test_images, calib_images
        self.device, self.out, self.method = device, Path(out), method
        self.progress, self.plots = progress, plots


def _say(msg):
    print(msg, flush=True)


def _pct(v):
    return "-" if v is None else f"{100 * v:.1f}%"


def format_table(res: OffloadResult) -> tuple[str, list[dict]]:
    """The per-layer table as aligned text and as rows (for CSV/markdown)."""
    rows = []
    for s in res.layers:
        row = {"layer": s.name, "images": s.images, "tiles": s.tiles, "dense_MACs": s.dense,
               "performed_MACs": s.performed, "MAC_saving": _pct(s.mac_saving)}
        for r in REASONS:
            row[r] = _pct(getattr(s, r) / s.dense if s.dense else 0.0)
        row["cycles"] = "-" if s.cycles is None else s.cycles
        row["dense_engine_cycles"] = s.dense_cycles
        row["cycle_saving"] = _pct(s.cycle_saving)
        conv = (s.cycle_saving / s.mac_saving
                if s.cycle_saving is not None and s.mac_saving > 0 else None)
        row["skip_to_cycle"] = _pct(conv)
        rows.append(row)
    t = res.totals()
    total = {"layer": "total", "images": res.layers[0].images if res.layers else 0,
             "tiles": sum(s.tiles for s in res.layers), "dense_MACs": t["dense"],
             "performed_MACs": t["performed"],
             "MAC_saving": _pct(1 - t["performed"] / t["dense"] if t["dense"] else 0.0)}
    for r in REASONS:
        total[r] = _pct(t[r] / t["dense"] if t["dense"] else 0.0)
    total["cycles"] = "-" if t["cycles"] is None else t["cycles"]
    total["dense_engine_cycles"] = t["dense_cycles"]
    cs = None if t["cycles"] is None else 1 - t["cycles"] / t["dense_cycles"]
    total["cycle_saving"] = _pct(cs)
    ms = 1 - t["performed"] / t["dense"] if t["dense"] else 0.0
    total["skip_to_cycle"] = _pct(cs / ms if cs is not None and ms > 0 else None)
    rows.append(total)
    cols = list(rows[0])
    width = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    lines = ["  ".join(f"{c:>{width[c]}}" for c in cols)]
    lines.append("  ".join("-" * width[c] for c in cols))
    for r in rows:
        lines.append("  ".join(f"{str(r[c]):>{width[c]}}" for c in cols))
    return "\n".join(lines), rows


def _markdown_table(rows) -> str:
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(out)


# -- steps ---------------------------------------------------------------------------------

def _exact_et(layer):
    """Exact early termination (never changes an output) on an unsigned-input layer."""
    try:
        from ..methods.snapea import exact
        return exact(layer)
    except ImportError:
        import dataclasses

        from ..randlayer import exact_et_params
        order, neg_start = exact_et_params(np.asarray(layer.w))
        return dataclasses.replace(layer, et="exact", order=order, neg_start=neg_start)


def _diagonal(layer, p):
    """Diagonal zero prediction with window ``p`` (the 2018 paper's predictor)."""
    try:
        from ..methods.zero_pred import diagonal
        return diagonal(layer, p)
    except ImportError:
        import dataclasses

        from ..randlayer import diagonal_leaders
        cout, ho, wo = layer.out_shape
        return dataclasses.replace(layer, p=p, leader=diagonal_leaders(cout, ho, wo, p))


def choose_configuration(net, splits, eps, method, g, progress):
    """Configured layers under the budget ``eps`` (top-1 points) and a sentence saying how.

    ``auto``: exact early termination on every unsigned-input layer (it never changes an
    output), then diagonal zero prediction per layer with the largest window ``p`` in 4, 3, 2
    that keeps the guarded top-1 drop (``NetEval.guarded_acc``: images lost, gains ignored)
    on the calibration images within ``SEARCH_MARGIN`` of the
    budget (500 images: one image is 0.2 points, so the margin absorbs sampling noise) (batch
    emulation, ``skipconv.sw.methods.common.NetEval``). The test-split drop is then measured
    by golden execution (step 6). ``joint``: the methods' joint search (slower).
    """
    if method == "dense":
        return list(net.layers), "dense (no skipping, as asked)"
    if method == "joint":
        return _joint(net, splits, eps, g, progress)
    layers = [L if L.act_signed else _exact_et(L) for L in net.layers]
    try:
        from ..methods.common import NetEval
    except ImportError as e:
        return layers, f"exact early termination only (zero-prediction search unavailable: {e})"
    calib = splits["calib"]
    ev = NetEval(net, calib.x.numpy(), calib.y.numpy(), g)
    base = ev.run({}).acc
    budget = eps / 100 * SEARCH_MARGIN
    chosen = {}
    from tqdm import tqdm
    for i in tqdm(range(len(layers)), desc="zero-prediction windows", disable=not progress,
                  leave=False):
        for p in (4, 3, 2):
            trial = dict(enumerate(layers))
            trial[i] = _diagonal(layers[i], p)
            # guarded: images lost count, lucky gains on others do not (as the searches)
            if base - ev.guarded_acc(ev.run(trial)) <= budget:
                layers[i], chosen[net.layers[i].name] = trial[i], p
                break
    zp = ", ".join(f"{k} p={v}" for k, v in chosen.items()) or "none within the budget"
    final = ev.run(dict(enumerate(layers)))
    drop = base - ev.guarded_acc(final)
    return layers, (f"exact early termination on unsigned-input layers; diagonal zero "
                    f"prediction: {zp} (calibration guarded top-1 drop {100 * drop:.1f} "
                    f"points, MAC reduction {100 * final.mac_reduction:.1f}% by emulation)")


def _joint(net, splits, eps, g, progress):
    from ..methods import joint
    from ..methods.common import NetEval
    calib = splits["calib"]
    ev = NetEval(net, calib.x.numpy(), calib.y.numpy(), g)
    res = joint.optimize(ev, eps / 100, progress=progress)
    layers = [res.plan.get(i, L) for i, L in enumerate(net.layers)]
    return layers, "joint search of the four methods (skipconv.sw.methods.joint)"


def open_engine(opts, config):
    """The device the demo runs on, and a sentence saying what it is."""
    from .device import GoldenDevice
    if opts.device == "golden":
        return GoldenDevice(config), "golden model (as asked)"
    try:
        from .sim_backend import open_sim
    except ImportError as e:
        if opts.device == "sim":
            raise
        return GoldenDevice(config), f"golden model: the simulator backend is not available ({e})"
    try:
        dev = open_sim(config, progress=opts.progress,
                       log=lambda m: _say(m if m.startswith(" ") else f"      {m}"))
    except Exception as e:          # the simulated engine cannot be built here (yet)
        if opts.device == "sim":
            raise
        return GoldenDevice(config), (f"golden model: the simulated engine is not available "
                                      f"({type(e).__name__}: {e})")
    return dev, f"Verilator simulation of the generated engine (lanes = {config.lanes})"


def run_demo(opts: DemoOptions) -> int:
    import torch

    from .. import data, export, zoo
    t_start = time.monotonic()
    out = opts.out
    _say(f"skipconv demo: {opts.model} on MNIST, eps = {opts.eps} point(s), engine lanes = "
         f"{opts.lanes}")

    _say("[1/6] example network (trained once, then cached)")
    model = zoo.get_model(opts.model, progress=opts.progress)
    splits = {name: data.mnist_split(name) for name in ("calib", "test")}
    test = splits["test"]
    if opts.test_images is not None and opts.test_images < len(test):
        test = test[np.arange(max(1, opts.test_images))]

    _say("[2/6] export to engine layers (calibration: "
         f"{len(splits['calib'])} images)")
    net = export.export(model, splits["calib"].x, spec={"zoo": opts.model})
    config = demo_config(opts.lanes)
    float_top1 = net.evaluate(test, export.dense_conv)["float_top1"]
    dense_logits = net.forward_int(test.x, export.dense_conv)
    int8_right = int((dense_logits.argmax(1) == test.y).sum())
    int8_top1 = int8_right / len(test)
    for i, L in enumerate(net.layers):
        _say(f"      layer {i} {L.name}: {tuple(L.in_shape)} -> {L.out_shape}, K = {L.k}, "
             f"{'signed' if L.act_signed else 'unsigned'} input, {L.dense_macs:,} MACs/image")
    _say(f"      top-1 on {len(test)} test images: float {100 * float_top1:.1f}%, "
         f"int8 dense {100 * int8_top1:.1f}%")

    _say(f"[3/6] skip configuration under eps = {opts.eps}")
    search = dict(splits)
    if opts.calib_images is not None and opts.calib_images < len(splits["calib"]):
        search["calib"] = splits["calib"][np.arange(max(1, opts.calib_images))]
    layers, how = choose_configuration(net, search, opts.eps, opts.method, config.g,
                                       opts.progress)
    _say(f"      {how}")

    _say("[4/6] engine device")
    device, what = open_engine(opts, config)
    _say(f"      {what}")

    n = min(opts.images, len(test))
    _say(f"[5/6] {n} test images through the engine layers, each layer checked against golden")
    try:
        res = offload(net, device, test.x[:n], compare=True, layers=layers,
                      progress=opts.progress)
        baseline = _measure_dense_baseline(net, device, test.x[:n], res, opts.progress)
    finally:
        device.close()
    mismatch = res.mismatch or baseline["mismatch"]
    verdict = ("bit-exact: every output, MAC count and counter equals the golden model"
               if mismatch is None else f"MISMATCH: {mismatch}")
    _say(f"      {verdict}")
    _say(f"      dense-engine cycles: {baseline['how']}")
    table, rows = format_table(res)
    _say("")
    _say(table)
    _say("")

    _say(f"[6/6] top-1 with skipping on the {len(test)} test images (golden execution)")
    skip_logits = _golden_logits(net, layers, test.x, config.g, opts.progress)
    skip_right = int((skip_logits.argmax(1) == test.y).sum())
    skip_top1 = skip_right / len(test)
    # from image counts: float32 means made a drop of exactly 1.0 point read as over 1.0
    drop = 100 * (int8_right - skip_right) / len(test)
    within = "within" if drop <= opts.eps + 1e-9 else "OVER"
    _say(f"      float {100 * float_top1:.1f}%, int8 dense {100 * int8_top1:.1f}%, int8 with "
         f"skipping {100 * skip_top1:.1f}% (drop {drop:.1f} points, {within} the budget of "
         f"{opts.eps} point(s))")

    summary = {
        "model": opts.model, "eps": opts.eps, "config": config.to_dict(),
        "configuration": how, "device": what, "images": n,
        "float_top1": float_top1, "int8_dense_top1": int8_top1, "int8_skip_top1": skip_top1,
        "bit_exact": mismatch is None,
        "mismatch": None if mismatch is None else str(mismatch),
        "dense_cycles": baseline["kind"],
        "layers": [s.as_dict() for s in res.layers], "totals": res.totals(),
        "wall_s": round(time.monotonic() - t_start, 1),
        "torch": torch.__version__,
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "results.json", json.dumps(summary, indent=2).encode())
    _write_csv(out / "layers.csv", rows)
    plots = _plots(out, res) if opts.plots else []
    _write_markdown(out / "report.md", summary, rows, plots)
    _say(f"report: {out / 'report.md'} (results.json, layers.csv"
         f"{', ' + ', '.join(p.name for p in plots) if plots else ''}); "
         f"{summary['wall_s']} s")
    return 0 if mismatch is None else 1


def _measure_dense_baseline(net, device, x, res: OffloadResult, progress) -> dict:
    """Replace the ideal dense-engine cycles of ``res`` by measured ones where the device
    counts cycles: the same images through the same engine with the exported layers (no
    plan, no early termination), every layer checked against golden too. Row bands and
    pipeline start and drain then cost the baseline what they cost the skip run."""
    if any(s.cycles is None for s in res.layers):
        return {"kind": "ideal", "mismatch": None,
                "how": "ideal (this device counts no cycles): ceil(T/g) steps per position "
                       "spread evenly over the lanes"}
    dense = offload(net, device, x, compare=True, progress=progress)
    for s, d in zip(res.layers, dense.layers):
        s.dense_cycles = d.cycles
    return {"kind": "measured", "mismatch": dense.mismatch,
            "how": "measured: the same images through this engine with the layers dense (no "
                   "plan, no early termination), also checked against golden"}


def _golden_logits(net, layers, x, g, progress):
    from .. import golden
    from ..export import dense_conv
    from tqdm import tqdm
    ids = {id(L): i for i, L in enumerate(net.layers)}
    bar = tqdm(total=len(x) * len(layers), desc="golden with skipping", disable=not progress,
               leave=False)

    def conv(layer, x_int):
        L = layers[ids[id(layer)]]
        if not L.features:
            bar.update(len(x_int))
            return dense_conv(L, x_int)
        outs = []
        for xi in x_int:
            outs.append(golden.run(L, xi, g).out)
            bar.update(1)
        return np.stack(outs)

    try:
        return net.forward_int(x, conv)
    finally:
        bar.close()


def _write_csv(path, rows):
    import csv
    import io
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())


def _plots(out: Path, res: OffloadResult) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s.name for s in res.layers]
    paths = []
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bottom = np.zeros(len(names))
    for r in REASONS:
        v = np.array([100 * getattr(s, r) / s.dense if s.dense else 0 for s in res.layers])
        ax.bar(names, v, bottom=bottom, label=r)
        bottom += v
    ax.set_ylabel("skipped MACs (% of dense)")
    ax.set_title("MACs skipped by reason, per engine layer")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(_savefig(fig, out / "savings_by_reason.png"))
    plt.close(fig)

    if all(s.cycles is not None for s in res.layers):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        xs = np.arange(len(names))
        ax.bar(xs - 0.2, [s.dense_cycles for s in res.layers], 0.4, label="dense layers")
        ax.bar(xs + 0.2, [s.cycles for s in res.layers], 0.4, label="this engine (simulated)")
        ax.set_xticks(xs, names)
        ax.set_ylabel("cycles")
        ax.set_title("cycles per engine layer")
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(_savefig(fig, out / "cycles.png"))
        plt.close(fig)
    return paths


def _savefig(fig, path: Path) -> Path:
    import io
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _write_markdown(path, summary, rows, plots):
    lines = [
        f"# skipconv demo: {summary['model']} on MNIST",
        "",
        f"- engine: lanes = {summary['config']['lanes']}, g = {summary['config']['g']}, "
        f"features = {', '.join(summary['config']['features'])}",
        f"- device: {summary['device']}",
        f"- skip configuration: {summary['configuration']}",
        f"- {summary['images']} real MNIST test images through the engine layers: "
        + ("bit-exact against the golden model" if summary["bit_exact"]
           else f"**mismatch**: {summary['mismatch']}"),
        f"- top-1 on the test split: float {100 * summary['float_top1']:.1f}%, int8 dense "
        f"{100 * summary['int8_dense_top1']:.1f}%, int8 with skipping "
        f"{100 * summary['int8_skip_top1']:.1f}%",
        f"- wall time: {summary['wall_s']} s",
        "",
        "## Per engine layer (summed over the images)",
        "",
        _markdown_table(rows),
        "",
        "tiles: engine passes (a layer larger than the engine's buffers runs as row bands and "
        "channel groups, bit-identical to the whole layer). "
        + ("Dense-engine cycles are measured: the same images through the same engine with the "
         "layers dense (no plan, no early termination). " if summary["dense_cycles"] == "measured"
         else "Dense-engine cycles are ideal: every position takes ceil(T/g) steps, spread "
              "evenly over the lanes. ")
        + "skip_to_cycle = cycle saving / MAC saving (the project's goal: >= 90%).",
        "",
    ]
    for p in plots:
        lines += [f"![{p.stem}]({p.name})", ""]
    atomic_write_bytes(path, "\n".join(lines).encode())
