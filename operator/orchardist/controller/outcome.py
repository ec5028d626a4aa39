"""What one reconcile asks the adapter to do: the Plan, and the Events to post on the deployment."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class Plan:
    create: tuple[dict[str, Any], ...] = ()
    delete: tuple[tuple[str, str], ...] = ()  # (replica name, why)
    service: dict[str, Any] | None = None  # desired Service when it must be created or changed
    slices: tuple[dict[str, Any], ...] = ()  # desired EndpointSlices that must be created or changed
    delete_slices: tuple[str, ...] = ()
    status: dict[str, Any] | None = None  # the whole new status when it changed
    events: tuple[Event, ...] = ()
    mark: tuple[tuple[str, bool], ...] = ()  # (replica, True: set / False: clear the lost annotation)

    @property
    def empty(self) -> bool:
        """Nothing to write (Events alone are not writes to our objects)."""
        return not (
            self.create
            or self.delete
            or self.service
            or self.slices
            or self.delete_slices
            or self.status
            or self.mark
        )
