"""The BPF filesystem that holds pylium's pins: mounted on demand when the pin root is under
/sys/fs/bpf (a fresh host or container may not have it mounted yet)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from pylium.datapath.libbpf import DatapathError

BPFFS = "/sys/fs/bpf"


def ensure_bpffs(root: Path) -> None:
    """Mount bpffs on /sys/fs/bpf if `root` lives there and nothing is mounted yet."""
    if str(root).startswith(BPFFS) and not os.path.ismount(BPFFS):
        proc = subprocess.run(["mount", "-t", "bpf", "bpf", BPFFS], capture_output=True, text=True)
        # a concurrent agent may have mounted it between our check and our mount
        if proc.returncode != 0 and not os.path.ismount(BPFFS):
            raise DatapathError(f"mounting bpffs on {BPFFS} failed: {proc.stderr.strip()}")
