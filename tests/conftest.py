"""Shared fixtures. Privileged tests (tests/privileged) need root, netns and BPF; they
create uniquely named namespaces and always remove them."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
#: the Star Wars policies the project ships (README, demo and tests use these)
EXAMPLE_POLICIES = REPO / "examples" / "policies"
#: Cilium's own policy examples: present beside the repository in CI, not in a bare clone
CILIUM_CORPUS = REPO.parent / "shared" / "corpus"


@pytest.fixture(scope="session")
def example_policies() -> Path:
    return EXAMPLE_POLICIES


@pytest.fixture(scope="session")
def cilium_corpus() -> Path:
    """Tests that read the corpus run where it is (CI) and are reported skipped elsewhere."""
    if not CILIUM_CORPUS.is_dir():
        pytest.skip("../shared/corpus not found: the Cilium corpus lives beside the "
                    "repository in CI")
    return CILIUM_CORPUS


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
