"""``skipconv bench methods``: MAC reduction at <= 1 point top-1 drop, per method and joint.

For each model, each method's search runs within ``--eps`` points (SnaPEA and VELCRO on the
calibration images; zero prediction, perforation and joint rank on augmented training images
and back off on the calibration images, docs/methods.md) and the result is measured by
golden execution on the test images, which choose nothing: ``mac_reduction_at_eps1``
(1 - performed / dense MACs over the engine layers) and the top-1 accuracy. The joint
configuration is compared with the best single method (goal: >= 0.60 and >= 1.5x).
VELCRO also runs on its specialized task (classes 0, 6, 8, 9), as in the paper.
Run folders (layer packages, summaries, statistics) go to ``--out`` for ``skipconv report``.
"""

from __future__ import annotations

HELP = "method searches on the zoo: MAC reduction at <= 1 point top-1 drop (golden, test split)"

SINGLE = ("snapea", "zero_pred", "velcro", "perforation")
#: Not run by default: zero prediction, then retraining with the predictor in the forward
#: pass (``--retrain-epochs``); a retrained network, so not one of the single methods the
#: joint search is compared with.
RETRAIN = "zero_pred_retrain"
#: Not run by default: the joint search, then retraining with its configurations past the
#: back-off's choice in the forward pass and the same trajectory walked again on the
#: retrained network (``--retrain-epochs``; methods.run._joint_retrained).
JOINT_RETRAIN = "joint_retrain"


