"""Agent component "datapath": opens (or adopts) the pinned BPF state under the configured
bpffs root in the agent's network namespace and garbage-collects expired conntrack
entries."""

from __future__ import annotations

import asyncio
import logging

from pylium.datapath.datapath import ROUTING_SLOT_ENCRYPT, Datapath

log = logging.getLogger(__name__)

CT_GC_INTERVAL_S = 30.0
CT_GC_MIN_INTERVAL_S = 1.0
#: fill ratio after a collection above which the next comes twice as soon, and below which
#: the interval relaxes again (an LRU conntrack map that fills evicts the least recently
#: used entries: idle long-lived connections, which then break)
CT_GC_BUSY_FILL, CT_GC_IDLE_FILL = 0.25, 0.05
CT_NEAR_FULL = 0.9


def next_gc_interval(interval: float, fill: float, longest: float) -> float:
    """Cilium-like adaptive conntrack GC: sooner while the table is filling, back to
    `longest` while it is nearly empty."""
    if fill >= CT_GC_BUSY_FILL:
        return max(CT_GC_MIN_INTERVAL_S, interval / 2)
    if fill <= CT_GC_IDLE_FILL:
        return min(longest, interval * 2)
    return interval


async def _ct_gc_loop(datapath: Datapath, longest: float) -> None:
    interval = longest
    warned = False
    while True:
        await asyncio.sleep(interval)
        try:
            removed = await asyncio.to_thread(datapath.ct_gc)
        except Exception:
            log.exception("conntrack gc failed")
            continue
        fill = datapath.ct_entries / datapath.ct_capacity if datapath.ct_capacity else 0.0
        if fill >= CT_NEAR_FULL and not warned:
            log.warning("conntrack table %.0f%% full after collection (%d of %d entries): "
                        "the kernel evicts the least recently used connections",
                        fill * 100, datapath.ct_entries, datapath.ct_capacity)
        warned = fill >= CT_NEAR_FULL
        interval = next_gc_interval(interval, fill, longest)
        if removed:
            log.debug("conntrack gc removed %d expired entries (%.0f%% full, next in %.0fs)",
                      removed, fill * 100, interval)


async def start(daemon) -> Datapath:
    cfg = daemon.config
    datapath = Datapath(cfg.bpffs_root,
                        ct_timeouts=(cfg.ct_timeout_tcp, cfg.ct_timeout_non_tcp, cfg.ct_timeout_syn,
                                     cfg.ct_timeout_fin),
                        cache_dir=cfg.state_dir / "bpf-cache",
                        policy_capacity=cfg.bpf_policy_map_max,
                        ct_max=cfg.bpf_ct_global_max)
    datapath.open()
    if not cfg.encryption:
        # encryption deselected: what a previous run's encryption left must not steer
        # traffic (with encryption selected the slot stays filled across the restart, so
        # nothing leaves in plaintext before the encryption sets up again)
        datapath.set_routing_slot(ROUTING_SLOT_ENCRYPT, None)
    endpoints = datapath.dump_endpoints()
    log.info("datapath open at %s (%d endpoints adopted)", cfg.bpffs_root, len(endpoints))
    daemon.spawn(_ct_gc_loop(datapath, min(CT_GC_INTERVAL_S, float(cfg.ct_timeout_non_tcp))))
    return datapath
