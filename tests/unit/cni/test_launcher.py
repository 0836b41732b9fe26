"""The `pylium-cni` launcher: a real exec of the file it writes, and the imports the plugin's
entry path costs (stdlib only: no PyYAML, no `typing`, nothing from site-packages)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pylium.cni import launcher, native, spec


def test_installed_launcher_execs_the_plugin(tmp_path):
    path = launcher.install(tmp_path / "bin", native=False)
    assert path.name == "pylium-cni" and os.access(path, os.X_OK)
    assert path.read_text().splitlines()[0] == f"#!{sys.executable} -IS"
    proc = subprocess.run([str(path)], input=b'{"cniVersion": "0.4.0"}',
                          env={"CNI_COMMAND": "VERSION", "PATH": "/usr/bin:/bin"},
                          capture_output=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["cniVersion"] == "0.4.0"
    # a bad environment is still a CNI error object on stdout, exit 1
    proc = subprocess.run([str(path)], input=b"{}", env={"PATH": "/usr/bin:/bin"},
                          capture_output=True, timeout=60, check=False)
    assert proc.returncode == 1 and json.loads(proc.stdout)["code"] == 4
    # rewriting is atomic and leaves no temp file behind
    launcher.install(tmp_path / "bin", native=False)
    assert [p.name for p in (tmp_path / "bin").iterdir()] == ["pylium-cni"]


def test_plugin_entry_path_imports_only_the_standard_library():
    probe = (f"import sys; sys.path.insert(0, {str(launcher.package_root())!r}); import pylium.cni.plugin; "
             "print(' '.join(sorted(sys.modules)))")
    proc = subprocess.run([sys.executable, "-IS", "-c", probe], capture_output=True,
                          text=True, timeout=60, check=True)
    modules = set(proc.stdout.split())
    assert "pylium.cni.plugin" in modules
    assert not modules & {"yaml", "typing", "site", "attrs", "http.client", "urllib.parse",
                          "socket", "selectors",
                          "importlib.metadata", "pylium.documents"}, modules
    # ... and exactly what the bundle for hosts without pylium carries
    assert {m for m in modules if m.startswith("pylium")} == set(launcher.BUNDLED_MODULES) == {
        "pylium", "pylium.cni", "pylium.cni.plugin", "pylium.cni.handler", "pylium.cni.spec",
        "pylium.boundedjson", "pylium.errors"}


def test_unusable_interpreter_path_and_usage(tmp_path, capsys):
    with pytest.raises(ValueError, match="#! line"):
        launcher.launcher_text(python="/opt/my python/bin/python3")
    with pytest.raises(ValueError, match="#! line"):
        launcher.launcher_text(python="/" + "x" * 300)
    assert launcher.main([]) == 2
    assert launcher.main(["--python", str(tmp_path / "d")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "d" / "pylium-cni")
    assert (tmp_path / "d" / "pylium-cni").read_text().startswith("#!")


@pytest.mark.skipif(native.compiler() is None, reason="no C compiler")
def test_the_native_transport_is_installed_where_it_can_be_built(tmp_path, monkeypatch):
    """Built from the source when none is prebuilt, copied when one is; statically linked
    (a node's libc may differ), and it answers VERSION with the handler's versions."""
    monkeypatch.setattr(native, "BUILT", tmp_path / "prebuilt")
    path = launcher.install(tmp_path / "bin")
    assert native.is_native(path) and os.access(path, os.X_OK)
    assert b"/ld-linux" not in path.read_bytes()  # no program interpreter: static
    proc = subprocess.run([str(path)], input=b'{"cniVersion": "0.4.0"}',
                          env={"CNI_COMMAND": "VERSION"}, capture_output=True, timeout=30)
    assert (proc.returncode, json.loads(proc.stdout)) == (0, {
        "cniVersion": "0.4.0", "supportedVersions": list(spec.SUPPORTED_VERSIONS)})
    native.build(native.BUILT)
    (tmp_path / "bin" / "pylium-cni").unlink()
    assert launcher.main([str(tmp_path / "bin")]) == 0
    assert (tmp_path / "bin" / "pylium-cni").read_bytes() == native.BUILT.read_bytes()
    assert [p.name for p in (tmp_path / "bin").iterdir()] == ["pylium-cni"]
    assert not native.is_native(Path(launcher.__file__))
