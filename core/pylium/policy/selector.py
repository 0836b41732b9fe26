"""Label selectors (`matchLabels` + `matchExpressions`), as Cilium's `api.EndpointSelector`.

Selector keys are `[source:]key`; no source means `any`, which matches a label of that key
from every source. Selectors are hashable so the selector cache can key on them."""

from __future__ import annotations

import attrs

from pylium.identity.labels import SOURCE_ANY, LabelSet, split_source


@attrs.frozen(cache_hash=True)
class Requirement:
    key: str
    operator: str
    values: tuple[str, ...] = ()

    def matches(self, labels: LabelSet) -> bool:
        source, key = split_source(self.key, SOURCE_ANY)
        present = labels.values_for(source, key)
        if self.operator == "Exists":
            return bool(present)
        if self.operator == "DoesNotExist":
            return not present
        hit = any(v in self.values for v in present)
        return hit if self.operator == "In" else not hit


@attrs.frozen(cache_hash=True)  # selectors key the selector cache: hashed very often
class EndpointSelector:
    #: sorted (key, value) pairs; the YAML `matchLabels` mapping
    match_labels: tuple[tuple[str, str], ...] = ()
    match_expressions: tuple[Requirement, ...] = ()

    def matches(self, labels: LabelSet) -> bool:
        for raw_key, value in self.match_labels:
            source, key = split_source(raw_key, SOURCE_ANY)
            if value not in labels.values_for(source, key):
                return False
        return all(req.matches(labels) for req in self.match_expressions)

    @property
    def is_wildcard(self) -> bool:
        """Matches every label set (`{}`)."""
        return not self.match_labels and not self.match_expressions

    def keys(self) -> list[tuple[str, str]]:
        """(source, key) of every key the selector names."""
        names = [k for k, _ in self.match_labels] + [r.key for r in self.match_expressions]
        return [split_source(k, SOURCE_ANY) for k in names]

    def has_key(self, source: str, key: str) -> bool:
        return (source, key) in self.keys()

    def has_source(self, source: str) -> bool:
        return any(s == source for s, _ in self.keys())

    def has_key_prefix(self, source: str, prefix: str) -> bool:
        return any(s == source and k.startswith(prefix) for s, k in self.keys())

    def with_label(self, key: str, value: str) -> EndpointSelector:
        """This selector with `key: value` added to matchLabels (replacing that key)."""
        labels = dict(self.match_labels)
        labels[key] = value
        return attrs.evolve(self, match_labels=tuple(sorted(labels.items())))

    def with_requirements(self, reqs: tuple[Requirement, ...]) -> EndpointSelector:
        return attrs.evolve(self, match_expressions=self.match_expressions + reqs)

    def as_requirements(self) -> tuple[Requirement, ...]:
        """matchLabels as `In` requirements plus matchExpressions (for fromRequires)."""
        return tuple(Requirement(k, "In", (v,)) for k, v in self.match_labels) + \
            self.match_expressions

    def to_dict(self) -> dict:
        out: dict = {}
        if self.match_labels:
            out["matchLabels"] = dict(self.match_labels)
        if self.match_expressions:
            out["matchExpressions"] = [
                {"key": r.key, "operator": r.operator, **({"values": list(r.values)}
                                                          if r.values else {})}
                for r in self.match_expressions]
        return out

    def __str__(self) -> str:
        parts = [f"{k}={v}" for k, v in self.match_labels]
        parts += [f"{r.key} {r.operator} ({','.join(r.values)})" if r.values
                  else f"{r.key} {r.operator}" for r in self.match_expressions]
        return "{" + ", ".join(parts) + "}"


WILDCARD = EndpointSelector()
