"""The agent refuses a config file or state directory that other users can write (one line
naming the path), and writes secrets 0600 from the first byte."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from pylium import config
from pylium.errors import ConfigError
from pylium.hardening import check_state_dir, write_private


def test_world_writable_config_file_is_refused_with_one_line(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("node_name: n1\n")
    path.chmod(0o666)
    with pytest.raises(ConfigError) as err:
        config.load(path, environ={})
    message = str(err.value)
    assert message == (f"config file {path} is writable by every user (-rw-rw-rw-); "
                       f"refusing to use it: chmod o-w {path}")
    path.chmod(0o644)
    assert config.load(path, environ={}).node_name == "n1"


def test_config_file_in_a_world_writable_directory_is_refused(tmp_path):
    folder = tmp_path / "etc"
    folder.mkdir()
    path = folder / "config.yaml"
    path.write_text("node_name: n1\n")
    folder.chmod(0o777)
    with pytest.raises(ConfigError, match=f"config file {path}: directory {folder} is "
                                          "writable by every user"):
        config.load(path, environ={})
    folder.chmod(0o1777)  # sticky, like /tmp: others cannot replace our file
    assert config.load(path, environ={}).node_name == "n1"


def test_world_writable_state_dir_is_refused(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    check_state_dir(state)
    check_state_dir(tmp_path / "not-yet" / "made")  # the agent creates it itself
    state.chmod(0o777)
    with pytest.raises(ConfigError, match=rf"state_dir {state}: {state} is writable by every "
                                          rf"user \(drwxrwxrwx\)"):
        check_state_dir(state)


def test_agent_command_stops_on_a_world_writable_state_dir(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o777)
    proc = subprocess.run([str(Path(sys.executable).with_name("pylium")), "agent", "--state-dir",
                           str(state), "--socket", str(tmp_path / "a.sock")],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYLIUM_CONFIG": ""})
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"state_dir {state}" in lines[0] and \
        "writable by every user" in lines[0], proc.stderr
    assert not (tmp_path / "a.sock").exists()


def test_write_private_creates_0600_whatever_the_umask(tmp_path):
    path = tmp_path / "wg.key"
    old = os.umask(0)
    try:
        write_private(path, b"secret")
        path.chmod(0o644)
        write_private(path, b"secret2")  # replaced by a new 0600 file, not rewritten
    finally:
        os.umask(old)
    assert path.read_bytes() == b"secret2"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["wg.key"]
