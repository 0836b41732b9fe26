"""Problems found in policy input, shared by the parser, the validator and the loader.

`PolicyError` refuses input (one `path: message` per problem); `FieldError` is raised by a
check deep in the model and gets its full path when the parser unwinds. `PolicyWarning` is
input that is accepted but not (fully) enforced: it travels with the `Policy` so the API and
the CLI can say so at import instead of leaving the user to find out from dropped traffic."""

from __future__ import annotations

import attrs

from pylium.errors import UserError, one_line


class PolicyError(UserError):
    """One or more problems in policy input; `errors` holds one `path: message` each."""

    def __init__(self, errors: list[str]):
        self.errors = [one_line(str(e)) for e in errors]
        super().__init__("; ".join(self.errors))


class FieldError(ValueError):
    """A validation failure below the current object: `sub` is the relative path."""

    def __init__(self, sub: str, message: str):
        self.sub = sub
        super().__init__(message)


def join_path(path: str, sub: str) -> str:
    """`spec.ingress[0]` + `toPorts` → `spec.ingress[0].toPorts`; `[2]` appends as is."""
    if not sub:
        return path
    if sub.startswith("[") or not path:
        return f"{path}{sub}"
    return f"{path}.{sub}"


@attrs.frozen
class PolicyWarning:
    """Accepted input that pylium does not enforce as Cilium would: `path: message`."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path or '(top)'}: {self.message}"

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "message": self.message}
