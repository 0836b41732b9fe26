"""Placeholder: replaced by the embedded SQLite backend."""

from pylium.api.kvstore import KVStore


class EmbeddedKVStore(KVStore):  # noqa: D101 - temporary stub
    name = "embedded"
