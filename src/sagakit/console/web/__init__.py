"""The web console: a Starlette app over one store (extra ``sagakit[console]``).

``create_app(store, ConsoleOptions(...))`` returns the ASGI app; ``sagakit
console`` serves it with uvicorn on 127.0.0.1:8080 by default.
"""

from __future__ import annotations

from .app import create_app
from .options import ConsoleOptions

__all__ = ["ConsoleOptions", "create_app"]
