"""The local lab: nodes and pods as network namespaces on this host (`lab.Lab` composes the
parts: topology, kvstore, agents, pods, state, processes)."""
