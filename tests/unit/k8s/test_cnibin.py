"""The `pylium-cni` bundle the DaemonSet's init container installs on the node: a zip
application that runs under the host's Python in isolated mode, with nothing from this
environment's site-packages, and speaks CNI (VERSION; an ADD with no agent answers a CNI
error object, code 11 "try again later")."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from pylium.cli.main import cli
from pylium.cni import launcher, native
from pylium_orchestrator_k8s import manifest

HOST_PYTHON = "/usr/bin/python3"

needs_host_python = pytest.mark.skipif(not os.access(HOST_PYTHON, os.X_OK),
                                       reason=f"{HOST_PYTHON} absent")


def _run(launcher: Path, env: dict[str, str], stdin: str = "") -> subprocess.CompletedProcess:
    # the runtime's environment: CNI variables and little else (no venv, no PYTHONPATH)
    return subprocess.run([str(launcher)], input=stdin, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", **env}, timeout=30, cwd="/")


@needs_host_python
def test_the_launcher_runs_on_the_host_python_alone(tmp_path):
    path = launcher.install(tmp_path, bundle=True, native=False)
    assert path == tmp_path / "pylium-cni" and os.access(path, os.X_OK)
    assert path.read_bytes().startswith(b"#!/usr/bin/python3 -IS\n")
    assert launcher.is_bundle(path)
    assert [p.name for p in tmp_path.iterdir()] == ["pylium-cni"]  # no temporary left

    version = _run(path, {"CNI_COMMAND": "VERSION"})
    assert version.returncode == 0, version.stderr
    assert "1.0.0" in json.loads(version.stdout)["supportedVersions"]

    conf = {"cniVersion": "1.0.0", "name": "pylium", "type": "pylium-cni",
            "socket": str(tmp_path / "no-agent.sock")}
    add = _run(path, {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c0ffee",
                      "CNI_NETNS": f"/proc/{os.getpid()}/ns/net", "CNI_IFNAME": "eth0",
                      "CNI_PATH": str(tmp_path)}, json.dumps(conf))
    assert add.returncode == 1
    error = json.loads(add.stdout)
    assert error["code"] == 11 and "agent" in error["msg"].lower(), error


@needs_host_python
def test_reinstalling_replaces_the_file_atomically(tmp_path):
    (tmp_path / "pylium-cni").write_text("#!/bin/sh\nexit 3\n")
    old_inode = (tmp_path / "pylium-cni").stat().st_ino
    result = CliRunner().invoke(cli, ["k8s", "install-cni", "--bin-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "installed" in result.output
    # the native transport when this install has one built (`make setup`), else the bundle
    if native.prebuilt() is not None:
        assert native.is_native(tmp_path / "pylium-cni") and "native" in result.output
    else:
        assert launcher.is_bundle(tmp_path / "pylium-cni")
    assert (tmp_path / "pylium-cni").stat().st_ino != old_inode  # renamed over, not rewritten


def test_a_missing_bin_dir_is_a_one_line_error(tmp_path):
    result = CliRunner().invoke(cli, ["k8s", "install-cni", "--bin-dir",
                                      str(tmp_path / "nope")])
    assert result.exit_code != 0
    assert "does not exist" in result.output and "Traceback" not in result.output


def test_the_daemonset_installs_it_in_an_init_container():
    ds = manifest.daemonset(image="reg/pylium:9", plugins=[], pull_policy="Never",
                            paths=manifest.HostPaths(cni_bin="/usr/libexec/cni"))
    pod = ds["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["image"] == "reg/pylium:9" and init["imagePullPolicy"] == "Never"
    assert init["command"][:3] == ["pylium", "k8s", "install-cni"]
    mount = init["volumeMounts"][0]
    assert init["command"][-1] == mount["mountPath"]
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["hostPath"]["path"] == "/usr/libexec/cni"
