"""On a real single-node Kubernetes 1.20: policies applied with kubectl reach the pylium
agent's repository within 2 s (with Cilium-style status on CNPs), the watches survive an API
server restart, pods run, and — once `pylium-cni` is installed — pods get pylium endpoints
with their Kubernetes labels, policies take effect on their traffic and deleting pods frees
their IPs. The fixture's teardown checks nothing is left behind."""

from __future__ import annotations

import ipaddress
import json
import time

import pytest
import yaml

from .conftest import REPO, pylium_cni_installed, wait_until

pytestmark = [pytest.mark.privileged, pytest.mark.slow]

NP = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-from-client, namespace: default}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchLabels: {app: client}}}]
    ports: [{protocol: TCP, port: 80}]
"""

BAD_CNP = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: bad-port, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - toPorts: [{ports: [{port: "99999", protocol: TCP}]}]
"""

CNP_WEB = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web-from-other, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: other}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
"""

CCNP = """
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: deathstar-cw}
spec:
  endpointSelector: {matchLabels: {class: deathstar}}
  ingress: [{fromEndpoints: [{matchLabels: {org: empire}}]}]
"""


def _agent_policies(cluster) -> set[str]:
    return {f"{p['kind']}/{p['namespace']}/{p['name']}"
            for p in cluster.agent("/v1/policy")["policies"]}


def _apply_and_time(cluster, text: str, key: str, present: bool = True) -> float:
    t0 = time.monotonic()
    if present:
        cluster.kubectl("apply", "-f", "-", input=text)
    else:
        cluster.kubectl("delete", "-f", "-", input=text)
    wait_until(f"{key} {'in' if present else 'out of'} the agent",
               lambda: (key in _agent_policies(cluster)) == present, timeout=10, interval=0.02)
    return time.monotonic() - t0


def test_crds_and_manifests_accepted_by_the_real_api_server(cluster):
    from pylium_orchestrator_k8s import manifest

    text = manifest.dump(manifest.manifests(["vxlan"], pull_policy="Never"))
    out = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=text).stdout
    assert "daemonset.apps/pylium created (server dry run)" in out
    crds = cluster.kubectl_json("get", "crd")["items"]
    assert {c["metadata"]["name"] for c in crds} >= {
        "ciliumnetworkpolicies.cilium.io", "ciliumclusterwidenetworkpolicies.cilium.io"}


def test_policies_from_kubectl_reach_the_agent_within_2s(cluster):
    seconds = {}
    seconds["NetworkPolicy"] = _apply_and_time(cluster, NP,
                                               "NetworkPolicy/default/web-from-client")
    rule1 = (REPO / "examples" / "policies" / "l3-l4-rule1.yaml").read_text()
    seconds["CiliumNetworkPolicy"] = _apply_and_time(cluster, rule1,
                                                     "CiliumNetworkPolicy/default/rule1")
    seconds["CiliumClusterwideNetworkPolicy"] = _apply_and_time(
        cluster, CCNP, "CiliumClusterwideNetworkPolicy//deathstar-cw")
    print(f"\nkubectl apply -> agent repository: {seconds}")
    assert all(s <= 2.0 for s in seconds.values()), seconds
    got = cluster.agent("/v1/policy/default/rule1")["policies"]
    assert [(p["kind"], p["namespace"], p["name"]) for p in got] == [
        ("CiliumNetworkPolicy", "default", "rule1")]
    # acceptance is written into the CNP's status, as Cilium does
    status = wait_until("rule1 status", lambda: cluster.kubectl_json(
        "get", "cnp", "rule1").get("status", {}).get("nodes", {}).get("pylium-node"))
    assert status["ok"] is True and status["enforcing"] is True
    assert status["localPolicyRevision"] > 0
    # a CNP the API server takes but pylium refuses: an error in status, nothing enforced
    cluster.kubectl("apply", "-f", "-", input=BAD_CNP)
    bad = wait_until("bad-port status", lambda: cluster.kubectl_json(
        "get", "cnp", "bad-port").get("status", {}).get("nodes", {}).get("pylium-node"))
    assert bad["ok"] is False and "99999" in bad["error"]
    assert "CiliumNetworkPolicy/default/bad-port" not in _agent_policies(cluster)
    # deleting takes the rules out just as fast
    gone = _apply_and_time(cluster, NP, "NetworkPolicy/default/web-from-client", present=False)
    assert gone <= 2.0, gone
    cluster.kubectl("delete", "-f", "-", input=BAD_CNP)


def test_watches_resume_after_an_api_server_restart(cluster):
    before = cluster.orchestrator_status()["watches"]["CiliumNetworkPolicy"]
    cluster.run("restart-apiserver", "1")
    doc = yaml.safe_load(CCNP)
    doc["metadata"]["name"] = "after-restart"
    text = yaml.safe_dump(doc)
    t0 = time.monotonic()
    cluster.kubectl("apply", "-f", "-", input=text)
    wait_until("a policy applied after the restart",
               lambda: "CiliumClusterwideNetworkPolicy//after-restart" in _agent_policies(cluster),
               timeout=15, interval=0.05)
    after_restart = time.monotonic() - t0
    after = cluster.orchestrator_status()["watches"]["CiliumNetworkPolicy"]
    print(f"\nafter API server restart: policy in {after_restart:.2f}s; watch {before} -> {after}")
    assert after["watches"] > before["watches"]  # the watch was re-established
    assert after["errors"] > before["errors"]    # ... after the connection dropped
    # a deletion after the restart is seen too (the watch is live, not a one-off relist)
    _apply_and_time(cluster, text, "CiliumClusterwideNetworkPolicy//after-restart",
                    present=False)


def _deployment(name: str, app: str) -> dict:
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": app}},
                 "template": {
                     "metadata": {"labels": {"app": app}},
                     "spec": {
                         # no cluster DNS here; never resolve names from pods
                         "dnsPolicy": "None", "dnsConfig": {"nameservers": ["127.0.0.1"]},
                         "enableServiceLinks": False,
                         "automountServiceAccountToken": False,
                         "terminationGracePeriodSeconds": 1,
                         "containers": [{
                             "name": "main", "image": "registry.local/busybox:pylium",
                             "imagePullPolicy": "Never",
                             "command": ["httpd", "-f", "-p", "80", "-h", "/www"]}]}}}}


def _controller_uid(obj: dict) -> str | None:
    return next((ref["uid"] for ref in obj["metadata"].get("ownerReferences") or []
                 if ref.get("controller")), None)


def _running_pods(cluster, app: str) -> list[dict]:
    """Running pods of the Deployment `app` as it is now: controlled by a ReplicaSet that
    this Deployment object controls. A previous rollout's pods carry the same labels and
    keep running, not yet terminating, until the garbage collector gets to them after the
    old Deployment was deleted; taken for the new ones they die in the middle of a test
    (the CI failure where "other denied" held and "client still allowed" never did: both
    probes ran in pods that were being killed)."""
    found = cluster.kubectl("get", "deployment", app, "--ignore-not-found", "-o", "json").stdout
    if not found.strip():
        return []
    uid = json.loads(found)["metadata"]["uid"]
    owned = {rs["metadata"]["uid"] for rs in cluster.kubectl_json(
        "get", "replicasets", "-l", f"app={app}")["items"] if _controller_uid(rs) == uid}
    pods = cluster.kubectl_json("get", "pods", "-l", f"app={app}")["items"]
    return [p for p in pods if p["status"].get("phase") == "Running"
            and p["status"].get("podIP") and not p["metadata"].get("deletionTimestamp")
            and _controller_uid(p) in owned]


class ProbeNotRun(AssertionError):
    """kubectl exec did not run the probe at all (pod or container gone, API error)."""


def _wget(cluster, pod: str, ip: str) -> bool:
    """HTTP GET from `pod` (busybox nc: the static busybox's wget crashes in glibc's NSS):
    True if web answered, False if the connection failed. A probe that never ran in the
    pod raises `ProbeNotRun` — it says nothing about policy, so it must not pass for a
    deny."""
    out = cluster.kubectl("exec", pod, "--", "sh", "-c",
                          f'printf "GET / HTTP/1.0\\r\\n\\r\\n" | nc -w 2 {ip} 80; '
                          'echo "probe-exit=$?"', check=False)
    if "probe-exit=" not in out.stdout:
        raise ProbeNotRun(f"probe from {pod} did not run: {(out.stderr or out.stdout).strip()}")
    return "200 OK" in out.stdout and "pylium" in out.stdout


@pytest.fixture
def two_deployments(cluster):
    docs = [_deployment("web", "web"), _deployment("client", "client"),
            _deployment("other", "other")]
    text = yaml.safe_dump_all(docs)
    t0 = time.monotonic()
    cluster.kubectl("apply", "-f", "-", input=text)
    pods = {app: wait_until(f"{app} pod running", lambda a=app: _running_pods(cluster, a),
                            timeout=120, interval=0.2)[0]
            for app in ("web", "client", "other")}
    print(f"\npods running in {time.monotonic() - t0:.1f}s")
    yield pods
    # foreground: --wait returns once the pods are gone too, not just the Deployments
    cluster.kubectl("delete", "-f", "-", "--wait=true", "--timeout=60s",
                    "--cascade=foreground", input=text, check=False)


def test_a_previous_rollouts_lingering_pods_are_not_taken_for_the_new_ones(cluster):
    """Regression (CI, under load): the pods of a deleted Deployment run on, not yet
    terminating, until the garbage collector in the controller manager deletes them. A
    fixture re-creating the Deployment at once took them for its own ("pods running in
    1.7s") and they died mid-test, failing "client still allowed" while "other denied"
    passed for the wrong reason. The lag is made certain here by freezing the controller
    manager."""
    import os
    import signal
    from pathlib import Path

    text = yaml.safe_dump(_deployment("linger", "linger"))
    cluster.kubectl("apply", "-f", "-", input=text)
    old = wait_until("first rollout running", lambda: _running_pods(cluster, "linger"),
                     timeout=120, interval=0.2)[0]["metadata"]["name"]
    kcm = next(e for e in json.loads(cluster.run("status").stdout)["processes"]
               if e["name"] == "kube-controller-manager")
    assert "kube-controller-manager" in Path(f"/proc/{kcm['pid']}/cmdline").read_text()
    os.kill(kcm["pid"], signal.SIGSTOP)
    try:
        # what the fixture's teardown did (background cascade), then the next fixture
        cluster.kubectl("delete", "-f", "-", "--wait=true", "--timeout=30s", input=text)
        cluster.kubectl("apply", "-f", "-", input=text)
        lingering = cluster.kubectl_json("get", "pod", old)
        assert lingering["status"]["phase"] == "Running"
        assert not lingering["metadata"].get("deletionTimestamp")
        assert _running_pods(cluster, "linger") == []  # not the new Deployment's pod
    finally:
        os.kill(kcm["pid"], signal.SIGCONT)
    try:
        new = wait_until("second rollout running", lambda: _running_pods(cluster, "linger"),
                         timeout=120, interval=0.2)[0]
        assert new["metadata"]["name"] != old

        def probe_from_old_refused() -> bool:
            try:
                _wget(cluster, old, new["status"]["podIP"])
            except ProbeNotRun:
                return True
            return False

        # once the garbage collector killed the old pod, a probe from it raises: it can
        # never pass for a policy deny
        wait_until("old pod gone", probe_from_old_refused, timeout=60, interval=0.5)
    finally:
        cluster.kubectl("delete", "-f", "-", "--wait=true", "--timeout=60s",
                        "--cascade=foreground", input=text, check=False)


def test_pods_run_and_talk(cluster, two_deployments):
    pods = two_deployments
    cidr = ipaddress.ip_network(cluster.env["pod_cidr"])
    for pod in pods.values():
        assert ipaddress.ip_address(pod["status"]["podIP"]) in cidr
    web_ip = pods["web"]["status"]["podIP"]
    assert wait_until("client -> web HTTP",
                      lambda: _wget(cluster, pods["client"]["metadata"]["name"], web_ip),
                      timeout=20)


@pytest.mark.skipif(not pylium_cni_installed(),
                    reason="pylium-cni is not installed (the cni branch); pods use the "
                           "reference bridge plugin, so they get no pylium endpoints")
def test_pods_are_pylium_endpoints_with_labels_policy_and_ip_release(cluster, two_deployments):
    pods = two_deployments
    endpoints = {(e["namespace"], e["name"]): e for e in cluster.agent("/v1/endpoint")}
    for app, pod in pods.items():
        ep = endpoints[("default", pod["metadata"]["name"])]
        assert ep["ipv4"] == pod["status"]["podIP"]
        assert ep["labels"]["app"] == app
        assert "k8s:io.kubernetes.pod.namespace=default" in ep["identity_labels"]
        assert ep["state"] == "ready"
    web_ip = pods["web"]["status"]["podIP"]
    client, other = pods["client"]["metadata"]["name"], pods["other"]["metadata"]["name"]
    wait_until("client and other reach web before any policy",
               lambda: _wget(cluster, client, web_ip) and _wget(cluster, other, web_ip),
               timeout=20)
    # NetworkPolicy: only app=client may reach web; in force within 2 s of kubectl apply
    t0 = time.monotonic()
    cluster.kubectl("apply", "-f", "-", input=NP)
    wait_until("other denied", lambda: not _wget(cluster, other, web_ip), timeout=10,
               interval=0.05)
    enforced = time.monotonic() - t0
    # each probe may take its 2 s timeout on a busy machine: allow a few of them
    wait_until("client still allowed", lambda: _wget(cluster, client, web_ip), timeout=20)
    print(f"\nNetworkPolicy enforced {enforced:.2f}s after kubectl apply")
    assert enforced <= 2.0 + 2.0  # + the denied probe's own 2 s timeout
    cluster.kubectl("delete", "-f", "-", input=NP)
    wait_until("NetworkPolicy lifted", lambda: _wget(cluster, other, web_ip), timeout=10)
    # a CiliumNetworkPolicy the other way round: only app=other may reach web
    t0 = time.monotonic()
    cluster.kubectl("apply", "-f", "-", input=CNP_WEB)
    wait_until("client denied", lambda: not _wget(cluster, client, web_ip), timeout=10,
               interval=0.05)
    enforced = time.monotonic() - t0
    wait_until("other allowed", lambda: _wget(cluster, other, web_ip), timeout=20)
    print(f"CiliumNetworkPolicy enforced {enforced:.2f}s after kubectl apply")
    assert enforced <= 2.0 + 2.0
    cluster.kubectl("delete", "-f", "-", input=CNP_WEB)
    # deleting a pod frees its IP and endpoint
    old_ip = pods["other"]["status"]["podIP"]
    cluster.kubectl("delete", "pod", other, "--wait=true", "--timeout=60s")
    wait_until("endpoint of the deleted pod gone", lambda: all(
        e["name"] != other for e in cluster.agent("/v1/endpoint")), timeout=30)
    wait_until("its IP free", lambda: all(
        e["ipv4"] != old_ip for e in cluster.agent("/v1/endpoint")), timeout=30)


@pytest.mark.timeout(900)  # builds and imports a ~530 MB image
def test_the_agent_as_a_daemonset_from_pylium_k8s_manifest(cluster, tmp_path):
    """The image from `pylium k8s image`, the objects from `pylium k8s manifest`: the agent
    the DaemonSet runs (not the one k8s/cluster.py started) follows the API server."""
    import subprocess
    import sys
    from pathlib import Path

    pylium = str(Path(sys.executable).with_name("pylium"))
    env = cluster.env
    archive = tmp_path / "pylium.tar"
    t0 = time.monotonic()
    subprocess.run([pylium, "k8s", "image", "--out", str(archive)], check=True,
                   capture_output=True, text=True, timeout=600)
    built = time.monotonic() - t0
    subprocess.run(["ctr", "-a", env["containerd_socket"], "-n", "k8s.io", "images", "import",
                    str(archive)], check=True, capture_output=True, timeout=600)
    imported = time.monotonic() - t0 - built
    run_dir = str(Path(env["agent_socket"]).parent)
    state = Path(f"/var/lib/pylium-k8s/{cluster.name}/ds-state")
    cni_conf = (f"/var/lib/pylium-k8s/{cluster.name}/cni/net.d" if cluster.cni == "pylium"
                else str(state / "cni-unused"))
    text = subprocess.run(
        [pylium, "k8s", "manifest", "--image", "registry.local/pylium:0.1.0",
         "--pull-policy", "Never", "--pod-cidr", env["pod_cidr"],
         "--api-server", "127.0.0.1:6443", "--host-run-dir", run_dir,
         "--host-state-dir", str(state), "--cni-conf-dir", cni_conf,
         "--bpffs-root", f"/sys/fs/bpf/pylium-k8s-{cluster.name}/ds"],
        check=True, capture_output=True, text=True).stdout
    cluster.run("stop-agent")
    try:
        t1 = time.monotonic()
        cluster.kubectl("apply", "-f", "-", input=text)
        cluster.kubectl("-n", "kube-system", "rollout", "status", "daemonset/pylium",
                        "--timeout=240s", timeout=300)
        ready = time.monotonic() - t1
        config = cluster.agent("/v1/config")
        assert config["socket"] == "/var/run/pylium/pylium.sock"  # the container's view
        assert config["node_name"] == "pylium-node" and config["orchestrator"] == "kubernetes"
        seconds = _apply_and_time(cluster, CCNP.replace("deathstar-cw", "from-daemonset"),
                                  "CiliumClusterwideNetworkPolicy//from-daemonset")
        print(f"\nagent image built {built:.0f}s, imported {imported:.0f}s; DaemonSet ready "
              f"{ready:.1f}s; policy reached it in {seconds:.2f}s")
        assert seconds <= 2.0
        status = wait_until("status written by the DaemonSet's agent", lambda: cluster.kubectl_json(
            "get", "ccnp", "from-daemonset").get("status", {}).get("nodes", {}).get(
            "pylium-node"))
        assert status["ok"] is True
        cluster.kubectl("delete", "ccnp", "from-daemonset")
    finally:
        cluster.kubectl("delete", "-f", "-", "--wait=true", "--timeout=60s", input=text,
                        check=False)
        cluster.run("start-agent", "--cni", cluster.cni)


def test_up_timing_recorded(cluster):
    state = json.loads(cluster.run("status").stdout)
    assert state["ready_seconds"] > 0
    assert {p["name"] for p in state["processes"]} >= {
        "etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "containerd",
        "kubelet", "pylium-agent"}
