"""Importing the datapath mounts nothing; opening a datapath under /sys/fs/bpf mounts bpffs
when it is missing. Run in a private mount namespace whose /sys/fs/bpf is unmounted, so
the host's bpffs is never touched."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare")

SCRIPT = r"""
import importlib, json, os, pkgutil
from pathlib import Path

out = {"mounted_at_start": os.path.ismount("/sys/fs/bpf")}
import pylium.datapath
for m in pkgutil.walk_packages(pylium.datapath.__path__, "pylium.datapath."):
    importlib.import_module(m.name)
out["mounted_after_import"] = os.path.ismount("/sys/fs/bpf")
from pylium.datapath.bpffs import ensure_bpffs
ensure_bpffs(Path("/sys/fs/bpf/pylium-test-datapath-loader"))
ensure_bpffs(Path("/sys/fs/bpf/pylium-test-datapath-loader"))  # mounted already: no-op
out["mounted_after_ensure"] = os.path.ismount("/sys/fs/bpf")
out["bpf_mounts"] = sum(1 for line in open("/proc/self/mountinfo")
                        if line.split(" - ")[1].startswith("bpf ") and " /sys/fs/bpf " in line)
print(json.dumps(out))
"""


def test_import_mounts_nothing_and_open_mounts_bpffs_once():
    # a private mount namespace (unshare's default propagation): the umount stays in it
    cmd = ["unshare", "--mount", "sh", "-c",
           'umount -l /sys/fs/bpf 2>/dev/null; exec "$0" -c "$1"', sys.executable, SCRIPT]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    out = json.loads(proc.stdout)
    assert out == {"mounted_at_start": False, "mounted_after_import": False,
                   "mounted_after_ensure": True, "bpf_mounts": 1}
