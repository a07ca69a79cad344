"""sagakit: durable sagas, process managers and 2PC for Python services.

The names here are the ones an application needs. Everything else is in its
module: the whole error tree in :mod:`sagakit.errors`, backends in
:mod:`sagakit.store` and :mod:`sagakit.transport`, the saga machinery in
:mod:`sagakit.saga`, test helpers in :mod:`sagakit.testing`.
"""

from .app import App, Settings
from .clock import Clock, FakeClock, SystemClock
from .console import ActionRequest, Operations, SagaQuery, Tokens
from .errors import (
    BusinessError,
    Cancelled,
    ConfigurationError,
    ConsoleError,
    DefinitionError,
    DuplicateRegistration,
    Forbidden,
    InvalidOperatorAction,
    MalformedMessage,
    MessageError,
    OversizeMessage,
    SagakitError,
    SagaNotFound,
    SchemaMismatch,
    StoreError,
    TransportError,
    Unauthenticated,
    UnknownAction,
    UnknownMessageType,
    WaitTimeout,
)
from .messages import Done, Envelope, Failure, command, event, new_id, reply
from .ops import Actor
from .participant import Context, Participant
from .policies import RetryPolicy
from .saga import Saga, SagaDefinition, Sagas, SagaState, SagaView
from .store import Store, open_store
from .transport import Transport, open_transport

__version__ = "0.2.0"

__all__ = [
    "ActionRequest",
    "Actor",
    "App",
    "BusinessError",
    "Cancelled",
    "Clock",
    "ConfigurationError",
    "ConsoleError",
    "Context",
    "DefinitionError",
    "Done",
    "DuplicateRegistration",
    "Envelope",
    "Failure",
    "FakeClock",
    "Forbidden",
    "InvalidOperatorAction",
    "MalformedMessage",
    "MessageError",
    "Operations",
    "OversizeMessage",
    "Participant",
    "RetryPolicy",
    "Saga",
    "SagaDefinition",
    "SagaNotFound",
    "SagaQuery",
    "SagaState",
    "SagaView",
    "SagakitError",
    "Sagas",
    "SchemaMismatch",
    "Settings",
    "Store",
    "StoreError",
    "SystemClock",
    "Tokens",
    "Transport",
    "TransportError",
    "Unauthenticated",
    "UnknownAction",
    "UnknownMessageType",
    "WaitTimeout",
    "__version__",
    "command",
    "event",
    "new_id",
    "open_store",
    "open_transport",
    "reply",
]
