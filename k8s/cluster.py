#!/usr/bin/env python3
"""A real single-node Kubernetes 1.20 on this machine, inside one network namespace.

    cluster.py up [--name N] [--cni auto|pylium|bridge] [--no-agent]
    cluster.py down [--name N]
    cluster.py status [--name N]
    cluster.py kubectl [--name N] -- ARGS...     (kubectl inside the node's namespace)

Everything runs in the netns `pk8s-<name>` (created here, with a veth (both ends inside) holding the
node IP): etcd, the API server, controller manager, scheduler, containerd, the kubelet and
the node's pylium agent (orchestrator `kubernetes`). Pod veths therefore land in that
namespace, never in the root namespace; the API server is reachable only from inside it
(`cluster.py kubectl`). Binaries come from the cache `k8s/build.sh` fills
($PYLIUM_K8S_CACHE, default /var/cache/pylium-k8s).

Network safety (../shared/PLATFORM.md): the kubelet runs with AWS_EC2_METADATA_DISABLED=true
and a resolv.conf naming only 127.0.0.1, the API server with
--kubelet-preferred-address-types=InternalIP; nothing resolves names outside.

`down` stops every process by its recorded pid (checked against its command line), kills
what containerd's shims left, unmounts everything under the cluster's directories and
/run/netns/cni-* created meanwhile, removes the cgroups and directories the kubelet created,
restores the sysctls it changed, deletes the namespace and the agent's BPF pins."""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CACHE = Path(os.environ.get("PYLIUM_K8S_CACHE", "/var/cache/pylium-k8s"))
REPO = Path(__file__).resolve().parent.parent
NODE_IP = "10.235.0.2"
NODE_PREFIX = 24
POD_CIDR = "10.236.0.0/24"
#: the controller manager hands each node a /24 of it, this node the first (POD_CIDR)
CLUSTER_CIDR = "10.236.0.0/16"
SERVICE_CIDR = "10.237.0.0/24"
ETCD_PORT = 23790
ETCD_PEER_PORT = 23800
API_PORT = 6443
PAUSE_IMAGE = "registry.local/pause:3.4.1"
BUSYBOX_IMAGE = "registry.local/busybox:pylium"
#: what the kubelet sets on the host (`setupKernelTunables`); recorded and restored
SYSCTLS = ("vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops",
           "kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes")
#: directories the kubelet creates outside its --root-dir
KUBELET_HOST_DIRS = ("/var/lib/kubelet", "/var/log/pods", "/var/log/containers")
CGROUP_NAMES = ("kubepods", "k8s.io")


class ClusterError(Exception):
    pass


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Paths:
    def __init__(self, name: str):
        self.name = name
        self.netns = f"pk8s-{name}"
        self.data = Path(f"/var/lib/pylium-k8s/{name}")
        self.run = Path(f"/run/pylium-k8s-{name}")
        self.state = self.run / "state.json"
        self.pki = self.data / "pki"
        self.kubeconfig = self.data / "admin.kubeconfig"
        self.logs = self.data / "logs"
        self.containerd_sock = self.run / "containerd.sock"
        self.cni_bin = self.data / "cni" / "bin"
        self.cni_conf = self.data / "cni" / "net.d"
        self.kubelet_root = self.data / "kubelet"
        self.agent_dir = self.data / "agent"
        self.agent_sock = self.run / "pylium.sock"
        self.bpffs = Path(f"/sys/fs/bpf/pylium-k8s-{name}")
        self.lock = Path(f"/run/pylium-k8s-{name}.lock")


