"""pylium: a plugin-based eBPF networking, security and observability agent.

Imports nothing at all: `pylium-cni` (exec'd for every pod) goes through this package."""


def __getattr__(name: str) -> str:
    """`__version__` is looked up on first use: importlib.metadata costs ~25 ms at import,
    which every `pylium-cni` exec (one per pod sandbox operation) would pay."""
    if name != "__version__":
        raise AttributeError(f"module 'pylium' has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        value = version("pylium")
    except PackageNotFoundError:  # running from a source tree without install
        value = "0.0.0+unknown"
    globals()["__version__"] = value
    return value
