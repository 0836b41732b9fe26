"""Hook implementations of the `wireguard` plugin."""

from pylium.api import EncryptionRecord
from pylium.hookspecs import hookimpl

from pylium_encryption_wireguard.backend import EncryptionWireguard


@hookimpl
def pylium_encryptions():
    return [EncryptionRecord(name="wireguard", backend=EncryptionWireguard, description="Transparent node-to-node WireGuard encryption")]
