"""Error types. `UserError` and its subclasses are mistakes a user can fix: the CLI and API
print their message as one line (no traceback) and exit/answer with a meaningful code."""


class PyliumError(Exception):
    """Base of every error pylium raises on purpose."""


_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)} | {
    0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t"}


def one_line(text: str) -> str:
    """`text` with control characters escaped: a message that quotes hostile input (a field
    name with a newline, an escape sequence) stays one line and cannot drive a terminal."""
    return text.translate(_CONTROL)


class UserError(PyliumError):
    """Bad input from a user: a malformed policy, flag, config file or API request. The
    message is kept to one line (`one_line`), whatever input it quotes."""

    exit_code = 1

    def __init__(self, message: object = "", *args: object):
        super().__init__(one_line(str(message)), *args)


class Conflict(UserError):
    """The request clashes with something being made or torn down (HTTP 409): the caller
    may try again later."""


class ConfigError(UserError):
    """The agent configuration (file, env or flags) is invalid."""

    exit_code = 2


class PluginError(PyliumError):
    """A plugin is missing, conflicting, or broken in a way that stops start-up."""

    exit_code = 3


class NotImplementedYet(PyliumError):
    """A plugin is registered but its backend has not been built yet."""

    def __init__(self, what: str, issue: str = ""):
        suffix = f" (tracked in {issue})" if issue else ""
        super().__init__(f"{what} is not implemented yet{suffix}")


class AgentUnreachable(PyliumError):
    """The CLI could not talk to the agent over its unix socket."""

    exit_code = 4
