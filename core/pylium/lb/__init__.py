"""Service load balancing: services and backends (model), their place in the KV store
(store), Maglev tables (maglev) and the agent component that writes the LB maps."""
