"""`pylium-cni` run exactly as a container runtime runs it, against a real agent in a lab
node's netns, side by side with the reference `bridge` + `host-local` plugins: result
shapes, CHECK/DEL semantics, error objects, ping between CNI-made pods, concurrency without
leaks, retried and abandoned ADDs, GC, STATUS and the conflist the agent writes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pylium.datapath import netns as plumbing

from .cnilab import TRANSPORTS, PyliumCNI, ReferenceCNI, cni_env, shape

pytestmark = [pytest.mark.privileged]

DNS = {"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"]}


@pytest.fixture(scope="module")
def conf_dir():
    path = tempfile.mkdtemp(prefix="cni-conf-")
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module", params=TRANSPORTS)
def pcni(request, conf_dir):
    lab = PyliumCNI(request.param, cni_conf_dir=str(conf_dir))
    try:
        yield lab
    finally:
        lab.down()


@pytest.fixture(scope="module")
def ref():
    reference = ReferenceCNI()
    try:
        yield reference
    finally:
        reference.down()


def _state(pcni) -> dict:
    """Everything an endpoint leaves behind in the agent, the kernel and IPAM."""
    client = pcni.api()
    ipam = json.loads(Path(pcni.node["state_dir"], "ipam.json").read_text())["allocated"]
    return {
        "endpoints": sorted(e["id"] for e in client.get("/v1/endpoint")),
        "lxc": sorted(link.ifname for link in plumbing.list_links(pcni.node["netns"])
                      if link.ifname.startswith("lxc")),
        "ipam": sorted(ipam),
        "bpf_endpoints": sorted(json.dumps(e, sort_keys=True)
                                for e in client.get("/v1/bpf/endpoints")),
        "ipcache_pods": sorted(e["cidr"] for e in client.get("/v1/bpf/ipcache")
                               if e["cidr"].startswith("10.200.")),
        "routes": sorted(r["dst"] for r in plumbing.routes(pcni.node["netns"])
                         if r["dst"].startswith("10.200.") and r["dst"].endswith("/32")),
    }


def _empty(pcni) -> bool:
    return all(not v for v in _state(pcni).values())


# shapes against the reference ------------------------------------------------------------
@pytest.mark.parametrize("version", ["0.3.1", "0.4.0", "1.0.0"])
def test_add_check_del_match_the_reference_plugins(pcni, ref, version):
    tag = version.replace(".", "")
    ours_ns, ref_ns = pcni.pod_netns(f"s{tag}"), ref.pod_netns(f"s{tag}")
    cid = f"shape{tag}"
    rc, ours, err = pcni.call(cni_env("ADD", cid, ours_ns), pcni.conf(version, dns=DNS))
    assert rc == 0, (ours, err)
    rc, theirs, err = ref.call(cni_env("ADD", cid, ref_ns), ref.conf(version))
    assert rc == 0, (theirs, err)
    assert shape(ours) == shape(theirs)
    assert ours["cniVersion"] == version and ours["dns"] == theirs["dns"] == DNS
    # what the result says is what the pod has
    ip = ours["ips"][0]
    pod_if = ours["interfaces"][ip["interface"]]
    assert pod_if["name"] == "eth0" and pod_if["sandbox"] == str(plumbing.netns_path(ours_ns))
    assert plumbing.addresses("eth0", ours_ns) == [ip["address"]]
    assert plumbing.link_info("eth0", ours_ns).mac == pod_if["mac"]
    host_if = ours["interfaces"][0]
    assert plumbing.link_info(host_if["name"], pcni.node["netns"]).mac == host_if["mac"]
    assert ("version" in ip) == (version != "1.0.0") == ("version" in theirs["ips"][0])
    # CHECK with the ADD's result: both pass (0.4.0+), both refuse on 0.3.x alike
    rc_o, out_o, _ = pcni.call(cni_env("CHECK", cid, ours_ns),
                               pcni.conf(version, dns=DNS, prevResult=ours))
    rc_r, out_r, _ = ref.call(cni_env("CHECK", cid, ref_ns), {**ref.conf(version),
                                                              "prevResult": theirs})
    assert (rc_o, rc_r) == ((0, 0) if version != "0.3.1" else (1, 1)), (out_o, out_r)
    if version == "0.3.1":
        assert out_o["code"] == out_r["code"] == 1
    # DEL frees everything; a second DEL (and one for a container never seen) is fine
    for env_ours, env_ref in ((cni_env("DEL", cid, ours_ns), cni_env("DEL", cid, ref_ns)),
                              (cni_env("DEL", cid, ours_ns), cni_env("DEL", cid, ref_ns)),
                              (cni_env("DEL", "never-added"), cni_env("DEL", "never-added"))):
        rc_o, out_o, _ = pcni.call(env_ours, pcni.conf(version))
        rc_r, out_r, _ = ref.call(env_ref, ref.conf(version))
        assert (rc_o, out_o, rc_r, out_r) == (0, None, 0, None)
    assert plumbing.link_info("eth0", ours_ns) is None
    assert ref.allocated() == [] and _empty(pcni)


def test_check_reports_a_broken_pod(pcni):
    ns = pcni.pod_netns("broken")
    rc, result, _ = pcni.call(cni_env("ADD", "broken1", ns), pcni.conf())
    assert rc == 0
    # the pod's address removed behind the agent's back: CHECK says so
    subprocess.run(["ip", "-n", ns, "addr", "flush", "dev", "eth0"], check=True)
    rc, err, _ = pcni.call(cni_env("CHECK", "broken1", ns), pcni.conf(prevResult=result))
    assert rc == 1 and err["code"] == 999 and "lacks" in err["details"]
    # a prevResult that is not what ADD returned: refused too
    forged = json.loads(json.dumps(result))
    forged["ips"][0]["address"] = "10.200.1.250/32"
    rc, err, _ = pcni.call(cni_env("CHECK", "broken1", ns), pcni.conf(prevResult=forged))
    assert rc == 1 and "not in prevResult" in err["details"]
    rc, err, _ = pcni.call(cni_env("CHECK", "broken1", ns), pcni.conf())
    assert rc == 1 and err["code"] == 7
    assert pcni.call(cni_env("DEL", "broken1", ns), pcni.conf())[0] == 0
    rc, err, _ = pcni.call(cni_env("CHECK", "broken1", ns), pcni.conf(prevResult=result))
    assert rc == 1 and "no pylium endpoint" in err["msg"]
    assert _empty(pcni)


# errors -------------------------------------------------------------------------------------
def test_errors_are_cni_error_objects_like_the_reference(pcni, ref):
    ns = pcni.pod_netns("err")
    ok = cni_env("ADD", "err1", ns)
    cases = [  # (env, stdin, expected code) — the reference answers each with the same code
        (ok, "this is not json", 6),
        (ok, "", 6),
        ({k: v for k, v in ok.items() if k != "CNI_CONTAINERID"}, None, 4),
        ({k: v for k, v in ok.items() if k not in ("CNI_NETNS", "CNI_IFNAME")}, None, 4),
        ({**ok, "CNI_COMMAND": "FROB"}, None, 4),
        (ok, {"cniVersion": "9.9.9", "name": "x", "type": "x"}, 1),
    ]
    for env, stdin, code in cases:
        ours_in = pcni.conf() if stdin is None else stdin
        ref_in = ref.conf() if stdin is None else stdin
        rc_o, out_o, err_o = pcni.call(env, ours_in)
        rc_r, out_r, _ = ref.call({**env, "CNI_NETNS": str(plumbing.netns_path(ns))}
                                  if "CNI_NETNS" in env else env, ref_in)
        assert rc_o == rc_r == 1, (env, stdin, out_o, out_r)
        assert out_o["code"] == out_r["code"] == code, (env, stdin, out_o, out_r)
        assert set(out_o) == {"cniVersion", "code", "msg", "details"}
        assert "Traceback" not in err_o and out_o["msg"] and "\n" not in out_o["msg"]
    # ours only: no CNI_COMMAND at all, a bad config value, an absent netns, no agent
    only_ours = [
        ({k: v for k, v in ok.items() if k != "CNI_COMMAND"}, pcni.conf(), 4),
        (ok, pcni.conf(socket="relative.sock"), 7),
        (ok, {"cniVersion": "1.0.0", "type": "pylium-cni"}, 7),
        (ok, pcni.conf(ipam={"type": "host-local"}), 2),
        ({**ok, "CNI_NETNS": "/run/netns/does-not-exist"}, pcni.conf(), 4),
        ({**ok, "CNI_ARGS": "K8S_POD_NAME"}, pcni.conf(), 4),
        (ok, pcni.conf(socket=f"/run/{pcni.lab.name}-none.sock"), 11),
        (ok, "[1, 2]", 6),
        (ok, b"\xff\xfe", 6),
    ]
    for env, stdin, code in only_ours:
        rc, out, err = pcni.call(env, stdin)
        assert (rc, out["code"]) == (1, code), (env, stdin, out, err)
        assert "Traceback" not in err
    assert _empty(pcni)


# real traffic --------------------------------------------------------------------------------
def test_two_cni_pods_ping_each_other_with_any_ifname(pcni):
    a_ns, b_ns = pcni.pod_netns("pa"), pcni.pod_netns("pb")
    rc, a, err = pcni.call(cni_env("ADD", "pinga", a_ns, ifname="eth0",
                                   args="IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;"
                                        "K8S_POD_NAME=web-1;K8S_POD_UID=u1"), pcni.conf())
    assert rc == 0, (a, err)
    rc, b, err = pcni.call(cni_env("ADD", "pingb", b_ns, ifname="net7"), pcni.conf())
    assert rc == 0, (b, err)
    assert b["interfaces"][1]["name"] == "net7" and plumbing.link_info("net7", b_ns)
    assert plumbing.link_info("eth0", b_ns) is None
    a_ip = a["ips"][0]["address"].split("/")[0]
    b_ip = b["ips"][0]["address"].split("/")[0]
    for src, dst in ((a_ns, b_ip), (b_ns, a_ip)):
        ping = subprocess.run(["nsenter", f"--net=/run/netns/{src}", "ping", "-c", "2",
                               "-W", "1", dst], capture_output=True, text=True, timeout=20)
        assert ping.returncode == 0, ping.stdout + ping.stderr
    # the endpoints: found by container id, named after the pod when the kubelet says
    ep = pcni.api().get("/v1/endpoint/container/pinga")
    assert (ep["name"], ep["namespace"], ep["container_id"], ep["pod_ifname"]) == \
        ("web-1", "shop", "pinga", "eth0")
    assert ep["netns"] == f"/run/netns/{a_ns}"
    assert [e["container_id"] for e in pcni.api().get("/v1/endpoint?container_id=pingb")] \
        == ["pingb"]
    # DEL for another ifname of the container leaves it alone
    assert pcni.call(cni_env("DEL", "pingb", b_ns, ifname="eth0"), pcni.conf())[0] == 0
    assert plumbing.link_info("net7", b_ns) is not None
    for cid, ns, ifname in (("pinga", a_ns, "eth0"), ("pingb", b_ns, "net7")):
        assert pcni.call(cni_env("DEL", cid, ns, ifname=ifname), pcni.conf())[0] == 0
    assert _empty(pcni)


# concurrency, retries, abandoned ADDs, GC -----------------------------------------------------
@pytest.mark.slow
def test_100_concurrent_add_del_leak_nothing(pcni):
    n = 100
    netns = [pcni.pod_netns(f"k{i}") for i in range(n)]

    def add(i):
        return pcni.call(cni_env("ADD", f"conc{i}", netns[i]), pcni.conf())

    def delete(i):
        return pcni.call(cni_env("DEL", f"conc{i}", netns[i]), pcni.conf())

    with ThreadPoolExecutor(max_workers=n) as pool:
        added = list(pool.map(add, range(n)))
    assert [rc for rc, _, _ in added] == [0] * n, [r for r in added if r[0]][:3]
    ips = [out["ips"][0]["address"] for _, out, _ in added]
    assert len(set(ips)) == n
    state = _state(pcni)
    assert len(state["endpoints"]) == len(state["lxc"]) == len(state["ipam"]) == n
    assert len(state["bpf_endpoints"]) == len(state["ipcache_pods"]) == n
    # DELs racing repeated ADDs of the same containers: every ADD answers the address it
    # had (or loses the race to its DEL), and a last round of DELs leaves nothing
    with ThreadPoolExecutor(max_workers=n) as pool:
        dels = pool.map(delete, range(0, n, 2))
        again = pool.map(add, range(1, n, 2))
        dels, again = list(dels), list(again)
    assert all(rc == 0 for rc, _, _ in dels)
    for i, (rc, out, _) in zip(range(1, n, 2), again, strict=True):
        assert rc == 0 and out["ips"][0]["address"] == ips[i]
    with ThreadPoolExecutor(max_workers=n) as pool:
        final = list(pool.map(delete, range(n)))
    assert all(rc == 0 for rc, _, _ in final)
    assert _state(pcni) == {k: [] for k in state}
    for ns in netns:
        assert [link.ifname for link in plumbing.list_links(ns)] == ["lo"]


def test_retried_add_gives_the_same_endpoint_and_gc_reclaims_abandoned_ones(pcni):
    keep_ns, lost_ns, gone_ns = (pcni.pod_netns(t) for t in ("keep", "lost", "gone"))
    rc, first, _ = pcni.call(cni_env("ADD", "keep1", keep_ns), pcni.conf())
    rc2, second, _ = pcni.call(cni_env("ADD", "keep1", keep_ns), pcni.conf())
    assert rc == rc2 == 0 and first == second
    # an ADD the runtime gave up on (killed while the agent works): the agent finishes it
    proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{pcni.node['netns']}", "--",
                             pcni.plugin], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            env=cni_env("ADD", "lost1", lost_ns))
    proc.stdin.write(json.dumps(pcni.conf()).encode())
    proc.stdin.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not pcni.api().get("/v1/endpoint?container_id=lost1"):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert pcni.api().get("/v1/endpoint?container_id=lost1"), "the agent finished the ADD"
    # ...and a sandbox that died without a DEL
    assert pcni.call(cni_env("ADD", "gone1", gone_ns), pcni.conf())[0] == 0
    assert len(_state(pcni)["ipam"]) == 3
    # GC needs the list (without it, it would free every pod)
    rc, err, _ = pcni.call(cni_env("GC", ifname=""), pcni.conf("1.1.0"))
    assert rc == 1 and err["code"] == 7
    gc_conf = pcni.conf("1.1.0", **{"cni.dev/valid-attachments": [
        {"containerID": "keep1", "ifname": "eth0"}]})
    rc, out, err = pcni.call(cni_env("GC", ifname=""), gc_conf)
    assert (rc, out) == (0, None), err
    state = _state(pcni)
    assert state["ipam"] == [first["ips"][0]["address"].split("/")[0]]
    assert len(state["endpoints"]) == len(state["lxc"]) == len(state["bpf_endpoints"]) == 1
    assert plumbing.link_info("eth0", lost_ns) is None
    assert pcni.call(cni_env("DEL", "keep1", keep_ns), pcni.conf())[0] == 0
    assert _empty(pcni)


# STATUS, VERSION, conflist ---------------------------------------------------------------------
def test_status_version_and_the_conflist_the_agent_wrote(pcni, conf_dir):
    rc, out, _ = pcni.call(cni_env("STATUS", ifname=""), pcni.conf("1.1.0"))
    assert (rc, out) == (0, None)
    rc, out, _ = pcni.call(cni_env("STATUS", ifname=""),
                           pcni.conf("1.1.0", socket=f"/run/{pcni.lab.name}-x.sock"))
    assert rc == 1 and out["code"] == 50
    rc, out, _ = pcni.call({"CNI_COMMAND": "VERSION"}, '{"cniVersion": "0.4.0"}')
    assert rc == 0 and out["cniVersion"] == "0.4.0"
    assert {"0.3.1", "0.4.0", "1.0.0", "1.1.0"} <= set(out["supportedVersions"])
    conflist = json.loads((conf_dir / "05-pylium.conflist").read_text())
    assert conflist["plugins"] == [{"type": "pylium-cni", "socket": pcni.node["socket"]}]
    # the runtime's view: the list's name and version injected into the plugin's config
    plugin_conf = {**conflist["plugins"][0], "name": conflist["name"],
                   "cniVersion": conflist["cniVersion"]}
    ns = pcni.pod_netns("conf")
    rc, out, err = pcni.call(cni_env("ADD", "conf1", ns), plugin_conf)
    assert rc == 0 and out["cniVersion"] == conflist["cniVersion"], err
    assert pcni.call(cni_env("DEL", "conf1", ns), plugin_conf)[0] == 0
    assert _empty(pcni)


# agent restart --------------------------------------------------------------------------------
def test_cni_endpoints_survive_an_agent_restart(pcni):
    """kill -9 the agent: while it is down ADD/DEL answer "try again later"; the restarted
    agent adopts the container's endpoint (same IP, veth), so CHECK passes with the old
    result, a retried ADD returns it, and DEL frees it."""
    ns = pcni.pod_netns("restart")
    rc, result, _ = pcni.call(cni_env("ADD", "restart1", ns), pcni.conf())
    assert rc == 0
    before = pcni.api().get("/v1/endpoint/container/restart1")
    pid = pcni.lab.node()["agent_pid"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.05)
    other = pcni.pod_netns("restart2")
    for env in (cni_env("ADD", "restart2", other), cni_env("DEL", "restart1", ns)):
        rc, err, _ = pcni.call(env, pcni.conf())
        assert rc == 1 and err["code"] == 11, err
    pcni.lab.start_agent(pcni.lab.node())
    after = pcni.api().get("/v1/endpoint/container/restart1")
    for key in ("id", "ipv4", "ifname", "ifindex", "mac", "pod_mac", "container_id", "netns"):
        assert after[key] == before[key], key
    assert pcni.call(cni_env("CHECK", "restart1", ns), pcni.conf(prevResult=result))[0] == 0
    rc, again, _ = pcni.call(cni_env("ADD", "restart1", ns), pcni.conf())
    assert rc == 0 and again == result
    assert pcni.call(cni_env("DEL", "restart1", ns), pcni.conf())[0] == 0
    assert _empty(pcni)


def test_netns_given_as_a_process_path(pcni):
    """Runtimes may name the sandbox by `/proc/<pid>/ns/net` (a process holding a netns
    nobody bind-mounted); the same namespace under two names is one endpoint."""
    holder = subprocess.Popen(["unshare", "--net", "sleep", "120"])
    bound = ""
    try:
        path = f"/proc/{holder.pid}/ns/net"
        deadline = time.monotonic() + 5
        while os.readlink(path) == os.readlink("/proc/self/ns/net") and \
                time.monotonic() < deadline:
            time.sleep(0.01)  # unshare has not switched yet
        env = {**cni_env("ADD", "procns1"), "CNI_NETNS": path}
        rc, result, err = pcni.call(env, pcni.conf())
        assert rc == 0, (result, err)
        assert result["interfaces"][1]["sandbox"] == path
        assert pcni.api().get("/v1/endpoint/container/procns1")["netns"] == path
        # the lab's world address, through the node
        ping = subprocess.run(["nsenter", f"--net={path}", "ping", "-c", "1", "-W", "2",
                               "198.51.100.10"], capture_output=True, text=True, timeout=20)
        assert ping.returncode == 0, ping.stdout + ping.stderr
        # another container id for the same netns (bind-mounted elsewhere) is refused
        bound = pcni.pod_netns("procbind")
        subprocess.run(["mount", "--bind", path, f"/run/netns/{bound}"], check=True)
        rc, out, _ = pcni.call(cni_env("ADD", "procns2", bound), pcni.conf())
        assert rc == 1 and "already belongs" in out["details"]
        assert pcni.call({**cni_env("DEL", "procns1"), "CNI_NETNS": path}, pcni.conf())[0] == 0
    finally:
        if bound:  # the bind over the lab's own (teardown removes that one)
            subprocess.run(["umount", f"/run/netns/{bound}"], check=False)
        holder.kill()
        holder.wait()
    assert _empty(pcni)
