"""Hook implementations of the `kubernetes` orchestrator plugin."""

from pylium.api import OrchestratorRecord
from pylium.hookspecs import hookimpl

from pylium_orchestrator_k8s.orchestrator import KubernetesOrchestrator


@hookimpl
def pylium_orchestrators():
    return [OrchestratorRecord(
        name="kubernetes", backend=KubernetesOrchestrator,
        description="Pods, namespaces, NetworkPolicy and Cilium(Clusterwide)NetworkPolicy "
                    "from the Kubernetes API server")]


@hookimpl
def pylium_cli_commands():
    from pylium_orchestrator_k8s.cli import k8s

    return [k8s]