def add_arguments(parser):
    parser.add_argument("--models", default="lenet",
                        help="comma-separated zoo models (default lenet; all: "
                             "lenet,vgg_small,resnet_small)")
    parser.add_argument("--eps", type=float, default=1.0, help="top-1 budget in points")
    parser.add_argument("--out", default=None,
                        help="folder for the runs (default: the cache, methods/bench)")
    parser.add_argument("--workers", type=int, default=None, help="local worker processes")
    parser.add_argument("--calib", type=int, default=None, help="first N calibration images")
    parser.add_argument("--test", type=int, default=None, help="first N test images")
    parser.add_argument("--methods", default=",".join(SINGLE + ("joint",)),
                        help="comma-separated methods to run (also zero_pred_retrain and "
                             "joint_retrain: zero prediction / joint with retraining, not in "
                             "the default list)")
    parser.add_argument("--joint-lazy", default=None,
                        help="joint search: moves re-checked per lazy round (default "
                             "methods.run.JOINT_LAZY_K; 'full': every round evaluates all)")
    parser.add_argument("--joint-max-seconds", type=float, default=None,
                        help="joint search: start no round after this many seconds (a "
                             "deadline; default none)")
    parser.add_argument("--joint-warm", default=None, metavar="METHODS",
                        help="joint search: single methods whose configurations warm-start "
                             "it (comma-separated of snapea,velcro,perforation; 'none': from "
                             "nothing; default methods.run.JOINT_WARM)")
    parser.add_argument("--joint-cold", default=None, choices=("yes", "no"),
                        help="joint search with a warm start: also search from nothing and "
                             "keep the better chosen step on the search images (default "
                             "methods.run.JOINT_COLD: yes)")
    parser.add_argument("--joint-step-downs", type=int, default=None, metavar="N",
                        help="joint search: a warm-start seed past the guards is tried again "
                             "up to N times, one rung milder on every ladder each time "
                             "(default methods.run.JOINT_STEP_DOWNS; 0: dropped at once)")
    parser.add_argument("--retrain-epochs", type=int, default=None, metavar="N",
                        help=f"{RETRAIN}, {JOINT_RETRAIN} (--methods names): epochs of "
                             "retraining with the skips in the forward pass (defaults "
                             "methods.finetune.RETRAIN_EPOCHS, methods.run.JOINT_RETRAIN_EPOCHS)")
    parser.add_argument("--retrain-set", default=None, choices=("target", "walk"),
                        help=f"{RETRAIN}: train with the target configuration (default) or "
                             "with one per mini-batch drawn from it, the configurations "
                             "after it and the dense network (walk)")
    parser.add_argument("--retrain-lr", type=float, default=None, metavar="LR",
                        help=f"{RETRAIN}, {JOINT_RETRAIN}: AdamW learning rate of the "
                             "retraining (defaults: methods.finetune.RETRAIN_LR, "
                             "methods.run.JOINT_RETRAIN_LR)")
    parser.add_argument("--retrain-distill", type=float, default=None, metavar="F",
                        help=f"{JOINT_RETRAIN}: share of the retraining loss distilled from the "
                             "original network's outputs, in [0, 1) (default "
                             "methods.run.JOINT_RETRAIN_DISTILL)")
    parser.add_argument("--retrain-continue", default=None, choices=("yes", "no"),
                        help=f"{JOINT_RETRAIN}: continue the greedy search on the retrained "
                             "network (default methods.run.JOINT_RETRAIN_CONTINUE: no)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args) -> dict:
    from pathlib import Path

    from .methods.executor import default_executor
    from .methods.run import SPECIALIZED, load_network, optimize_model
    from .paths import cache_dir

    out = Path(args.out) if args.out else cache_dir("methods", "bench")
    eps = args.eps / 100.0
    methods = [m for m in args.methods.split(",") if m]
    if args.retrain_epochs is not None and args.retrain_epochs < 1:
        raise SystemExit(f"skipconv bench methods: --retrain-epochs {args.retrain_epochs}: "
                         "must be >= 1")
    if args.retrain_lr is not None and not args.retrain_lr > 0:
        raise SystemExit(f"skipconv bench methods: --retrain-lr {args.retrain_lr}: must be > 0")
    if args.retrain_distill is not None and not 0 <= args.retrain_distill < 1:
        raise SystemExit(f"skipconv bench methods: --retrain-distill {args.retrain_distill}: "
                         "must be in [0, 1)")
    if args.joint_step_downs is not None and args.joint_step_downs < 0:
        raise SystemExit(f"skipconv bench methods: --joint-step-downs {args.joint_step_downs}: "
                         "must be >= 0")
    figures = {"eps_points": args.eps}
    with default_executor(args.workers) as ex:
        for model in [m for m in args.models.split(",") if m]:
            loaded = load_network(model, progress=not args.quiet)
            res = {}
            for method in methods:
                opts, run_method = None, method
                if method == RETRAIN:
                    from .methods.finetune import RETRAIN_EPOCHS
                    run_method = "zero_pred"
                    opts = {"retrain": args.retrain_epochs or RETRAIN_EPOCHS}
                    if args.retrain_set:
                        opts["retrain_set"] = args.retrain_set
                    if args.retrain_lr is not None:
                        opts["retrain_lr"] = args.retrain_lr
                elif method in ("joint", JOINT_RETRAIN):
                    opts = {k: v for k, v in (("lazy_k", args.joint_lazy),
                                              ("max_seconds", args.joint_max_seconds),
                                              ("warm", args.joint_warm),
                                              ("cold", args.joint_cold),
                                              ("step_downs", args.joint_step_downs))
                            if v is not None}
                    if method == JOINT_RETRAIN:
                        from .methods.run import JOINT_RETRAIN_EPOCHS
                        run_method = "joint"
                        opts["retrain"] = args.retrain_epochs or JOINT_RETRAIN_EPOCHS
                        opts.update({k: v for k, v in (
                            ("retrain_lr", args.retrain_lr),
                            ("retrain_distill", args.retrain_distill),
                            ("retrain_continue", args.retrain_continue)) if v is not None})
                s = optimize_model(model, run_method, eps, out / model / method, executor=ex,
                                   calib_n=args.calib, test_n=args.test, loaded=loaded,
                                   progress=not args.quiet, options=opts)
                t = s["test"]
                res[method] = {"mac_reduction_at_eps1": round(t["mac_reduction"], 4),
                               "acc": round(t["acc"], 4), "acc_dense": round(t["acc_dense"], 4),
                               "drop_points": round(100 * t["drop"], 2),
                               "within_eps": t["within_eps"], "seconds": s["seconds"]}
                if method == RETRAIN:
                    rt = s["info"]["retrain"]
                    res[method].update(
                        retrained=rt["adopted"], retrain_epochs=rt["epochs"],
                        retrain_set=rt.get("retrain_set"),
                        retrain_seconds=rt.get("seconds"),
                        dense_drop_calib_points=round(100 * rt["dense_drop_calib"], 2)
                        if "dense_drop_calib" in rt else None)
                if method == JOINT_RETRAIN:
                    rt = s["info"]["retrain"]
                    res[method].update(
                        retrained=rt["adopted"], retrain_epochs=rt["epochs"],
                        retrain_lr=rt["lr"], retrain_distill=rt["distill"],
                        retrain_seconds=rt.get("seconds"), chosen_step=s["info"]["chosen_step"],
                        retrained_step=rt.get("chosen"),
                        continued=rt.get("continued", {}).get("chosen_step"),
                        dense_drop_calib_points=round(100 * rt["dense_drop_calib"], 2))
                    if "test_without" in rt:
                        w = rt["test_without"]
                        res[method]["without_retraining"] = {
                            "mac_reduction_at_eps1": round(w["mac_reduction"], 4),
                            "acc": round(w["acc"], 4), "drop_points": round(100 * w["drop"], 2),
                            "within_eps": w["within_eps"]}
                if method in ("joint", JOINT_RETRAIN):
                    res[method]["evaluations"] = s["info"].get("evaluations")
                    res[method]["stop"] = s["info"].get("stop")
                    warm = s["info"].get("warm") or {}
                    res[method]["warm_start"] = warm.get("chosen")
                    res[method]["kept"] = warm.get("kept")
                    res[method]["chosen_step"] = s["info"].get("chosen_step")
                    res[method]["steps"] = s["info"].get("steps")
            if "velcro" in methods:
                s = optimize_model(model, "velcro", 0.0, out / model / "velcro_specialized",
                                   executor=ex, calib_n=args.calib, test_n=args.test,
                                   classes=SPECIALIZED, loaded=loaded, progress=not args.quiet)
                t = s["test"]
                res["velcro_specialized"] = {
                    "classes": list(SPECIALIZED), "eps_points": 0.0,
                    "mac_reduction": round(t["mac_reduction"], 4),
                    "C_formula": round(s["info"]["C_formula"], 4), "acc": round(t["acc"], 4),
                    "acc_dense": round(t["acc_dense"], 4), "within_eps": t["within_eps"]}
            singles = [res[m]["mac_reduction_at_eps1"] for m in SINGLE
                       if m in res and res[m]["within_eps"]]
            for jm in ("joint", JOINT_RETRAIN):
                if jm in res and singles:
                    best = max(singles)
                    j = res[jm]
                    sfx = "" if jm == "joint" else "_retrain"
                    res["joint_over_best_single" + sfx] = round(
                        j["mac_reduction_at_eps1"] / best, 3) if best > 0 else None
                    res["goal_met" + sfx] = bool(j["within_eps"]
                                                 and j["mac_reduction_at_eps1"] >= 0.60
                                                 and best > 0
                                                 and j["mac_reduction_at_eps1"] >= 1.5 * best)
            figures[model] = res
    figures["out"] = str(out)
    return figures
