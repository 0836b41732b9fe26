"""Example third-party pylium plugin: the `file` KV-store backend."""
