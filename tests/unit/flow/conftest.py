"""Makes this folder's helper modules (flow_starwars) importable under importlib mode."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
