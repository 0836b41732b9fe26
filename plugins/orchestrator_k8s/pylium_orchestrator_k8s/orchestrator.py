"""The `kubernetes` orchestrator: follows the API server and feeds the agent.

- Namespaces and this node's Pods → the labels of the pods' endpoints (the endpoint manager
  asks `endpoint_labels` when the CNI plugin creates an endpoint; label changes later are
  applied with `set_labels`).
- NetworkPolicy, CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy → the policy
  repository; CNP/CCNP acceptance (or the parse error) is written into
  `status.nodes.<node>` as Cilium does. An invalid update keeps the previous version
  enforced (fail closed: a typo never turns into allow-all).
- Services + EndpointSlices → the load balancer (`services.py`), Nodes → the node
  registry (`nodes.py`), when the agent runs those components.
- When every watch has synced, `05-pylium.conflist` is written into the CNI config
  directory (option `cni_conf_dir`), so the kubelet only hands pods to a ready agent.

Options (`plugin_options.kubernetes`): `kubeconfig` (path; else in-cluster credentials),
`node_name` (default: the agent's node), `cni_conf_dir` ("" = do not write), `cni_socket`
(the agent socket written into the conflist), `cluster_name`, `sync_timeout` (seconds to
wait for the first lists before refusing to start), `watch_timeout`."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any

from pylium.api import Orchestrator
from pylium.errors import PluginError, UserError
from pylium.policy.errors import PolicyError
from pylium.policy.load import CCNP, CNP, KNP

from pylium_orchestrator_k8s.informer import Informer, object_key
from pylium_orchestrator_k8s.labels import endpoint_labels
from pylium_orchestrator_k8s.nodes import NodeSync
from pylium_orchestrator_k8s.policies import CRD_PLURALS, node_status, to_policies
from pylium_orchestrator_k8s.services import SERVICE_NAME_LABEL, ServiceSync, translate

log = logging.getLogger(__name__)

CONFLIST_NAME = "05-pylium.conflist"
DEFAULT_SOCKET = "/var/run/pylium/pylium.sock"
CILIUM_GROUP, CILIUM_VERSION = "cilium.io", "v2"
DISCOVERY_GROUP = "discovery.k8s.io"
#: EndpointSlice versions, newest first (1.21+ serve v1; 1.20 only v1beta1)
DISCOVERY_VERSIONS = ("v1", "v1beta1")


def conflist(socket: str) -> dict[str, Any]:
    """The CNI network configuration list the runtime reads (type `pylium-cni`)."""
    return {"cniVersion": "1.0.0", "name": "pylium",
            "plugins": [{"type": "pylium-cni", "socket": socket}]}


async def make_api_client(options: dict[str, Any]):
    """An ApiClient from `kubeconfig` or, inside a pod, the service account."""
    from kubernetes_asyncio import client, config

    cfg = client.Configuration()
    kubeconfig = options.get("kubeconfig")
    if kubeconfig:
        if not Path(kubeconfig).is_file():
            raise PluginError(f"kubernetes: kubeconfig {kubeconfig} does not exist")
        await config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)
    elif os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config(client_configuration=cfg)
    else:
        raise PluginError("kubernetes: set plugin_options.kubernetes.kubeconfig, or run the "
                          "agent in a pod (no KUBERNETES_SERVICE_HOST here)")
    return client.ApiClient(configuration=cfg)


class KubernetesOrchestrator(Orchestrator):
    name = "kubernetes"

    def __init__(self, context: Any, options: dict[str, Any] | None = None):
        super().__init__(context, options)
        node = getattr(context, "node", None)
        self.node_name = str(self.options.get("node_name") or getattr(node, "name", ""))
        self.cluster = str(self.options.get("cluster_name", "default"))
        self.cni_conf_dir = str(self.options.get("cni_conf_dir", ""))
        self.cni_socket = str(self.options.get("cni_socket", DEFAULT_SOCKET))
        self.sync_timeout = float(self.options.get("sync_timeout", 30))
        self.watch_timeout = int(self.options.get("watch_timeout", 240))
        self.api_client: Any = None
        self.informers: dict[str, Informer] = {}
        self._tasks: list[asyncio.Task] = []
        #: (kind, namespace, name) → (uid, generation) of what the repository holds
        self._imported: dict[tuple[str, str, str], tuple[str, int]] = {}
        self.policy_errors: dict[str, str] = {}
        self.label_updates = 0
        services = getattr(context, "services", None)
        self.services = (ServiceSync(services, getattr(context, "state_dir", None))
                         if services is not None else None)
        #: Service/EndpointSlice events wait for the first complete lists of both
        self._services_synced = False
        nodes = getattr(context, "nodes", None)
        self.nodes = NodeSync(nodes) if nodes is not None else None
        self.discovery_version = ""

    # lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        from kubernetes_asyncio import client

        self.api_client = await make_api_client(self.options)
        core = client.CoreV1Api(self.api_client)
        net = client.NetworkingV1Api(self.api_client)
        custom = client.CustomObjectsApi(self.api_client)

        def crd(plural: str):
            return lambda **kw: custom.list_cluster_custom_object(
                CILIUM_GROUP, CILIUM_VERSION, plural, **kw)

        def pods(**kw):
            return core.list_pod_for_all_namespaces(
                field_selector=f"spec.nodeName={self.node_name}", **kw)

        specs = [
            ("Namespace", "v1", core.list_namespace, self._on_namespace),
            ("Pod", "v1", pods, self._on_pod),
            (KNP, "networking.k8s.io/v1", net.list_network_policy_for_all_namespaces,
             self._policy_handler(KNP)),
            (CNP, "cilium.io/v2", crd(CRD_PLURALS[CNP]), self._policy_handler(CNP)),
            (CCNP, "cilium.io/v2", crd(CRD_PLURALS[CCNP]), self._policy_handler(CCNP)),
        ]
        if self.services is not None:
            self.discovery_version = await self._served_version(DISCOVERY_GROUP,
                                                                DISCOVERY_VERSIONS)

            def slices(**kw):
                return custom.list_cluster_custom_object(
                    DISCOVERY_GROUP, self.discovery_version, "endpointslices", **kw)

            specs += [
                ("Service", "v1", core.list_service_for_all_namespaces, self._on_service),
                ("EndpointSlice", f"{DISCOVERY_GROUP}/{self.discovery_version}", slices,
                 self._on_endpoint_slice),
            ]
        if self.nodes is not None:
            specs.append(("Node", "v1", core.list_node, self._on_node))
        for kind, api_version, lister, handler in specs:
            self.informers[kind] = Informer(kind, api_version, lister, handler,
                                            watch_timeout=self.watch_timeout,
                                            optional=kind in CRD_PLURALS)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(inf.run(), name=f"k8s-watch-{kind}")
                       for kind, inf in self.informers.items()]
        try:
            await asyncio.wait_for(
                asyncio.gather(*(inf.synced.wait() for inf in self.informers.values())),
                self.sync_timeout)
        except TimeoutError:
            waiting = {k: i.last_error or "no answer" for k, i in self.informers.items()
                       if not i.synced.is_set()}
            await self.stop()
            raise PluginError(
                f"kubernetes: no complete list from the API server within "
                f"{self.sync_timeout:g}s: " + "; ".join(f"{k}: {e}" for k, e in waiting.items())
            ) from None
        endpoints = self.context.endpoints
        if endpoints is not None and hasattr(endpoints, "label_resolver"):
            endpoints.label_resolver = self.endpoint_labels
        await self._sync_endpoints()
        if self.services is not None:
            # events from now on sync their Service after this (ServiceSync's lock)
            self._services_synced = True
            await self.services.resync(self._desired_services())
        if self.cni_conf_dir:
            self._write_conflist()
        log.info("kubernetes orchestrator synced (node %s)", self.node_name)

    async def stop(self) -> None:
        endpoints = getattr(self.context, "endpoints", None)
        if getattr(endpoints, "label_resolver", None) == self.endpoint_labels:
            endpoints.label_resolver = None
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self.api_client is not None:
            await self.api_client.close()
            self.api_client = None

    def status(self) -> dict[str, Any]:
        return {"node": self.node_name,
                "watches": {k: inf.status() for k, inf in self.informers.items()},
                "policies": len(self._imported),
                "policy_errors": dict(self.policy_errors),
                "label_updates": self.label_updates,
                "services": self.services.status() if self.services is not None else None,
                "endpoint_slices": self.discovery_version or None,
                "nodes": self.nodes.status() if self.nodes is not None else None}

    async def _served_version(self, group: str, versions: tuple[str, ...]) -> str:
        """The first of `versions` the API server serves for `group`."""
        from kubernetes_asyncio import client

        try:
            groups = await client.ApisApi(self.api_client).get_api_versions()
        except Exception as exc:
            raise PluginError(f"kubernetes: API groups not readable: {exc}") from None
        served = {v.version for g in groups.groups or [] if g.name == group
                  for v in g.versions or []}
        for version in versions:
            if version in served:
                return version
        raise PluginError(f"kubernetes: the API server serves no {group} version pylium "
                          f"reads ({', '.join(versions)}; it serves "
                          f"{', '.join(sorted(served)) or 'none'})")

    def _write_conflist(self) -> None:
        directory = Path(self.cni_conf_dir)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / CONFLIST_NAME
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(conflist(self.cni_socket), indent=2) + "\n")
        os.replace(tmp, path)
        log.info("wrote %s", path)

    # labels -------------------------------------------------------------------------------
    def _desired(self, namespace: str, name: str) -> dict[str, str] | None:
        pod = self.informers["Pod"].cache.get((namespace, name))
        if pod is None:
            return None
        ns = self.informers["Namespace"].cache.get(("", namespace))
        return endpoint_labels(pod, ns, self.cluster)

    async def endpoint_labels(self, namespace: str, name: str) -> dict[str, str]:
        """Labels for a new endpoint of pod namespace/name: from the watch cache, else
        straight from the API server (the CNI ADD can beat the pod's watch event)."""
        desired = self._desired(namespace, name)
        if desired is not None:
            return desired
        from kubernetes_asyncio import client

        core = client.CoreV1Api(self.api_client)
        try:
            pod = await core.read_namespaced_pod(name, namespace, _preload_content=False)
            pod_obj = json.loads(await pod.read()) if pod.status == 200 else None
            pod.release()
            ns = await core.read_namespace(namespace, _preload_content=False)
            ns_obj = json.loads(await ns.read()) if ns.status == 200 else None
            ns.release()
        except Exception as exc:
            log.warning("labels of pod %s/%s: %s", namespace, name, exc)
            return {}
        if pod_obj is None:
            return {}  # not a pod of this cluster (or already gone)
        return endpoint_labels(pod_obj, ns_obj, self.cluster)

    async def _sync_endpoints(self, namespace: str | None = None,
                              name: str | None = None) -> None:
        endpoints = self.context.endpoints
        if endpoints is None:
            return
        for ep in endpoints.list():
            if namespace is not None and ep.namespace != namespace:
                continue
            if name is not None and ep.name != name:
                continue
            desired = self._desired(ep.namespace, ep.name)
            if desired is None or dict(ep.labels) == desired:
                continue
            log.info("endpoint %s %s/%s: labels %s", ep.id, ep.namespace, ep.name, desired)
            await endpoints.set_labels(ep.id, desired)
            self.label_updates += 1

    async def _on_pod(self, event: str, obj: dict[str, Any]) -> None:
        if event != "DELETED":  # the CNI DEL frees the endpoint of a deleted pod
            await self._sync_endpoints(*object_key(obj))

    async def _on_namespace(self, event: str, obj: dict[str, Any]) -> None:
        if event != "DELETED":
            await self._sync_endpoints(namespace=object_key(obj)[1])

    # services and nodes -------------------------------------------------------------------
    def _slices_of(self, namespace: str, name: str) -> list[dict[str, Any]]:
        return [sl for (ns, _), sl in self.informers["EndpointSlice"].cache.items()
                if ns == namespace and ((sl.get("metadata") or {}).get("labels") or {})
                .get(SERVICE_NAME_LABEL) == name]

    def _desired_services(self) -> dict[str, dict[str, Any]]:
        desired: dict[str, dict[str, Any]] = {}
        for (namespace, name), svc in self.informers["Service"].cache.items():
            desired.update(translate(svc, self._slices_of(namespace, name)))
        return desired

    async def _sync_service(self, namespace: str, name: str) -> None:
        if not self._services_synced:
            return  # the resync after the first lists does them all at once
        svc = self.informers["Service"].cache.get((namespace, name))
        await self.services.sync(namespace, name, svc, self._slices_of(namespace, name))

    async def _on_service(self, event: str, obj: dict[str, Any]) -> None:
        await self._sync_service(*object_key(obj))

    async def _on_endpoint_slice(self, event: str, obj: dict[str, Any]) -> None:
        namespace, _ = object_key(obj)
        service = ((obj.get("metadata") or {}).get("labels") or {}).get(SERVICE_NAME_LABEL)
        if service:
            await self._sync_service(namespace, service)

    async def _on_node(self, event: str, obj: dict[str, Any]) -> None:
        self.nodes.on_node(event, obj)

    # policies -----------------------------------------------------------------------------
    def _policy_handler(self, kind: str):
        async def handle(event: str, obj: dict[str, Any]) -> None:
            await self._on_policy(kind, event, obj)
        return handle

    async def _on_policy(self, kind: str, event: str, obj: dict[str, Any]) -> None:
        namespace, name = object_key(obj)
        if kind == CCNP:
            namespace = ""
        pid = (kind, namespace, name)
        ref = f"{kind} {namespace + '/' if namespace else ''}{name}"
        repository = self.context.policy.repository
        if event == "DELETED":
            if self._imported.pop(pid, None) is not None:
                try:
                    repository.delete(name, namespace, kind)
                    log.info("%s deleted", ref)
                except UserError:  # already removed through the agent API
                    pass
            self.policy_errors.pop(ref, None)
            return
        meta = obj.get("metadata") or {}
        version = (str(meta.get("uid") or ""), int(meta.get("generation") or 0))
        if self._imported.get(pid) == version and ref not in self.policy_errors:
            return  # a status-only update (ours, or another node's)
        try:
            policies = to_policies(kind, obj)
        except PolicyError as exc:
            error = "; ".join(exc.errors)
            self.policy_errors[ref] = error
            kept = " (the previous version stays enforced)" if pid in self._imported else ""
            log.error("%s rejected%s: %s", ref, kept, error)
            await self._write_status(kind, namespace, name, ok=False, error=error)
            return
        self.policy_errors.pop(ref, None)
        revision = repository.add(policies)
        self._imported[pid] = version
        warnings = tuple(str(w) for p in policies for w in p.warnings)
        log.info("%s imported at revision %d", ref, revision)
        await self._write_status(kind, namespace, name, ok=True, revision=revision,
                                 warnings=warnings)

    async def _write_status(self, kind: str, namespace: str, name: str, **status: Any) -> None:
        if kind not in CRD_PLURALS or self.api_client is None:
            return  # NetworkPolicy has no per-node status
        from kubernetes_asyncio import client

        custom = client.CustomObjectsApi(self.api_client)
        body = node_status(self.node_name, **status)
        try:
            if namespace:
                await custom.patch_namespaced_custom_object_status(
                    CILIUM_GROUP, CILIUM_VERSION, namespace, CRD_PLURALS[kind], name, body,
                    _content_type="application/merge-patch+json")
            else:
                await custom.patch_cluster_custom_object_status(
                    CILIUM_GROUP, CILIUM_VERSION, CRD_PLURALS[kind], name, body,
                    _content_type="application/merge-patch+json")
        except Exception as exc:  # the policy is enforced either way
            log.warning("%s %s: status not written: %s", kind, name, exc)
