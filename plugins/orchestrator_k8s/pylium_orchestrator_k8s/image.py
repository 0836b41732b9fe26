"""The agent image, written as a docker-archive without a registry or an image builder.

Two layers: (1) the files of the Debian packages the agent runs on — Python 3.11, clang (it
compiles its BPF at start), libbpf and the kernel/libc headers, `mount` — with their
dependency closure, taken from this machine's dpkg database; (2) /opt/pylium/lib, where pip
installs the core, the Kubernetes orchestrator and the chosen plugins with their Python
dependencies at the versions this environment runs, plus /usr/local/bin scripts for their
console entry points. `ctr -n k8s.io images import` takes the result."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from pylium.errors import UserError

from pylium_orchestrator_k8s.dockerarchive import write_archive

SYSTEM_PACKAGES = ("python3.11", "clang", "clang-14", "libbpf1", "libbpf-dev", "linux-libc-dev",
                   "libc6-dev", "mount")
SKIP_PREFIXES = ("/usr/share/doc", "/usr/share/man", "/usr/share/locale", "/usr/share/info",
                 "/usr/share/lintian", "/usr/share/bug")
TARGET = "/opt/pylium/lib"
PYTHON = "/usr/bin/python3.11"


def package_files(roots: tuple[str, ...] = SYSTEM_PACKAGES) -> list[str]:
    """Every file dpkg installed for `roots` and what they depend on."""
    out = subprocess.run(
        ["apt-cache", "depends", "--recurse", "--installed", "--no-recommends", "--no-suggests",
         "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances", *roots],
        capture_output=True, text=True, check=True).stdout
    packages = sorted({line.strip() for line in out.splitlines()
                       if line and not line.startswith((" ", "<"))})
    files: set[str] = set()
    for package in packages:
        listing = subprocess.run(["dpkg-query", "-L", package], capture_output=True, text=True)
        if listing.returncode != 0:
            continue  # not installed (an alternative of an or-dependency)
        files.update(f for f in listing.stdout.splitlines()
                     if f.startswith("/") and not f.startswith(SKIP_PREFIXES))
    return sorted(files)


def _requirement(dist: str) -> str:
    """A local source directory for editable/path installs, else name==version."""
    d = metadata.distribution(dist)
    direct = d.read_text("direct_url.json")
    if direct:
        info = json.loads(direct)
        url = info.get("url", "")
        if url.startswith("file://") and Path(url[7:]).is_dir():
            return url[7:]
    return f"{d.metadata['Name']}=={d.version}"


def _constraints(path: Path) -> None:
    """Pin every distribution to the version this environment runs (the tested set)."""
    lines = sorted({f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions()
                    if d.metadata["Name"] and not d.metadata["Name"].lower().startswith("pylium")})
    path.write_text("\n".join(lines) + "\n")


def _scripts(root: Path, target: Path) -> list[str]:
    bindir = root / "usr" / "local" / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    names = []
    for dist in metadata.distributions(path=[str(target)]):
        for ep in dist.entry_points.select(group="console_scripts"):
            module, _, func = ep.value.partition(":")
            script = bindir / ep.name
            script.write_text(f"#!{PYTHON}\nimport sys\nfrom {module} import {func}\n"
                              f"sys.exit({func}())\n")
            script.chmod(0o755)
            names.append(ep.name)
    return sorted(names)


def build(distributions: list[str], out: Path, name: str) -> str:
    """Write the image holding `distributions` to `out`; returns a one-line summary."""
    if sys.version_info[:2] != (3, 11):
        raise UserError(f"the image runs Debian's Python 3.11; run this from a 3.11 "
                        f"environment (this is {sys.version.split()[0]})")
    if shutil.which("dpkg-query") is None or not Path(PYTHON).exists():
        raise UserError(f"building the image needs a Debian machine with {PYTHON}")
    missing = [d for d in distributions if not _installed(d)]
    if missing:
        raise UserError(f"not installed here: {', '.join(missing)} (install them first)")
    with tempfile.TemporaryDirectory(prefix="pylium-image-") as tmp:
        root = Path(tmp) / "root"
        target = root / TARGET.lstrip("/")
        target.mkdir(parents=True)
        constraints = Path(tmp) / "constraints.txt"
        _constraints(constraints)
        requirements = [_requirement(d) for d in distributions]
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-cache-dir",
                               "--target", str(target), "-c", str(constraints),
                               *requirements], capture_output=True, text=True)
        if proc.returncode != 0:
            raise UserError(f"pip install into the image failed: {proc.stderr.strip()[-400:]}")
        shutil.rmtree(target / "bin", ignore_errors=True)  # scripts for the wrong python
        # the static native pylium-cni the init container installs on the node
        # (`pylium k8s install-cni`), next to its source in the image's pylium package
        from pylium.cni import native

        try:
            native.build(target / native.BUILT.relative_to(native.SOURCE.parents[3]))
        except native.BuildError as exc:
            raise UserError(f"building the native pylium-cni for the image: {exc}") from None
        scripts = _scripts(root, target)
        for d in ("tmp", "etc/pylium", "var/run/pylium", "var/lib/pylium", "sys/fs/bpf"):
            (root / d).mkdir(parents=True, exist_ok=True)
        (root / "tmp").chmod(0o1777)
        (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
        (root / "etc" / "group").write_text("root:x:0:\n")
        files = package_files()
        image_id = write_archive(
            out, name, [(root, "")], file_lists=[files], cmd=["pylium", "agent"],
            env=["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                 f"PYTHONPATH={TARGET}", "PYTHONDONTWRITEBYTECODE=1"])
    size = out.stat().st_size / 1e6
    return (f"{out}: {name} sha256:{image_id[:12]} ({size:.0f} MB; "
            f"{len(files)} system files; scripts {', '.join(scripts)})")


def _installed(dist: str) -> bool:
    try:
        metadata.distribution(dist)
        return True
    except metadata.PackageNotFoundError:
        return False
