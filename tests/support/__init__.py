"""Test doubles and helpers shared by tests (and benchmarks); never shipped in a distribution."""
