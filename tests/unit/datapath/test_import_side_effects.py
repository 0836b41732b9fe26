"""Importing the datapath changes nothing in the process: libbpf is not even loaded (so no
print callback of ours is installed) until something is loaded, and then the callback goes
in once. Checked in a fresh interpreter by reading /proc/self/maps and asking libbpf."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = r"""
import ctypes, importlib, json, pkgutil

def libbpf_ranges():
    out = []
    for line in open("/proc/self/maps"):
        if "libbpf.so" in line:
            lo, hi = line.split()[0].split("-")
            out.append((int(lo, 16), int(hi, 16)))
    return out

import pylium.datapath
modules = [m.name for m in pkgutil.walk_packages(pylium.datapath.__path__, "pylium.datapath.")]
for name in modules + ["pylium.flow.metrics", "pylium_overlay_vxlan.backend",
                       "pylium_overlay_geneve.backend"]:
    importlib.import_module(name)
out = {"modules": modules, "libbpf_mapped_after_import": bool(libbpf_ranges())}

from pylium.datapath import libbpf
lib = libbpf.lib
def in_libbpf(addr):
    return any(lo <= addr < hi for lo, hi in libbpf_ranges())
printer = lib.libbpf_set_print(None)
lib.libbpf_set_print(printer)
out["printer_before_capture_in_libbpf"] = in_libbpf(printer)
libbpf.capture_log()
first = ctypes.cast(libbpf._printer, ctypes.c_void_p).value
libbpf.capture_log()
printer = lib.libbpf_set_print(None)
lib.libbpf_set_print(printer)
out["printer_after_capture_in_libbpf"] = in_libbpf(printer)
out["printer_after_capture_is_ours"] = printer == first
print(json.dumps(out))
"""


def test_importing_the_datapath_loads_no_libbpf_and_sets_no_callback():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          check=True)
    out = json.loads(proc.stdout)
    assert {"pylium.datapath.loader", "pylium.datapath.datapath",
            "pylium.datapath.testrun"} <= set(out["modules"])
    assert out["libbpf_mapped_after_import"] is False
    # the same probe sees libbpf's own printer before capture_log() and ours after it
    assert out["printer_before_capture_in_libbpf"] is True
    assert out["printer_after_capture_in_libbpf"] is False
    assert out["printer_after_capture_is_ours"] is True