# helpers ---------------------------------------------------------------------------------
def sh(*argv: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise ClusterError(f"{' '.join(argv[:4])}...: {(proc.stderr or proc.stdout).strip()}")
    return proc


def in_netns(p: Paths, argv: list[str]) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{p.netns}", "--", *argv]


def enter_netns(p: Paths) -> None:
    """Move this (single-threaded) process into the node's namespace: its probes of the API
    server, etcd and the kubelet reach the addresses they listen on there."""
    import ctypes

    fd = os.open(f"/run/netns/{p.netns}", os.O_RDONLY)
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
            raise ClusterError(f"setns {p.netns}: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)


def proc_alive(pid: int, needle: str) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return needle in cmdline


def stop_pid(pid: int, needle: str, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `timeout`: only if `pid` still runs `needle`."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        if not proc_alive(pid, needle):
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and proc_alive(pid, needle):
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.05)


def read_state(p: Paths) -> dict:
    try:
        return json.loads(p.state.read_text())
    except (OSError, ValueError):
        return {}


def write_state(p: Paths, state: dict) -> None:
    p.run.mkdir(parents=True, exist_ok=True)
    tmp = p.state.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, p.state)


def wait_for(what: str, check, timeout: float, proc: subprocess.Popen | None = None,
             log_path: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:] if log_path else ""
            raise ClusterError(f"{what}: process exited with {proc.returncode}\n{tail}")
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.1)
    tail = log_path.read_text(errors="replace")[-3000:] if log_path else ""
    raise ClusterError(f"{what}: not ready within {timeout:.0f}s\n{tail}")


def mounts_under(prefixes: list[str]) -> list[str]:
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if any(point == pre or point.startswith(pre.rstrip("/") + "/") for pre in prefixes):
            found.append(point)
    return found


def binary(name: str) -> str:
    path = CACHE / "bin" / name
    if not os.access(path, os.X_OK):
        raise ClusterError(f"{path} missing: build the cache first (make k8s-cache, "
                           "or k8s/build.sh)")
    return str(path)


# certificates and kubeconfig ------------------------------------------------------------
def make_pki(p: Paths) -> str:
    """CA, API server serving cert, service-account key pair, admin token."""
    p.pki.mkdir(parents=True, exist_ok=True)
    k = p.pki
    sh("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30",
       "-subj", "/CN=pylium-k8s-ca", "-keyout", str(k / "ca.key"), "-out", str(k / "ca.crt"))
    ext = k / "apiserver.ext"
    ext.write_text("subjectAltName=DNS:kubernetes,DNS:kubernetes.default,"
                   "DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,"
                   f"DNS:localhost,IP:127.0.0.1,IP:{NODE_IP},IP:10.237.0.1\n"
                   "extendedKeyUsage=serverAuth\n")
    sh("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=kube-apiserver",
       "-keyout", str(k / "apiserver.key"), "-out", str(k / "apiserver.csr"))
    sh("openssl", "x509", "-req", "-in", str(k / "apiserver.csr"), "-CA", str(k / "ca.crt"),
       "-CAkey", str(k / "ca.key"), "-CAcreateserial", "-days", "30", "-extfile", str(ext),
       "-out", str(k / "apiserver.crt"))
    # the API server's client certificate towards the kubelet (logs, exec)
    sh("openssl", "req", "-newkey", "rsa:2048", "-nodes",
       "-subj", "/O=system:masters/CN=kube-apiserver-kubelet-client",
       "-keyout", str(k / "kubelet-client.key"), "-out", str(k / "kubelet-client.csr"))
    sh("openssl", "x509", "-req", "-in", str(k / "kubelet-client.csr"), "-CA", str(k / "ca.crt"),
       "-CAkey", str(k / "ca.key"), "-CAcreateserial", "-days", "30",
       "-out", str(k / "kubelet-client.crt"))
    sh("openssl", "genrsa", "-out", str(k / "sa.key"), "2048")
    sh("openssl", "rsa", "-in", str(k / "sa.key"), "-pubout", "-out", str(k / "sa.pub"))
    token = secrets.token_hex(16)
    (k / "tokens.csv").write_text(f'{token},admin,admin,"system:masters"\n')
    ca = base64.b64encode((k / "ca.crt").read_bytes()).decode()
    p.kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "pylium",
        "clusters": [{"name": "pylium", "cluster": {
            "server": f"https://127.0.0.1:{API_PORT}", "certificate-authority-data": ca}}],
        "users": [{"name": "admin", "user": {"token": token}}],
        "contexts": [{"name": "pylium", "context": {"cluster": "pylium", "user": "admin"}}],
    }, indent=1))
    os.chmod(p.kubeconfig, 0o600)
    return token


