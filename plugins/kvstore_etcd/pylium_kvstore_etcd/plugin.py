"""Hook implementations of the `etcd` plugin."""

from pylium.api import KVStoreRecord
from pylium.hookspecs import hookimpl

from pylium_kvstore_etcd.backend import EtcdKVStore


@hookimpl
def pylium_kvstores():
    return [KVStoreRecord(name="etcd", backend=EtcdKVStore, description="etcd v3 cluster state through aetcd")]
