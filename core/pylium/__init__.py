"""pylium: a plugin-based eBPF networking, security and observability agent."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pylium")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+unknown"