def api_get(p: Paths, path: str, token: str, timeout: float = 2.0) -> tuple[int, bytes]:
    ctx = ssl.create_default_context(cafile=str(p.pki / "ca.crt"))
    req = urllib.request.Request(f"https://127.0.0.1:{API_PORT}{path}",
                                 headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


# processes -------------------------------------------------------------------------------
class Runner:
    def __init__(self, p: Paths, state: dict):
        self.p = p
        self.state = state

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None,
              needle: str | None = None) -> subprocess.Popen:
        self.p.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.p.logs / f"{name}.log"
        full_env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
                    "HOME": "/root", "AWS_EC2_METADATA_DISABLED": "true",
                    **(env or {})}
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(in_netns(self.p, argv), stdout=out, stderr=out,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    env=full_env)
        # nsenter execs the command: the pid is the program's own
        self.state.setdefault("processes", []).append(
            {"name": name, "pid": proc.pid, "match": needle or str(self.p.data),
             "argv": list(argv), "env": dict(env or {})})
        write_state(self.p, self.state)
        return proc


def containerd_config(p: Paths) -> str:
    d = p.data / "containerd"
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return f"""version = 2
root = "{d}/root"
state = "{p.run}/containerd-state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper"]

[grpc]
  address = "{p.containerd_sock}"

[ttrpc]
  address = "{p.run}/containerd.sock.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"

[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  # this VM lacks CAP_SYS_RESOURCE: without it runc fails on the pause container
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        SystemdCgroup = false
  [{cri}.cni]
    bin_dir = "{p.cni_bin}"
    conf_dir = "{p.cni_conf}"
"""


def setup_cni(p: Paths, cni: str) -> None:
    p.cni_bin.mkdir(parents=True, exist_ok=True)
    p.cni_conf.mkdir(parents=True, exist_ok=True)
    for plugin in ("loopback", "host-local", "bridge"):
        link = p.cni_bin / plugin
        if not link.exists():
            link.symlink_to(f"/usr/lib/cni/{plugin}")
    pylium_cni = Path(sys.executable).with_name("pylium-cni")
    if pylium_cni.exists():
        # the native transport (`make setup` builds it; else the python -I -S launcher):
        # what a runtime should exec per pod
        subprocess.run([sys.executable, "-m", "pylium.cni.launcher", str(p.cni_bin)],
                       check=True, capture_output=True)
    if cni == "bridge":
        # the reference plugins, for a cluster without pylium-cni (its bridge lives in the
        # node's namespace; no masquerade, no iptables)
        (p.cni_conf / "10-bridge.conflist").write_text(json.dumps({
            "cniVersion": "0.4.0", "name": "bridge", "plugins": [{
                "type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": False,
                "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_CIDR}]],
                         "routes": [{"dst": "0.0.0.0/0"}],
                         "dataDir": str(p.data / "cni" / "ipam")}}]}, indent=1))
    elif not pylium_cni.exists():
        raise ClusterError(f"--cni pylium: {pylium_cni} is not installed (use --cni bridge)")


def agent_config(p: Paths, cni: str) -> dict:
    return {
        "node_name": "pylium-node",
        "socket": str(p.agent_sock),
        "state_dir": str(p.agent_dir),
        "bpffs_root": str(p.bpffs),
        "pod_cidr": POD_CIDR,
        "node_ip": NODE_IP,
        "orchestrator": "kubernetes",
        "plugin_options": {"kubernetes": {
            # with the bridge plugins the agent must not put its conflist first
            "kubeconfig": str(p.kubeconfig),
            "cni_conf_dir": str(p.cni_conf) if cni == "pylium" else "",
            "cni_socket": str(p.agent_sock), "sync_timeout": 60}},
    }


