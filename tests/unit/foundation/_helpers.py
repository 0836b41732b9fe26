"""Helpers for foundation tests (this directory is a package so its module names cannot
collide with other test directories): throwaway plugin distributions made of a module plus a
`*.dist-info` (METADATA + entry_points.txt) in a temp dir on the path. `importlib.metadata`
discovers them exactly as it discovers a pip-installed plugin, with no pip run."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
PYLIUM = Path(sys.executable).with_name("pylium")


class FakeSite:
    """A directory of fake installed distributions."""

    def __init__(self, root: Path):
        self.root = root
        self.modules: list[str] = []

    def add(self, dist: str, source: str, entry: str | None = None, version: str = "1.0",
            module: str | None = None) -> str:
        """Install `source` as a module of distribution `dist`, registered in the `pylium`
        entry-point group under `entry` (default: a unique name). Returns the entry name."""
        module = module or f"fakeplug_{uuid.uuid4().hex[:8]}"
        entry = entry or module
        (self.root / f"{module}.py").write_text(textwrap.dedent(source))
        info = self.root / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text(f"[pylium]\n{entry} = {module}\n")
        self.modules.append(module)
        return entry


def run_pylium(*args: str, env: dict | None = None, timeout: float = 60,
               pythonpath: list[Path] = ()) -> subprocess.CompletedProcess:
    """Run the `pylium` CLI in a subprocess, as a user would."""
    full_env = {k: v for k, v in os.environ.items()
                if (not k.startswith("PYLIUM_") or k == "PYLIUM_BPFFS_ROOT") and k != "PYTHONPATH"}
    if pythonpath:
        full_env["PYTHONPATH"] = os.pathsep.join(str(p) for p in pythonpath)
    full_env.update(env or {})
    return subprocess.run([str(PYLIUM), *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """The CLI failed with `code`, printed one `Error:` line naming `needles`, no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]
