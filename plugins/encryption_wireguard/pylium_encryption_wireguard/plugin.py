"""Hook implementations of the `wireguard` plugin."""

from pathlib import Path

from pylium.api import EncryptionRecord
from pylium.hookspecs import hookimpl

from pylium_encryption_wireguard.backend import EncryptionWireguard

BPF_SOURCE = Path(__file__).resolve().parent / "bpf" / "bpf_wireguard.c"
#: the device's ifindex and the plaintext choice are the backend's to know
RUNTIME_DEFINES = ("WG_IFINDEX", "ALLOW_PLAINTEXT")


@hookimpl
def pylium_encryptions():
    return [EncryptionRecord(
        name="wireguard", backend=EncryptionWireguard,
        description="Transparent node-to-node WireGuard encryption (wireguard-go, UDP 51871)",
        bpf_sources=(BPF_SOURCE,), runtime_defines=RUNTIME_DEFINES)]
