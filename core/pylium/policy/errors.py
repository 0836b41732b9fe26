"""Problems found in policy input, shared by the parser, the validator and the loader.

`PolicyError` refuses input (one `path: message` per problem); `FieldError` is raised by a
check deep in the model and gets its full path when the parser unwinds."""

from __future__ import annotations

from pylium.errors import UserError


class PolicyError(UserError):
    """One or more problems in policy input; `errors` holds one `path: message` each."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
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
