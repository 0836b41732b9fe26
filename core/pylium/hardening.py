"""What the agent refuses to trust, and how it writes secrets.

An agent runs as root and acts on what its config file and state directory say (which
plugins to load, which endpoints to adopt, which addresses are taken). If another user can
write either of them, or replace them through a directory they can write, that user steers
the agent: so start-up stops with one line naming the path, as sshd does for its keys.
"World-writable" is the test, with the sticky bit excepted for directories (/tmp): there
others can add entries but not replace ours.

`write_private` is how secrets (WireGuard private keys, tokens) reach disk: created 0600
from the first byte, never chmod-ed after the fact."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from pylium.errors import ConfigError


def _unsafe(mode: int, is_dir: bool) -> bool:
    if not mode & stat.S_IWOTH:
        return False
    return not (is_dir and mode & stat.S_ISVTX)


def world_writable(path: Path) -> Path | None:
    """The first of `path` and its parents that others may write (sticky directories
    excepted), or None. Symlinks are followed, as the agent would follow them."""
    current = Path(os.path.abspath(path))
    for candidate in (current, *current.parents):
        try:
            st = candidate.stat()
        except FileNotFoundError:
            continue  # created later by the agent itself, with its own umask
        except OSError as exc:
            raise ConfigError(f"{candidate}: cannot check permissions: {exc.strerror}"
                              ) from None
        if _unsafe(st.st_mode, stat.S_ISDIR(st.st_mode)):
            return candidate
    return None


def check_config_file(path: Path) -> None:
    """Refuse a config file that others could have written (or replaced)."""
    found = world_writable(path)
    if found is None:
        return
    mode = stat.filemode(found.stat().st_mode)
    where = "" if found == Path(os.path.abspath(path)) else f": directory {found}"
    raise ConfigError(f"config file {path}{where} is writable by every user ({mode}); "
                      f"refusing to use it: chmod o-w {found}")


def check_state_dir(path: Path) -> None:
    """Refuse a state directory (or a parent) that others could write."""
    found = world_writable(path)
    if found is not None:
        raise ConfigError(f"state_dir {path}: {found} is writable by every user "
                          f"({stat.filemode(found.stat().st_mode)}); refusing to start: "
                          f"chmod o-w {found}")


def write_private(path: Path, data: bytes) -> None:
    """Write a secret: a new file created 0600 (owner only), then renamed over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(fd, 0o600)  # exact, whatever the umask
        f.write(data)
        f.flush()
        os.fsync(fd)
    os.replace(tmp, path)