def up(p: Paths, cni: str, with_agent: bool) -> None:
    if read_state(p).get("processes"):
        raise ClusterError(f"cluster {p.name} is already up (cluster.py down --name {p.name})")
    bins = {b: binary(b) for b in ("kube-apiserver", "kube-controller-manager",
                                    "kube-scheduler", "kubelet", "kubectl")}
    for tool in ("containerd", "ctr", "runc", "etcd", "openssl", "nsenter"):
        if shutil.which(tool) is None:
            raise ClusterError(f"{tool} not installed (k8s/build.sh installs it)")
    t0 = time.monotonic()
    state: dict = {"name": p.name, "started": time.time(), "sysctls": {},
                   "created_dirs": [d for d in KUBELET_HOST_DIRS if not Path(d).exists()],
                   "created_cgroups": [],
                   "netns_before": sorted(os.listdir("/run/netns"))
                   if os.path.isdir("/run/netns") else []}
    for key in SYSCTLS:
        try:
            state["sysctls"][key] = Path(f"/proc/sys/{key}").read_text().strip()
        except OSError:
            pass
    for ctrl in Path("/sys/fs/cgroup").iterdir():
        for cg in CGROUP_NAMES:
            if ctrl.is_dir() and not (ctrl / cg).exists():
                state["created_cgroups"].append(str(ctrl / cg))
    p.data.mkdir(parents=True, exist_ok=True)
    write_state(p, state)
    # the node's namespace, with the node IP on a dummy link (no way out of it)
    sh("ip", "netns", "add", p.netns)
    state["netns"] = p.netns
    write_state(p, state)
    sh("ip", "-n", p.netns, "link", "set", "lo", "up")
    # no dummy driver in this kernel: a veth pair with both ends inside the namespace
    sh("ip", "-n", p.netns, "link", "add", "k8snode0", "type", "veth", "peer", "name",
       "k8snode0p")
    sh("ip", "-n", p.netns, "addr", "add", f"{NODE_IP}/{NODE_PREFIX}", "dev", "k8snode0")
    sh("ip", "-n", p.netns, "link", "set", "k8snode0", "up")
    sh("ip", "-n", p.netns, "link", "set", "k8snode0p", "up")
    enter_netns(p)
    token = make_pki(p)
    state["token"] = token
    run = Runner(p, state)
    resolv = p.data / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\noptions ndots:1\n")

    etcd_dir = p.data / "etcd"
    proc = run.start("etcd", ["etcd", "--name", p.name, "--data-dir", str(etcd_dir),
                              "--listen-client-urls", f"http://127.0.0.1:{ETCD_PORT}",
                              "--advertise-client-urls", f"http://127.0.0.1:{ETCD_PORT}",
                              "--listen-peer-urls", f"http://127.0.0.1:{ETCD_PEER_PORT}",
                              "--initial-advertise-peer-urls",
                              f"http://127.0.0.1:{ETCD_PEER_PORT}",
                              "--initial-cluster", f"{p.name}=http://127.0.0.1:{ETCD_PEER_PORT}"])
    k = p.pki
    apiserver_args = [
        bins["kube-apiserver"], f"--etcd-servers=http://127.0.0.1:{ETCD_PORT}",
        "--bind-address=0.0.0.0", f"--secure-port={API_PORT}", "--insecure-port=0",
        f"--advertise-address={NODE_IP}", f"--cert-dir={p.data / 'apiserver-certs'}",
        f"--tls-cert-file={k / 'apiserver.crt'}", f"--tls-private-key-file={k / 'apiserver.key'}",
        f"--client-ca-file={k / 'ca.crt'}", f"--token-auth-file={k / 'tokens.csv'}",
        "--authorization-mode=AlwaysAllow",
        f"--service-account-key-file={k / 'sa.pub'}",
        f"--service-account-signing-key-file={k / 'sa.key'}",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        f"--service-cluster-ip-range={SERVICE_CIDR}", "--allow-privileged=true",
        "--kubelet-preferred-address-types=InternalIP", "--profiling=false",
        f"--kubelet-client-certificate={k / 'kubelet-client.crt'}",
        f"--kubelet-client-key={k / 'kubelet-client.key'}",
        "--watch-cache=true", "--v=1",
    ]
    state["apiserver_args"] = apiserver_args
    run.start("kube-apiserver", apiserver_args, needle=str(k / "tokens.csv"))
    wait_for("etcd", lambda: _tcp(ETCD_PORT), 20, proc, p.logs / "etcd.log")
    wait_for("kube-apiserver /readyz", lambda: api_get(p, "/readyz", token)[0] == 200, 90,
             None, p.logs / "kube-apiserver.log")
    log(f"API server ready ({time.monotonic() - t0:.1f}s)")
    apply_crds(p, bins["kubectl"])
    kc = str(p.kubeconfig)
    common = [f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}",
              f"--authorization-kubeconfig={kc}", "--leader-elect=false",
              "--bind-address=127.0.0.1", "--port=0", "--v=1"]
    run.start("kube-controller-manager", [
        bins["kube-controller-manager"], *common, "--secure-port=10257",
        f"--cert-dir={p.data / 'cm-certs'}",
        f"--service-account-private-key-file={k / 'sa.key'}", f"--root-ca-file={k / 'ca.crt'}",
        f"--flex-volume-plugin-dir={p.data / 'flexvolume'}",
        "--use-service-account-credentials=false",
        # the node's spec.podCIDR (pylium's Nodes -> node registry): the first /24 is POD_CIDR
        "--allocate-node-cidrs=true", f"--cluster-cidr={CLUSTER_CIDR}",
        "--node-cidr-mask-size=24"], needle=kc)
    run.start("kube-scheduler", [bins["kube-scheduler"], *common, "--secure-port=10259",
                                 f"--cert-dir={p.data / 'scheduler-certs'}"], needle=kc)
    (p.data / "containerd").mkdir(parents=True, exist_ok=True)
    ctd_conf = p.data / "containerd.toml"
    ctd_conf.write_text(containerd_config(p))
    setup_cni(p, cni)
    proc = run.start("containerd", ["containerd", "--config", str(ctd_conf)], needle=str(ctd_conf))
    wait_for("containerd", lambda: p.containerd_sock.is_socket() and sh(
        "ctr", "-a", str(p.containerd_sock), "version").returncode == 0, 20, proc,
        p.logs / "containerd.log")
    for image in ("pause.tar", "busybox.tar"):
        sh("ctr", "-a", str(p.containerd_sock), "-n", "k8s.io", "images", "import",
           str(CACHE / "images" / image))
    log(f"containerd up, images imported ({time.monotonic() - t0:.1f}s)")
    if with_agent:
        start_agent(p, state, cni)
        log(f"pylium agent up ({time.monotonic() - t0:.1f}s)")
    elif cni == "pylium":
        log("no agent: the node stays NotReady until one writes 05-pylium.conflist")
    kubelet_args = [
        bins["kubelet"], f"--kubeconfig={kc}", "--container-runtime=remote",
        f"--container-runtime-endpoint=unix://{p.containerd_sock}",
        "--cgroup-driver=cgroupfs", "--fail-swap-on=false",
        f"--root-dir={p.kubelet_root}", f"--cert-dir={p.kubelet_root / 'pki'}",
        f"--volume-plugin-dir={p.data / 'volume-plugins'}",
        "--hostname-override=pylium-node", f"--node-ip={NODE_IP}", f"--address={NODE_IP}",
        "--make-iptables-util-chains=false", "--read-only-port=0",
        "--eviction-hard=memory.available<20Mi,nodefs.available<1%,imagefs.available<1%",
        "--image-gc-high-threshold=100", "--image-gc-low-threshold=99",
        "--node-status-update-frequency=1s", f"--resolv-conf={resolv}",
        "--anonymous-auth=false", "--authorization-mode=AlwaysAllow",
        f"--client-ca-file={k / 'ca.crt'}", "--healthz-bind-address=127.0.0.1",
        "--healthz-port=10248", f"--pod-infra-container-image={PAUSE_IMAGE}",
        "--serialize-image-pulls=false", "--v=1",
    ]
    proc = run.start("kubelet", kubelet_args, needle=str(p.kubelet_root))
    wait_for("kubelet /healthz", lambda: _http_ok("http://127.0.0.1:10248/healthz"), 60, proc,
             p.logs / "kubelet.log")
    log(f"kubelet healthy ({time.monotonic() - t0:.1f}s)")
    if cni == "bridge" or with_agent:
        wait_for("node Ready", lambda: _node_ready(p, token), 90, proc, p.logs / "kubelet.log")
        log(f"node Ready ({time.monotonic() - t0:.1f}s)")
    state["ready_seconds"] = round(time.monotonic() - t0, 1)
    write_state(p, state)
    print(f"cluster {p.name} up in {state['ready_seconds']}s; kubectl: "
          f"{Path(__file__).resolve()} kubectl --name {p.name} -- get nodes")


