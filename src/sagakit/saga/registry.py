"""Saga definitions registered with an App, by stable (name, version)."""

from __future__ import annotations

from typing import Any, TypeVar

from ..errors import DuplicateRegistration, SagaVersionUnknown
from .definition import SagaDefinition
from .machine import SagaMachine

D = TypeVar("D")


class SagaRegistry:
    """Every registered definition, and the machine that runs each."""

    def __init__(self) -> None:
        self.definitions: dict[tuple[str, int], SagaDefinition[Any]] = {}
        self._machines: dict[tuple[str, int], SagaMachine] = {}

    def register(self, defn: SagaDefinition[Any]) -> None:
        """Register ``defn``; the same name and version twice raises."""
        if defn.key in self.definitions:
            raise DuplicateRegistration(
                f"saga {defn.name!r} version {defn.version} registered twice"
            )
        self.definitions[defn.key] = defn
        self._machines[defn.key] = SagaMachine(defn)

    def registered(self, defn: SagaDefinition[D]) -> SagaDefinition[D]:
        """The definition registered under ``defn``'s name and version."""
        found = self.definitions.get(defn.key)
        if found is None:
            raise SagaVersionUnknown(f"saga {defn.name!r} v{defn.version} is not registered")
        return found

    def machine(self, name: str, version: int, saga_id: str | None = None) -> SagaMachine:
        """The machine for instances of ``name`` v``version``."""
        machine = self._machines.get((name, version))
        if machine is None:
            raise SagaVersionUnknown(
                f"saga {name!r} version {version} is not registered here", saga_id=saga_id
            )
        return machine
