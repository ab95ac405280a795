"""``skipconv report DIR``: tables and plots of the method runs found under DIR.

Every folder below ``DIR`` holding a ``summary.json`` (written by ``skipconv optimize`` or
``skipconv bench methods``) is one run. The report writes into ``DIR``:

* ``report.md`` and ``report.csv``: one row per run (model, method, eps, test top-1 dense
  and configured, drop, MAC reduction and its split by reason, all by golden execution);
* ``accuracy_vs_macs.png``: test top-1 against MAC reduction per method and joint (one panel
  per model), with the search trajectories on the calibration images;
* ``spatial_correlation.png``: share of all-zero windows 1x1..5x5 per layer;
* ``variance_hist.png``: VELCRO variance tensors, all classes vs the specialized task;
* ``savings_by_reason.png``: per layer and run, skipped MACs by reason (share of dense);
* ``zero_maps.png``: zero / non-zero ofmap positions of one real test image, dense and
  configured, per layer.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from .layer import atomic_write_bytes

__all__ = ["find_runs", "write_report", "REASONS"]

REASONS = ("early_term", "zero_pred", "velcro", "perforation")
_COLORS = {"early_term": "tab:blue", "zero_pred": "tab:orange", "velcro": "tab:green",
           "perforation": "tab:red"}
_METHOD_ORDER = ("snapea", "zero_pred", "velcro", "perforation", "joint")


def find_runs(root) -> list[dict]:
    """Every run under ``root``: its summary plus ``path`` (sorted by model, method, eps)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"report folder {str(root)!r} does not exist")
    runs = []
    for f in sorted(root.rglob("summary.json")):
        s = json.loads(f.read_text())
        s["path"] = f.parent
        runs.append(s)
    key = {m: i for i, m in enumerate(_METHOD_ORDER)}
    runs.sort(key=lambda s: (s["model"], key.get(s["method"], 99), s["eps"], str(s["path"])))
    return runs


def _label(s) -> str:
    tag = s["method"]
    info = s.get("info", {})
    if s["method"] == "velcro" and info.get("classes"):
        tag += "{" + ",".join(map(str, info["classes"])) + "}"
    if s["method"] == "perforation" and info.get("mask"):
        tag += f"/{info['mask']}"
    if s["method"] == "zero_pred" and info.get("mode"):
        tag += f"/{info['mode']}/p{info.get('p')}"
    if "retrain" in info:
        # the retrained network's result, or the search's own when retraining was not adopted
        tag += "+retrained" if info["retrain"].get("adopted") else "+retrain(not adopted)"
    return tag


def _row(s) -> dict:
    t = s["test"]
    dense = sum(c["dense"] for c in t["layers"])
    by = {r: sum(c[r] for c in t["layers"]) / dense if dense else 0.0 for r in REASONS}
    return {"model": s["model"], "run": _label(s), "eps": s["eps"],
            "test_images": s["test_images"], "acc_dense": t["acc_dense"], "acc": t["acc"],
            "drop_points": 100 * t["drop"], "mac_reduction": t["mac_reduction"],
            **{f"by_{r}": by[r] for r in REASONS}, "within_eps": t["within_eps"],
            "path": str(s["path"])}


def _table(rows) -> tuple[str, str]:
    cols = ["model", "run", "eps", "test_images", "acc_dense", "acc", "drop_points",
            "mac_reduction", *[f"by_{r}" for r in REASONS], "within_eps"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols + ["path"])
    w.writeheader()
    for r in rows:
        w.writerow(r)
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r[c]
            cells.append(f"{v:.4f}" if isinstance(v, float) else str(v))
        md.append("| " + " | ".join(cells) + " |")
    return "\n".join(md), buf.getvalue()


