"""Labels as Cilium writes them: `source:key=value`.

Sources: `k8s` (pod and namespace labels), `reserved` (identities the agent defines),
`cidr` (CIDR identities), `any` (only in selectors: matches every source), `unspec`.
A selector key written without a source means `any`."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping

import attrs

from pylium.errors import UserError

SOURCE_K8S = "k8s"
SOURCE_RESERVED = "reserved"
SOURCE_CIDR = "cidr"
SOURCE_ANY = "any"
SOURCE_UNSPEC = "unspec"

#: the namespace label every Kubernetes pod endpoint carries
POD_NAMESPACE_LABEL = "io.kubernetes.pod.namespace"
#: prefix of the namespace's own labels copied onto pod endpoints
NAMESPACE_LABELS_PREFIX = "io.cilium.k8s.namespace.labels."


@attrs.frozen(order=True)
class Label:
    source: str
    key: str
    value: str = ""

    def __str__(self) -> str:
        text = f"{self.source}:{self.key}"
        return f"{text}={self.value}" if self.value else text


@functools.lru_cache(maxsize=65536)
def split_source(text: str, default: str) -> tuple[str, str]:
    """`"k8s:app"` → (`"k8s"`, `"app"`); `"app"` → (default, `"app"`)."""
    source, sep, rest = text.partition(":")
    if sep and source and "/" not in source and "=" not in source:
        return source, rest
    return default, text


def parse_label(text: str, default_source: str = SOURCE_K8S) -> Label:
    """Parse `[source:]key[=value]`."""
    text = text.strip()
    source, rest = split_source(text, default_source)
    key, _, value = rest.partition("=")
    if not key:
        raise UserError(f"label {text!r} has no key")
    return Label(source, key, value)


class LabelSet(frozenset):
    """An immutable set of `Label`s; the identity of an endpoint is one of these."""

    def __new__(cls, labels: Iterable[Label] = ()):
        return super().__new__(cls, labels)

    @classmethod
    def parse(cls, text: str | Iterable[str], default_source: str = SOURCE_K8S) -> LabelSet:
        """From `"org=empire,class=tiefighter"` or a list of label strings."""
        items = text.split(",") if isinstance(text, str) else list(text)
        return cls(parse_label(item, default_source) for item in items if item.strip())

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, str], source: str = SOURCE_K8S) -> LabelSet:
        return cls(Label(*split_source(k, source), str(v)) for k, v in mapping.items())

    def sorted_strings(self) -> list[str]:
        return [str(label) for label in sorted(self)]

    def key_string(self) -> str:
        """Canonical text form, used as the KV-store key of this label set."""
        return ";".join(self.sorted_strings())

    def _index(self) -> dict[str, list[Label]]:
        index = self.__dict__.get("_by_key")
        if index is None:
            index = {}
            for lb in self:
                index.setdefault(lb.key, []).append(lb)
            self.__dict__["_by_key"] = index
        return index

    def values_for(self, source: str, key: str) -> list[str]:
        """Values of labels named `key` from `source` (`any` = every source)."""
        return [lb.value for lb in self._index().get(key, ())
                if source == SOURCE_ANY or lb.source == source]

    def has(self, source: str, key: str) -> bool:
        return bool(self.values_for(source, key))

    def __repr__(self) -> str:
        return f"LabelSet({self.sorted_strings()!r})"
