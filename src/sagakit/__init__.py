"""sagakit: durable sagas, process managers and 2PC for Python services."""

from .app import App, Settings
from .clock import Clock, FakeClock, SystemClock
from .coordinator import Coordinator, SagaView
from .errors import (
    BusinessError,
    ConcurrencyConflict,
    ConfigurationError,
    DefinitionError,
    DuplicateRegistration,
    HandlerFailed,
    InvalidOperatorAction,
    MalformedMessage,
    MessageError,
    NoHandler,
    OversizeMessage,
    RoutingError,
    SagaError,
    SagakitError,
    SagaNotFound,
    SagaVersionUnknown,
    SchemaMismatch,
    StoreError,
    TransportError,
    UnknownMessageType,
    UnknownSaga,
)
from .messages import Done, Envelope, Failure, Headers, command, event, new_id, reply
from .participant import Cancelled, Context, Participant
from .policies import RetryPolicy
from .saga import Saga, SagaDefinition
from .store import Store, open_store
from .transport import Transport, open_transport

__version__ = "0.1.0"

__all__ = [
    "App",
    "BusinessError",
    "Cancelled",
    "Clock",
    "ConcurrencyConflict",
    "ConfigurationError",
    "Context",
    "Coordinator",
    "DefinitionError",
    "Done",
    "DuplicateRegistration",
    "Envelope",
    "Failure",
    "FakeClock",
    "HandlerFailed",
    "Headers",
    "InvalidOperatorAction",
    "MalformedMessage",
    "MessageError",
    "NoHandler",
    "OversizeMessage",
    "Participant",
    "RetryPolicy",
    "RoutingError",
    "Saga",
    "SagaDefinition",
    "SagaError",
    "SagaNotFound",
    "SagaVersionUnknown",
    "SagaView",
    "SagakitError",
    "SchemaMismatch",
    "Settings",
    "Store",
    "StoreError",
    "SystemClock",
    "Transport",
    "TransportError",
    "UnknownMessageType",
    "UnknownSaga",
    "__version__",
    "command",
    "event",
    "new_id",
    "open_store",
    "open_transport",
    "reply",
]
