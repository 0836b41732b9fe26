"""Agent configuration: defaults < YAML file < PYLIUM_* env < flags, and errors that name
the setting and where it came from."""

from __future__ import annotations

from pathlib import Path

import pytest
from pylium import config
from pylium.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pylium.yaml"
    path.write_text(text)
    return path


def test_defaults_select_the_embedded_single_node_setup():
    cfg = config.load(None, environ={})
    assert (cfg.kvstore, cfg.routing_mode, cfg.orchestrator) == ("embedded", "local", "standalone")
    assert cfg.socket == Path("/var/run/pylium/pylium.sock")
    assert cfg.bpffs_root == Path("/sys/fs/bpf/pylium")


def test_precedence_file_then_env_then_flags(tmp_path):
    path = write(tmp_path, "kvstore: etcd\nrouting-mode: vxlan\nnode_name: from-file\n"
                           "l7_parsers: [http]\n")
    env = {"PYLIUM_ROUTING_MODE": "geneve", "PYLIUM_NODE_NAME": "from-env",
           "PYLIUM_L7_PARSERS": "http,kafka"}
    cfg = config.load(path, {"node_name": "from-flag"}, environ=env)
    assert cfg.kvstore == "etcd"              # file only
    assert cfg.routing_mode == "geneve"       # env beats file
    assert cfg.node_name == "from-flag"       # flag beats env
    assert cfg.l7_parsers == ("http", "kafka")


def test_config_file_from_env_variable(tmp_path):
    path = write(tmp_path, "kvstore: consul\n")
    assert config.load(None, environ={"PYLIUM_CONFIG": str(path)}).kvstore == "consul"


def test_unrelated_pylium_env_vars_are_ignored():
    cfg = config.load(None, environ={"PYLIUM_SOCKET_FOR_CLI_ONLY": "x", "PYLIUM_TRACE_PLUGINS": "1"})
    assert cfg.kvstore == "embedded"


@pytest.mark.parametrize("text, needle", [
    ("bogus: 1\n", "unknown setting 'bogus'"),
    ("ct_timeout_tcp: abc\n", "ct_timeout_tcp: expected an integer, got 'abc'"),
    ("ct_timeout_tcp: -5\n", "ct_timeout_tcp: must be positive"),
    ("ct_timeout_tcp: true\n", "ct_timeout_tcp: expected an integer, got True"),
    ("enforcement: sometimes\n", "enforcement: must be one of default, always, never"),
    ("pod_cidr: 10.0.0.300/24\n", "pod_cidr:"),
    ("kvstore_options: [1, 2]\n", "kvstore_options: expected a mapping"),
    ("l7_parsers: [1]\n", "l7_parsers: expected a list of names"),
    ("node_ip:\n", "node_ip: no value given"),
])
def test_bad_file_values_name_the_file_and_setting(tmp_path, text, needle):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        config.load(path, environ={})
    message = str(err.value)
    assert message.startswith(f"config file {path}: ")
    assert needle in message and "\n" not in message


def test_malformed_yaml_names_the_line(tmp_path):
    path = write(tmp_path, "kvstore: etcd\nl7_parsers: [http\nrouting_mode: vxlan\n")
    with pytest.raises(ConfigError, match=rf"config file {path}: line \d+: not valid YAML"):
        config.load(path, environ={})


def test_top_level_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="expected a mapping of settings"):
        config.load(write(tmp_path, "- kvstore\n"), environ={})


def test_missing_file_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="No such file or directory"):
        config.load(tmp_path / "absent.yaml", environ={})


def test_env_and_flag_errors_name_their_source():
    with pytest.raises(ConfigError, match="^environment PYLIUM_CT_TIMEOUT_SYN: ct_timeout_syn: "
                                          "expected an integer"):
        config.load(None, environ={"PYLIUM_CT_TIMEOUT_SYN": "soon"})
    with pytest.raises(ConfigError, match="^flag --pod-cidr: pod_cidr:"):
        config.load(None, {"pod_cidr": "not-a-cidr"}, environ={})
    with pytest.raises(ConfigError, match="^flag --kvstore-options: kvstore_options: expected "
                                          "a mapping"):
        config.load(None, {"kvstore_options": "[1]"}, environ={})


def test_a_later_source_fixes_an_earlier_bad_value(tmp_path):
    path = write(tmp_path, "ct_timeout_tcp: abc\n")
    assert config.load(path, environ={"PYLIUM_CT_TIMEOUT_TCP": "30"}).ct_timeout_tcp == 30


def test_to_dict_round_trips(tmp_path):
    cfg = config.load(None, {"l7_parsers": "http", "kvstore_options": "{path: /x}"}, environ={})
    data = config.to_dict(cfg)
    assert data["l7_parsers"] == ["http"] and data["kvstore_options"] == {"path": "/x"}
    assert config.load(write(tmp_path, __import__("yaml").safe_dump(data)), environ={}) == cfg
