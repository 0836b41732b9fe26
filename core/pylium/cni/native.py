"""Build the native `pylium-cni` transport (`native/pylium-cni.c`) with the machine's C
compiler: no interpreter start per exec, which is most of what a Python `pylium-cni` costs
(`make setup` builds it; `pylium.cni.launcher` installs it when there is one).

The versions it answers VERSION with, the default socket, the route and the exit-code header
are passed from `pylium.cni.spec`/`handler` as -D flags: the C file has no copy of them.
Linked statically when the C library allows (a node's libc may differ from this one's).

    python -m pylium.cni.native [OUT]      # writes OUT (default: BUILT, in the package)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from pylium.cni import handler, spec

SOURCE = Path(__file__).resolve().parent / "native" / "pylium-cni.c"
#: where `make setup` (and the agent image's build) put the build, next to its source in the
#: package: `launcher` installs it from there
BUILT = SOURCE.with_name("pylium-cni")
COMPILERS = ("cc", "gcc", "clang")


class BuildError(RuntimeError):
    """The native transport could not be built here."""


def compiler() -> str | None:
    for name in COMPILERS:
        if path := shutil.which(name):
            return path
    return None


def _c_string(text: str) -> str:
    if any(c in text for c in '"\\\n') or not text.isascii():
        raise BuildError(f"{text!r} cannot be passed as a C string")
    return f'"{text}"'


def defines(default_socket: str = handler.DEFAULT_SOCKET) -> list[str]:
    return [f"-DPYLIUM_CNI_VERSIONS={','.join(map(_c_string, spec.SUPPORTED_VERSIONS))}",
            f"-DPYLIUM_CNI_SOCKET={_c_string(default_socket)}",
            f"-DPYLIUM_CNI_ROUTE={_c_string(handler.ROUTE)}",
            f"-DPYLIUM_CNI_EXIT_HEADER={_c_string(handler.EXIT_HEADER)}"]


def build(out: Path, cc: str | None = None,
          default_socket: str = handler.DEFAULT_SOCKET) -> Path:
    """Compile the transport into `out` atomically (static when possible). It sends a
    config that names no usable socket to `default_socket` (the agent's default; tests point
    it at their lab agent, so that agent reports what is wrong with such configs)."""
    cc = cc or compiler()
    if cc is None:
        raise BuildError("no C compiler (cc, gcc or clang) found")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    base = [cc, "-O2", "-std=c11", "-Wall", "-Wextra", *defines(default_socket), str(SOURCE), "-o", str(tmp)]
    errors = ""
    try:
        for extra in (["-static"], []):
            proc = subprocess.run([*base, *extra], capture_output=True, text=True, check=False)
            if proc.returncode == 0:
                tmp.chmod(0o755)
                os.replace(tmp, out)
                return out
            errors = proc.stderr.strip()
    finally:
        tmp.unlink(missing_ok=True)
    raise BuildError(f"{cc} failed: {errors[-400:]}")


def prebuilt() -> Path | None:
    """The transport built for this install (`BUILT`), if there is one newer than what it
    is built from (the C source and the values passed from spec/handler)."""
    inputs = (SOURCE, Path(__file__), Path(spec.__file__), Path(handler.__file__))
    try:
        newest = max(p.stat().st_mtime for p in inputs)
        if BUILT.stat().st_mtime >= newest and os.access(BUILT, os.X_OK):
            return BUILT
    except OSError:
        pass
    return None


def is_native(path: Path) -> bool:
    """Whether `path` is a build of the native transport (an ELF naming our route)."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return False
    return data.startswith(b"\x7fELF") and handler.ROUTE.encode() in data \
        and handler.EXIT_HEADER.encode() in data


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1 or (args and args[0].startswith("-")):
        print("usage: python -m pylium.cni.native [OUT]", file=sys.stderr)
        return 2
    try:
        print(build(Path(args[0]) if args else BUILT))
    except (BuildError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
