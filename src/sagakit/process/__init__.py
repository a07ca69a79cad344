"""Process managers and stateless sagas.

- :mod:`.decision`: what a handler returns (:func:`decide`, :func:`evolve`, :func:`react`)
- :mod:`.definition`: :class:`ProcessManager`, :class:`StatelessSaga`, policies for
  messages with no instance (:class:`Hold`, :class:`Ignore`)
- :mod:`.machine`: the pure machine — instance + input -> outcome, timers by token
- :mod:`.runtime`: the thin shell in the hop's transaction; :mod:`.records`: its tables
- :mod:`.processes`: ``app.processes`` (send, get, wait, history, tree)
- :mod:`.check`: definition checks (:func:`~.check.problems`); :mod:`.diagram`: the drawing

Hook for trackers: every decision is one row of ``process_log`` with the
message's ``correlation_id``, and every message a process manager or a
stateless saga sends carries that correlation id, so a tracker that projects
by correlation id (``sagakit.choreography``) sees these flows too.
"""

from .decision import Decision, decide, evolve, react
from .definition import (
    Hold,
    Ignore,
    ProcessManager,
    Replied,
    SagaEnded,
    StatelessSaga,
    TimerFired,
)
from .processes import Processes, ProcessView
from .records import HistoryEntry

__all__ = [
    "Decision",
    "HistoryEntry",
    "Hold",
    "Ignore",
    "ProcessManager",
    "ProcessView",
    "Processes",
    "Replied",
    "SagaEnded",
    "StatelessSaga",
    "TimerFired",
    "decide",
    "evolve",
    "react",
]
