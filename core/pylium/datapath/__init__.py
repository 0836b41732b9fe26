"""The eBPF datapath: BPF programs on each endpoint's veth, pinned maps, and the
`Datapath` facade the rest of pylium drives them through."""

from pylium.datapath.datapath import Datapath, EndpointInfo
from pylium.datapath.libbpf import DatapathError

__all__ = ["Datapath", "DatapathError", "EndpointInfo"]
