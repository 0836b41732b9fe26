"""The agent process's garbage-collector settings.

An agent holds a large, slowly growing, mostly acyclic state (ipcache entries, node records,
mirrored KV items: one per endpoint and node of the cluster) and, while the cluster changes,
allocates many short-lived objects per event. With CPython's defaults (a young collection
every 700 net allocations, a full one whenever the long-lived set grew by a quarter) the
collector walks that whole state again and again: measured on 100 simulated nodes
converging after 1,000 endpoint changes, 0.4-0.55 s of collection per round, the largest
single item of the agents' CPU.

What long-running Python services do instead (Instagram's `gc.freeze`, raised thresholds in
most large deployments): collect young objects less often, and after start-up move
everything alive into the permanent generation, which collections never walk again.
Reference cycles are still collected, only in larger batches; what `freeze` moved is
never collected (the start-up state lives as long as the agent anyway)."""

from __future__ import annotations

import gc

#: (young, middle, old): a young collection per 50,000 net allocations instead of 700;
#: the full collection's own rule (only when the long-lived set grew by 25 %) still holds
THRESHOLDS = (50_000, 20, 10)


def tune() -> None:
    """Raise the collection thresholds (call once, early, in the agent process)."""
    gc.set_threshold(*THRESHOLDS)


def settle() -> None:
    """After start-up (the initial lists applied): collect once, then freeze what is left
    so later collections walk only what changes."""
    gc.collect()
    gc.freeze()
