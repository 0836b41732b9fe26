"""`make demo`: the Star Wars story on a one-node lab, told with the real `pylium` commands.

1. `pylium lab up --demo starwars`: a node namespace running an agent; deathstar (an HTTP
   server on :80), tiefighter and xwing pods wired as endpoints.
2. Before any policy, both ships land (`POST /v1/request-landing` → "Ship landed").
3. `pylium policy import examples/policies/l3-l4-rule1.yaml`: only `org=empire` may reach
   the deathstar on TCP/80. The tiefighter still lands; the xwing's SYN is dropped in the
   kernel by the BPF program on the deathstar's veth (curl times out).
4. The evidence: the drop in `pylium monitor`, the `Policy denied` counter in
   `pylium bpf metrics list`, ingress enforcement on the deathstar in `pylium endpoint list`.
5. `pylium lab down`, always, and a check that nothing is left behind.

Exits 0 only if every step happened; a piece of pylium that is missing says so by name."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

#: unique per run, so demos run side by side (CI, several shells) never share a lab
LAB = f"sw{os.getpid() & 0xFFFF:04x}"
SOCKET = f"/var/run/pylium/{LAB}-node1.sock"
#: the project's own Star Wars policies (examples/policies), shipped as package data
POLICIES = resources.files("pylium.lab") / "example_policies"
RULE1 = "l3-l4-rule1.yaml"
L7_RULE1 = "l7-rule1.yaml"
PYLIUM = str(Path(sys.executable).with_name("pylium"))
ENV = {**os.environ, "PYLIUM_LAB": LAB, "PYLIUM_SOCKET": SOCKET, "COLUMNS": "200"}
LANDING = "/v1/request-landing"


def _shown_path(path: Path) -> str:
    """In a checkout, the path the README uses (examples/policies/...); else the absolute one."""
    real = path.resolve()
    if real.is_relative_to(Path.cwd()) and real.relative_to(Path.cwd()).parts[0] == "examples":
        return str(real.relative_to(Path.cwd()))
    return str(real)


class Story:
    def __init__(self) -> None:
        self.failures: list[str] = []
        self.missing: list[str] = []

    def say(self, text: str) -> None:
        print(f"\n\033[1m== {text}\033[0m", flush=True)

    def run(self, *args: str, timeout: float = 120, show: bool = True,
            check: bool = False) -> subprocess.CompletedProcess:
        shown = "pylium " + " ".join(args)
        if show:
            print(f"$ {shown}", flush=True)
        proc = subprocess.run([PYLIUM, *args], capture_output=True, text=True, env=ENV,
                              timeout=timeout, check=False)
        if show:
            out = (proc.stdout + proc.stderr).rstrip()
            if out:
                print(out, flush=True)
        if check and proc.returncode != 0:
            raise StoryError(f"`{shown}` failed with exit code {proc.returncode}")
        return proc

    def expect(self, ok: bool, what: str) -> None:
        print(("   \033[32m✔ " if ok else "   \033[31m✘ ") + what + "\033[0m", flush=True)
        if not ok:
            self.failures.append(what)


class StoryError(Exception):
    pass


def _land(story: Story, ship: str, ip: str) -> subprocess.CompletedProcess:
    return story.run("lab", "exec", ship, "--", "curl", "-s", "--max-time", "2", "-XPOST",
                     f"http://{ip}{LANDING}")


def _start_monitor() -> subprocess.Popen:
    print("$ pylium monitor --type drop   (in the background)", flush=True)
    return subprocess.Popen([PYLIUM, "monitor", "--type", "drop"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=ENV,
                            start_new_session=True)


def _stop_monitor(proc: subprocess.Popen) -> str:
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    return out


def tell(story: Story) -> None:
    story.say("1. A one-node lab with the Star Wars pods (its agent also runs the HTTP proxy "
              "plugin, for chapter 5)")
    story.run("lab", "up", "--demo", "starwars", "--agent-setting", "l7_parsers=[http]",
              check=True)
    import json

    status = json.loads(story.run("lab", "status", "-o", "json", show=False).stdout)
    ips = {p["name"]: p["ip"] for p in status["pods"]}
    deathstar = ips["deathstar"]
    story.run("endpoint", "list")

    story.say("2. No policy yet: every ship may land")
    for ship in ("tiefighter", "xwing"):
        proc = _land(story, ship, deathstar)
        story.expect(proc.returncode == 0 and "Ship landed" in proc.stdout,
                     f"{ship} lands before any policy")

    story.say(f"3. Import {RULE1}: only the empire may reach the deathstar on TCP/80")
    with resources.as_file(POLICIES / RULE1) as rule1:
        print(rule1.read_text().rstrip())
        story.run("policy", "import", _shown_path(rule1), check=True)
    time.sleep(0.5)  # regeneration is asynchronous to the import
    monitor = _start_monitor()
    time.sleep(1.0)
    proc = _land(story, "tiefighter", deathstar)
    story.expect(proc.returncode == 0 and "Ship landed" in proc.stdout,
                 "tiefighter (org=empire) still lands")
    proc = _land(story, "xwing", deathstar)
    story.expect(proc.returncode == 28 and "Ship landed" not in proc.stdout,
                 f"xwing (org=alliance) is dropped: curl timed out (exit {proc.returncode})")

    story.say("4. The evidence")
    out = _stop_monitor(monitor)
    drops = [line for line in out.splitlines()
             if deathstar in line and ("drop" in line.lower() or "denied" in line.lower())]
    print("   pylium monitor saw:")
    print("\n".join(f"   | {line}" for line in (drops or out.splitlines())[-8:]))
    story.expect(bool(drops), "pylium monitor shows the xwing's packets dropped by policy")
    proc = story.run("observe", "--verdict", "DROPPED", "--to-pod", "default/deathstar",
                     "--last", "3", "-o", "compact")
    story.expect("xwing" in proc.stdout and "DROPPED" in proc.stdout,
                 "pylium observe (Hubble-style flows) shows xwing -> deathstar DROPPED")
    proc = story.run("policy", "trace", "--src", "org=alliance,class=xwing", "--dst",
                     "org=empire,class=deathstar", "--dport", "80", "--datapath")
    story.expect(proc.returncode == 0 and "Verdict:  denied" in proc.stdout
                 and "Datapath: denied (agrees" in proc.stdout,
                 "policy trace: the reference evaluator and the loaded BPF program both deny")
    proc = story.run("bpf", "metrics", "list")
    denied = [line for line in proc.stdout.splitlines() if "policy denied" in line.lower()]
    story.expect(bool(denied), "bpf metrics count the 'Policy denied' drops")
    proc = story.run("endpoint", "get", "deathstar")
    story.expect("Enabled" in proc.stdout.split("Ingress policy:")[-1].splitlines()[0],
                 "the deathstar endpoint enforces ingress policy")
    l7_chapter(story, deathstar)


def l7_chapter(story: Story, deathstar: str) -> None:
    story.say(f"5. Import {L7_RULE1}: the empire may only POST {LANDING} (HTTP-aware, "
              "through the L7 proxy)")
    with resources.as_file(POLICIES / L7_RULE1) as rule:
        story.run("policy", "import", _shown_path(rule), check=True)
    deadline = time.monotonic() + 10
    proc = _land(story, "tiefighter", deathstar)
    while "Ship landed" not in proc.stdout and time.monotonic() < deadline:
        time.sleep(0.5)  # regeneration and the proxy's policy push are asynchronous
        proc = _land(story, "tiefighter", deathstar)
    story.expect(proc.returncode == 0 and "Ship landed" in proc.stdout,
                 f"tiefighter POST {LANDING}: Ship landed")
    proc = story.run("lab", "exec", "tiefighter", "--", "curl", "-s", "--max-time", "2",
                     "-w", " (HTTP %{http_code})", "-XPUT", f"http://{deathstar}/v1/exhaust-port")
    story.expect(proc.returncode == 0 and proc.stdout.startswith("Access denied")
                 and proc.stdout.endswith("(HTTP 403)"),
                 "tiefighter PUT /v1/exhaust-port: 403 Access denied from the proxy")
    proc = _land(story, "xwing", deathstar)
    story.expect(proc.returncode == 28, "xwing is still dropped at L3/L4 (curl timed out)")
    proc = story.run("observe", "--protocol", "http", "--to-pod", "default/deathstar",
                     "--last", "4", "-o", "compact")
    story.expect("exhaust-port" in proc.stdout and "DROPPED" in proc.stdout,
                 "pylium observe --protocol http shows the denied PUT as an L7 flow")


def _leftovers() -> list[str]:
    left = [f"netns {n}" for n in (os.listdir("/run/netns") if os.path.isdir("/run/netns")
                                   else []) if n.startswith(f"{LAB}-")]
    for path in (SOCKET, f"/sys/fs/bpf/pylium/{LAB}-node1", f"/var/lib/pylium/lab/{LAB}-node1",
                 f"/var/run/pylium/lab/{LAB}.json"):
        if os.path.lexists(path):
            left.append(path)
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"pylium.l7.proxy" in cmdline and f"/{LAB}-node1/".encode() in cmdline:
            left.append(f"L7 proxy process {pid}")
    return left


def main() -> int:
    if os.geteuid() != 0:
        print("the demo creates network namespaces and loads BPF: run it as root", flush=True)
        return 1
    for tool in ("nsenter", "curl"):
        if shutil.which(tool) is None:
            print(f"the demo needs `{tool}` (make setup installs it)")
            return 1
    story = Story()
    print("pylium Star Wars demo: identity-based L3/L4 policy enforced by eBPF, "
          "on a lab of network namespaces (the host's own network is not touched)")
    try:
        tell(story)
    except StoryError as exc:
        story.failures.append(str(exc))
        print(f"   \033[31m✘ {exc}\033[0m")
    except Exception as exc:  # the lab still comes down, and the reason is shown
        story.failures.append(f"{type(exc).__name__}: {exc}")
        print(f"   \033[31m✘ {type(exc).__name__}: {exc}\033[0m")
    finally:
        story.say("6. Tear down")
        story.run("lab", "down")
        left = _leftovers()
        story.expect(not left, "lab down left nothing behind" +
                     (f" (left: {', '.join(left)})" if left else ""))
    print()
    if story.missing:
        print("Missing pieces: " + "; ".join(story.missing))
    if story.failures or story.missing:
        print(f"\033[31mThe story did not fully happen ({len(story.failures)} failed, "
              f"{len(story.missing)} missing).\033[0m")
        return 1
    print("\033[32mThe story happened: empire ships land, the alliance is dropped in the "
          "kernel, the proxy refuses the exhaust port, and the drops are on record.\033[0m")
    return 0


if __name__ == "__main__":
    sys.exit(main())
