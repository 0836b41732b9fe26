"""Makes this folder's helper modules (flow_starwars) importable under importlib mode."""