def apply_crds(p: Paths, kubectl: str) -> None:
    """The CiliumNetworkPolicy CRDs, as `pylium k8s manifest` writes them."""
    from pylium_orchestrator_k8s.manifest import crds

    path = p.data / "crds.json"
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": crds()}))
    base = [kubectl, f"--kubeconfig={p.kubeconfig}"]
    sh(*base, "apply", "-f", str(path))
    sh(*base, "wait", "--for=condition=established", "--timeout=60s",
       "crd/ciliumnetworkpolicies.cilium.io", "crd/ciliumclusterwidenetworkpolicies.cilium.io")


def start_agent(p: Paths, state: dict, cni: str) -> None:
    p.agent_dir.mkdir(parents=True, exist_ok=True)
    config = p.agent_dir / "config.yaml"
    config.write_text(json.dumps(agent_config(p, cni), indent=1))  # JSON is YAML
    pylium = str(Path(sys.executable).with_name("pylium"))
    proc = Runner(p, state).start("pylium-agent", [pylium, "agent", "--config", str(config)],
                                  needle=str(config))
    wait_for("pylium agent", lambda: p.agent_sock.is_socket() and _agent_ok(p), 90, proc,
             p.logs / "pylium-agent.log")


def stop_named(p: Paths, name: str) -> None:
    state = read_state(p)
    keep = []
    for entry in state.get("processes", []):
        if entry["name"] == name:
            stop_pid(entry["pid"], entry["match"])
        else:
            keep.append(entry)
    state["processes"] = keep
    write_state(p, state)


