"""Routing modes: the agent component that runs the selected backend, and the bases the
backends build on (`tunnel.TunnelRouting` for the overlays, `base.RoutedNodes` for routes)."""
