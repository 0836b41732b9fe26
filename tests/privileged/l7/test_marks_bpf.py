"""`pylium.datapath.marks` against the C it mirrors: the datapath's own inline functions,
compiled from bpf/lib/common.h and run with BPF_PROG_TEST_RUN."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pylium.datapath import libbpf
from pylium.datapath.compile import bpf_source_dir, compile_object
from pylium.datapath.libbpf import lib
from pylium.datapath.marks import mark_decode_identity, mark_encode_identity
from pylium.datapath.packet import PROTO_TCP, SkBuff, build

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root (BPF)")
    obj_path = compile_object("mark_twin.c", cache_dir=tmp_path_factory.mktemp("l7-proxy-bpf"),
                              src_dir=HERE / "bpf", extra_include=(bpf_source_dir(),))
    obj = lib.bpf_object__open_file(str(obj_path).encode(), None)
    assert obj and not lib.libbpf_get_error(obj)
    try:
        libbpf.check(lib.bpf_object__load(obj), "loading mark_twin")
        prog = lib.bpf_object__find_program_by_name(obj, b"mark_twin")
        yield libbpf.check(lib.bpf_program__fd(prog), "fd of mark_twin")
    finally:
        lib.bpf_object__close(obj)


@pytest.mark.parametrize("identity", [0, 1, 2, 255, 256, 1000, 2001, 65535, 65536, 0x123456,
                                      0xFFFFFF, 0x1000000, 0xFFFFFFFF])
def test_python_twin_matches_the_c_functions(program, identity):
    packet = build("10.0.0.1", "10.0.0.2", PROTO_TCP, 1000, 80)
    ctx = SkBuff()
    ctx.cb[0] = identity
    _, _, _, out = libbpf.test_run(program, packet, ctx)
    assert out.cb[1] == mark_encode_identity(identity)
    assert out.cb[2] == mark_decode_identity(out.cb[1])
