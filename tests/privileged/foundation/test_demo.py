"""`make demo` (its Python part, `python -m pylium.demo`) runs to the end and exits 0, as the
acceptance on a fresh clone asks. Privileged: the demo builds a lab of network namespaces."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def test_demo_runs_and_exits_zero():
    proc = subprocess.run([sys.executable, "-m", "pylium.demo"], capture_output=True, text=True,
                          timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
