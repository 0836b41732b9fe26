"""The `pylium-cni` the DaemonSet installs on the node (Cilium's install-cni init container
copies its `cilium-cni` binary the same way).

The runtime execs CNI plugins on the host, outside any container, so the venv or image
script that imports pylium from site-packages cannot serve there. What is installed instead
is a launcher: a Python zip application holding just what `pylium.cni.plugin` imports (the
CNI client, pylium's document loader and errors, pure-Python PyYAML), run by the host's
Python 3 in isolated mode (`-I`: nothing from the host's site-packages or environment).
Everything else happens in the agent, over its socket. The file is written beside the
target and renamed over it, so the runtime never execs a half-written plugin."""

from __future__ import annotations

import importlib.util
import io
import os
import tempfile
import zipfile
from pathlib import Path

NAME = "pylium-cni"
DEFAULT_PYTHON = "/usr/bin/python3"
#: the modules `pylium.cni.plugin` imports, each from the installed package
MODULES = ("pylium", "pylium.errors", "pylium.documents", "pylium.cni", "pylium.cni.spec",
           "pylium.cni.plugin")
#: packages copied whole (their .py files)
PACKAGES = ("yaml",)
MAIN = ("import sys\n"
        "from pylium.cni.plugin import main\n"
        "sys.exit(main())\n")


def _module_file(name: str) -> tuple[str, Path]:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"module {name} is not installed")
    origin = Path(spec.origin)
    arcname = name.replace(".", "/") + ("/__init__.py" if origin.name == "__init__.py"
                                        else ".py")
    return arcname, origin


def launcher_bytes(python: str = DEFAULT_PYTHON) -> bytes:
    """The launcher: `#!<python> -I` and a zip of the CNI client's modules."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in MODULES:
            arcname, path = _module_file(name)
            zf.writestr(arcname, path.read_bytes())
        for package in PACKAGES:
            _, init = _module_file(package)
            for path in sorted(init.parent.glob("*.py")):
                zf.writestr(f"{package}/{path.name}", path.read_bytes())
        zf.writestr("__main__.py", MAIN)
    return f"#!{python} -I\n".encode() + buf.getvalue()


def install(bin_dir: Path, python: str = DEFAULT_PYTHON) -> Path:
    """Write the launcher into `bin_dir` as `pylium-cni` (atomically); returns its path."""
    bin_dir = Path(bin_dir)
    if not bin_dir.is_dir():
        raise FileNotFoundError(f"CNI bin directory {bin_dir} does not exist")
    target = bin_dir / NAME
    fd, tmp = tempfile.mkstemp(prefix=f".{NAME}.", dir=bin_dir)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(launcher_bytes(python))
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def is_launcher(path: Path) -> bool:
    """Whether `path` is a launcher this module wrote (a zip with the CNI client)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return {"__main__.py", "pylium/cni/plugin.py"} <= set(zf.namelist())
    except (OSError, zipfile.BadZipFile):
        return False