def restart_apiserver(p: Paths, downtime: float = 0.0) -> None:
    """Stop and start the API server (tests: watches must resume)."""
    enter_netns(p)
    stop_named(p, "kube-apiserver")
    time.sleep(downtime)
    state = read_state(p)
    Runner(p, state).start("kube-apiserver", state["apiserver_args"],
                           needle=str(p.pki / "tokens.csv"))
    wait_for("kube-apiserver /readyz", lambda: api_get(p, "/readyz", state["token"])[0] == 200,
             90, None, p.logs / "kube-apiserver.log")
    # a controller manager still starting when the API server went away exits (klog.Fatal
    # in its namespace deleter); a real node's systemd or kubelet would start it again
    restart_exited(p, SUPERVISED)


#: control-plane processes a real node's supervisor restarts when they exit
SUPERVISED = ("kube-controller-manager", "kube-scheduler")


def restart_exited(p: Paths, names: tuple[str, ...]) -> list[str]:
    """Start again, with their recorded command line, the processes named `names` that have
    exited; returns their names."""
    state = read_state(p)
    dead = [e for e in state.get("processes", [])
            if e["name"] in names and e.get("argv") and not proc_alive(e["pid"], e["match"])]
    if not dead:
        return []
    state["processes"] = [e for e in state["processes"] if e not in dead]
    write_state(p, state)
    runner = Runner(p, state)
    for entry in dead:
        log(f"{entry['name']} had exited; started again")
        runner.start(entry["name"], entry["argv"], entry["env"] or None, needle=entry["match"])
    return [e["name"] for e in dead]


