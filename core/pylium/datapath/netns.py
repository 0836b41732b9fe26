"""Netlink plumbing for namespaces, veth pairs, addresses, routes and neighbours (pyroute2).

Besides the BPF loader this is the only module that speaks netlink. Every function takes a
`netns` argument: None means the calling process's own namespace (the agent runs inside its
node's namespace), otherwise a name under /run/netns or an absolute path to a netns file.
Deleting things is idempotent: removing what is already gone is not an error. The
requests of a pod start and stop (`wire_endpoint`, `unwire_endpoint`), which run for every
CNI ADD and DEL, are packed by hand and sent in batches on a kept socket instead (`_rtnl`):
an `IPRoute` request costs ~0.3 ms of CPU."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import inspect
import itertools
import os
import socket
import stat
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import attrs
from pyroute2 import IPRoute, NetlinkError
from pyroute2.netlink import (
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_EXCL,
    NLM_F_REPLACE,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
)
from pyroute2.netlink.rtnl import (
    RTM_DELLINK,
    RTM_DELROUTE,
    RTM_GETLINK,
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTM_NEWNEIGH,
    RTM_NEWROUTE,
    RTM_SETLINK,
    rt_proto,
    rt_scope,
    rt_type,
)
from pyroute2.netlink.rtnl.ifinfmsg import IFF_UP
from pyroute2.netlink.rtnl.ndmsg import NUD_PERMANENT
from pyroute2.netlink.rtnl.rtmsg import RTNH_F_ONLINK

NETNS_RUN_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3), linux/nsfs.h
MS_BIND, MS_REC, MS_SHARED, MNT_DETACH = 4096, 16384, 1 << 20, 2
T = TypeVar("T")
_TMP_NAMES = itertools.count(1)


def netns_path(netns: str) -> Path:
    """The file that names a namespace: `/run/netns/<name>` or the path given."""
    return Path(netns) if netns.startswith("/") else NETNS_RUN_DIR / netns


def netns_problem(netns: str) -> str | None:
    """Why `netns` cannot be an endpoint's namespace ("does not exist", "is not a network
    namespace"), or None when it is one. The kernel answers (ioctl NS_GET_NSTYPE), so a
    regular file, a directory or another kind of namespace is refused before any wiring;
    nothing but regular files (what nsfs files look like) is opened, so a FIFO or a
    device named by mistake is never touched."""
    try:
        path = netns_path(netns)
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "does not exist"
    except (OSError, ValueError) as exc:
        return f"cannot be read: {getattr(exc, 'strerror', None) or exc}"
    if not stat.S_ISREG(mode):
        return "is not a network namespace (not an nsfs file)"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        return f"cannot be opened: {exc.strerror}"
    try:
        kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError:
        return "is not a network namespace (a regular file)"
    finally:
        os.close(fd)
    return None if kind == CLONE_NEWNET else "is a namespace but not a network namespace"


def netns_exists(netns: str) -> bool:
    """True when `netns` names a network namespace (not merely an existing file)."""
    return netns_problem(netns) is None


def same_netns(a: str, b: str) -> bool:
    """Do `a` and `b` name one namespace? Compared by inode, so `/run/netns/x`, `x` and
    `/proc/<pid>/ns/net` of a process inside it all match; by path if one is gone."""
    ka, kb = netns_key(a), netns_key(b)
    if ka is None or kb is None:
        return netns_path(a) == netns_path(b)
    return ka == kb


def netns_key(netns: str) -> tuple[int, int] | None:
    """(device, inode) of the namespace `netns` names, None if it is gone: what
    `same_netns` compares, for callers that compare one namespace with many."""
    try:
        st = os.stat(netns_path(netns))
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _share_run_dir() -> None:
    """Make /run/netns a shared mount point, as iproute2 does, so a namespace bound there
    is visible in every mount namespace."""
    NETNS_RUN_DIR.mkdir(parents=True, exist_ok=True)
    libc = _libc()
    if libc.mount(b"", str(NETNS_RUN_DIR).encode(), b"none", MS_SHARED | MS_REC, None) == 0:
        return
    path = str(NETNS_RUN_DIR).encode()
    _check(libc.mount(path, path, b"none", MS_BIND | MS_REC, None), "bind-mounting /run/netns")
    _check(libc.mount(b"", path, b"none", MS_SHARED | MS_REC, None), "sharing /run/netns")


def create_netns(name: str) -> Path:
    """Create a named network namespace with its loopback up; returns its path.

    A helper thread `unshare`s a new netns for itself alone and bind-mounts it at
    /run/netns/<name>; nothing forks (forking an agent that runs threads and an event loop
    is what pyroute2's netns helpers do, and it is not safe here)."""
    if "/" in name or not name or len(name) > 64:
        raise ValueError(f"bad netns name {name!r}")
    _share_run_dir()
    path = NETNS_RUN_DIR / name
    os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0o444))

    def body() -> None:
        libc = _libc()
        _check(libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
        _check(libc.mount(b"/proc/thread-self/ns/net", str(path).encode(), b"none",
                          MS_BIND, None), f"binding netns at {path}")

    try:
        _on_thread(body)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    set_link_up("lo", name)
    return path


def remove_netns(netns: str) -> bool:
    """Delete a named namespace (its veth ends go with it); False if it was not there."""
    path = netns_path(netns)
    if not path.exists():
        return False
    _libc().umount2(str(path).encode(), MNT_DETACH)
    path.unlink(missing_ok=True)
    return True


def list_netns() -> list[str]:
    return sorted(p.name for p in NETNS_RUN_DIR.iterdir()) if NETNS_RUN_DIR.is_dir() else []


def _on_thread(func: Callable[[], T], netns: str | None = None) -> T:
    """Run `func` on a fresh thread, first `setns(2)`-ed into `netns` if given (only that
    thread moves; the process stays where it is)."""
    result: dict[str, Any] = {}

    def body() -> None:
        try:
            if netns is not None:
                _enter(netns)
            result["value"] = func()
        except BaseException as exc:  # handed back to the caller's thread
            result["error"] = exc

    thread = threading.Thread(target=body, name=f"netns-{netns or 'new'}")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def _enter(netns: str) -> None:
    """`setns(2)` the calling thread into `netns`."""
    fd = os.open(netns_path(netns), os.O_RDONLY)
    try:
        _check(_libc().setns(fd, CLONE_NEWNET), f"setns({netns})")
    finally:
        os.close(fd)


def run_in_netns(netns: str, func: Callable[[], T]) -> T:
    """Run `func` with its thread inside `netns` (sockets it opens live there)."""
    return _on_thread(func, netns)


def _netlink(func: Callable[..., T]) -> Callable[..., T]:
    """Run a netlink helper in the namespace named by its `netns` keyword argument: on a
    thread that entered it, where `IPRoute()` opens its socket (pyroute2's own `netns=`
    forks a child process for that, which an agent with threads must not do)."""

    signature = inspect.signature(func)

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        netns = bound.arguments.get("netns")
        if netns is None:
            return func(*args, **kwargs)
        bound.arguments["netns"] = None
        return _on_thread(lambda: func(*bound.args, **bound.kwargs), netns)

    return wrapper


_thread = threading.local()


def reuse_netlink_socket() -> None:
    """Let the calling thread keep one `IPRoute` socket across `ipr()` uses: for worker
    threads that live long and never leave their namespace (a `ThreadPoolExecutor`
    initializer). Making an `IPRoute` costs an event loop, a socket pair and a bind — a
    good share of the CPU a CNI ADD or DEL costs the agent."""
    _thread.reuse = True


@contextmanager
def ipr() -> Iterator[IPRoute]:
    """An `IPRoute` socket in the calling thread's namespace (the thread's kept one after
    `reuse_netlink_socket`, unless already lent out further up the stack). It joins no
    multicast group: only answers to its own requests arrive (pyroute2's default joins
    link, address and route events, which the kernel then copies to every open socket
    and an idle kept one would queue)."""
    if not getattr(_thread, "reuse", False) or getattr(_thread, "lent", False):
        ip = IPRoute(groups=0)
        try:
            yield ip
        finally:
            ip.close()
        return
    ip = getattr(_thread, "ip", None) or IPRoute(groups=0)
    _thread.ip, _thread.lent = None, True
    _drop_stale(ip)
    keep = False
    try:
        yield ip
        keep = True
    except NetlinkError:  # the kernel said no: the socket itself is fine
        keep = True
        raise
    finally:
        _thread.lent = False
        if keep:
            _thread.ip = ip
        else:  # interrupted half way through a request: its answers may still come
            ip.close()


def _drop_stale(ip: IPRoute) -> None:
    """Empty a kept socket's queue of answers nobody read: pyroute2 stops reading a `get`
    (link get, link_lookup) at the reply and leaves the kernel's ACK after it queued, so a
    kept socket would hold every such ACK for good (three per endpoint create and delete).
    The socket is idle when lent (one thread, one request at a time), so whatever is queued
    then is stale."""
    queue = getattr(getattr(getattr(ip, "asyncore", None), "msg_queue", None), "root", None)
    if queue is None:
        return
    while not queue.empty():
        queue.get_nowait()
        queue.task_done()


def write_sysctl(netns: str | None, key: str, value: str) -> None:
    """Set `net.*` sysctl `key` (dotted) inside `netns` (never call with the root ns)."""
    path = "/proc/sys/" + key.replace(".", "/")

    def write() -> None:
        _write_proc(path, f"{value}\n".encode())

    write() if netns is None else _on_thread(write, netns)


def read_sysctl(netns: str | None, key: str) -> str:
    path = Path("/proc/sys") / key.replace(".", "/")
    return (path.read_text() if netns is None else _on_thread(path.read_text, netns)).strip()


# links ------------------------------------------------------------------------------------
@attrs.frozen
class LinkInfo:
    ifname: str
    ifindex: int
    mac: str
    up: bool


def _link_info(ip: IPRoute, ifname: str) -> LinkInfo | None:
    """One RTM_GETLINK by name (a lookup and then a get by index cost two)."""
    try:  # any refusal means "no such link", as pyroute2's link_lookup reads it
        msg = ip.link("get", ifname=ifname)[0]
    except (NetlinkError, KeyError, IndexError):
        return None
    return LinkInfo(ifname=ifname, ifindex=msg["index"], mac=msg.get_attr("IFLA_ADDRESS"),
                    up=bool(msg["flags"] & 1))


@_netlink
def link_info(ifname: str, netns: str | None = None) -> LinkInfo | None:
    """The link called `ifname` in `netns`, or None."""
    with ipr() as ip:
        return _link_info(ip, ifname)


@_netlink
def list_links(netns: str | None = None) -> list[LinkInfo]:
    with ipr() as ip:
        out = []
        for msg in ip.get_links():
            out.append(LinkInfo(ifname=msg.get_attr("IFLA_IFNAME"), ifindex=msg["index"],
                                mac=msg.get_attr("IFLA_ADDRESS") or "",
                                up=bool(msg["flags"] & 1)))
        return out


@_netlink
def delete_link(ifname: str, netns: str | None = None) -> bool:
    """Delete a link (a veth takes its peer with it); False if it did not exist."""
    with ipr() as ip:
        found = ip.link_lookup(ifname=ifname)
        if not found:
            return False
        try:
            ip.link("del", index=found[0])
        except NetlinkError as exc:
            if exc.code != errno.ENODEV:
                raise
            return False
        return True


@_netlink
def set_link_up(ifname: str, netns: str | None = None, master: str | None = None) -> None:
    with ipr() as ip:
        index = ip.link_lookup(ifname=ifname)[0]
        if master is not None:
            ip.link("set", index=index, master=ip.link_lookup(ifname=master)[0])
        ip.link("set", index=index, state="up")


@_netlink
def _add_veth(a_name: str, tmp: str, b_netns: str | None, mtu: int,
              netns: str | None = None) -> LinkInfo:
    with ipr() as ip:
        ip.link("add", ifname=a_name, kind="veth", peer={"ifname": tmp}, mtu=mtu)
        try:
            peer = ip.link_lookup(ifname=tmp)[0]
            fd = os.open(netns_path(b_netns) if b_netns else "/proc/self/ns/net", os.O_RDONLY)
            try:
                ip.link("set", index=peer, net_ns_fd=fd)
            finally:
                os.close(fd)
            ip.link("set", index=ip.link_lookup(ifname=a_name)[0], state="up")
            info = _link_info(ip, a_name)
        except BaseException:
            ip.link("del", ifname=a_name)
            raise
    assert info is not None
    return info


@_netlink
def _rename_up(tmp: str, name: str, mtu: int, netns: str | None = None) -> LinkInfo:
    with ipr() as ip:
        index = _index(ip, tmp)
        ip.link("set", index=index, ifname=name, mtu=mtu)
        ip.link("set", index=index, state="up")
        info = _link_info(ip, name)
    assert info is not None
    return info


def create_veth(a_name: str, a_netns: str | None, b_name: str, b_netns: str | None,
                mtu: int = 1500) -> tuple[LinkInfo, LinkInfo]:
    """A veth pair with one end `a_name` in `a_netns` and the other `b_name` in `b_netns`,
    both up (None: the caller's namespace). The peer is born under a temporary name and
    moved, so the final name may exist elsewhere already (every pod's end is `eth0`)."""
    tmp = f"pyt{os.getpid() % 10000}{next(_TMP_NAMES) % 100000}"
    a_info = _add_veth(a_name, tmp, b_netns, mtu, netns=a_netns)
    try:
        b_info = _rename_up(tmp, b_name, mtu, netns=b_netns)
    except BaseException:
        delete_link(a_name, netns=a_netns)
        raise
    return a_info, b_info


@_netlink
def create_bridge(name: str, netns: str | None) -> LinkInfo:
    with ipr() as ip:
        ip.link("add", ifname=name, kind="bridge")
        ip.link("set", index=ip.link_lookup(ifname=name)[0], state="up")
        info = _link_info(ip, name)
    assert info is not None
    return info


# addresses, routes, neighbours ------------------------------------------------------------
def _index(ip: IPRoute, ifname: str) -> int:
    found = ip.link_lookup(ifname=ifname)
    if not found:
        raise LookupError(f"no link {ifname!r}")
    return found[0]


@_netlink
def add_address(ifname: str, cidr: str, netns: str | None = None) -> None:
    """Add `addr/len` to a link (already present is fine)."""
    address, _, length = cidr.partition("/")
    with ipr() as ip:
        try:
            ip.addr("add", index=_index(ip, ifname), address=address, prefixlen=int(length or 32))
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise


@_netlink
def addresses(ifname: str | None = None, netns: str | None = None) -> list[str]:
    """IPv4 addresses (`addr/len`) in `netns`, of one link or all."""
    with ipr() as ip:
        kwargs = {"index": _index(ip, ifname)} if ifname else {}
        return [f"{m.get_attr('IFA_ADDRESS')}/{m['prefixlen']}"
                for m in ip.get_addr(family=2, **kwargs)]


@_netlink
def add_route(dst: str, netns: str | None = None, gateway: str | None = None,
              ifname: str | None = None, onlink: bool = False,
              proto: int | None = None) -> None:
    """Add (or replace) a route; `dst` is a CIDR or "default". `proto` marks who owns it
    (rtm_protocol, pyroute2's default `static` without one): `delete_routes` finds them."""
    spec: dict[str, Any] = {"dst": "0.0.0.0/0" if dst == "default" else dst}
    if proto is not None:
        spec["proto"] = proto
    with ipr() as ip:
        if ifname is not None:
            spec["oif"] = _index(ip, ifname)
        if gateway is not None:
            spec["gateway"] = gateway
        elif ifname is not None:
            spec["scope"] = 253  # link
        if onlink:
            spec["flags"] = 4  # RTNH_F_ONLINK
        ip.route("replace", **spec)


@_netlink
def delete_route(dst: str, netns: str | None = None) -> bool:
    with ipr() as ip:
        try:
            ip.route("del", dst=dst)
        except NetlinkError as exc:
            if exc.code in (errno.ESRCH, errno.ENOENT):
                return False
            raise
        return True


@_netlink
def routes(netns: str | None = None) -> list[dict[str, Any]]:
    """IPv4 main-table routes as `{"dst", "gateway", "oif", "proto"}` dicts."""
    with ipr() as ip:
        out = []
        for m in ip.get_routes(family=2, table=254):
            dst = m.get_attr("RTA_DST")
            out.append({"dst": f"{dst}/{m['dst_len']}" if dst else "default",
                        "gateway": m.get_attr("RTA_GATEWAY"), "oif": m.get_attr("RTA_OIF"),
                        "proto": m["proto"]})
        return out


@_netlink
def delete_routes(proto: int, netns: str | None = None) -> list[str]:
    """Delete every IPv4 main-table route marked `proto` (see `add_route`); their
    destinations. `proto` must be one only pylium uses: nothing else is looked at."""
    if proto in (rt_proto["unspec"], rt_proto["kernel"], rt_proto["boot"],
                 rt_proto["static"]):
        raise ValueError(f"route protocol {proto} is shared: refusing to delete by it")
    deleted = []
    with ipr() as ip:
        for m in ip.get_routes(family=2, table=254):
            if m["proto"] != proto:
                continue
            dst = m.get_attr("RTA_DST")
            spec = {"dst": f"{dst}/{m['dst_len']}" if dst else "0.0.0.0/0", "proto": proto,
                    "table": 254}
            try:
                ip.route("del", **spec)
            except NetlinkError as exc:
                if exc.code not in (errno.ESRCH, errno.ENOENT):
                    raise
                continue
            deleted.append(spec["dst"])
    return deleted


@_netlink
def add_static_neighbour(ifname: str, address: str, mac: str, netns: str | None = None) -> None:
    """A permanent neighbour entry (replaces an existing one)."""
    with ipr() as ip:
        ip.neigh("replace", dst=address, lladdr=mac, ifindex=_index(ip, ifname), state=0x80)


@_netlink
def neighbours(ifname: str, netns: str | None = None) -> dict[str, str]:
    """IPv4 neighbours of a link: {address: mac}."""
    with ipr() as ip:
        return {m.get_attr("NDA_DST"): m.get_attr("NDA_LLADDR")
                for m in ip.get_neighbours(family=2, ifindex=_index(ip, ifname))
                if m.get_attr("NDA_LLADDR")}


# endpoints --------------------------------------------------------------------------------
@attrs.frozen
class EndpointLinks:
    host: LinkInfo
    pod: LinkInfo


def wire_endpoint(host_ifname: str, pod_netns: str, ip_address: str | Callable[[], str],
                  gateway: str, pod_ifname: str = "eth0", mtu: int = 1500,
                  on_host_link: Callable[[LinkInfo], None] | None = None) -> EndpointLinks:
    """Cilium-style endpoint plumbing. Pod side: `ip/32` on `pod_ifname`, a static neighbour
    for the gateway pointing at the host-side MAC, default route via the gateway `onlink`.
    Host side (this namespace): `/32` route to the pod through the host-side veth and a
    static neighbour for the pod. Undone on any failure.

    This runs once per pod start (CNI ADD), so it is kept cheap: five sends of batched
    rtnetlink messages (see `_rtnl`). The pod's end is born in its namespace under its
    final name with a MAC chosen here (no move between namespaces: a move waits for RCU
    grace periods, ~100 ms on a busy node; no asking for its MAC); the host end is born up
    (no carrier, hence no IPv6 traffic, until the pod end comes up after the sysctls of
    both are set); the pod side goes over a socket the calling thread opens inside the
    pod's namespace and then steps back out of (no extra thread per pod).

    `on_host_link` is called with the host end before the pod end comes up (the datapath
    puts its programs there: the pod's first packet already meets them). `ip_address` may
    be a callable that waits for the address: the veth and its programs, which need none,
    are made meanwhile (a create's address comes from another thread)."""
    host_mac, pod_mac = _random_mac(), _random_mac()
    fd = os.open(netns_path(pod_netns), os.O_RDONLY | os.O_CLOEXEC)
    try:
        with _host_socket() as host_sock, _socket_in(fd, pod_netns) as pod_sock:
            # the pair and the host end (its index, and its peer's in the pod) in one send
            replies: list[bytes] = []
            made, found = _rtnl_each(
                host_sock, _new_veth(host_ifname, host_mac, pod_ifname, fd, pod_mac, mtu),
                _link_request(RTM_GETLINK, 0, host_ifname),
                replies=replies)
            os.close(fd)
            fd = -1
            if made:  # nothing made (a link of that name is someone else's): nothing to undo
                raise NetlinkError(made, os.strerror(made))
            try:
                if found:
                    raise NetlinkError(found, os.strerror(found))
                host = _link_of(replies[0], host_ifname, host_mac)
                # IPv4-only pods: no IPv6 router/neighbour solicitations for the datapath
                # to drop
                _disable_ipv6(host_ifname, whole_namespace=False)
                if on_host_link is not None:
                    on_host_link(host)
                if callable(ip_address):
                    ip_address = ip_address()
                pod = _configure_pod_side(pod_sock, pod_ifname, pod_mac, ip_address, gateway,
                                          host.mac, _u32_attr(replies[0], _IFLA_LINK))
                _rtnl(host_sock,
                      _route(32, rt_scope["link"], 0, host.ifindex, dst=ip_address),
                      _neigh(host.ifindex, ip_address, pod_mac))
            except BaseException:
                try:
                    _rtnl(host_sock, _link_request(RTM_DELLINK, 0, host_ifname))
                except NetlinkError:
                    pass
                raise
    finally:
        if fd >= 0:
            os.close(fd)
    return EndpointLinks(host=host, pod=pod)


def _random_mac() -> str:
    """A random locally administered unicast MAC (what the kernel gives a veth anyway)."""
    raw = bytearray(os.urandom(6))
    raw[0] = (raw[0] & 0xFE) | 0x02
    return ":".join(f"{b:02x}" for b in raw)


@contextmanager
def _socket_in(netns_fd: int, netns: str) -> Iterator[socket.socket]:
    """A raw rtnetlink socket of the namespace `netns_fd` (`netns`) for the calling thread,
    which enters it only to open it (and to turn IPv6 off by default there: a pod is
    IPv4-only, and links made later inherit it) and goes straight back: a netlink socket
    stays bound to the namespace it was opened in. A thread that keeps its sockets
    (`reuse_netlink_socket`: it never leaves its namespace for good) keeps the fd of its
    own namespace too."""
    home = getattr(_thread, "home", -1) if getattr(_thread, "reuse", False) else -1
    owned = home < 0
    if owned:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(_libc().setns(netns_fd, CLONE_NEWNET), f"setns({netns})")
        try:
            _disable_ipv6("", whole_namespace=True)
            sock = _route_socket()
        finally:
            if _libc().setns(home, CLONE_NEWNET) != 0:
                # a thread stuck in a pod's namespace would wire the next pods wrongly:
                # stop rather than go on (cannot happen short of a kernel bug)
                os.write(2, b"pylium: cannot return a netlink thread to the agent's netns\n")
                os.abort()
    finally:
        if owned and getattr(_thread, "reuse", False):
            _thread.home = home
        elif owned:
            os.close(home)
    try:
        yield sock
    finally:
        sock.close()


def _configure_pod_side(sock: socket.socket, ifname: str, mac: str, ip_address: str,
                        gateway: str, host_mac: str, index: int | None = None) -> LinkInfo:
    """Inside the pod (over `sock`, a socket of its namespace): the veth end up with
    `ip/32`, the gateway as a static neighbour at the host-side MAC, the default route via
    it `onlink` — one batch once the end's index is known (`index`: the host end's
    IFLA_LINK, else asked for)."""
    if not index:
        index = _get_link(sock, ifname, mac).ifindex
    address = socket.inet_aton(ip_address)
    _rtnl(sock,
          _link_request(RTM_SETLINK, 0, index=index, flags=IFF_UP, change=IFF_UP),
          (RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL,
           _IFADDRMSG.pack(socket.AF_INET, 32, 0, 0, index)
           + _attr(_IFA_LOCAL, address) + _attr(_IFA_ADDRESS, address)),
          _neigh(index, gateway, host_mac),
          _route(0, rt_scope["universe"], RTNH_F_ONLINK, index, gateway=gateway))
    return LinkInfo(ifname=ifname, ifindex=index, mac=mac, up=True)


def _new_veth(host_ifname: str, host_mac: str, pod_ifname: str, pod_netns_fd: int,
              pod_mac: str, mtu: int) -> _Request:
    """RTM_NEWLINK of a veth pair: `host_ifname` up here with `host_mac`, its peer born as
    `pod_ifname` with `pod_mac` in the namespace of `pod_netns_fd` (no move afterwards;
    both MACs chosen here, so nothing needs asking back)."""
    peer = (_IFINFOMSG.pack(0, 0, 0, 0, 0) + _attr(_IFLA_IFNAME, _name(pod_ifname))
            + _attr(_IFLA_MTU, _U32.pack(mtu)) + _attr(_IFLA_NET_NS_FD, _U32.pack(pod_netns_fd))
            + _attr(_IFLA_ADDRESS, _mac(pod_mac)))
    info = (_attr(_IFLA_INFO_KIND, b"veth\0")
            + _attr(_IFLA_INFO_DATA, _attr(_VETH_INFO_PEER, peer)))
    return _link_request(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, host_ifname, flags=IFF_UP,
                         change=IFF_UP, attrs=_attr(_IFLA_MTU, _U32.pack(mtu))
                         + _attr(_IFLA_ADDRESS, _mac(host_mac)) + _attr(_IFLA_LINKINFO, info))


def _route(dst_len: int, scope: int, flags: int, oif: int, dst: str | None = None,
           gateway: str | None = None) -> _Request:
    """RTM_NEWROUTE (replace) of a unicast IPv4 route in the main table, protocol static
    (as pyroute2 adds routes, so `delete_route` finds them), out of `oif`."""
    attrs = _attr(_RTA_DST, socket.inet_aton(dst)) if dst is not None else b""
    if gateway is not None:
        attrs += _attr(_RTA_GATEWAY, socket.inet_aton(gateway))
    return (RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE,
            _RTMSG.pack(socket.AF_INET, dst_len, 0, 0, _RT_TABLE_MAIN, rt_proto["static"],
                        scope, rt_type["unicast"], flags)
            + attrs + _attr(_RTA_OIF, _U32.pack(oif)))


def _neigh(index: int, address: str, mac: str) -> _Request:
    """RTM_NEWNEIGH (replace): a permanent IPv4 neighbour."""
    return (RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_REPLACE,
            _NDMSG.pack(socket.AF_INET, index, NUD_PERMANENT, 0, 0)
            + _attr(_NDA_DST, socket.inet_aton(address)) + _attr(_NDA_LLADDR, _mac(mac)))


# batched rtnetlink: the requests of one pod start and stop --------------------------------
# pyroute2's IPRoute spends most of an endpoint create's CPU on its event loop, a request at
# a time (about 0.3 ms each), and even its message classes cost more CPU to encode these few
# requests than the kernel takes to act on them. So they are packed here with `struct` (a
# request is its type, its flags and its body: the fixed header and the attributes) and
# sent in batches on a kept raw socket (the kernel handles the messages of one send in
# order); the answers are read by their fixed headers alone (an ACK's error code, a link's
# index and flags). tests/unit/datapath/test_rtnl_pack.py checks the bytes against
# pyroute2's encoding of the same requests.
_RT_TABLE_MAIN = 254
_SEQ = itertools.count(1)
_NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
_NLMSGERR = struct.Struct("=i")  # after the header: the error code (0 is an ACK)
_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefix length, flags, scope, index
_NDMSG = struct.Struct("=BxxxiHBB")  # family, ifindex, state, flags, type
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst/src len, tos, table, proto, scope, type, flags
_RTA = struct.Struct("=HH")  # attribute length, type
_U32 = struct.Struct("=I")
_IFLA_ADDRESS, _IFLA_IFNAME, _IFLA_MTU, _IFLA_LINK, _IFLA_LINKINFO = 1, 3, 4, 5, 18
_IFLA_NET_NS_FD = 28
_IFLA_INFO_KIND, _IFLA_INFO_DATA, _VETH_INFO_PEER = 1, 2, 1
_IFA_ADDRESS, _IFA_LOCAL = 1, 2
_NDA_DST, _NDA_LLADDR = 1, 2
_RTA_DST, _RTA_OIF, _RTA_GATEWAY = 1, 4, 5
#: one request: message type, flags (request and ACK are added when sent), body
_Request = tuple[int, int, bytes]


def _attr(kind: int, payload: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    size = _RTA.size + len(payload)
    return _RTA.pack(size, kind) + payload + b"\0" * (-size % 4)


def _name(ifname: str) -> bytes:
    return ifname.encode() + b"\0"


def _mac(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def _link_request(kind: int, nl_flags: int, ifname: str | None = None, index: int = 0,
                  flags: int = 0, change: int = 0, attrs: bytes = b"") -> _Request:
    """An ifinfomsg request (RTM_NEWLINK/SETLINK/GETLINK/DELLINK) naming a link by name or
    index."""
    body = _IFINFOMSG.pack(0, 0, index, flags, change)
    if ifname is not None:
        body += _attr(_IFLA_IFNAME, _name(ifname))
    return kind, nl_flags, body + attrs


def _packed(request: _Request, seq: int) -> bytes:
    """The whole message of `request` with sequence number `seq` (an ACK asked for)."""
    kind, flags, body = request
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, flags | NLM_F_REQUEST | NLM_F_ACK,
                          seq, 0) + body


def _rtnl(sock: socket.socket, *requests: _Request) -> list[bytes]:
    """Send `requests` in one batch, each with an ACK asked for; the answers that are not
    ACKs (whole messages, raw) come back in order. The first refusal raises `NetlinkError`
    (after every answer is read: the socket stays usable)."""
    replies: list[bytes] = []
    for code in _rtnl_each(sock, *requests, replies=replies):
        if code:
            raise NetlinkError(code, os.strerror(code))
    return replies


def _rtnl_each(sock: socket.socket, *requests: _Request,
               replies: list[bytes] | None = None) -> list[int]:
    """`_rtnl` without raising: the error code of each request (0: done), in order."""
    seqs = [next(_SEQ) & 0xFFFFFFFF for _ in requests]
    out = [_packed(request, seq) for request, seq in zip(requests, seqs, strict=True)]
    sock.send(b"".join(out))
    pending, codes = set(seqs), dict.fromkeys(seqs, 0)
    while pending:
        data = sock.recv(65536)
        offset = 0
        while offset + _NLMSGHDR.size <= len(data):
            length, kind, _flags, seq, _port = _NLMSGHDR.unpack_from(data, offset)
            if length < _NLMSGHDR.size:
                break  # malformed: nothing more to read in this datagram
            if seq in pending:
                if kind == NLMSG_ERROR:
                    pending.discard(seq)
                    codes[seq] = abs(_NLMSGERR.unpack_from(data, offset + _NLMSGHDR.size)[0])
                elif kind != NLMSG_DONE and replies is not None:
                    replies.append(data[offset:offset + length])
            offset += (length + 3) & ~3
    return [codes[seq] for seq in seqs]


def _link_of(reply: bytes, ifname: str, mac: str) -> LinkInfo:
    """The link an RTM_NEWLINK answer describes: its index, flags and the MAC the kernel
    reports (`mac`, the one we chose, if the answer has none): the datapath takes it as
    the veth's, asking no second time."""
    _family, _type, index, flags, _change = _IFINFOMSG.unpack_from(reply, _NLMSGHDR.size)
    address = _attr_bytes(reply, _IFLA_ADDRESS)
    if address is not None and len(address) == 6:
        mac = ":".join(f"{b:02x}" for b in address)
    return LinkInfo(ifname=ifname, ifindex=index, mac=mac, up=bool(flags & IFF_UP))


def _attr_bytes(reply: bytes, kind: int) -> bytes | None:
    """The payload of an attribute of an RTM_NEWLINK answer, or None."""
    offset = _NLMSGHDR.size + _IFINFOMSG.size
    end = min(len(reply), _NLMSGHDR.unpack_from(reply)[0])
    while offset + _RTA.size <= end:
        size, found = _RTA.unpack_from(reply, offset)
        if size < _RTA.size or offset + size > end:
            return None  # malformed or cut short
        if found & 0x3FFF == kind:
            return reply[offset + _RTA.size:offset + size]
        offset += (size + 3) & ~3
    return None


def _u32_attr(reply: bytes, kind: int) -> int | None:
    """A u32 attribute of an RTM_NEWLINK answer (e.g. a veth's IFLA_LINK: its peer's index
    in the peer's namespace), or None."""
    payload = _attr_bytes(reply, kind)
    return _U32.unpack_from(payload)[0] if payload is not None and len(payload) >= 4 else None


def _get_link(sock: socket.socket, ifname: str, mac: str) -> LinkInfo:
    """One RTM_GETLINK by name (ENODEV if there is none) of a link whose MAC we chose."""
    reply = _rtnl(sock, _link_request(RTM_GETLINK, 0, ifname))[0]
    return _link_of(reply, ifname, mac)


def _route_socket() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                         socket.NETLINK_ROUTE)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.bind((0, 0))
    return sock


@contextmanager
def _host_socket() -> Iterator[socket.socket]:
    """A raw rtnetlink socket in the calling thread's namespace: the thread's kept one
    while it keeps pyroute2 sockets (`reuse_netlink_socket`), else a fresh one closed
    after use."""
    if getattr(_thread, "reuse", False):
        sock = getattr(_thread, "raw", None)
        if sock is None:
            sock = _thread.raw = _route_socket()
        yield sock
        return
    sock = _route_socket()
    try:
        yield sock
    finally:
        sock.close()


def _disable_ipv6(ifname: str, whole_namespace: bool = True) -> None:
    """`disable_ipv6` on `ifname` in the calling thread's namespace, and with
    `whole_namespace` (a pod's) on every link there and every link made later."""
    for scope in (("default", "all") if whole_namespace else ()) + ((ifname,) if ifname else ()):
        _write_proc(f"/proc/sys/net/ipv6/conf/{scope}/disable_ipv6", b"1\n")


def _write_proc(path: str, data: bytes) -> None:
    """Write a /proc file in three plain syscalls (a pod start writes several sysctls)."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def unwire_endpoint(host_ifname: str, ip_address: str | None = None) -> bool:
    """Remove the host-side veth (its pod end and the /32 route go with it; the route is
    asked to go too, in case the veth was gone already); False if the veth was not there.
    Batched like `wire_endpoint`: one send per pod stop."""
    requests = [_link_request(RTM_DELLINK, 0, host_ifname)]
    if ip_address:  # any scope and protocol
        requests.append((RTM_DELROUTE, 0, _RTMSG.pack(
            socket.AF_INET, 32, 0, 0, _RT_TABLE_MAIN, 0, rt_scope["nowhere"], 0, 0)
            + _attr(_RTA_DST, socket.inet_aton(ip_address))))
    with _host_socket() as sock:
        errors = _rtnl_each(sock, *requests)
    link_error = errors[0]
    if link_error not in (0, errno.ENODEV):
        raise NetlinkError(link_error, os.strerror(link_error))
    if len(errors) > 1 and errors[1] not in (0, errno.ESRCH, errno.ENOENT):
        raise NetlinkError(errors[1], os.strerror(errors[1]))
    return link_error == 0


# routing modes ----------------------------------------------------------------------------
@_netlink
def link_mtu(ifname: str, netns: str | None = None) -> int:
    with ipr() as ip:
        return int(ip.link("get", index=_index(ip, ifname))[0].get_attr("IFLA_MTU"))


@_netlink
def set_link_mtu(ifname: str, mtu: int, netns: str | None = None) -> None:
    with ipr() as ip:
        ip.link("set", index=_index(ip, ifname), mtu=mtu)


@_netlink
def link_with_address(address: str, netns: str | None = None) -> str | None:
    """The name of the link holding IPv4 `address`, or None."""
    with ipr() as ip:
        for m in ip.get_addr(family=2):
            if m.get_attr("IFA_ADDRESS") == address:
                return ip.link("get", index=m["index"])[0].get_attr("IFLA_IFNAME")
    return None


@_netlink
def create_vxlan_external(ifname: str, port: int, mtu: int, netns: str | None = None) -> LinkInfo:
    """A VXLAN device in collect_md (`external`) mode listening on UDP `port`, up; an
    existing one with that name is replaced only if its port differs."""
    with ipr() as ip:
        found = ip.link_lookup(ifname=ifname)
        if found:
            msg = ip.link("get", index=found[0])[0]
            data = (msg.get_attr("IFLA_LINKINFO") or {}).get_attr("IFLA_INFO_DATA")
            if data is None or data.get_attr("IFLA_VXLAN_PORT") != port:
                ip.link("del", index=found[0])
                found = []
        if not found:
            ip.link("add", ifname=ifname, kind="vxlan", vxlan_collect_metadata=1,
                    vxlan_port=port, vxlan_learning=0)
        index = _index(ip, ifname)
        ip.link("set", index=index, mtu=mtu)
        ip.link("set", index=index, state="up")
        info = _link_info(ip, ifname)
    assert info is not None
    return info


# policy routing ---------------------------------------------------------------------------
# These run on a helper thread even for the caller's own netns: the datapath calls them from
# wherever it is used, the agent's event loop included (pyroute2's sync API cannot run there).
def add_fwmark_local_table(mark: int, mask: int, table: int, priority: int,
                           netns: str | None = None) -> None:
    """Deliver packets whose mark matches `mark/mask` locally, whatever their destination:
    rule `fwmark mark/mask lookup table` + `local 0.0.0.0/0 dev lo table table` (how a
    transparent proxy receives connections to addresses that are not the host's).
    Idempotent."""

    def add() -> None:
        with ipr() as ip:
            if not _fwmark_rules(ip, mark, mask, table, priority):
                ip.rule("add", family=socket.AF_INET, fwmark=mark, fwmask=mask, table=table,
                        priority=priority)
            ip.route("replace", dst="0.0.0.0/0", table=table, type="local", scope="host",
                     oif=_index(ip, "lo"))

    _on_thread(add, netns)


def delete_fwmark_local_table(mark: int, mask: int, table: int, priority: int,
                              netns: str | None = None) -> bool:
    """Remove what `add_fwmark_local_table` added; False if none of it was there."""

    def delete() -> bool:
        removed = False
        with ipr() as ip:
            for _rule in _fwmark_rules(ip, mark, mask, table, priority):
                ip.rule("del", family=socket.AF_INET, fwmark=mark, fwmask=mask, table=table,
                        priority=priority)
                removed = True
            try:
                ip.route("del", dst="0.0.0.0/0", table=table, type="local", scope="host",
                         oif=_index(ip, "lo"))
                removed = True
            except NetlinkError as exc:
                if exc.code not in (errno.ESRCH, errno.ENOENT):
                    raise
        return removed

    return _on_thread(delete, netns)


def fwmark_local_table_present(mark: int, mask: int, table: int, priority: int,
                               netns: str | None = None) -> dict[str, bool]:
    """{"rule": ..., "route": ...}: which parts of `add_fwmark_local_table` are in place."""

    def present() -> dict[str, bool]:
        with ipr() as ip:
            rule = bool(_fwmark_rules(ip, mark, mask, table, priority))
            route = any(m.get_attr("RTA_TABLE") == table
                        for m in ip.get_routes(family=socket.AF_INET, table=table))
        return {"rule": rule, "route": route}

    return _on_thread(present, netns)


def _fwmark_rules(ip: IPRoute, mark: int, mask: int, table: int, priority: int) -> list:
    return [r for r in ip.get_rules(family=socket.AF_INET)
            if r.get_attr("FRA_FWMARK") == mark and r.get_attr("FRA_FWMASK") == mask
            and (r.get_attr("FRA_TABLE") or r["table"]) == table
            and r.get_attr("FRA_PRIORITY") == priority]
