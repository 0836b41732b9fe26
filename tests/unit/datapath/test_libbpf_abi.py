"""The ctypes declarations of libbpf's option structs and the kernel's `struct __sk_buff`
prefix match the C headers pylium runs against (a host C program prints sizeof/offsetof)."""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import pytest
from pylium.datapath.libbpf import BpfMapCreateOpts, BpfTcHook, BpfTcOpts, BpfTestRunOpts
from pylium.datapath.packet import SkBuff

pytestmark = pytest.mark.skipif(shutil.which("clang") is None, reason="needs clang")

STRUCTS = {
    "struct bpf_test_run_opts": BpfTestRunOpts,
    "struct bpf_tc_hook": BpfTcHook,
    "struct bpf_tc_opts": BpfTcOpts,
    "struct bpf_map_create_opts": BpfMapCreateOpts,
}


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory) -> dict[str, int]:
    tmp = tmp_path_factory.mktemp("abi")
    lines = ['#include <stddef.h>', '#include <stdio.h>', '#include <bpf/libbpf.h>',
             '#include <bpf/bpf.h>', '#include <linux/bpf.h>', 'int main(void) {']
    for c_name, mirror in STRUCTS.items():
        lines.append(f'printf("{c_name} %zu\\n", sizeof({c_name}));')
        for field, *_ in mirror._fields_:
            lines.append(f'printf("{c_name}.{field} %zu\\n", offsetof({c_name}, {field}));')
    for field, *_ in SkBuff._fields_:
        lines.append(f'printf("struct __sk_buff.{field} %zu\\n", offsetof(struct __sk_buff, {field}));')
    lines += ["return 0; }"]
    src = tmp / "abi.c"
    src.write_text("\n".join(lines))
    subprocess.run(["clang", "-I/usr/include/x86_64-linux-gnu", str(src), "-o", str(tmp / "abi")],
                   check=True, capture_output=True)
    out = subprocess.run([str(tmp / "abi")], check=True, capture_output=True, text=True).stdout
    return {name: int(value) for name, value in (line.rsplit(" ", 1) for line in out.splitlines())}


@pytest.mark.parametrize("c_name", sorted(STRUCTS))
def test_libbpf_opts_mirror_the_header(c_name, c_layout):
    mirror = STRUCTS[c_name]
    assert ctypes.sizeof(mirror) == c_layout[c_name]
    for field, *_ in mirror._fields_:
        assert getattr(mirror, field).offset == c_layout[f"{c_name}.{field}"], field


def test_sk_buff_prefix_mirrors_the_uapi_header(c_layout):
    for field, *_ in SkBuff._fields_:
        assert getattr(SkBuff, field).offset == c_layout[f"struct __sk_buff.{field}"], field
