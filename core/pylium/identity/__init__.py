"""identity: label sets → numeric security identities.

    labels     `Label`, `LabelSet` (`LabelSet.parse("app=web,k8s:tier=db")`)
    model      `Identity`, Cilium's reserved numbers, ranges (256.., local 1<<24..)
    cache      `IdentityCache`: the node's known identities, CIDR identities on demand,
               listeners `(added, removed)`
    allocator  `IdentityAllocator`: cluster-wide allocation through the KV store
    manager    `IdentityManager`: allocator + cache + KV watch of other nodes
    component  agent start-up: `daemon.components["identity"]` is the manager

`await manager.allocate(labels) -> Identity`, `await manager.release(identity)`,
`manager.lookup(number)`, `manager.lookup_labels(labels)`, `manager.list()`,
`manager.cache` (what the policy engine watches)."""
