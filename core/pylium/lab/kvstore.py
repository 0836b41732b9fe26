"""The lab's cluster store (`lab up --kvstore`): `embedded`, one SQLite file every node's
agent opens (with more than one node), or `etcd`, a real etcd in the lab's `<name>-kv`
namespace on the underlay, reachable from every node at KVSTORE_IP.

The etcd is run by `pylium.kvstore.etcd_process.EtcdProcess` (not the tests' helper), in its
own session so it outlives `pylium lab up`; a later command stops it by its recorded pid."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from pylium.errors import UserError
from pylium.kvstore.etcd_process import EtcdProcess
from pylium.lab.processes import stop_process
from pylium.lab.state import STATE_ROOT, LabState, State
from pylium.lab.topology import UNDERLAY_PREFIX, Topology

KVSTORES = ("embedded", "etcd")
KVSTORE_IP = UNDERLAY_PREFIX + "2"
ETCD_PORTS = (2379, 2380)


class LabKVStore:
    def __init__(self, store: LabState, topology: Topology):
        self.store = store
        self.topology = topology
        self.name = store.name

    def make(self, state: State, kvstore: str, nodes: int,
             settings: dict[str, Any]) -> dict[str, Any]:
        """Set up the store the agents share; returns the agent settings that select it
        (none when the agents' own defaults or the caller's settings already decide)."""
        if kvstore == "etcd":
            return self._make_etcd(state)
        if (nodes > 1 and settings.get("kvstore", "embedded") == "embedded"
                and "kvstore_options" not in settings):
            # one cluster: identities, nodes and endpoint IPs shared by every agent
            shared = STATE_ROOT / f"{self.name}-kvstore.sqlite3"
            state["paths"] += [str(shared), f"{shared}-wal", f"{shared}-shm",
                               f"{shared}.users"]
            self.store.save(state)
            return {"kvstore_options": {"path": str(shared)}}
        return {}

    def _make_etcd(self, state: State) -> dict[str, Any]:
        netns = self.topology.plug(state, "kv", "kv", KVSTORE_IP)
        data_dir = STATE_ROOT / self.topology.ns("etcd")
        shutil.rmtree(data_dir, ignore_errors=True)
        state["paths"].append(str(data_dir))
        state["kvstore"] = {"backend": "etcd", "netns": netns, "data_dir": str(data_dir),
                            "endpoint": f"http://{KVSTORE_IP}:{ETCD_PORTS[0]}"}
        self.store.save(state)
        self.start(state)
        return {"kvstore": "etcd", "kvstore_options": {"endpoints": [state["kvstore"]["endpoint"]]}}

    def _etcd_of(self, state: State) -> dict[str, Any]:
        kv = state.get("kvstore", {})
        if kv.get("backend") != "etcd":
            raise UserError(f"lab {self.name} runs no etcd (use `lab up --kvstore etcd`)")
        return kv

    def start(self, state: State) -> None:
        """(Re)start the lab's etcd on the same address and data (after `stop`)."""
        kv = self._etcd_of(state)
        etcd = EtcdProcess(Path(kv["data_dir"]), client_port=ETCD_PORTS[0],
                           peer_port=ETCD_PORTS[1], name=self.topology.ns("etcd"),
                           host=KVSTORE_IP, netns=kv["netns"], detach=True)
        etcd.start()
        kv["pid"] = etcd.process.pid
        state["processes"].append({"pid": etcd.process.pid, "match": kv["data_dir"]})
        self.store.save(state)

    def stop(self, state: State, wipe: bool = False) -> None:
        """Stop the lab's etcd (an outage: agents go degraded until `start`); `wipe` also
        deletes its data, so it comes back empty (the agents write their state back)."""
        kv = self._etcd_of(state)
        stop_process(kv.get("pid", 0), kv["data_dir"])
        if wipe:
            shutil.rmtree(Path(kv["data_dir"]) / "data", ignore_errors=True)
