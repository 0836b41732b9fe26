"""Shared fixtures. Privileged tests (tests/privileged) need root, netns and BPF; they
create uniquely named namespaces and always remove them."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"{SHARED} is missing: the project expects ../shared beside the checkout")
    return SHARED


@pytest.fixture(scope="session", autouse=True)
def agent_pins_stay_in_a_test_root():
    """Agents a test starts without `--bpffs-root` (they inherit the environment) pin their
    maps under a per-run directory that is removed at the end, never under the real
    /sys/fs/bpf/pylium a production agent would use."""
    root = Path(f"/sys/fs/bpf/pylium-test-run-{os.getpid()}")
    previous = os.environ.get("PYLIUM_BPFFS_ROOT")
    os.environ["PYLIUM_BPFFS_ROOT"] = str(root)
    yield root
    if previous is None:
        os.environ.pop("PYLIUM_BPFFS_ROOT", None)
    else:
        os.environ["PYLIUM_BPFFS_ROOT"] = previous
    shutil.rmtree(root, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="privileged test: needs root")
    for item in items:
        if "privileged" in item.nodeid.split(os.sep):
            item.add_marker(skip)
