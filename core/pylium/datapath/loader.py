"""The one way pylium turns BPF C into loaded programs: the core's endpoint object and
every plugin's object go through `load_object`.

A plugin ships its C sources as package data; they `#include "lib/..."` from the core's
`bpf/` (always on the include path), so they see the same map definitions. Every map named
in `pinned_maps` is bound to its pin under `pin_root`: the first loader creates and pins
it, later ones (a restarted agent, a plugin's object) adopt it, so plugin programs read and
write the very maps the endpoint programs use."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

import attrs

from pylium.datapath import libbpf
from pylium.datapath.compile import compile_object
from pylium.datapath.libbpf import DatapathError, lib

LOG_LINES = 30
# libbpf's log buffer is process-wide: one load at a time keeps its lines attributable
_load_lock = threading.Lock()


@attrs.define(eq=False)
class LoadedObject:
    """One compiled and loaded BPF object. Closing drops our fds only: pins and attachments stay."""

    source: Path
    object_path: Path
    prog_fds: dict[str, int]
    map_fds: dict[str, int]
    _obj: int | None = attrs.field(default=None, repr=False, alias="obj")

    def program(self, name: str) -> int:
        """fd of the program whose C function is `name`."""
        try:
            return self.prog_fds[name]
        except KeyError:
            raise DatapathError(self._missing("program", name, self.prog_fds)) from None

    def map(self, name: str) -> int:
        """fd of the map `name` (a pinned one is the shared map itself)."""
        try:
            return self.map_fds[name]
        except KeyError:
            raise DatapathError(self._missing("map", name, self.map_fds)) from None

    def _missing(self, kind: str, name: str, present: Mapping[str, int]) -> str:
        if self._obj is None:
            return f"{kind} {name} of {self.source.name}: the object is closed"
        return (f"{kind} {name} missing from {self.source.name} "
                f"(it has: {', '.join(sorted(present)) or 'none'})")

    def close(self) -> None:
        """Drop our fds (idempotent); pinned maps and attached programs stay in the kernel."""
        if self._obj is not None:
            lib.bpf_object__close(self._obj)
        self._obj = None
        self.prog_fds.clear()
        self.map_fds.clear()

    def __enter__(self) -> LoadedObject:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _named(obj: int, next_fn, name_fn, fd_fn, kind: str) -> dict[str, int]:
    out: dict[str, int] = {}
    item = next_fn(obj, None)
    while item:
        name = name_fn(item).decode()
        out[name] = libbpf.check(fd_fn(item), f"fd of {kind} {name}")
        item = next_fn(obj, item)
    return out


def load_object(source: Path, defines: Mapping[str, object] | None = None, *,
                pin_root: Path | None = None, pinned_maps: Iterable[str] = (),
                require_pinned: bool = False, cache_dir: Path | None = None,
                include_dirs: Iterable[Path] = ()) -> LoadedObject:
    """Compile (cached) and load `source`. Every map of the object whose name is in
    `pinned_maps` is bound to `pin_root/<name>` (created or adopted), so plugin programs share
    the core's maps; `require_pinned` makes a missing one an error (the core's own object).
    The core's bpf/ dir is always on the include path. Errors: DatapathError with the last
    libbpf log lines."""
    source = Path(source)
    pinned = tuple(pinned_maps)
    if pinned and pin_root is None:
        raise DatapathError(f"loading {source.name}: pinned maps {', '.join(pinned)} "
                            "need a pin_root")
    if pinned and not Path(pin_root).is_dir():
        raise DatapathError(f"loading {source.name}: pin directory {pin_root} does not exist")
    object_path = compile_object(source, defines, cache_dir, include_dirs=include_dirs)
    libbpf.capture_log()
    with _load_lock:
        libbpf.clear_log()
        obj = lib.bpf_object__open_file(str(object_path).encode(), None)
        if not obj or lib.libbpf_get_error(obj):
            raise DatapathError(f"opening BPF object {object_path} ({source.name}) failed:\n"
                                + "\n".join(libbpf.log_tail(LOG_LINES)))
        try:
            for name in pinned:
                bpf_map = lib.bpf_object__find_map_by_name(obj, name.encode())
                if not bpf_map:
                    if require_pinned:
                        raise DatapathError(f"map {name} missing from {source.name} "
                                            f"({object_path})")
                    continue
                libbpf.check(lib.bpf_map__set_pin_path(bpf_map, str(Path(pin_root) / name).encode()),
                             f"setting pin path of {name}")
            rc = lib.bpf_object__load(obj)
            if rc < 0:
                hint = (f"; if maps pinned under {pin_root} have an old layout, remove them "
                        "(pylium lab down / Datapath.destroy())" if pinned else "")
                raise DatapathError(
                    f"loading {source.name} failed ({os.strerror(libbpf.errno_of(rc))}){hint}:\n"
                    + "\n".join(libbpf.log_tail(LOG_LINES)))
            prog_fds = _named(obj, lib.bpf_object__next_program, lib.bpf_program__name,
                              lib.bpf_program__fd, "program")
            map_fds = _named(obj, lib.bpf_object__next_map, lib.bpf_map__name,
                             lib.bpf_map__fd, "map")
        except BaseException:
            lib.bpf_object__close(obj)
            raise
    return LoadedObject(source, object_path, prog_fds, map_fds, obj=obj)

