"""What the lab and the agent client may import: the lab is not a CLI and not a test (it runs
its own etcd, not the tests' helper), and the agent client stays stdlib-only so the CLI starts
fast. Checked in a fresh interpreter, where `sys.modules` shows everything an import pulled in."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def _modules_after(import_line: str) -> list[str]:
    code = f"import json, sys; {import_line}; print(json.dumps(sorted(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    return json.loads(proc.stdout)


def test_the_lab_imports_neither_the_cli_nor_test_helpers():
    loaded = _modules_after("import pylium.lab.lab")
    assert "pylium.lab.lab" in loaded
    slips = [m for m in loaded if m.startswith(("pylium.cli", "pylium.kvstore.testing",
                                                "tests", "pylium_"))]
    assert slips == []


def test_the_agent_client_is_stdlib_only():
    loaded = _modules_after("import pylium.agent.client")
    assert "pylium.agent.client" in loaded
    heavy = [m for m in loaded if m.split(".")[0] in ("aiohttp", "pyroute2", "yaml", "click")
             or m in ("pylium.agent.daemon", "pylium.agent.server")]
    assert heavy == []


@pytest.mark.parametrize("name", ["", "toolongname", "a_b", "a b"])
def test_a_bad_lab_name_is_one_clear_error(name):
    from pylium.errors import UserError
    from pylium.lab.lab import Lab

    with pytest.raises(UserError, match="1-8 letters, digits or '-'"):
        Lab(name)
