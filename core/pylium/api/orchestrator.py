"""Orchestrator contract: where endpoints, labels and policies come from (standalone API,
Kubernetes, ...)."""

from __future__ import annotations

import abc
from typing import Any


class Orchestrator(abc.ABC):
    name: str = ""

    def __init__(self, context: Any, options: dict[str, Any] | None = None):
        self.context = context
        self.options = dict(options if options is not None else getattr(context, "options", {}))

    @classmethod
    def from_context(cls, context: Any) -> Orchestrator:
        """How the core builds the backend from a `pylium.api.context.OrchestratorContext`."""
        return cls(context, dict(context.options))

    @abc.abstractmethod
    async def start(self) -> None:
        """Begin feeding endpoints and policies into the agent (through `context`)."""

    @abc.abstractmethod
    async def stop(self) -> None: ...

    def status(self) -> dict[str, Any]:
        return {}
