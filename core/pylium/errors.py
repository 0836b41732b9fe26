"""Error types. `UserError` and its subclasses are mistakes a user can fix: the CLI and API
print their message as one line (no traceback) and exit/answer with a meaningful code."""


class PyliumError(Exception):
    """Base of every error pylium raises on purpose."""


class UserError(PyliumError):
    """Bad input from a user: a malformed policy, flag, config file or API request."""

    exit_code = 1


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