def _tcp(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=1) as resp:
        return resp.status == 200


def _agent_ok(p: Paths) -> bool:
    import http.client
    import socket

    class Conn(http.client.HTTPConnection):
        def connect(self):
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.settimeout(2)
            self.sock.connect(str(p.agent_sock))

    conn = Conn("localhost")
    conn.request("GET", "/v1/status")
    return conn.getresponse().status == 200


def _node_ready(p: Paths, token: str) -> bool:
    status, body = api_get(p, "/api/v1/nodes/pylium-node", token)
    if status != 200:
        return False
    conds = json.loads(body).get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)


# teardown --------------------------------------------------------------------------------
def down(p: Paths, graceful: bool = True) -> None:
    t0 = time.monotonic()
    state = read_state(p)
    procs = {e["name"]: e for e in state.get("processes", [])}
    if graceful and "kubelet" in procs and "kube-apiserver" in procs and \
            proc_alive(procs["kubelet"]["pid"], procs["kubelet"]["match"]):
        # the kubelet stops the pods, so the runtime calls CNI DEL for each. Wait for
        # that (no task left running), not for the objects: kubelet 1.20 confirms a
        # pod's deletion to the API only after removing its sandbox and at its 10 s
        # status batch, which kubectl --wait would sit through (26 s for the test run).
        subprocess.run(in_netns(p, [binary("kubectl"), f"--kubeconfig={p.kubeconfig}",
                                    "delete", "deployments,daemonsets,replicasets,pods",
                                    "--all", "--all-namespaces", "--grace-period=1",
                                    "--wait=false"]),
                       capture_output=True, timeout=60)
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and _sandboxes(p):
            time.sleep(0.5)
        log(f"pods stopped ({time.monotonic() - t0:.1f}s)")
    order = ["kubelet", "pylium-agent", "kube-scheduler", "kube-controller-manager",
             "containerd", "kube-apiserver", "etcd"]
    for name in order + [n for n in procs if n not in order]:
        if name in procs:
            t1 = time.monotonic()
            stop_pid(procs[name]["pid"], procs[name]["match"])
            if time.monotonic() - t1 > 2:
                log(f"{name} took {time.monotonic() - t1:.1f}s to stop")
    log(f"processes stopped ({time.monotonic() - t0:.1f}s)")
    # shims and containers outlive containerd: find them by our unique socket path
    needle = str(p.containerd_sock)
    for pid_dir in Path("/proc").iterdir():
        if pid_dir.name.isdigit() and proc_alive(int(pid_dir.name), needle):
            stop_pid(int(pid_dir.name), needle, timeout=2)
    for cg in state.get("created_cgroups", []):
        _kill_cgroup(Path(cg))
    for point in sorted(mounts_under([str(p.data), str(p.run)]), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)
    before = set(state.get("netns_before", []))
    if os.path.isdir("/run/netns"):
        for ns in os.listdir("/run/netns"):
            if ns.startswith("cni-") and ns not in before:
                subprocess.run(["umount", "-l", f"/run/netns/{ns}"], capture_output=True)
                Path(f"/run/netns/{ns}").unlink(missing_ok=True)
    for cg in sorted(state.get("created_cgroups", []), key=len, reverse=True):
        _rmdir_tree(Path(cg))
    for key, value in state.get("sysctls", {}).items():
        try:
            Path(f"/proc/sys/{key}").write_text(value + "\n")
        except OSError as exc:
            log(f"could not restore {key}={value}: {exc}")
    if state.get("netns") or Path(f"/run/netns/{p.netns}").exists():
        subprocess.run(["ip", "netns", "del", p.netns], capture_output=True)
    if p.bpffs.exists():
        shutil.rmtree(p.bpffs, ignore_errors=True)
    for d in state.get("created_dirs", []):
        for point in sorted(mounts_under([d]), key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True)
        shutil.rmtree(d, ignore_errors=True)
    shutil.rmtree(p.data, ignore_errors=True)
    shutil.rmtree(p.run, ignore_errors=True)
    try:
        p.data.parent.rmdir()  # /var/lib/pylium-k8s, when no other cluster uses it
    except OSError:
        pass
    log(f"cluster {p.name} down ({time.monotonic() - t0:.1f}s)")


