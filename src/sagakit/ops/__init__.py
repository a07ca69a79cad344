"""Operating sagakit: who acts (:class:`Actor`), and later retention, dead letters, audit."""

from .actor import Actor

__all__ = ["Actor"]
