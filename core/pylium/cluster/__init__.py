"""cluster: what several agents agree on through the KV store (Cilium's kvstore mode).

    session    `ClusterSession`: the agent's one lease for everything it publishes, kept
               alive; KV-store health ("ok"/"degraded") and resync after an outage
    mirror     `PrefixMirror`: list + watch a prefix into a dict, re-listing (and reporting
               what changed) whenever asked to resync
    nodes      `NodeRegistry`: this node under `pylium/state/nodes/v1/<name>`, the others
               followed; join/leave callbacks
    ipcache    `IPCacheSync`: local endpoints published under `pylium/state/ip/v1/<ip>`,
               remote ones kept in the BPF ipcache (/32 → identity, tunnel = owner's IP)
    component  agent start-up: `daemon.components["cluster"]`

Keys written by an agent live under its lease, so a node that dies without cleaning up
disappears (with its endpoints) once the lease expires."""
