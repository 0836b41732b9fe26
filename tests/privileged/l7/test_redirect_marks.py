"""pylium.datapath.marks is the Python twin of the datapath's mark functions: run the C ones
(bpf/lib/common.h, bpf/lib/proxy.h) in the kernel with BPF_PROG_TEST_RUN on the same inputs
and compare, so the L7 proxy marks its upstream exactly as the programs decode it."""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import pytest
from pylium.datapath import libbpf
from pylium.datapath.loader import load_object
from pylium.datapath.marks import (
    MARK_MAGIC_DRYRUN,
    MARK_MAGIC_IDENTITY,
    MARK_MAGIC_MASK,
    MARK_MAGIC_PROXY_EGRESS,
    MARK_MAGIC_TO_PROXY,
    MAX_MARK_IDENTITY,
    mark_decode_identity,
    mark_encode_identity,
    mark_encode_to_proxy,
)
from pylium.datapath.packet import SkBuff

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    subprocess.run("mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf", shell=True,
                   check=True)
    with load_object(HERE / "redirect_marks.bpf.c",
                     cache_dir=tmp_path_factory.mktemp("bpfcache")) as obj:
        prog = obj.program("marks")

        def call(identity: int, mark: int, port: int) -> SkBuff:
            ctx = SkBuff()
            ctx.cb[0], ctx.cb[1], ctx.cb[2] = identity, mark, port
            retval, _ns, _data, out = libbpf.test_run(prog, bytes(64), ctx)
            assert retval == 0
            return out

        yield call


def test_constants_match_the_c_defines(run):
    out = run(1, 0, 1)
    assert out.cb[3] == MARK_MAGIC_IDENTITY | (MARK_MAGIC_TO_PROXY << 16)
    assert out.cb[4] == MARK_MAGIC_PROXY_EGRESS | (MARK_MAGIC_MASK << 16)
    assert out.mark == MARK_MAGIC_DRYRUN


def test_identity_and_proxy_marks_equal_the_c_functions(run):
    rng = random.Random(11)
    identities = [0, 1, 2, 255, 256, 0xFFFF, 0x10000, 0xABCDEF, MAX_MARK_IDENTITY,
                  *(rng.randrange(MAX_MARK_IDENTITY + 1) for _ in range(200))]
    for identity in identities:
        port = rng.randrange(1, 65536)
        python_mark = mark_encode_identity(identity)
        out = run(identity, python_mark, port)
        assert out.cb[0] == python_mark, identity
        assert out.cb[1] == mark_decode_identity(python_mark) == identity
        assert out.cb[2] == mark_encode_to_proxy(port)
        assert python_mark & MARK_MAGIC_MASK == MARK_MAGIC_IDENTITY


def test_egress_proxy_magic_keeps_the_identity_and_bad_input_is_refused():
    mark = mark_encode_identity(4242, MARK_MAGIC_PROXY_EGRESS)
    assert mark & MARK_MAGIC_MASK == MARK_MAGIC_PROXY_EGRESS
    assert mark_decode_identity(mark) == 4242
    for bad in (-1, MAX_MARK_IDENTITY + 1):
        with pytest.raises(ValueError):
            mark_encode_identity(bad)
    with pytest.raises(ValueError):
        mark_encode_identity(1, MARK_MAGIC_TO_PROXY)
    with pytest.raises(ValueError):
        mark_encode_to_proxy(0)
