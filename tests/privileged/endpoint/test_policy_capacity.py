"""Seeing a policy-map overflow coming, on a real agent whose endpoint policy maps hold 6
entries (`bpf_policy_map_max: 6`): `pylium policy import --dry-run` shows each endpoint's
need against the capacity and refuses, naming the endpoint; a real import of the same file
is refused whole; the endpoint keeps enforcing the policy it had."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pylium.errors import UserError

from .eplab import api, import_policy, make_lab


def _ports_policy(name: str, ports: range) -> str:
    listed = ", ".join(f'{{port: "{p}", protocol: TCP}}' for p in ports)
    return (f"apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: {name}}}\n"
            f"spec:\n  endpointSelector: {{matchLabels: {{app: web}}}}\n  ingress:\n"
            f"  - fromEndpoints: [{{matchLabels: {{app: client}}}}]\n"
            f"    toPorts: [{{ports: [{listed}]}}]\n")


@pytest.fixture
def small_maps_lab():
    lab = make_lab(bpf_policy_map_max=6)
    try:
        yield lab
    finally:
        lab.down()


def test_dry_run_shows_the_overflow_and_import_refuses_it(small_maps_lab, tmp_path):
    lab = small_maps_lab
    web = lab.add_pod("web", {"app": "web"})
    lab.add_pod("client", {"app": "client"})
    import_policy(lab, _ports_policy("web", range(80, 83)))  # 3 entries + meta: fits
    web_id = next(e["id"] for e in api(lab).get("/v1/endpoint") if e["name"] == "web")
    before = api(lab).get(f"/v1/bpf/policy/{web_id}")
    assert len(before["entries"]) == 3

    big = tmp_path / "web.yaml"
    big.write_text(_ports_policy("web", range(80, 90)))  # 10 entries + meta > 6
    cli = [str(Path(sys.executable).with_name("pylium")), "-H", lab.node()["socket"]]
    proc = subprocess.run([*cli, "policy", "import", "--dry-run", str(big), "-o", "json"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    answer = json.loads(proc.stdout)
    rows = {e["name"]: (e["entries"], e["capacity"], e["fits"]) for e in answer["endpoints"]}
    assert rows["default/web"] == (11, 6, False)
    assert rows["default/client"][2] is True
    refusal = ("refused: the policy map of 1 endpoint(s) would overflow its 6 entries: "
               f"default/web (endpoint {web_id}: 11 entries); nothing was imported")
    assert answer["refused"] == refusal
    assert proc.stderr.strip().splitlines()[-1] == f"Error: {refusal}"
    table = subprocess.run([*cli, "policy", "import", "--dry-run", str(big)],
                           capture_output=True, text=True, timeout=60)
    assert "ENTRIES" in table.stdout and "NO" in table.stdout

    with pytest.raises(UserError) as err:
        api(lab).post("/v1/policy", {"text": big.read_text(), "name": "web"})
    assert str(err.value) == refusal
    # nothing changed: same policy in the store and in the endpoint's map
    assert [p["name"] for p in api(lab).get("/v1/policy")["policies"]] == ["web"]
    assert api(lab).get(f"/v1/bpf/policy/{web_id}") == before
    assert web["ip"]
