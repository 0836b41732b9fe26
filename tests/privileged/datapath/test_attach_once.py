"""An agent start attaches each endpoint's programs once: `Datapath.open()` re-attaches the
endpoints it finds in the map, and the endpoint manager's restore that follows (one
`attach_endpoint` per endpoint) must not replace those filters a second time."""

from __future__ import annotations

from pylium.datapath import Datapath, libbpf, tc

from .conftest import BPF_CACHE

PODS = {"a": ("10.219.0.10", 4001), "b": ("10.219.0.11", 4002)}


def _count_attaches(monkeypatch) -> list[tuple[int, int]]:
    """Every hook a program is attached to, through `tc.attach` or `tc.attach_both`."""
    calls: list[tuple[int, int]] = []
    real, real_both = tc.attach, tc.attach_both

    def counting(ifindex: int, point: int, prog_fd: int) -> None:
        calls.append((ifindex, point))
        real(ifindex, point, prog_fd)

    def counting_both(ifindex: int, ingress_fd: int, egress_fd: int) -> None:
        calls.extend([(ifindex, tc.INGRESS), (ifindex, tc.EGRESS)])
        real_both(ifindex, ingress_fd, egress_fd)

    monkeypatch.setattr(tc, "attach", counting)
    monkeypatch.setattr(tc, "attach_both", counting_both)
    return calls


def _attached_ids(worker, ifindex: int) -> tuple[int | None, int | None]:
    return (worker.run(tc.query, ifindex, tc.INGRESS), worker.run(tc.query, ifindex, tc.EGRESS))


def test_agent_start_attaches_each_endpoint_once(node, monkeypatch):
    n = node("tidy-attach1", PODS)
    n.raw.close()  # the agent stops; filters and pins stay
    calls = _count_attaches(monkeypatch)
    restarted = Datapath(n.root, cache_dir=BPF_CACHE)
    try:
        n.worker.run(restarted.open)  # datapath component
        for ep in n.eps.values():     # endpoint restore
            n.worker.run(restarted.attach_endpoint, ep)
        want = sorted((ep.ifindex, point) for ep in n.eps.values()
                      for point in (tc.INGRESS, tc.EGRESS))
        assert sorted(calls) == want, "every endpoint hook attached exactly once"
        new_ids = (libbpf.prog_info(restarted.prog_fds["from_container"]).id,
                   libbpf.prog_info(restarted.prog_fds["to_container"]).id)
        for ep in n.eps.values():
            assert _attached_ids(n.worker, ep.ifindex) == new_ids  # the new programs run

        # a detached endpoint attached again gets its filters again
        ep = n.eps["a"]
        calls.clear()
        n.worker.run(restarted.detach_endpoint, ep.ep_id)
        assert _attached_ids(n.worker, ep.ifindex) == (None, None)
        n.worker.run(restarted.attach_endpoint, ep)
        assert sorted(calls) == [(ep.ifindex, tc.INGRESS), (ep.ifindex, tc.EGRESS)]
        assert _attached_ids(n.worker, ep.ifindex) == new_ids
    finally:
        restarted.close()


def test_an_endpoint_attach_asks_for_the_clsact_qdisc_once(node):
    """Both programs go on a new veth with one qdisc create: a second create for the egress
    hook was refused by the kernel on every pod start, and libbpf's log of that refusal
    crowded the verifier's messages out of `log_tail`."""
    libbpf.clear_log()
    n = node("tidy-attach2", PODS)
    for ep in n.eps.values():
        ingress, egress = _attached_ids(n.worker, ep.ifindex)
        assert ingress is not None and egress is not None
    refusals = [line for line in libbpf.log_tail(LOG_LINES) if "Kernel error" in line]
    assert refusals == [], refusals


LOG_LINES = libbpf.LOG_KEEP
