"""sagakit: durable sagas, process managers and 2PC for Python services.

The names here are the ones an application needs. Everything else is in its
module: the whole error tree in :mod:`sagakit.errors`, backends in
:mod:`sagakit.store` and :mod:`sagakit.transport`, the saga machinery in
:mod:`sagakit.saga`, process managers in :mod:`sagakit.process`, test helpers
in :mod:`sagakit.testing`.
"""

from .app import App, Settings
from .choreography import Choreography, ChoreographyDefinition, ChoreographyStalled, FlowView
from .clock import Clock, FakeClock, SystemClock
from .console import ActionRequest, Operations, SagaQuery, Tokens
from .errors import (
    AtomicAborted,
    BusinessError,
    Cancelled,
    ConfigurationError,
    ConsoleError,
    DefinitionError,
    DuplicateRegistration,
    FlowNotFound,
    Forbidden,
    ForeignNamespace,
    InvalidOperatorAction,
    LockTimingWarning,
    MalformedMessage,
    MessageError,
    MissingCorrelation,
    OversizeMessage,
    PendingElsewhere,
    ReservationExpired,
    ResourceUnavailable,
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
from .locks import Pending, Reservations
from .messages import Done, Envelope, Failure, command, event, new_id, reply
from .observe.telemetry import Telemetry, TelemetryOptions
from .ops import Actor
from .participant import Context, Participant
from .policies import RetryPolicy
from .process import Decision, ProcessManager, StatelessSaga, decide, evolve, react
from .saga import Saga, SagaDefinition, Sagas, SagaState, SagaView
from .store import Store, open_store
from .transport import Transport, open_transport
from .twophase import AtomicTx, TwoPhaseOptions

__version__ = "0.2.0"

__all__ = [
    "ActionRequest",
    "Actor",
    "App",
    "AtomicAborted",
    "AtomicTx",
    "BusinessError",
    "Cancelled",
    "Choreography",
    "ChoreographyDefinition",
    "ChoreographyStalled",
    "Clock",
    "ConfigurationError",
    "ConsoleError",
    "Context",
    "Decision",
    "DefinitionError",
    "Done",
    "DuplicateRegistration",
    "Envelope",
    "Failure",
    "FakeClock",
    "FlowNotFound",
    "FlowView",
    "Forbidden",
    "ForeignNamespace",
    "InvalidOperatorAction",
    "LockTimingWarning",
    "MalformedMessage",
    "MessageError",
    "MissingCorrelation",
    "Operations",
    "OversizeMessage",
    "Participant",
    "Pending",
    "PendingElsewhere",
    "ProcessManager",
    "ReservationExpired",
    "Reservations",
    "ResourceUnavailable",
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
    "StatelessSaga",
    "Store",
    "StoreError",
    "SystemClock",
    "Telemetry",
    "TelemetryOptions",
    "Tokens",
    "Transport",
    "TransportError",
    "TwoPhaseOptions",
    "Unauthenticated",
    "UnknownAction",
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
