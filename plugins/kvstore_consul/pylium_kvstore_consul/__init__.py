"""pylium plugin `consul`: Consul KV cluster state through py-consul."""
