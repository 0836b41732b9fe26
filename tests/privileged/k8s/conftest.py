"""A real single-node Kubernetes 1.20 (k8s/cluster.py) for the whole module, in its own
network namespace, with the pylium agent (orchestrator `kubernetes`) beside the kubelet.

Needs the binaries cache k8s/build.sh fills (`make test` builds it first). Without it these
tests are skipped, saying so, unless PYLIUM_K8S_BUILD=1 asks to build it here."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
CLUSTER = REPO / "k8s" / "cluster.py"
CACHE = Path(os.environ.get("PYLIUM_K8S_CACHE", "/var/cache/pylium-k8s"))
BINARIES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet",
            "kubectl")


def cache_ready() -> bool:
    return all(os.access(CACHE / "bin" / b, os.X_OK) for b in BINARIES) and \
        (CACHE / "images" / "pause.tar").is_file() and (CACHE / "images" / "busybox.tar").is_file()


def pylium_cni_installed() -> bool:
    return Path(sys.executable).with_name("pylium-cni").exists()


class Cluster:
    def __init__(self, name: str, cni: str):
        self.name = name
        self.cni = cni
        self.env = {}

    def run(self, *args: str, check: bool = True, timeout: float = 300):
        proc = subprocess.run([sys.executable, str(CLUSTER), *args, "--name", self.name],
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"cluster.py {' '.join(args)} failed:\n{proc.stdout}\n"
                                 f"{proc.stderr}")
        return proc

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 120) -> subprocess.CompletedProcess:
        proc = subprocess.run(["nsenter", f"--net=/run/netns/{self.env['netns']}", "--",
                               self.env["kubectl"], f"--kubeconfig={self.env['kubeconfig']}",
                               *args], input=input, capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)}: {proc.stderr or proc.stdout}")
        return proc

    def kubectl_json(self, *args: str) -> dict:
        return json.loads(self.kubectl(*args, "-o", "json").stdout)

    def agent(self, path: str) -> dict:
        from pylium.agent.client import AgentClient

        return AgentClient(self.env["agent_socket"], timeout=10).get(path)

    def orchestrator_status(self) -> dict:
        caps = self.agent("/v1/status")["capabilities"]
        return next(c for c in caps if c["kind"] == "orchestrator" and c["selected"])["status"]

    def leftovers(self) -> list[str]:
        left = []
        if os.path.exists(f"/run/netns/{self.env['netns']}"):
            left.append(f"netns {self.env['netns']}")
        for path in (f"/var/lib/pylium-k8s/{self.name}", f"/run/pylium-k8s-{self.name}",
                     f"/sys/fs/bpf/pylium-k8s-{self.name}"):
            if os.path.lexists(path):
                left.append(path)
        mounts = Path("/proc/self/mountinfo").read_text()
        if f"/var/lib/pylium-k8s/{self.name}" in mounts or f"pylium-k8s-{self.name}" in mounts:
            left.append("mounts under the cluster's directories")
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        left += [f"process {line[:120]}" for line in ps.splitlines()
                 if f"pylium-k8s/{self.name}" in line or f"pylium-k8s-{self.name}" in line]
        return left


def wait_until(what: str, check, timeout: float = 60.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except Exception as exc:  # not there yet
            last = exc
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout:.0f}s (last: {last})")


def keep_logs(c: Cluster) -> Path | None:
    """Copy the cluster's logs (agent, kubelet, API server...) out of its data directory
    before `down` deletes it: into $PYLIUM_K8S_KEEP_LOGS, or /tmp when a test failed."""
    import shutil
    import tempfile

    target = os.environ.get("PYLIUM_K8S_KEEP_LOGS")
    dest = (Path(target) / c.name if target
            else Path(tempfile.mkdtemp(prefix=f"pylium-k8s-{c.name}-logs-")))
    src = Path(c.env.get("logs", ""))
    if not src.is_dir():
        return None
    shutil.copytree(src, dest, dirs_exist_ok=True)
    return dest


@pytest.fixture(scope="package")
def cluster(request):
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, containerd, the kubelet)")
    if not cache_ready():
        if os.environ.get("PYLIUM_K8S_BUILD") == "1":
            subprocess.run([str(REPO / "k8s" / "build.sh")], check=True)
        else:
            pytest.skip(f"Kubernetes binaries cache {CACHE} absent: `make k8s-cache` builds it "
                        "(make test does; or set PYLIUM_K8S_BUILD=1)")
    cni = "pylium" if pylium_cni_installed() else "bridge"
    c = Cluster(f"t{secrets.token_hex(3)}", cni)
    c.env = json.loads(c.run("env").stdout)
    sysctls_before = {k: Path(f"/proc/sys/{k}").read_text() for k in
                      ("vm/overcommit_memory", "kernel/panic", "kernel/panic_on_oops")}
    netns_before = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    failed_before = request.session.testsfailed
    t0 = time.monotonic()
    try:
        up = c.run("up", "--cni", cni, timeout=600)
        c.up_output = up.stdout
        c.up_seconds = time.monotonic() - t0
        yield c
    finally:
        if c.env and (os.environ.get("PYLIUM_K8S_KEEP_LOGS") or
                      request.session.testsfailed > failed_before):
            print(f"\nk8s cluster {c.name}: logs kept in {keep_logs(c)}")
        t1 = time.monotonic()
        down = c.run("down", check=False, timeout=300)
        c.down_seconds = time.monotonic() - t1
        print(f"\nk8s cluster {c.name}: up {getattr(c, 'up_seconds', 0):.1f}s, "
              f"down {c.down_seconds:.1f}s\n{down.stdout.strip()}")
        left = c.leftovers()
        after = {k: Path(f"/proc/sys/{k}").read_text() for k in sysctls_before}
        new_netns = {n for n in (os.listdir("/run/netns") if os.path.isdir("/run/netns")
                                 else []) if n.startswith("cni-")} - netns_before
        assert not left, f"teardown left: {left}"
        assert after == sysctls_before, "sysctls the kubelet changed were not restored"
        assert not new_netns, f"teardown left pod namespaces {new_netns}"
