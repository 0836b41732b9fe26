"""pylium plugin `wireguard`: Transparent node-to-node WireGuard encryption."""
