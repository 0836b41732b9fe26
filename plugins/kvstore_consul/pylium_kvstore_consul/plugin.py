"""Hook implementations of the `consul` plugin."""

from pylium.api import KVStoreRecord
from pylium.hookspecs import hookimpl

from pylium_kvstore_consul.backend import KvstoreConsul


@hookimpl
def pylium_kvstores():
    return [KVStoreRecord(name="consul", backend=KvstoreConsul, description="Consul KV cluster state through py-consul")]
