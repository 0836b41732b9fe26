#!/usr/bin/env python3
"""Write a docker-archive (`docker save` format) from directory trees, without a registry or daemon.

No registry can be reached here, so images are written by hand and fed to `ctr images import`:
a manifest.json, an image config (linux/amd64) and one uncompressed layer tar per --root (a
directory whose contents become the image's /, or placed under a prefix) or per --files (a list
of host paths, each stored at the same path, e.g. the files of some Debian packages). Only the
standard library is used: k8s/build.sh runs this file before any venv exists. Entries are
sorted and owned by root with a fixed mtime, so the same inputs give the same image id.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import stat
import sys
import tarfile
from pathlib import Path

MTIME = 0


def _layer(root: Path, prefix: str = "") -> bytes:
    """One uncompressed layer tar of `root`'s contents (placed under `prefix` in the image)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        entries = sorted(root.rglob("*"))
        if prefix.strip("/"):
            acc = ""
            for part in Path(prefix.strip("/")).parts:
                acc = f"{acc}/{part}" if acc else part
                info = tarfile.TarInfo(acc)
                info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, MTIME
                tar.addfile(info)
        for path in entries:
            rel = path.relative_to(root).as_posix()
            name = f"{prefix.strip('/')}/{rel}" if prefix.strip("/") else rel
            st = path.lstat()
            if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
                continue  # sockets, fifos, devices: never part of an image
            info = tar.gettarinfo(str(path), arcname=name)
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.mtime = MTIME
            if info.isreg():
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    return buf.getvalue()


#: merged-/usr symlinks of Debian 12: host paths through them are stored under usr/
MERGED_USR = {"bin": "usr/bin", "sbin": "usr/sbin", "lib": "usr/lib", "lib64": "usr/lib64"}


def _files_layer(paths: list[str]) -> bytes:
    """One layer holding host `paths` at the same place (parents' symlinks resolved, so
    /lib/x.so lands in usr/lib/x.so); the merged-/usr links are added as links."""
    entries: dict[str, Path] = {}
    for raw in paths:
        path = Path(raw)
        if not path.is_absolute() or not os.path.lexists(path):
            continue
        real = Path(os.path.realpath(path.parent)) / path.name
        st = real.lstat()
        if stat.S_ISDIR(st.st_mode):
            continue  # directories come from their files' parents
        entries[real.as_posix().lstrip("/")] = real
    dirs: set[str] = set()
    for name in entries:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            dirs.add("/".join(parts[:i]))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for link, target in sorted(MERGED_USR.items()):
            if target in dirs:
                info = tarfile.TarInfo(link)
                info.type, info.linkname, info.mtime = tarfile.SYMTYPE, target, MTIME
                info.mode = 0o777
                tar.addfile(info)
        for d in sorted(dirs):
            info = tarfile.TarInfo(d)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, MTIME
            tar.addfile(info)
        for name in sorted(entries):
            info = tar.gettarinfo(str(entries[name]), arcname=name)
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.mtime = MTIME
            if info.isreg():
                with open(entries[name], "rb") as f:
                    tar.addfile(info, f)
            elif info.issym():
                tar.addfile(info)
    return buf.getvalue()


def write_archive(out: Path, name: str, layers: list[tuple[Path, str]], *,
                  entrypoint: list[str] | None = None, cmd: list[str] | None = None,
                  env: list[str] | None = None, workdir: str = "/",
                  file_lists: list[list[str]] | None = None) -> str:
    """Write the archive to `out`; return the image id (sha256 of the config). Layers:
    each of `file_lists` first, then each (root, prefix) of `layers`."""
    blobs = [_files_layer(paths) for paths in file_lists or []]
    blobs += [_layer(root, prefix) for root, prefix in layers]
    diff_ids = ["sha256:" + hashlib.sha256(b).hexdigest() for b in blobs]
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {
            "Env": env or ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Entrypoint": entrypoint,
            "Cmd": cmd,
            "WorkingDir": workdir,
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "pylium k8s/dockerarchive.py"}
                    for _ in blobs],
    }
    config_bytes = json.dumps(config, sort_keys=True).encode()
    image_id = hashlib.sha256(config_bytes).hexdigest()
    layer_names = [f"{d.split(':', 1)[1]}/layer.tar" for d in diff_ids]
    manifest = [{"Config": f"{image_id}.json", "RepoTags": [name], "Layers": layer_names}]
    repo, _, tag = name.rpartition(":")
    tmp = out.with_suffix(out.suffix + ".part")
    with tarfile.open(tmp, "w") as tar:
        def add(arcname: str, data: bytes) -> None:
            info = tarfile.TarInfo(arcname)
            info.size, info.mode, info.mtime = len(data), 0o644, MTIME
            tar.addfile(info, io.BytesIO(data))
        for lname, blob in zip(layer_names, blobs, strict=True):
            add(lname, blob)
        add(f"{image_id}.json", config_bytes)
        add("manifest.json", json.dumps(manifest).encode())
        add("repositories", json.dumps({repo: {tag: diff_ids[-1].split(":", 1)[1]}}).encode())
    os.replace(tmp, out)
    return image_id


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True, help="repo:tag, e.g. registry.local/busybox:pylium")
    p.add_argument("--root", action="append", default=[],
                   help="a directory that becomes one layer; DIR or DIR=/prefix in the image")
    p.add_argument("--files", action="append", default=[], type=Path,
                   help="a file listing host paths (one a line) that become one layer")
    p.add_argument("--entrypoint", nargs="+")
    p.add_argument("--cmd", nargs="+")
    p.add_argument("--env", action="append")
    p.add_argument("--workdir", default="/")
    p.add_argument("--out", required=True, type=Path)
    a = p.parse_args(argv)
    if ":" not in a.name.rsplit("/", 1)[-1]:
        print(f"dockerarchive: --name {a.name!r} needs a tag (repo:tag)", file=sys.stderr)
        return 2
    layers = []
    for spec in a.root:
        d, _, prefix = spec.partition("=")
        if not Path(d).is_dir():
            print(f"dockerarchive: --root {d!r} is not a directory", file=sys.stderr)
            return 2
        layers.append((Path(d), prefix))
    if not layers and not a.files:
        print("dockerarchive: give at least one --root or --files", file=sys.stderr)
        return 2
    lists = [f.read_text().split("\n") for f in a.files]
    image_id = write_archive(a.out, a.name, layers, entrypoint=a.entrypoint, cmd=a.cmd,
                             env=a.env, workdir=a.workdir, file_lists=lists)
    print(f"{a.out}: {a.name} sha256:{image_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
