"""Load a plugin's own BPF object next to the endpoint datapath.

A plugin ships its C sources as package data; they `#include "lib/..."` from the core's
`bpf/` (on the include path), so they see the same map definitions. Every map of the object
that the datapath pins (endpoints, ipcache, ...) is bound to that pin: plugin programs read
and write the very maps the endpoint programs use."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from pylium.datapath import libbpf
from pylium.datapath.compile import bpf_source_dir, compile_object
from pylium.datapath.libbpf import DatapathError, lib

log = logging.getLogger(__name__)


class PluginObject:
    """One compiled and loaded plugin object; `prog_fds` by program name. Closing drops our
    fds only: programs stay wherever they were attached or put."""

    def __init__(self, datapath, src_dir: Path, source: str,
                 defines: Mapping[str, object] | None = None):
        self.datapath = datapath
        self.src_dir = Path(src_dir)
        self.source = source
        self.defines = dict(defines or {})
        self.prog_fds: dict[str, int] = {}
        self._obj: int | None = None

    def load(self, programs: tuple[str, ...]) -> dict[str, int]:
        from pylium.datapath.datapath import PINNED_MAPS, _libbpf_log

        path = compile_object(self.source, self.defines, self.datapath.cache_dir,
                              src_dir=self.src_dir, extra_include=(bpf_source_dir(),))
        obj = lib.bpf_object__open_file(str(path).encode(), None)
        if not obj or lib.libbpf_get_error(obj):
            raise DatapathError(f"opening BPF object {path} failed")
        try:
            for name in PINNED_MAPS:
                m = lib.bpf_object__find_map_by_name(obj, name.encode())
                if m:
                    libbpf.check(lib.bpf_map__set_pin_path(m, str(self.datapath.root / name).encode()),
                                 f"setting pin path of {name}")
            del _libbpf_log[:]
            rc = lib.bpf_object__load(obj)
            if rc < 0:
                raise DatapathError(f"loading {self.source} failed "
                                    f"({os.strerror(libbpf.errno_of(rc))}):\n"
                                    + "\n".join(_libbpf_log[-30:]))
            for name in programs:
                prog = lib.bpf_object__find_program_by_name(obj, name.encode())
                if not prog:
                    raise DatapathError(f"program {name} missing from {self.source}")
                self.prog_fds[name] = libbpf.check(lib.bpf_program__fd(prog), f"fd of {name}")
        except BaseException:
            lib.bpf_object__close(obj)
            self.prog_fds.clear()
            raise
        self._obj = obj
        return dict(self.prog_fds)

    def close(self) -> None:
        if self._obj is not None:
            lib.bpf_object__close(self._obj)
        self._obj = None
        self.prog_fds.clear()
