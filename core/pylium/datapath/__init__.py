"""The eBPF datapath: BPF programs on each endpoint's veth, pinned maps, the one loader
that compiles and loads BPF objects (the core's and plugins'), and the `Datapath` facade the
rest of pylium drives them through. Importing it loads no library and mounts nothing."""

from pylium.datapath.datapath import Datapath, EndpointInfo
from pylium.datapath.libbpf import DatapathError
from pylium.datapath.loader import LoadedObject, load_object

__all__ = ["Datapath", "DatapathError", "EndpointInfo", "LoadedObject", "load_object"]
