"""pylium plugin `vxlan`: VXLAN overlay (collect_md device, VNI = source identity, UDP 8472)."""
