"""sagakit: durable sagas, process managers and 2PC for Python services.

The names here are the ones an application needs. Everything else is in its
module: the whole error tree in :mod:`sagakit.errors`, backends in
:mod:`sagakit.store` and :mod:`sagakit.transport`, the saga machinery in
:mod:`sagakit.saga`, process managers in :mod:`sagakit.process`, test helpers
in :mod:`sagakit.testing`.
"""

from .app import App, Settings
from .clock import Clock, FakeClock, SystemClock
from .errors import (
    BusinessError,
    Cancelled,
    ConfigurationError,
    DefinitionError,
    DuplicateRegistration,
    InvalidOperatorAction,
    MalformedMessage,
    MessageError,
    OversizeMessage,
    SagakitError,
    SagaNotFound,
    SchemaMismatch,
    StoreError,
    TransportError,
    UnknownMessageType,
    WaitTimeout,
)
from .messages import Done, Envelope, Failure, command, event, new_id, reply
from .ops import Actor
from .participant import Context, Participant
from .policies import RetryPolicy
from .process import Decision, ProcessManager, StatelessSaga, decide, evolve, react
from .saga import Saga, SagaDefinition, Sagas, SagaState, SagaView
from .store import Store, open_store
from .transport import Transport, open_transport

__version__ = "0.2.0"

__all__ = [
    "Actor",
    "App",
    "BusinessError",
    "Cancelled",
    "Clock",
    "ConfigurationError",
    "Context",
    "Decision",
    "DefinitionError",
    "Done",
    "DuplicateRegistration",
    "Envelope",
    "Failure",
    "FakeClock",
    "InvalidOperatorAction",
    "MalformedMessage",
    "MessageError",
    "OversizeMessage",
    "Participant",
    "ProcessManager",
    "RetryPolicy",
    "Saga",
    "SagaDefinition",
    "SagaNotFound",
    "SagaState",
    "SagaView",
    "SagakitError",
    "Sagas",
    "SchemaMismatch",
    "Settings",
    "StatelessSaga",
    "Store",
    "StoreError",
    "SystemClock",
    "Transport",
    "TransportError",
    "UnknownMessageType",
    "WaitTimeout",
    "__version__",
    "command",
    "decide",
    "event",
    "evolve",
    "new_id",
    "open_store",
    "open_transport",
    "react",
    "reply",
]
