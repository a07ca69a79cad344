"""Choreographed sagas: a declared contract, a tracker, and a lint.

- :mod:`.contract`: ``Choreography(...)...build()``, validated at build time
- :mod:`.tracker`: the pure projection — flow state + event -> state + effects
- :mod:`.shell`: the tracker's hop (inbox, lock, decide, persist) and timers
- :mod:`.rows`: its tables; :mod:`.queries`: ``app.flows``
- :mod:`.check`: ``sagakit check`` for choreographies; :mod:`.diagram`: the drawing

Participants publish and react to events with ``@p.event(..., publishes=...)``
and ``ctx.publish``; the tracker only watches, it never sends a command.
"""

from __future__ import annotations

from .contract import Choreography, ChoreographyDefinition
from .queries import Flows, FlowView
from .shell import TRACKER
from .tracker import ChoreographyStalled

__all__ = [
    "TRACKER",
    "Choreography",
    "ChoreographyDefinition",
    "ChoreographyStalled",
    "FlowView",
    "Flows",
]
