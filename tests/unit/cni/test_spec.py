"""The CNI protocol rules of `pylium.cni.spec`: environment, config, versions, results."""

from __future__ import annotations

import pytest
from pylium.cni import spec
from pylium.cni.spec import CNIError

ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "abc123", "CNI_NETNS": "/var/run/netns/cni-1",
       "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin"}
EP = {"ipv4": "10.200.1.7", "gateway": "10.200.1.1", "ifname": "lxc0123456789a",
      "mac": "02:00:00:00:00:01", "pod_ifname": "eth0", "pod_mac": "02:00:00:00:00:02"}


def code_of(func, *args) -> int:
    with pytest.raises(CNIError) as err:
        func(*args)
    return err.value.code


def test_env_per_verb():
    env = spec.parse_env({**ENV, "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAME=web-1"})
    assert (env["command"], env["container_id"], env["ifname"]) == ("ADD", "abc123", "eth0")
    assert env["args"] == {"IgnoreUnknown": "1", "K8S_POD_NAME": "web-1"}
    # DEL without a netns (the sandbox may be gone), STATUS/VERSION with nothing else
    assert spec.parse_env({k: v for k, v in ENV.items() if k != "CNI_NETNS"}
                          | {"CNI_COMMAND": "DEL"})["netns"] == ""
    assert spec.parse_env({"CNI_COMMAND": "STATUS"})["command"] == "STATUS"
    assert spec.parse_env({"CNI_COMMAND": "VERSION"})["command"] == "VERSION"


@pytest.mark.parametrize("environ, words", [
    ({}, ["CNI_COMMAND"]),
    ({"CNI_COMMAND": "ADD"}, ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"]),
    ({**ENV, "CNI_NETNS": ""}, ["CNI_NETNS"]),
    ({**ENV, "CNI_COMMAND": "add"}, ["unknown CNI_COMMAND"]),
    ({**ENV, "CNI_CONTAINERID": "a/b"}, ["CNI_CONTAINERID"]),
    ({**ENV, "CNI_IFNAME": "averyveryverylongname"}, ["CNI_IFNAME"]),
    ({**ENV, "CNI_NETNS": "relative/ns"}, ["CNI_NETNS"]),
    ({**ENV, "CNI_ARGS": "K8S_POD_NAME"}, ["CNI_ARGS"]),
    ({"CNI_COMMAND": "GC"}, ["CNI_PATH"]),
])
def test_bad_env_is_code_4_naming_the_variables(environ, words):
    with pytest.raises(CNIError) as err:
        spec.parse_env(environ)
    assert err.value.code == spec.INVALID_ENVIRONMENT
    text = err.value.msg + err.value.details
    assert all(w in text for w in words), text


def test_config_decoding_and_versions():
    assert spec.decode_config(b'{"cniVersion": "1.0.0"}') == {"cniVersion": "1.0.0"}
    for raw in (b"", b"not json", b"[1]", b"\xff\xfe", b'"text"'):
        assert code_of(spec.decode_config, raw) == spec.DECODING_FAILURE
    for version in ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"):
        assert spec.config_version({"cniVersion": version}) == version
    for version in ("0.2.0", "2.0.0", "1.0"):
        assert code_of(spec.config_version, {"cniVersion": version}) == spec.INCOMPATIBLE_VERSION
    assert code_of(spec.config_version, {}) == spec.INCOMPATIBLE_VERSION  # 0.1.0 implied
    assert code_of(spec.config_version, {"cniVersion": 1}) == spec.INVALID_CONFIG


def test_config_settings():
    conf = {"name": "pylium", "socket": "/run/p.sock", "dns": {"nameservers": ["10.96.0.10"]}}
    assert spec.validate_config(conf) == conf
    assert spec.validate_config({"name": "n"})["socket"] == ""
    for bad in ({}, {"name": "-bad"}, {"name": "n", "socket": "rel.sock"},
                {"name": "n", "socket": 5}, {"name": "n", "dns": []},
                {"name": "n", "dns": {"nameservers": "10.0.0.1"}}):
        assert code_of(spec.validate_config, bad) == spec.INVALID_CONFIG, bad
    assert code_of(spec.validate_config, {"name": "n", "ipam": {"type": "host-local"}}) == \
        spec.UNSUPPORTED_FIELD


def test_gc_attachments():
    conf = {"cni.dev/valid-attachments": [{"containerID": "a", "ifname": "eth0"},
                                          {"containerID": "b"}]}
    assert spec.valid_attachments(conf) == [{"container_id": "a", "ifname": "eth0"},
                                            {"container_id": "b", "ifname": "eth0"}]
    assert spec.valid_attachments({"cni.dev/attachments": []}) == []
    for bad in ({}, {"cni.dev/valid-attachments": {}},
                {"cni.dev/valid-attachments": [{"ifname": "eth0"}]}):
        assert code_of(spec.valid_attachments, bad) == spec.INVALID_CONFIG


def test_endpoint_names_come_from_the_pod_or_the_container():
    k8s = {"container_id": "f00d", "args": {"K8S_POD_NAME": "web-1", "K8S_POD_NAMESPACE": "shop"}}
    assert spec.endpoint_identity(k8s) == ("web-1", "shop")
    assert spec.endpoint_identity({"container_id": "ABC_def.1", "args": {}}) == \
        ("abc-def.1", "default")
    long_pod = {"container_id": "c1", "args": {"K8S_POD_NAME": "x" * 80,
                                               "K8S_POD_NAMESPACE": "shop"}}
    assert spec.endpoint_identity(long_pod) == ("c1", "shop")
    assert len(spec.name_from_container_id("a" * 64)) == 63


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
def test_add_result_shape(version):
    dns = {"nameservers": ["10.96.0.10"], "search": []}
    result = spec.add_result(version, EP, "/var/run/netns/cni-1", dns)
    assert set(result) == {"cniVersion", "interfaces", "ips", "routes", "dns"}
    assert result["cniVersion"] == version
    host, pod = result["interfaces"]
    assert set(host) == {"name", "mac"} and pod["sandbox"] == "/var/run/netns/cni-1"
    (ip,) = result["ips"]
    assert result["interfaces"][ip["interface"]] is pod
    assert (ip["address"], ip["gateway"]) == ("10.200.1.7/32", "10.200.1.1")
    assert ("version" in ip) == (version < "1.0.0")
    assert result["routes"] == [{"dst": "0.0.0.0/0"}]
    assert result["dns"] == {"nameservers": ["10.96.0.10"]}


def test_check_against_prev_result():
    env = {"ifname": "eth0", "netns": "/var/run/netns/cni-1"}
    prev = spec.add_result("1.0.0", EP, env["netns"], {})
    assert spec.check_against(prev, EP, env) == []
    assert spec.check_against(None, EP, env)
    moved = {**EP, "ipv4": "10.200.1.8"}
    assert "10.200.1.8" in spec.check_against(prev, moved, env)[0]
    assert "MAC" in spec.check_against(prev, {**EP, "pod_mac": "02:00:00:00:00:09"}, env)[0]
    assert "sandbox" in spec.check_against(prev, EP, {**env, "netns": "/proc/1/ns/net"})[0]
    assert "no interface" in spec.check_against(prev, EP, {**env, "ifname": "net1"})[0]
