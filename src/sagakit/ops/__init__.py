"""Operating sagakit: who acts (:class:`Actor`), retention (:class:`Retention`).

The background jobs (:mod:`.retention`'s pruner, :mod:`.stuck`'s watcher) are
imported by the App directly; only the small option types live here, so that
the saga machinery can import :class:`Actor` without pulling them in.
"""

from .actor import Actor
from .retention import Retention

__all__ = ["Actor", "Retention"]
