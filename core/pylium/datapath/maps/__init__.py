"""ctypes mirrors of every pinned map's key/value (one module per map) and their names."""
