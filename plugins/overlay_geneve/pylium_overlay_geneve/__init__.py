"""pylium plugin `geneve`: Geneve overlay encapsulated in BPF (VNI = source identity, UDP 6081)."""
