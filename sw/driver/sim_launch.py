"""Start the simulator process of the ``sim`` backend (run as ``python -m``; see sim_backend).

Reads the launch file written by :func:`skipconv.sw.driver.sim_backend.open_sim` and runs
:mod:`skipconv.sw.driver.sim_server` as the cocotb test of the cached build, through
:func:`skipconv.sim.runner.run_bench` (one simulator process for the whole session).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    from skipconv.sim import runner
    from skipconv.sw.config import EngineConfig

    argv = sys.argv[1:] if argv is None else argv
    job = json.loads(Path(argv[0]).read_text())
    config = EngineConfig.from_dict(job["config"])
    build = runner.SimBuild(config, "verilator", Path(job["build_dir"]), Path(job["verilog"]))
    try:
        runner.run_bench(build, "skipconv.sw.driver.sim_server", {"port": job["port"], "bulk": job.get("bulk", True)},
                         workdir=Path(job["workdir"]))
    except runner.SimError as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
