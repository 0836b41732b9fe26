"""Hook implementations: what pylium discovers through the `pylium` entry point."""

from pylium.api import KVStoreRecord
from pylium.hookspecs import hookimpl

from pylium_kvstore_file.store import FileKVStore


@hookimpl
def pylium_kvstores():
    return [
        KVStoreRecord(
            name="file",
            backend=FileKVStore,
            description="Example plugin: one JSON file on this node's disk",
        )
    ]
