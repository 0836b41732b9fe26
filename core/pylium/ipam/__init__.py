"""Pod IP address management: addresses from the node's pod CIDR, persisted."""

from pylium.ipam.allocator import IPAMError, PodCIDRAllocator

__all__ = ["IPAMError", "PodCIDRAllocator"]