def _save(fig, path):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def write_report(root) -> dict:
    """Write the report files into ``root``; return their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = Path(root)
    runs = find_runs(root)
    if not runs:
        raise FileNotFoundError(f"no run (summary.json) under {str(root)!r}")
    rows = [_row(s) for s in runs]
    md_table, csv_text = _table(rows)
    files = {}
    models = sorted({s["model"] for s in runs})

    # Accuracy vs MAC reduction.
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        for s in (s for s in runs if s["model"] == model):
            lbl = _label(s)
            t = s["test"]
            ax.scatter([100 * t["mac_reduction"]], [100 * t["acc"]], s=60, label=lbl,
                       zorder=3)
            traj = s.get("trajectory") or []
            if traj:
                xs = [100 * p[1] for p in traj]
                ys = [100 * p[2] for p in traj]
                ax.plot(xs, ys, alpha=0.35, lw=1, marker=".", label=f"{lbl} (search, calib)")
        dense_acc = next(s["test"]["acc_dense"] for s in runs if s["model"] == model)
        ax.axhline(100 * dense_acc, color="grey", ls="--", lw=1, label="dense (test)")
        ax.axhline(100 * dense_acc - 1, color="grey", ls=":", lw=1, label="dense - 1 point")
        ax.set_xlabel("MAC reduction [%] (golden)")
        ax.set_ylabel("top-1 [%]")
        ax.set_title(f"{model}: accuracy vs MAC reduction")
        ax.legend(fontsize=7)
    files["accuracy_vs_macs"] = root / "accuracy_vs_macs.png"
    _save(fig, files["accuracy_vs_macs"])
    plt.close(fig)

    # Statistics from one run per model.
    stat_runs = {}
    for s in runs:
        if (s["path"] / "stats.npz").exists():
            stat_runs.setdefault(s["model"], s)
    if stat_runs:
        fig, axes = plt.subplots(1, len(stat_runs), figsize=(6 * len(stat_runs), 4),
                                 squeeze=False)
        for ax, (model, s) in zip(axes[0], stat_runs.items()):
            with np.load(s["path"] / "stats.npz") as st:
                sc = st["spatial_correlation"]
            nl, ns = sc.shape
            width = 0.8 / ns
            for j in range(ns):
                ax.bar(np.arange(nl) + j * width, 100 * np.nan_to_num(sc[:, j]), width,
                       label=f"{j + 1}x{j + 1}")
            ax.set_xticks(np.arange(nl) + 0.4 - width / 2)
            ax.set_xticklabels(s["layer_names"], rotation=30, fontsize=7)
            ax.set_ylabel("all-zero windows [%]")
            ax.set_title(f"{model}: spatial correlation (calib, dense)")
            ax.legend(fontsize=7)
        files["spatial_correlation"] = root / "spatial_correlation.png"
        _save(fig, files["spatial_correlation"])
        plt.close(fig)

        s = next(iter(stat_runs.values()))
        with np.load(s["path"] / "stats.npz") as st:
            nl = len(s["layer_names"])
            classes = st["specialized_classes"].tolist()
            fig, axes = plt.subplots(1, nl, figsize=(3.6 * nl, 3.2), squeeze=False)
            for k, ax in enumerate(axes[0]):
                va, vs = st[f"var_all_{k}"], st[f"var_specialized_{k}"]
                hi = max(float(va.max()), float(vs.max()), 1.0)
                bins = np.concatenate([[0], np.logspace(-2, np.log10(hi), 40)])
                ax.hist(va, bins=bins, alpha=0.5, label="all classes")
                ax.hist(vs, bins=bins, alpha=0.5, label=f"classes {classes}")
                ax.set_xscale("symlog", linthresh=0.01)
                ax.set_title(f"{s['model']} {s['layer_names'][k]}", fontsize=8)
                ax.set_xlabel("variance (output units^2)", fontsize=7)
                ax.legend(fontsize=6)
        files["variance_hist"] = root / "variance_hist.png"
        _save(fig, files["variance_hist"])
        plt.close(fig)

    # Savings by reason, per layer and run.
    fig, axes = plt.subplots(1, len(runs), figsize=(2.8 * len(runs) + 1, 3.6), squeeze=False,
                             sharey=True)
    for ax, s in zip(axes[0], runs):
        layers = s["test"]["layers"]
        bottom = np.zeros(len(layers))
        for r in REASONS:
            v = np.array([100 * c[r] / c["dense"] if c["dense"] else 0 for c in layers])
            ax.bar(np.arange(len(layers)), v, bottom=bottom, color=_COLORS[r], label=r)
            bottom += v
        ax.set_xticks(np.arange(len(layers)))
        ax.set_xticklabels([f"L{i}" for i in range(len(layers))], fontsize=7)
        ax.set_title(f"{s['model']}\n{_label(s)}", fontsize=8)
        ax.set_ylim(0, 100)
    axes[0][0].set_ylabel("skipped MACs [% of dense]")
    axes[0][0].legend(fontsize=6)
    files["savings_by_reason"] = root / "savings_by_reason.png"
    _save(fig, files["savings_by_reason"])
    plt.close(fig)

    # Zero maps of a real image: the joint run when present, else the first run with stats.
    zs = next((s for s in runs if s["method"] == "joint" and (s["path"] / "stats.npz").exists()),
              next(iter(stat_runs.values()), None))
    if zs is not None:
        with np.load(zs["path"] / "stats.npz") as st:
            nl = len(zs["layer_names"])
            fig, axes = plt.subplots(2, nl + 1, figsize=(3 * (nl + 1), 6), squeeze=False)
            axes[0][0].imshow(st["image"][0], cmap="gray")
            axes[0][0].set_title("input image", fontsize=8)
            axes[1][0].axis("off")
            for k in range(nl):
                for row, name in ((0, "dense"), (1, "conf")):
                    o = st[f"ofmap_{name}_{k}"]                     # (C, H, W)
                    c = min(o.shape[0], 8)
                    tiles = [np.pad((t != 0).astype(float), 1, constant_values=0.5)
                             for t in o[:c]]
                    tiles += [np.full_like(tiles[0], 0.5)] * (-len(tiles) % 4)
                    rows_ = [np.concatenate(tiles[r:r + 4], axis=1)
                             for r in range(0, len(tiles), 4)]
                    grid = np.concatenate(rows_, axis=0)            # channels, 4 per row
                    axes[row][k + 1].imshow(grid, cmap="gray", vmin=0, vmax=1)
                    frac = float((o == 0).mean())
                    axes[row][k + 1].set_title(
                        f"{zs['layer_names'][k]} {'dense' if row == 0 else _label(zs)}\n"
                        f"zeros {100 * frac:.0f}% (first {c} ch.)", fontsize=7)
                    axes[row][k + 1].axis("off")
            axes[0][0].axis("off")
        files["zero_maps"] = root / "zero_maps.png"
        _save(fig, files["zero_maps"])
        plt.close(fig)

    md = ["# skipconv methods report", "",
          f"Runs found under `{root}`: {len(runs)}. Accuracy and MACs by golden execution on "
          "the test images; MAC reduction = 1 - performed / dense over the engine layers.", "",
          md_table, ""]
    for name, path in files.items():
        md += [f"## {name.replace('_', ' ')}", "", f"![{name}]({path.name})", ""]
    files["md"] = root / "report.md"
    files["csv"] = root / "report.csv"
    atomic_write_bytes(files["md"], "\n".join(md).encode())
    atomic_write_bytes(files["csv"], csv_text.encode())
    return {k: str(v) for k, v in files.items()}
