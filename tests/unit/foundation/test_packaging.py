"""Packaging as a user meets it: the core and one plugin installed alone into a fresh venv,
a third-party plugin (`examples/pylium-kvstore-file`) installed, discovered, selected and
called by a running agent, uninstalling plugins, and root extras resolved from `make wheels`
output (`pip install -f dist 'pylium[etcd]'`), and the core plus two plugins resolved against the
package index with no constraints file (the newest releases their ranges admit).

Real pip, real wheels, a real venv. To stay fast and offline the venv borrows the project
venv's third-party libraries (pluggy, attrs, aiohttp, ...) through a `.pth` file pointing at a
directory of symlinks that leaves out every pylium distribution; pylium itself and its plugins
are installed as wheels built from a copy of this checkout. The one exception is the resolution
test, which must see the index's newest releases: it installs them into an empty venv."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from ._helpers import REPO

pytestmark = pytest.mark.slow

PROJECT_SITE = Path(sysconfig.get_paths()["purelib"])


def sh(*cmd, timeout: float = 180, check: bool = True, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if (not k.startswith("PYLIUM_") or k == "PYLIUM_BPFFS_ROOT")}
    env.pop("PYTHONPATH", None)
    env.pop("PIP_CONSTRAINT", None)  # what a test installs is what it says, nothing pinned
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                          timeout=timeout, env=env, **kw)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n"
                    f"{proc.stdout}\n{proc.stderr}")
    return proc


def _is_pylium(name: str) -> bool:
    lowered = name.lower()
    return lowered.startswith(("pylium", "__editable__")) and "pylium" in lowered


@pytest.fixture(scope="module")
def work():
    path = Path(tempfile.mkdtemp(prefix="pyl-pkg-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def wheelhouse(work) -> Path:
    """What `make wheels` produces (core + plugins), built from a copy of the checkout so
    the shared tree gets no build/ litter."""
    src = work / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist")
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "core", src / "core", ignore=ignore)
    subs = ("plugins/kvstore_etcd", "plugins/l7_http", "examples/pylium-kvstore-file")
    for sub in subs:
        shutil.copytree(REPO / sub, src / sub, ignore=ignore)
    wheels = work / "dist"
    sh(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", wheels, src,
       *(src / sub for sub in subs))
    return wheels


def fresh_venv(path: Path) -> Path:
    """A venv with no pylium in it, borrowing third-party libraries from the project venv."""
    sh(sys.executable, "-m", "venv", "--without-pip", path)
    deps = path / "borrowed"
    deps.mkdir()
    for entry in PROJECT_SITE.iterdir():
        if not _is_pylium(entry.name) and not entry.name.endswith(".pth"):
            (deps / entry.name).symlink_to(entry)
    site = Path(sh(path / "bin/python", "-c", "import sysconfig; "
                   "print(sysconfig.get_paths()['purelib'])").stdout.strip())
    (site / "borrowed.pth").write_text(f"{deps}\n")
    return path / "bin/python"


def pip(python: Path, *args: str) -> subprocess.CompletedProcess:
    return sh(sys.executable, "-m", "pip", "--python", python, *args)


def plugin_rows(python: Path) -> list[dict]:
    proc = sh(python.with_name("pylium"), "plugins", "-o", "json")
    return json.loads(proc.stdout)


def wheel(wheels: Path, dist: str) -> Path:
    return next(wheels.glob(f"{dist.replace('-', '_')}-*.whl"))


def test_the_wheel_ships_the_example_policies(wheelhouse):
    """`python -m pylium.demo` from a wheel install imports rule1 from package data: the
    wheel holds examples/policies (linked into the package in the checkout) byte for byte."""
    shipped = {}
    with zipfile.ZipFile(wheel(wheelhouse, "pylium")) as whl:
        for name in whl.namelist():
            if name.startswith("pylium/lab/example_policies/"):
                shipped[name.rsplit("/", 1)[1]] = whl.read(name)
    expected = {p.name: p.read_bytes() for p in (REPO / "examples/policies").glob("*.yaml")}
    assert {"l3-l4-rule1.yaml", "l7-rule1.yaml", "cidr-rule.yaml"} <= set(expected)
    assert shipped == expected


def test_core_and_one_plugin_alone_then_a_third_party_plugin(wheelhouse, work):
    python = fresh_venv(work / "venv-alone")
    pylium = python.with_name("pylium")
    assert sh(python, "-c", "import pylium", check=False).returncode != 0  # really empty

    # `pip install ./plugins/kvstore_etcd` with the core, nothing else
    pip(python, "install", "-q", "--no-deps", "--no-index", wheel(wheelhouse, "pylium"),
        wheel(wheelhouse, "pylium-kvstore-etcd"))
    rows = plugin_rows(python)
    assert [(r["name"], r["dist"]) for r in rows] == [
        ("pylium.builtins", "pylium"), ("kvstore_etcd", "pylium-kvstore-etcd")]
    assert rows[1]["capabilities"][0]["name"] == "etcd" and rows[1]["status"] == "ok"

    # a third-party plugin: discovered ...
    pip(python, "install", "-q", "--no-deps", "--no-index",
        wheel(wheelhouse, "pylium-kvstore-file"))
    rows = plugin_rows(python)
    example = next(r for r in rows if r["dist"] == "pylium-kvstore-file")
    assert (example["name"], example["version"], example["hooks"]) == (
        "kvstore_file", "0.1.0", ["pylium_kvstores"])

    # ... selected by config, and called: the agent keeps its state in the plugin's file
    state_file = work / "cluster-state.json"
    config = work / "agent.yaml"
    config.write_text(f"kvstore: file\nkvstore_options: {{path: {state_file}}}\n"
                      f"node_name: ext-node\nstate_dir: {work / 'state'}\n")
    sock = work / "ext.sock"
    env = {k: v for k, v in os.environ.items() if (not k.startswith("PYLIUM_") or k == "PYLIUM_BPFFS_ROOT")}
    agent = subprocess.Popen([pylium, "agent", "--config", config, "--socket", sock],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        status = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and agent.poll() is None:
            proc = sh(pylium, "-H", sock, "status", "-o", "json", check=False)
            if proc.returncode == 0:
                status = json.loads(proc.stdout)
                break
            time.sleep(0.2)
        assert status is not None, agent.stdout.read() if agent.poll() is not None else "timeout"
        assert status["kvstore"]["backend"] == "file" and status["kvstore"]["healthy"]
        assert status["kvstore"]["detail"] == str(state_file)
        assert state_file.exists()
        agent_rows = json.loads(sh(pylium, "-H", sock, "plugins", "-o", "json",
                                   "--config", config).stdout)
        assert next(r for r in agent_rows if r["name"] == "kvstore_file")["selected"] is True
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=20)
    assert agent.returncode == 0

    # uninstalling removes a plugin from the listing without breaking the core
    pip(python, "uninstall", "-q", "-y", "pylium-kvstore-etcd")
    assert [r["dist"] for r in plugin_rows(python)] == ["pylium", "pylium-kvstore-file"]
    pip(python, "uninstall", "-q", "-y", "pylium-kvstore-file")
    assert [r["name"] for r in plugin_rows(python)] == ["pylium.builtins"]
    missing = sh(pylium, "agent", "--config", config, "--socket", sock, check=False)
    assert missing.returncode == 3
    assert "kvstore 'file' is selected but not installed" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_root_extras_resolve_from_built_wheels(wheelhouse, work):
    """`make wheels && pip install -f dist 'pylium[etcd]'`: the extra names a plugin
    distribution that pip finds among the built wheels."""
    python = fresh_venv(work / "venv-extras")
    pip(python, "install", "-q", "--no-index", "-f", wheelhouse, "pylium[etcd]")
    rows = plugin_rows(python)
    assert [r["dist"] for r in rows] == ["pylium", "pylium-kvstore-etcd"]


def test_core_and_two_plugins_resolve_with_the_newest_releases_in_range(wheelhouse, work):
    """`pip install -f dist pylium pylium-kvstore-etcd pylium-l7-http` in an empty venv, with
    the package index and without constraints.txt: pip resolves the declared ranges on its own,
    picks the newest release each range admits (an outdated direct dependency is one whose
    newest release lies outside its range, i.e. a new major), and the plugins then load."""
    python = work / "venv-newest" / "bin/python"
    sh(sys.executable, "-m", "venv", "--without-pip", python.parent.parent)
    dists = ("pylium", "pylium-kvstore-etcd", "pylium-l7-http")
    proc = sh(sys.executable, "-m", "pip", "--python", python, "install", "-q", "-f", wheelhouse,
              *(wheel(wheelhouse, d) for d in dists), timeout=600, check=False)
    assert proc.returncode == 0, f"pip could not resolve the declared ranges:\n{proc.stderr}"

    rows = {r["dist"]: r for r in plugin_rows(python)}
    assert {d: rows[d]["status"] for d in dists[1:]} == {d: "ok" for d in dists[1:]}

    installed = {canonicalize_name(r["name"]): r["version"] for r in json.loads(
        pip(python, "list", "--format", "json").stdout)}
    outdated = {canonicalize_name(r["name"]): r["latest_version"] for r in json.loads(
        sh(sys.executable, "-m", "pip", "--python", python, "list", "--outdated",
           "--format", "json").stdout)}
    requires = json.loads(sh(python, "-c", "import importlib.metadata as m, json, sys; "
                             "print(json.dumps({d: m.requires(d) for d in sys.argv[1:]}))",
                             *dists).stdout)
    checked = []
    for dist in dists:
        for spec in requires[dist] or []:
            req = Requirement(spec)
            name = canonicalize_name(req.name)
            if req.marker is not None or name.startswith("pylium"):
                continue  # extras (test, plugin names) and our own distributions
            assert installed[name] in req.specifier, (req, installed[name])
            if name in outdated:
                assert outdated[name] not in req.specifier, (
                    f"{req.name} {installed[name]} was chosen though {outdated[name]} is in "
                    f"range {req.specifier}: the ranges do not resolve with the newest")
            checked.append(name)
    assert {"pluggy", "aiohttp", "aetcd", "httptools"} <= set(checked)
