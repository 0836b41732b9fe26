"""Policy documents in, `Policy` models out: reading text and files, one or many YAML
documents or JSON, and telling the kinds apart.

Accepted: YAML (one or many documents) or JSON; `cilium.io/v2` CiliumNetworkPolicy /
CiliumClusterwideNetworkPolicy with `spec` and/or `specs`; `networking.k8s.io/v1`
NetworkPolicy; bare JSON lists of rules (what `cilium policy import` takes). Each rule is
structured and validated by `parse.structure` (errors name their path:
`spec.ingress[0].toPorts[0].ports[0].port: "99999" is not a port`), then translated for its
namespace (`namespace.translate_namespace`, `k8s.translate`). What is accepted but not
enforced yet comes back in `Policy.warnings` (`parse.warnings_in`), never silently."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pylium.documents import DocumentError, LimitExceeded, decode_text, load_json, load_yaml_all
from pylium.policy import k8s
from pylium.policy.errors import PolicyError, PolicyWarning
from pylium.policy.namespace import translate_namespace
from pylium.policy.parse import structure, warnings_in
from pylium.policy.rule import Policy, Rule

CILIUM_API = "cilium.io/v2"
K8S_API = "networking.k8s.io/v1"
CNP, CCNP, KNP = "CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy", "NetworkPolicy"
POLICY_KINDS = {CNP: CILIUM_API, CCNP: CILIUM_API, KNP: K8S_API}

_TOP_KEYS = {"apiversion": "apiVersion", "kind": "kind", "metadata": "metadata",
             "spec": "spec", "specs": "specs", "description": "description",
             "status": "status"}
_META_KEYS = {"name", "namespace", "labels", "annotations", "uid", "resourceVersion",
              "generation", "creationTimestamp", "managedFields", "finalizers",
              "ownerReferences", "generateName", "description"}


def _document(doc: Any, prefix: str, default_name: str) -> list[Policy]:
    if isinstance(doc, list):
        rules = structure(doc, tuple[Rule, ...], prefix)
        name = default_name or "rules"
        return [Policy("RuleList", name, "", rules, source=doc,
                       warnings=tuple(warnings_in(rules, prefix)))]
    if not isinstance(doc, dict):
        raise PolicyError([f"{prefix or '(top)'}: expected a policy document or a list of "
                           "rules"])
    p = f"{prefix}." if prefix else ""
    top: dict[str, Any] = {}
    for key, value in doc.items():
        name = _TOP_KEYS.get(str(key).lower())
        if name is None:
            raise PolicyError([f"{p}{key}: unknown field"])
        top[name] = value
    kind = top.get("kind")
    if kind is None:
        raise PolicyError([f"{p}kind: required field missing"])
    if kind not in POLICY_KINDS:
        raise PolicyError([f"{p}kind: {kind!r} is not a policy kind (expected "
                           f"{', '.join(POLICY_KINDS)})"])
    api = top.get("apiVersion")
    if api != POLICY_KINDS[kind]:
        raise PolicyError([f"{p}apiVersion: {api!r} is not valid for {kind} (expected "
                           f"{POLICY_KINDS[kind]!r})"])
    meta = top.get("metadata") or {}
    if not isinstance(meta, dict):
        raise PolicyError([f"{p}metadata: expected a mapping"])
    for key in meta:
        if key not in _META_KEYS:
            raise PolicyError([f"{p}metadata.{key}: unknown field"])
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise PolicyError([f"{p}metadata.name: required field missing"])
    description = str(top.get("description") or meta.get("description") or "")
    if kind == KNP:
        if "specs" in top:
            raise PolicyError([f"{p}specs: unknown field for NetworkPolicy"])
        namespace = str(meta.get("namespace") or "default")
        spec = structure(top.get("spec"), k8s.NetworkPolicySpec, f"{p}spec")
        return [Policy(kind, name, namespace, (k8s.translate(spec, namespace),),
                       description, source=doc, warnings=tuple(warnings_in(spec, f"{p}spec")))]
    namespace = "" if kind == CCNP else str(meta.get("namespace") or "default")
    if kind == CCNP and meta.get("namespace"):
        raise PolicyError([f"{p}metadata.namespace: a cluster-wide policy has no namespace"])
    rules: list[Rule] = []
    errors: list[str] = []
    found: list[PolicyWarning] = []
    if "spec" not in top and "specs" not in top:
        raise PolicyError([f"{p}spec: required field missing (spec or specs)"])
    for field in ("spec", "specs"):
        if field not in top:
            continue
        try:
            got = structure(top[field], Rule if field == "spec" else tuple[Rule, ...],
                            f"{p}{field}")
        except PolicyError as exc:
            errors += exc.errors
            continue
        found += warnings_in(got, f"{p}{field}")
        rules += [got] if field == "spec" else got
    if errors:
        raise PolicyError(errors)
    rules = [translate_namespace(r, namespace) for r in rules]
    return [Policy(kind, name, namespace, tuple(rules), description, source=doc,
                   warnings=tuple(found))]


def _template_error(text: str) -> str | None:
    for number, line in enumerate(text.splitlines(), 1):
        if "{{" in line and not line.lstrip().startswith("#"):
            return (f"line {number}: unrendered Go template placeholder "
                    f"{line.strip()!r}; render the template before loading it")
    return None


def load_text(text: str | bytes, name: str = "") -> list[Policy]:
    """Parse YAML or JSON text (or bytes: UTF-8, or UTF-16/32 with a BOM) holding one or
    more policy documents or a rule list. Size, nesting and alias expansion are bounded
    (`pylium.documents`): hostile input is refused with one line, never a traceback."""
    try:
        if isinstance(text, bytes):
            text = decode_text(text, "(top)")
        template = _template_error(text)
        if template:
            raise PolicyError([template])
        docs: list[Any] | None = None
        if text.lstrip().startswith(("[", "{")):
            try:
                docs = [load_json(text, "(top)")]
            except LimitExceeded:
                raise
            except DocumentError:
                pass  # maybe YAML flow style
        if docs is None:
            docs = load_yaml_all(text, "(top)")
    except DocumentError as exc:
        raise PolicyError([str(exc).removeprefix("(top): ")]) from None
    if not docs:
        raise PolicyError(["(top): no policy documents found"])
    policies: list[Policy] = []
    errors: list[str] = []
    for index, doc in enumerate(docs):
        prefix = f"documents[{index}]" if len(docs) > 1 else ""
        try:
            policies += _document(doc, prefix, name)
        except PolicyError as exc:
            errors += exc.errors
    if errors:
        raise PolicyError(errors)
    return policies


def load_file(path: str | Path) -> list[Policy]:
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise PolicyError([f"{path}: cannot read: {exc.strerror}"]) from None
    try:
        return load_text(text, path.stem)
    except PolicyError as exc:
        raise PolicyError([f"{path}: {e}" for e in exc.errors]) from None


def load_files(paths: Iterable[str | Path]) -> list[Policy]:
    """Load every file; raise one PolicyError listing the problems of all of them."""
    policies: list[Policy] = []
    errors: list[str] = []
    for path in paths:
        try:
            policies += load_file(path)
        except PolicyError as exc:
            errors += exc.errors
    if errors:
        raise PolicyError(errors)
    return policies


def from_source(kind: str, name: str, source: Any) -> list[Policy]:
    """Re-parse a stored document (the policy store persists `Policy.source`)."""
    return _document(source, "", name if kind == "RuleList" else "")
