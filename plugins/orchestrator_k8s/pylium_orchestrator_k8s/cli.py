"""`pylium k8s ...`: deploy manifests, the agent image, and the DaemonSet's health probe."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from pylium.errors import UserError


@click.group("k8s")
def k8s() -> None:
    """Kubernetes: deploy manifests, the agent image, health probe, CNI install."""


@k8s.command("manifest")
@click.option("--plugins", "plugins", default="",
              help="Comma-separated plugins for the agent (e.g. vxlan,etcd,http).")
@click.option("--image", default=None, help="Agent image (default registry.local/pylium:0.1.0).")
@click.option("--pod-cidr", default="10.200.0.0/24", show_default=True)
@click.option("--api-server", default="",
              help="HOST:PORT of the API server for the agent (no kube-proxy before pylium).")
@click.option("--kvstore-endpoints", default="", help="Comma-separated KV store endpoints.")
@click.option("--pull-policy", type=click.Choice(["Always", "IfNotPresent", "Never"]),
              default="IfNotPresent", show_default=True)
@click.option("--no-crds", is_flag=True, help="Leave the CiliumNetworkPolicy CRDs out.")
@click.option("--host-run-dir", default="/var/run/pylium", show_default=True,
              help="Node directory of the agent socket (pylium-cni connects there).")
@click.option("--host-state-dir", default="/var/lib/pylium", show_default=True)
@click.option("--cni-conf-dir", default="/etc/cni/net.d", show_default=True,
              help="Node directory the runtime reads CNI configs from.")
@click.option("--bpffs-root", default="/sys/fs/bpf/pylium", show_default=True)
@click.option("--cni-bin-dir", default="/opt/cni/bin", show_default=True,
              help="Node directory the runtime runs CNI plugins from (pylium-cni goes there).")
def manifest_cmd(plugins: str, image: str | None, pod_cidr: str, api_server: str,
                 kvstore_endpoints: str, pull_policy: str, no_crds: bool, host_run_dir: str,
                 host_state_dir: str, cni_conf_dir: str, bpffs_root: str,
                 cni_bin_dir: str) -> None:
    """Print CRDs, RBAC, ConfigMap and the agent DaemonSet as one YAML stream."""
    import ipaddress

    from pylium_orchestrator_k8s import manifest

    try:
        ipaddress.IPv4Network(pod_cidr)
    except ValueError as exc:
        raise UserError(f"--pod-cidr: {exc}") from None
    selected = manifest.parse_plugins(plugins)
    if "etcd" in selected and not kvstore_endpoints:
        raise UserError("--plugins etcd needs --kvstore-endpoints")
    docs = manifest.manifests(selected, image=image or manifest.DEFAULT_IMAGE,
                              pod_cidr=pod_cidr, api_server=api_server,
                              pull_policy=pull_policy, kvstore_endpoints=kvstore_endpoints,
                              with_crds=not no_crds,
                              paths=manifest.HostPaths(host_run_dir, host_state_dir,
                                                       cni_conf_dir, bpffs_root, cni_bin_dir))
    click.echo(manifest.dump(docs), nl=False)


@k8s.command("install-cni")
@click.option("--bin-dir", type=click.Path(path_type=Path), default=Path("/opt/cni/bin"),
              show_default=True, help="The node's CNI bin directory (as mounted here).")
@click.option("--python", "python", default="/usr/bin/python3", show_default=True,
              help="The node's Python 3, which runs the launcher.")
def install_cni_cmd(bin_dir: Path, python: str) -> None:
    """Install `pylium-cni` into the node's CNI bin directory (the DaemonSet's init
    container runs this): the static native transport the image carries, else the bundle
    run by the node's Python."""
    from pylium.cni import launcher, native

    if not bin_dir.is_dir():
        raise UserError(f"install-cni: CNI bin directory {bin_dir} does not exist")
    use_native = native.prebuilt() is not None
    try:
        path = launcher.install(bin_dir, python, bundle=True, native=use_native)
    except (OSError, ValueError, native.BuildError) as exc:
        raise UserError(f"install-cni: {exc}") from None
    click.echo(f"installed {path} ({path.stat().st_size} bytes, "
               + ("native)" if use_native else f"run by {python})"))


@k8s.command("health")
@click.pass_context
def health_cmd(ctx: click.Context) -> None:
    """Exit 0 when the agent reports healthy and its orchestrator runs (readiness probe)."""
    from pylium.agent.client import AgentClient, AgentUnreachable

    socket = (ctx.find_root().obj or {}).get("socket") or "/var/run/pylium/pylium.sock"
    try:
        status = AgentClient(socket, timeout=4).get("/v1/status")
    except (AgentUnreachable, UserError) as exc:
        click.echo(f"not ready: {exc}", err=True)
        sys.exit(1)
    orchestrator = [c.get("state") for c in status.get("capabilities") or []
                    if isinstance(c, dict) and c.get("kind") == "orchestrator"
                    and c.get("selected")]
    if not status.get("healthy") or (orchestrator and orchestrator[0] != "running"):
        click.echo(f"not ready: healthy={status.get('healthy')} orchestrator={orchestrator}",
                   err=True)
        sys.exit(1)
    click.echo("ok")


@k8s.command("image")
@click.option("--plugins", "plugins", default="", help="Comma-separated plugins to install.")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="docker-archive to write (import with `ctr -n k8s.io images import`).")
@click.option("--name", default=None, help="Image name:tag (default registry.local/pylium:0.1.0).")
def image_cmd(plugins: str, out: Path, name: str | None) -> None:
    """Build the agent image (core + orchestrator + chosen plugins) as a docker-archive."""
    from pylium_orchestrator_k8s import image, manifest

    selected = manifest.parse_plugins(plugins)
    click.echo(image.build(manifest.distributions(selected), out,
                           name or manifest.DEFAULT_IMAGE))
