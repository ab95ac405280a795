"""``skipconv golden CASE.npz [--g N] -o RESULT.npz``: run one case file on the golden model."""

from __future__ import annotations

import sys

HELP = "run one layer case file (docs/semantics.md section 7) on the NumPy golden model"


def add_arguments(parser):
    parser.add_argument("case", help="case file (.npz with x, w, b, ... as semantics.md section 7)")
    parser.add_argument("--g", type=int, default=1, metavar="N",
                        help="MACs per PE per step, as the engine's g (default 1)")
    parser.add_argument("-o", "--output", required=True, metavar="RESULT.npz",
                        help="where to write the result (out, macs, counters)")


def run(args) -> int:
    from .golden import run as golden_run
    from .layer import LayerError, load_case

    try:
        layer, x = load_case(args.case)
        result = golden_run(layer, x, g=args.g)
    except (LayerError, FileNotFoundError) as e:
        print(f"skipconv golden: {args.case}: {e}", file=sys.stderr)
        return 2
    result.to_npz(args.output)
    acct = result.accounting()
    skipped = ", ".join(f"{k} {acct[k]}" for k in ("velcro", "perforation", "zero_pred",
                                                    "early_term"))
    print(f"{layer.out_shape[0]}x{layer.out_shape[1]}x{layer.out_shape[2]} outputs; "
          f"MACs dense {acct['dense']}, performed {acct['performed']} "
          f"({acct['performed'] / max(acct['dense'], 1):.1%}); skipped: {skipped}")
    print(f"wrote {args.output}")
    return 0
