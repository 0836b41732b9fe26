"""Objects are cached by sources + defines + clang version; a compile error is loud."""

from __future__ import annotations

import shutil

import pytest
from pylium.datapath.compile import bpf_source_dir, compile_object
from pylium.datapath.libbpf import DatapathError

pytestmark = pytest.mark.skipif(shutil.which("clang") is None, reason="needs clang")


def test_same_inputs_hit_the_cache_and_defines_change_the_key(tmp_path):
    lxc = bpf_source_dir() / "bpf_lxc.c"
    first = compile_object(lxc, {"CT_LIFETIME_TCP": 10}, cache_dir=tmp_path)
    mtime = first.stat().st_mtime_ns
    again = compile_object(lxc, {"CT_LIFETIME_TCP": 10}, cache_dir=tmp_path)
    other = compile_object(lxc, {"CT_LIFETIME_TCP": 11}, cache_dir=tmp_path)
    assert again == first and again.stat().st_mtime_ns == mtime
    assert other != first
    assert first.read_bytes()[:4] == b"\x7fELF"


def test_source_change_changes_the_key(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(bpf_source_dir(), src)
    a = compile_object(src / "bpf_lxc.c", cache_dir=tmp_path / "c")
    (src / "lib" / "common.h").write_text((src / "lib" / "common.h").read_text() + "\n/* x */\n")
    b = compile_object(src / "bpf_lxc.c", cache_dir=tmp_path / "c")
    assert a != b


def test_compile_error_names_the_source(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(bpf_source_dir(), src)
    (src / "bpf_lxc.c").write_text("this is not C;\n")
    with pytest.raises(DatapathError, match="compiling bpf_lxc.c failed"):
        compile_object(src / "bpf_lxc.c", cache_dir=tmp_path / "c")


PLUGIN_C = '#include "lib/common.h"\n#include "extra.h"\nchar LICENSE[] SEC("license") = "GPL";\n' \
           'SEC("tc") int prog(struct __sk_buff *skb) { return EXTRA_VALUE; }\n'


def test_plugin_source_sees_the_core_headers_and_its_include_dirs_key_the_cache(tmp_path):
    plugin = tmp_path / "plugin"
    plugin.mkdir()
    (plugin / "bpf_plugin.c").write_text(PLUGIN_C)
    extra = tmp_path / "include"
    extra.mkdir()
    (extra / "extra.h").write_text("#define EXTRA_VALUE 0\n")
    a = compile_object(plugin / "bpf_plugin.c", cache_dir=tmp_path / "c", include_dirs=[extra])
    assert a.name.startswith("bpf_plugin-") and a.read_bytes()[:4] == b"\x7fELF"
    (extra / "extra.h").write_text("#define EXTRA_VALUE 2\n")
    b = compile_object(plugin / "bpf_plugin.c", cache_dir=tmp_path / "c", include_dirs=[extra])
    assert a != b


def test_source_must_be_an_existing_absolute_path(tmp_path):
    with pytest.raises(DatapathError, match="expected an absolute path"):
        compile_object("bpf_lxc.c", cache_dir=tmp_path)
    with pytest.raises(DatapathError, match="not found"):
        compile_object(tmp_path / "missing.c", cache_dir=tmp_path)
