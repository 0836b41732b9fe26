"""The `pylium-cni` launcher: a real exec of the file it writes, and the imports the plugin's
entry path costs (stdlib only: no PyYAML, no `typing`, nothing from site-packages)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from pylium.cni import launcher


def test_installed_launcher_execs_the_plugin(tmp_path):
    path = launcher.install(tmp_path / "bin")
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
    launcher.install(tmp_path / "bin")
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
        "pylium", "pylium.cni", "pylium.cni.plugin", "pylium.cni.spec", "pylium.boundedjson",
        "pylium.errors"}


def test_unusable_interpreter_path_and_usage(tmp_path, capsys):
    with pytest.raises(ValueError, match="#! line"):
        launcher.launcher_text(python="/opt/my python/bin/python3")
    with pytest.raises(ValueError, match="#! line"):
        launcher.launcher_text(python="/" + "x" * 300)
    assert launcher.main([]) == 2
    assert launcher.main([str(tmp_path / "d")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "d" / "pylium-cni")