def _sandboxes(p: Paths) -> bool:
    out = subprocess.run(["ctr", "-a", str(p.containerd_sock), "-n", "k8s.io", "tasks", "ls",
                          "-q"], capture_output=True, text=True)
    return out.returncode == 0 and bool(out.stdout.strip())


def _kill_cgroup(root: Path) -> None:
    if not root.is_dir():
        return
    for procs in root.rglob("cgroup.procs"):
        try:
            pids = [int(x) for x in procs.read_text().split()]
        except OSError:
            continue
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _rmdir_tree(root: Path) -> None:
    if not root.is_dir():
        return
    dirs = sorted((d for d in root.rglob("*") if d.is_dir()), key=lambda d: len(d.parts),
                  reverse=True)
    for d in dirs + [root]:
        for _ in range(20):
            try:
                d.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="single-node Kubernetes for pylium")
    ap.add_argument("command", choices=["up", "down", "status", "kubectl", "restart-apiserver",
                                        "env", "stop-agent", "start-agent"])
    ap.add_argument("--name", default="dev")
    ap.add_argument("--cni", choices=["auto", "pylium", "bridge"], default="auto",
                    help="auto: pylium-cni when installed, else the reference bridge plugins")
    ap.add_argument("--no-agent", action="store_true")
    ap.add_argument("--fast", action="store_true", help="down: do not delete pods first")
    ap.add_argument("args", nargs="*")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:  # kubectl -- ARGS: everything after -- is kubectl's
        argv, extra = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    a = ap.parse_args(argv)
    a.args += extra
    p = Paths(a.name)
    if a.cni == "auto":
        a.cni = "pylium" if Path(sys.executable).with_name("pylium-cni").exists() else "bridge"
    try:
        if a.command == "up":
            import fcntl

            lock = open(p.lock, "w")
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ClusterError(f"cluster {p.name} is being changed by another process") \
                    from None
            try:
                up(p, a.cni, not a.no_agent)
            except BaseException:
                log("start failed; tearing down what was started")
                down(p, graceful=False)
                raise
        elif a.command == "down":
            down(p, graceful=not a.fast)
        elif a.command == "restart-apiserver":
            restart_apiserver(p, float(a.args[0]) if a.args else 0.0)
        elif a.command == "stop-agent":
            stop_named(p, "pylium-agent")
        elif a.command == "start-agent":
            enter_netns(p)
            start_agent(p, read_state(p), a.cni)
        elif a.command == "status":
            print(json.dumps({k: v for k, v in read_state(p).items() if k != "token"},
                             indent=1))
        elif a.command == "env":
            print(json.dumps({"netns": p.netns, "kubeconfig": str(p.kubeconfig),
                              "kubectl": str(CACHE / "bin" / "kubectl"),
                              "agent_socket": str(p.agent_sock), "node": "pylium-node",
                              "node_ip": NODE_IP, "pod_cidr": POD_CIDR,
                              "containerd_socket": str(p.containerd_sock),
                              "logs": str(p.logs)}))
        elif a.command == "kubectl":
            os.execvp("nsenter", in_netns(p, [binary("kubectl"),
                                              f"--kubeconfig={p.kubeconfig}", *a.args]))
    except ClusterError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
