"""CNI: the `pylium-cni` plugin (`plugin`, `spec`) and the agent's conflist (`component`)."""
