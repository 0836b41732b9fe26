"""The `pylium-cni` executable a container runtime finds in its CNI bin dir: the native
transport (`pylium.cni.native`, a static C program that only carries the invocation to the
agent) wherever one is built or a C compiler can build it; otherwise a few lines that start
this Python with `-I -S` (no site-packages scan, no `.pth` hooks, no user or
environment paths) and run `pylium.cni.plugin`, which imports only the standard library.

The console script pip writes for `pylium-cni` starts the interpreter the ordinary way:
`site` then imports every `.pth` hook of the environment (an editable install has one per
distribution), which costs 20-60 ms of CPU per exec — and the runtime execs the plugin for
every pod ADD, DEL and CHECK, 20 at once when a node starts 20 pods. The launcher skips all
that and puts only the directory holding the `pylium` package on `sys.path`.

Where the plugin runs on a host that has no pylium installed (a Kubernetes node, written by
the DaemonSet's install-cni init container, as Cilium's copies `cilium-cni`), the launcher is
a *bundle* instead: a Python zip application holding just the modules the plugin's entry
path imports, run by the host's own Python 3 with `-I -S`.

    python -m pylium.cni.launcher /opt/cni/bin     # writes /opt/cni/bin/pylium-cni
    python -m pylium.cni.launcher --python DIR     # the Python launcher even with a compiler
"""

from __future__ import annotations

import importlib.util
import io
import os
import sys
import zipfile
from pathlib import Path

import pylium

NAME = "pylium-cni"
#: Linux reads at most this much of a `#!` line (BINPRM_BUF_SIZE, kernel 5.1+)
MAX_SHEBANG = 255
#: the host Python a bundle names when none is given
HOST_PYTHON = "/usr/bin/python3"
#: every module the plugin's entry path imports beyond the standard library (a test checks
#: the list against a real import)
BUNDLED_MODULES = ("pylium", "pylium.errors", "pylium.boundedjson", "pylium.cni",
                   "pylium.cni.spec", "pylium.cni.handler", "pylium.cni.plugin")
_BUNDLE_MAIN = "import sys\nfrom pylium.cni.plugin import main\nsys.exit(main())\n"


def package_root() -> Path:
    """The directory that holds the `pylium` package (site-packages, or the source tree of
    an editable install)."""
    return Path(pylium.__file__).resolve().parent.parent


def _shebang(python: str) -> str:
    shebang = f"#!{python} -IS"
    if len(shebang) > MAX_SHEBANG or any(c.isspace() for c in python):
        raise ValueError(f"{python}: cannot be named in a #! line (too long or has spaces)")
    return shebang


def launcher_text(python: str | None = None, root: Path | None = None) -> str:
    python = python or sys.executable
    root = root or package_root()
    return (f"{_shebang(python)}\n"
            "# pylium-cni, written by `python -m pylium.cni.launcher`: the CNI plugin started\n"
            "# without site-packages (-I -S), so each exec costs only the stdlib it imports\n"
            "import sys\n"
            f"sys.path.insert(0, {str(root)!r})\n"
            "from pylium.cni.plugin import main\n"
            "sys.exit(main())\n")


def bundle_bytes(python: str = HOST_PYTHON) -> bytes:
    """The bundle: `#!<python> -IS` and a zip of the plugin's modules, from this install."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in BUNDLED_MODULES:
            spec = importlib.util.find_spec(name)
            if spec is None or spec.origin is None:
                raise FileNotFoundError(f"module {name} is not installed")
            origin = Path(spec.origin)
            arcname = name.replace(".", "/") + ("/__init__.py" if origin.name == "__init__.py"
                                                else ".py")
            zf.writestr(arcname, origin.read_bytes())
        zf.writestr("__main__.py", _BUNDLE_MAIN)
    return f"{_shebang(python)}\n".encode() + buf.getvalue()


def is_bundle(path: Path) -> bool:
    """Whether `path` is a bundle this module wrote (a zip with the CNI plugin)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return {"__main__.py", "pylium/cni/plugin.py"} <= set(zf.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def install(bin_dir: Path, python: str | None = None, bundle: bool = False,
            native: bool | None = None) -> Path:
    """Write `pylium-cni` into `bin_dir` atomically (a runtime never execs half a file):
    the native transport when `native` (None: when one is built or can be built here),
    else the launcher, or with `bundle` the self-contained bundle run by `python` (default
    the host's /usr/bin/python3)."""
    from pylium.cni import native as native_build

    bin_dir = Path(bin_dir)
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / NAME
    if native is not False:
        built = native_build.prebuilt()
        if built is not None:
            return _write(path, built.read_bytes())
        if native or native_build.compiler():
            try:
                return native_build.build(path)
            except native_build.BuildError:
                if native:
                    raise
    content = (bundle_bytes(python or HOST_PYTHON) if bundle
               else launcher_text(python).encode())
    return _write(path, content)


def _write(path: Path, content: bytes) -> Path:
    bin_dir = path.parent
    tmp = bin_dir / f".{NAME}.tmp{os.getpid()}"
    try:
        tmp.write_bytes(content)
        tmp.chmod(0o755)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    native = None
    if args[:1] == ["--python"]:
        native, args = False, args[1:]
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m pylium.cni.launcher [--python] CNI_BIN_DIR", file=sys.stderr)
        return 2
    try:
        print(install(Path(args[0]), native=native))
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
