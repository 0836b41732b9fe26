"""pylium's Kubernetes orchestrator: follows the API server and feeds the agent."""
