"""``skipconv demo``: the main job (what ``make demo`` runs); see skipconv.sw.driver.demo."""

from __future__ import annotations

HELP = ("the main job: the example MNIST network, a skip configuration, the engine's "
        "layers checked bit for bit against golden, a per-layer table and a report in out/")


def add_arguments(parser):
    parser.add_argument("--model", default="lenet", help="zoo model (default: lenet)")
    parser.add_argument("--images", type=int, default=16,
                        help="test images run through the engine layers (default: 16)")
    parser.add_argument("--test-images", type=int, default=None,
                        help="test images for the accuracies (default: the whole test split, "
                             "1,000)")
    parser.add_argument("--calib-images", type=int, default=None,
                        help="calibration images for the skip-configuration search (default: "
                             "all 500)")
    parser.add_argument("--eps", type=float, default=1.0,
                        help="accuracy budget of the skip configuration, top-1 points "
                             "(default: 1.0)")
    parser.add_argument("--lanes", type=int, default=8, help="engine lanes (default: 8)")
    parser.add_argument("--device", choices=("auto", "sim", "golden"), default="auto",
                        help="where the engine layers run: the Verilator simulation (sim), "
                             "the golden model, or auto = sim when it can be built (default)")
    parser.add_argument("--method", choices=("auto", "joint", "dense"), default="auto",
                        help="skip configuration: exact early termination + diagonal zero "
                             "prediction searched per layer (auto, default), the methods' "
                             "joint search (slower), or none")
    parser.add_argument("-o", "--out", default="out/demo",
                        help="folder for report.md, results.json, layers.csv and plots "
                             "(default: out/demo)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    from .driver.demo import DemoOptions, run_demo

    if args.images < 1:
        raise SystemExit(f"skipconv demo: --images = {args.images}: must be >= 1")
    return run_demo(DemoOptions(model=args.model, images=args.images, eps=args.eps,
                                test_images=args.test_images,
                                calib_images=args.calib_images,
                                lanes=args.lanes, device=args.device, out=args.out,
                                method=args.method, progress=not args.no_progress,
                                plots=not args.no_plots))
