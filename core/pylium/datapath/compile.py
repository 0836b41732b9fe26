"""Compile BPF C sources with clang into ELF objects, cached by a hash of the sources, the
defines and the clang version."""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path

from pylium.datapath.libbpf import DatapathError

CLANG = os.environ.get("PYLIUM_CLANG", "clang")
BASE_FLAGS = ("-O2", "-g", "-target", "bpf", "-I/usr/include/x86_64-linux-gnu", "-Wall",
              "-Werror")


def bpf_source_dir() -> Path:
    """`bpf/` of the checkout, or the copy installed as package data (`pylium/bpf`)."""
    installed = Path(str(resources.files("pylium"))) / "bpf"
    if (installed / "bpf_lxc.c").is_file():
        return installed.resolve()
    checkout = Path(__file__).resolve().parents[3] / "bpf"
    if (checkout / "bpf_lxc.c").is_file():
        return checkout
    raise DatapathError(f"BPF sources not found (looked in {installed} and {checkout})")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pylium" / "bpf"


@functools.lru_cache(maxsize=1)
def clang_version() -> str:
    if shutil.which(CLANG) is None:
        raise DatapathError(f"{CLANG} not found: install clang (apt-get install clang)")
    return subprocess.run([CLANG, "--version"], capture_output=True, text=True,
                          check=True).stdout.splitlines()[0]


def _sources_digest(src_dir: Path) -> hashlib._Hash:
    digest = hashlib.sha256()
    for path in sorted(p for p in src_dir.rglob("*") if p.suffix in (".c", ".h")):
        digest.update(str(path.relative_to(src_dir)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest


def compile_object(source: Path, defines: Mapping[str, object] | None = None,
                   cache_dir: Path | None = None, include_dirs: Iterable[Path] = ()) -> Path:
    """Compile the C file `source` and return the cached object's path.

    The core's `bpf/` is always on the include path (a plugin's program includes the core's
    `lib/*.h`, so both see one definition of the shared maps). The cache key covers every
    `.c`/`.h` beside `source` and in each include dir, the defines and the clang version."""
    source = Path(source)
    if not source.is_absolute():
        raise DatapathError(f"BPF source {source}: expected an absolute path")
    if not source.is_file():
        raise DatapathError(f"BPF source {source} not found")
    cache_dir = cache_dir or default_cache_dir()
    includes: list[Path] = []
    for inc in (*include_dirs, bpf_source_dir()):
        inc = Path(inc).resolve()
        if inc not in includes:
            includes.append(inc)
    define_args = [f"-D{k}={v}" for k, v in sorted((defines or {}).items())]
    digest = _sources_digest(source.parent)
    for inc in includes:
        if inc != source.parent.resolve():
            digest.update(_sources_digest(inc).digest())
    digest.update(source.name.encode() + b"\0" + "\0".join(define_args).encode() + b"\0")
    digest.update(clang_version().encode())
    obj = cache_dir / f"{source.stem}-{digest.hexdigest()[:32]}.o"
    if obj.is_file():
        return obj
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".o.tmp")
    os.close(fd)
    cmd = [CLANG, *BASE_FLAGS, *define_args, *(f"-I{p}" for p in includes),
           "-c", str(source), "-o", tmp]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        Path(tmp).unlink(missing_ok=True)
        raise DatapathError(f"compiling {source.name} failed:\n{proc.stderr.strip()}")
    os.replace(tmp, obj)  # atomic: concurrent compilers never see a half-written object
    return obj
