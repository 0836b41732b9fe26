"""Hook implementations of the `consul` plugin."""

from pylium.api import KVStoreRecord
from pylium.hookspecs import hookimpl

from pylium_kvstore_consul.backend import ConsulKVStore


@hookimpl
def pylium_kvstores():
    return [KVStoreRecord(name="consul", backend=ConsulKVStore,
                          description="Consul KV cluster state through py-consul "
                                      "(tested against pylium's Consul API emulator only)")]
