"""The `pylium-cni` executable a container runtime finds in its CNI bin dir: a few lines
that start this Python with `-I -S` (no site-packages scan, no `.pth` hooks, no user or
environment paths) and run `pylium.cni.plugin`, which imports only the standard library.

The console script pip writes for `pylium-cni` starts the interpreter the ordinary way:
`site` then imports every `.pth` hook of the environment (an editable install has one per
distribution), which costs 20-60 ms of CPU per exec — and the runtime execs the plugin for
every pod ADD, DEL and CHECK, 20 at once when a node starts 20 pods. The launcher skips all
that and puts only the directory holding the `pylium` package on `sys.path`.

    python -m pylium.cni.launcher /opt/cni/bin     # writes /opt/cni/bin/pylium-cni
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pylium

NAME = "pylium-cni"
#: Linux reads at most this much of a `#!` line (BINPRM_BUF_SIZE, kernel 5.1+)
MAX_SHEBANG = 255


def package_root() -> Path:
    """The directory that holds the `pylium` package (site-packages, or the source tree of
    an editable install)."""
    return Path(pylium.__file__).resolve().parent.parent


def launcher_text(python: str | None = None, root: Path | None = None) -> str:
    python = python or sys.executable
    root = root or package_root()
    shebang = f"#!{python} -IS"
    if len(shebang) > MAX_SHEBANG or any(c.isspace() for c in python):
        raise ValueError(f"{python}: cannot be named in a #! line (too long or has spaces)")
    return (f"{shebang}\n"
            "# pylium-cni, written by `python -m pylium.cni.launcher`: the CNI plugin started\n"
            "# without site-packages (-I -S), so each exec costs only the stdlib it imports\n"
            "import sys\n"
            f"sys.path.insert(0, {str(root)!r})\n"
            "from pylium.cni.plugin import main\n"
            "sys.exit(main())\n")


def install(bin_dir: Path, python: str | None = None) -> Path:
    """Write the launcher into `bin_dir` atomically (a runtime never execs half a file)."""
    bin_dir = Path(bin_dir)
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / NAME
    tmp = bin_dir / f".{NAME}.tmp{os.getpid()}"
    tmp.write_text(launcher_text(python))
    tmp.chmod(0o755)
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m pylium.cni.launcher CNI_BIN_DIR", file=sys.stderr)
        return 2
    try:
        print(install(Path(args[0])))
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
