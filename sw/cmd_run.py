"""``skipconv run PACKAGES --device ...``: run exported layers on an engine (or its models).

PACKAGES is one of:

* a network folder written by ``skipconv export`` / ``ExportedNet.save`` (``manifest.json``):
  MNIST test images run through it with the engine layers on the device;
* a folder written by ``skipconv optimize`` (``summary.json`` and ``layers/*.npz``): the zoo
  model it names, exported again (or, after ``--retrain``, the retrained network saved in
  its ``network/``), with its configured layers;
* one or more case files (``.npz`` with ``x``, docs/semantics.md section 7): each layer runs
  once on its input (``-o DIR`` writes the result files).
"""

from __future__ import annotations

HELP = "run exported or configured layers on a device (golden, sim, serial:PORT, xrt)"


def add_arguments(parser):
    parser.add_argument("packages", nargs="+", metavar="PACKAGES",
                        help="a network folder (manifest.json), an optimize folder "
                             "(summary.json + layers/) or case files (.npz with x)")
    parser.add_argument("--device", default="golden",
                        help="golden, sim, serial:PORT (e.g. serial:/dev/ttyUSB0), xrt, or "
                             "responder (the protocol's software engine) (default: golden)")
    parser.add_argument("--compare", action="store_true",
                        help="check every engine layer against the golden model and report "
                             "the first mismatch (layer, channel, position); exit 1 on one")
    parser.add_argument("--config", metavar="JSON",
                        help="engine config file (EngineConfig JSON); default: the default "
                             "preset with --lanes")
    parser.add_argument("--lanes", type=int, default=None, help="engine lanes (default: 8)")
    parser.add_argument("--images", type=int, default=100,
                        help="MNIST test images for a network (default: 100)")
    parser.add_argument("--baudrate", type=int, default=115200, help="serial line rate")
    parser.add_argument("--timeout", type=float, default=2.0,
                        help="serial: seconds of silence before a retransmission / error")
    parser.add_argument("--xclbin", default=None, help="xrt: the kernel binary "
                        "(default: $SKIPCONV_XCLBIN)")
    parser.add_argument("-o", "--out", default=None, metavar="DIR",
                        help="write results here (results.json; result .npz per case file)")
    parser.add_argument("--json", action="store_true", help="print the statistics as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _config(args):
    from .config import PRESETS, EngineConfig
    if args.config:
        from pathlib import Path
        config = EngineConfig.from_json(Path(args.config).read_text())
    else:
        config = PRESETS["default"]
    if args.lanes is not None:
        config = config.replace(lanes=args.lanes)
    return config


def _open(args, config):
    from .driver.device import open_device
    options = {}
    if args.device.startswith("serial:"):
        options = {"baudrate": args.baudrate, "timeout": args.timeout}
    elif args.device == "xrt":
        options = {"xclbin": args.xclbin}
    elif args.device == "sim":
        options = {"progress": not args.quiet}
    return open_device(args.device, config, **options)


def _run_cases(args, config, paths) -> int:
    import json
    from pathlib import Path

    from . import golden
    from .driver.offload import first_mismatch
    from .layer import load_case

    out = Path(args.out) if args.out else None
    failures = 0
    report = []
    with _open(args, config) as dev:
        for i, path in enumerate(paths):
            layer, x = load_case(path)
            r = dev.run(layer, x)
            entry = {"case": str(path), **r.accounting(), "cycles": r.cycles,
                     "positions": r.positions}
            if args.compare:
                mm = first_mismatch(i, layer.name, 0, r, golden.run(layer, x, g=config.g),
                                    getattr(dev, "trace", True))
                entry["mismatch"] = None if mm is None else str(mm)
                failures += mm is not None
            if out:
                r.to_npz(out / (Path(path).stem + ".result.npz"))
            report.append(entry)
            if not args.json:
                status = "" if not args.compare else (" bit-exact" if not entry["mismatch"]
                                                      else f" MISMATCH {entry['mismatch']}")
                print(f"{path}: dense {r.dense:,} performed {r.performed:,} cycles "
                      f"{r.cycles if r.cycles is not None else '-'}{status}")
    if args.json:
        print(json.dumps(report, indent=2))
    return 1 if failures else 0


def _network(args):
    """(net, configured layers or None, description) for a network or optimize folder."""
    import json
    from pathlib import Path

    from . import data, export
    from .layer import load

    folder = Path(args.packages[0])
    if (folder / "manifest.json").is_file():
        return export.load(folder), None, f"network {folder}"
    summary = folder / "summary.json"
    if summary.is_file():
        from . import zoo
        info = json.loads(summary.read_text())
        name = info.get("model")
        if info.get("info", {}).get("retrain", {}).get("adopted"):
            # A retrained network (zero_pred --retrain): its own weights and scales.
            net = export.load(folder / "network")
        else:
            model = zoo.get_model(name, progress=not args.quiet)
            net = export.export(model, data.mnist_split("calib").x, spec={"zoo": name})
        files = sorted((folder / "layers").glob("*.npz"))
        if len(files) != len(net.layers):
            raise SystemExit(f"skipconv run: {folder}/layers holds {len(files)} packages; "
                             f"model {name!r} has {len(net.layers)} engine layers")
        return net, [load(f) for f in files], (f"{name} configured by {info.get('method')} "
                                               f"(eps {info.get('eps')}) from {folder}")
    raise SystemExit(f"skipconv run: {folder} has neither manifest.json (an exported network) "
                     "nor summary.json (an optimize run); for single layers pass case files")


def run(args) -> int:
    import json
    from pathlib import Path

    paths = [Path(p) for p in args.packages]
    config = _config(args)
    if all(p.is_file() and p.suffix == ".npz" for p in paths):
        return _run_cases(args, config, paths)
    if len(paths) != 1 or not paths[0].is_dir():
        raise SystemExit("skipconv run: give one network folder, or case files (.npz)")

    from . import data
    from .driver.demo import format_table
    from .driver.offload import offload

    net, layers, what = _network(args)
    test = data.mnist_split("test")
    n = max(1, min(args.images, len(test)))
    with _open(args, config) as dev:
        res = offload(net, dev, test.x[:n], compare=args.compare, layers=layers,
                      progress=not args.quiet)
    top1 = res.accuracy(test.y[:n])
    summary = {"what": what, "device": dev.name, "images": n, "top1": top1,
               "layers": [s.as_dict() for s in res.layers], "totals": res.totals(),
               "compared": args.compare,
               "mismatch": None if res.mismatch is None else str(res.mismatch),
               "wall_s": round(res.wall_s, 3)}
    if args.out:
        from .layer import atomic_write_bytes
        atomic_write_bytes(Path(args.out) / "results.json",
                           json.dumps(summary, indent=2).encode())
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        table, _ = format_table(res)
        print(f"{what} on {dev.name}: {n} MNIST test images, top-1 {100 * top1:.1f}%")
        print(table)
        if args.compare:
            print("bit-exact against golden" if res.mismatch is None
                  else f"MISMATCH: {res.mismatch}")
    return 1 if res.mismatch is not None else 0
