"""pylium plugin `etcd`: etcd v3 cluster state through aetcd."""
