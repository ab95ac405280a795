"""``skipconv optimize MODEL --method M --eps E -o DIR``: configure a zoo model's skip methods."""

from __future__ import annotations

HELP = "search a skip-method configuration for a zoo model within an accuracy budget"

_METHODS = ("zero_pred", "snapea", "velcro", "perforation", "joint")


def _classes(text):
    import argparse
    try:
        out = tuple(sorted({int(v) for v in text.split(",") if v.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--classes {text!r}: expected digits like 0,6,8,9")
    if not out or any(not 0 <= c <= 9 for c in out):
        raise argparse.ArgumentTypeError(f"--classes {text!r}: expected digits 0..9")
    return out


def add_arguments(parser):
    parser.add_argument("model", help="zoo model: lenet, vgg_small or resnet_small")
    parser.add_argument("--method", required=True, choices=_METHODS,
                        help="which method's search to run (joint combines all four)")
    parser.add_argument("--eps", type=float, default=1.0,
                        help="allowed top-1 drop in points (default 1.0 = one point)")
    parser.add_argument("-o", "--out", required=True, metavar="DIR",
                        help="output folder: layers/*.npz, summary.json, stats.npz")
    parser.add_argument("--g", type=int, default=1, help="engine MACs per PE per cycle")
    parser.add_argument("--workers", type=int, default=None,
                        help="local worker processes for candidate evaluations (default 2; "
                             "1 = in this process)")
    parser.add_argument("--calib", type=int, default=None, help="use the first N calibration images")
    parser.add_argument("--test", type=int, default=None, help="use the first N test images")
    parser.add_argument("--classes", type=_classes, default=None,
                        help="VELCRO specialized task, e.g. 0,6,8,9 (default: all classes)")
    parser.add_argument("--mode", default="uniform_layer",
                        choices=("uniform_layer", "uniform_filter", "uniform_patch",
                                 "max_granularity"), help="zero_pred optimizer mode")
    parser.add_argument("--p", type=int, default=2, help="zero_pred window size (2..8)")
    parser.add_argument("--ones-range", default=None, metavar="LO,HI",
                        help="zero_pred: number of leaders per window, e.g. 1,2")
    parser.add_argument("--gt", type=int, default=2, help="zero_pred granularity (windows per cluster side)")
    parser.add_argument("--mask", default="impact", choices=("uniform", "grid", "pooling", "impact"),
                        help="perforation mask type")
    parser.add_argument("--joint-search", default="augmented",
                        choices=("augmented", "train", "calib"),
                        help="joint: rank moves by NLL on augmented copies of training images "
                             "and back off on the calibration images (augmented, default), "
                             "the same by margin loss on the training images themselves "
                             "(train), or search on the calibration images alone (calib)")
    parser.add_argument("--joint-warm", default=None, metavar="METHODS",
                        help="joint (augmented or train search): single methods whose "
                             "configurations, expressed in the joint ladders, warm-start the "
                             "search (comma-separated of snapea,velcro,perforation; the best "
                             "of each alone and their unions within the guards is step 0; "
                             "'none': start from nothing; default all three)")
    parser.add_argument("--search", default="augmented", choices=("augmented", "calib"),
                        help="zero_pred, perforation: rank candidates on augmented copies of "
                             "training images with eps * 3 there and back off on the "
                             "calibration images (augmented, default), or search on the "
                             "calibration images alone with eps * 0.5 (calib, the former "
                             "search)")
    parser.add_argument("--search-images", type=int, default=None, metavar="N",
                        help="joint, zero_pred, perforation: training images the search ranks "
                             "on (default 1000)")
    parser.add_argument("--val-margin", type=float, default=None, metavar="F",
                        help="joint, zero_pred, perforation: share of eps the back-off allows "
                             "on the calibration images (default 0.5)")
    parser.add_argument("--retrain", type=int, default=None, metavar="EPOCHS",
                        help="zero_pred, joint: after the search, retrain the float model for EPOCHS "
                             "epochs on the training images with the predictor in the forward "
                             "pass (the layer pass's most aggressive configuration within the "
                             "search budget; predictor not trained), export it again and "
                             "walk the layer pass again on it with the same guards; drops "
                             "against the original dense network (joint: with the trajectory's "
                             "steps past the back-off's choice, all four methods emulated, "
                             "then those steps walked again; e.g. 4; default: none)")
    parser.add_argument("--retrain-lr", type=float, default=None, metavar="LR",
                        help="--retrain: AdamW learning rate, cosine decay to 0 "
                             "(default 1e-4; joint 3e-4)")
    parser.add_argument("--retrain-distill", type=float, default=None, metavar="F",
                        help="joint --retrain: share of the loss distilled from the original "
                             "network's outputs, in [0, 1) (default 0.5)")
    parser.add_argument("--retrain-continue", default=None, choices=("yes", "no"),
                        help="joint --retrain: continue the greedy search on the retrained "
                             "network from the last step within the guards (default no)")
    parser.add_argument("--retrain-set", default=None, choices=("target", "walk"),
                        help="zero_pred --retrain: train with that one configuration "
                             "(target, default) or, per mini-batch, one drawn from it, the "
                             "layer-pass configurations after it and the dense network (walk)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args) -> int:
    import json
    import sys

    if not 0 <= args.eps < 100:
        print(f"skipconv optimize: --eps {args.eps}: must be in 0..100 points", file=sys.stderr)
        return 2

    from .methods.executor import default_executor
    from .methods.run import optimize_model
    options = {"mode": args.mode, "p": args.p, "gt": args.gt, "mask": args.mask}
    if args.method in ("joint", "zero_pred", "perforation"):
        options["search"] = args.joint_search if args.method == "joint" else args.search
        for name in ("search_images", "val_margin"):
            v = getattr(args, name)
            if v is not None:
                if not v > 0:
                    print(f"skipconv optimize: --{name.replace('_', '-')} {v}: must be > 0",
                          file=sys.stderr)
                    return 2
                options[name] = v
    if args.joint_warm is not None:
        if args.method != "joint":
            print(f"skipconv optimize: --joint-warm: only with --method joint "
                  f"(--method {args.method})", file=sys.stderr)
            return 2
        options["warm"] = args.joint_warm
    if (args.retrain is not None or args.retrain_lr is not None or args.retrain_set
            or args.retrain_distill is not None or args.retrain_continue is not None):
        for name in ("retrain_distill", "retrain_continue"):
            if getattr(args, name) is not None and args.method != "joint":
                print(f"skipconv optimize: --{name.replace('_', '-')}: only with --method joint",
                      file=sys.stderr)
                return 2
        if args.retrain_set and args.method != "zero_pred":
            print("skipconv optimize: --retrain-set: only with --method zero_pred",
                  file=sys.stderr)
            return 2
        if args.method not in ("zero_pred", "joint"):
            print(f"skipconv optimize: --retrain / --retrain-lr: only with --method zero_pred "
                  f"or joint (--method {args.method})", file=sys.stderr)
            return 2
        if args.retrain_distill is not None:
            if not 0 <= args.retrain_distill < 1:
                print(f"skipconv optimize: --retrain-distill {args.retrain_distill}: must be "
                      "in [0, 1)", file=sys.stderr)
                return 2
            options["retrain_distill"] = args.retrain_distill
        if args.retrain_continue is not None:
            options["retrain_continue"] = args.retrain_continue
        if args.retrain is None:
            given = [f"--{n.replace('_', '-')}" for n in
                     ("retrain_lr", "retrain_set", "retrain_distill", "retrain_continue")
                     if getattr(args, n) is not None]
            print(f"skipconv optimize: {' '.join(given)}: needs --retrain EPOCHS",
                  file=sys.stderr)
            return 2
        if args.retrain < 1:
            print(f"skipconv optimize: --retrain {args.retrain}: must be a number of epochs "
                  ">= 1", file=sys.stderr)
            return 2
        options["retrain"] = args.retrain
        if args.retrain_set:
            options["retrain_set"] = args.retrain_set
        if args.retrain_lr is not None:
            if not args.retrain_lr > 0:
                print(f"skipconv optimize: --retrain-lr {args.retrain_lr}: must be > 0",
                      file=sys.stderr)
                return 2
            options["retrain_lr"] = args.retrain_lr
    if args.ones_range:
        lo, hi = (int(v) for v in args.ones_range.split(","))
        options["ones_range"] = (lo, hi)
    with default_executor(args.workers) as ex:
        s = optimize_model(args.model, args.method, args.eps / 100.0, args.out, g=args.g,
                           executor=ex, calib_n=args.calib, test_n=args.test,
                           classes=args.classes, progress=not args.quiet, options=options)
    t = s["test"]
    print(json.dumps({"model": s["model"], "method": s["method"], "eps_points": args.eps,
                      "acc_dense": t["acc_dense"], "acc": t["acc"],
                      "drop_points": 100 * t["drop"], "mac_reduction": t["mac_reduction"],
                      "within_eps": t["within_eps"],
                      **({"retrained": s["info"]["retrain"]["adopted"]}
                         if "retrain" in s["info"] else {}),
                      "out": str(args.out)}, indent=2))
    return 0 if t["within_eps"] else 1
