"""A worker thread's kept netlink socket stays empty between uses: answers pyroute2 leaves
unread (the ACK after a `get`'s reply) must not pile up, one more per endpoint create and
delete, for the agent's whole life."""

from __future__ import annotations

import os
import secrets
import subprocess
import threading

from pylium.datapath import netns as plumbing

CLONE_NEWNET = 0x40000000


def test_kept_socket_does_not_accumulate_unread_answers():
    node = f"epmem-nl-{secrets.token_hex(3)}"
    pods = [f"{node}-p{i}" for i in range(6)]
    subprocess.run(["ip", "netns", "add", node], check=True)
    queued: list[tuple[int, int]] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            fd = os.open(f"/run/netns/{node}", os.O_RDONLY)  # only this thread moves
            try:
                plumbing._check(plumbing._libc().setns(fd, CLONE_NEWNET), "setns")
            finally:
                os.close(fd)
            plumbing.reuse_netlink_socket()
            for i, pod in enumerate(pods):
                subprocess.run(["ip", "netns", "add", pod], check=True)
                links = plumbing.wire_endpoint(f"lxepm{i}", pod, f"10.99.7.{10 + i}",
                                               "10.99.7.1", pod_ifname="eth0", mtu=1500)
                assert links.host.ifindex > 0
                assert plumbing.unwire_endpoint(f"lxepm{i}", f"10.99.7.{10 + i}")
                with plumbing.ipr() as ip:  # the kept socket, lent again
                    queue = ip.asyncore.msg_queue.root
                    queued.append((i, queue.qsize()))
        except BaseException as exc:  # handed to the test's thread
            errors.append(exc)

    try:
        thread = threading.Thread(target=worker)
        thread.start()
        thread.join(60)
        assert not thread.is_alive()
        if errors:
            raise errors[0]
        assert [n for _, n in queued] == [0] * len(pods), queued
    finally:
        for pod in pods:
            subprocess.run(["ip", "netns", "del", pod], capture_output=True)
        subprocess.run(["ip", "netns", "del", node], capture_output=True)
