"""Agent component "datapath": opens (or adopts) the pinned BPF state under the configured
bpffs root in the agent's network namespace and garbage-collects expired conntrack
entries."""

from __future__ import annotations

import asyncio
import logging

from pylium.datapath.datapath import ROUTING_SLOT_ENCRYPT, Datapath

log = logging.getLogger(__name__)

CT_GC_INTERVAL_S = 30.0


async def _ct_gc_loop(datapath: Datapath, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            removed = await asyncio.to_thread(datapath.ct_gc)
            if removed:
                log.debug("conntrack gc removed %d expired entries", removed)
        except Exception:
            log.exception("conntrack gc failed")


async def start(daemon) -> Datapath:
    cfg = daemon.config
    datapath = Datapath(cfg.bpffs_root,
                        ct_timeouts=(cfg.ct_timeout_tcp, cfg.ct_timeout_non_tcp, cfg.ct_timeout_syn,
                                     cfg.ct_timeout_fin),
                        cache_dir=cfg.state_dir / "bpf-cache",
                        policy_capacity=cfg.bpf_policy_map_max)
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
