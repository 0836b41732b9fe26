"""The conntrack map's size follows `bpf_ct_global_max`: a node whose pinned map has another
size gets a new map of the asked size on the next open (not a load failure), and sizes
outside the range are refused with one line."""

from __future__ import annotations

import secrets
import subprocess
from pathlib import Path

import pytest
from pylium.datapath import Datapath, libbpf
from pylium.datapath.compile import bpf_source_dir
from pylium.errors import UserError

pytestmark = pytest.mark.privileged

CACHE = Path("/tmp/pylium-test-bpf-cache")


def test_a_resized_conntrack_map_is_recreated_on_open(caplog):
    subprocess.run("mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf", shell=True)
    root = Path(f"/sys/fs/bpf/pylium-test-ctsize-{secrets.token_hex(3)}")
    dp = Datapath(root, cache_dir=CACHE).open()
    try:
        assert libbpf.map_info(dp.conntrack.fd).max_entries == 65536
        dp.close()
        dp = Datapath(root, cache_dir=CACHE, ct_max=131072).open()
        assert libbpf.map_info(dp.conntrack.fd).max_entries == 131072
        assert "conntrack map resized from 65536 to 131072" in caplog.text
        dp.close()
        # the same size again: the pinned map is adopted, not re-created
        pinned = libbpf.obj_get(str(root / "conntrack"))
        try:
            map_id = libbpf.map_info(pinned).id
        finally:
            libbpf.close(pinned)
        dp = Datapath(root, cache_dir=CACHE, ct_max=131072).open()
        assert libbpf.map_info(dp.conntrack.fd).id == map_id
        # an object loaded beside it (socket LB, a plugin's) adopts that very map: it is
        # compiled with the datapath's map-shaping defines
        sock = dp.load_object(bpf_source_dir() / "bpf_sock.c")
        try:
            assert libbpf.map_info(sock.map("conntrack")).id == map_id
        finally:
            sock.close()
    finally:
        dp.destroy()


@pytest.mark.parametrize("size", [0, 100, 1 << 25])
def test_sizes_outside_the_range_are_refused(size):
    with pytest.raises(UserError, match="bpf_ct_global_max"):
        Datapath(Path("/sys/fs/bpf/unused"), ct_max=size)
