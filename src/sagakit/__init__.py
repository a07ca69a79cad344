"""sagakit: durable sagas, process managers and 2PC for Python services.

The names here are the ones an application needs. Everything else is in its
module: the whole error tree in :mod:`sagakit.errors`, backends in
:mod:`sagakit.store` and :mod:`sagakit.transport`, the saga machinery in
:mod:`sagakit.saga`, test helpers in :mod:`sagakit.testing`.
"""

from .app import App, Settings
from .choreography import Choreography, ChoreographyDefinition, ChoreographyStalled, FlowView
from .clock import Clock, FakeClock, SystemClock
from .errors import (
    AtomicAborted,
    BusinessError,
    Cancelled,
    ConfigurationError,
    DefinitionError,
    DuplicateRegistration,
    FlowNotFound,
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
    UnknownMessageType,
    WaitTimeout,
)
from .locks import Pending, Reservations
from .messages import Done, Envelope, Failure, command, event, new_id, reply
from .observe.telemetry import Telemetry, TelemetryOptions
from .ops import Actor
from .participant import Context, Participant
from .policies import RetryPolicy
from .saga import Saga, SagaDefinition, Sagas, SagaState, SagaView
from .store import Store, open_store
from .transport import Transport, open_transport
from .twophase import AtomicTx, TwoPhaseOptions

__version__ = "0.2.0"

__all__ = [
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
    "Context",
    "DefinitionError",
    "Done",
    "DuplicateRegistration",
    "Envelope",
    "Failure",
    "FakeClock",
    "FlowNotFound",
    "FlowView",
    "InvalidOperatorAction",
    "LockTimingWarning",
    "MalformedMessage",
    "MessageError",
    "MissingCorrelation",
    "OversizeMessage",
    "Participant",
    "Pending",
    "PendingElsewhere",
    "ReservationExpired",
    "Reservations",
    "ResourceUnavailable",
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
    "Store",
    "StoreError",
    "SystemClock",
    "Telemetry",
    "TelemetryOptions",
    "Transport",
    "TransportError",
    "TwoPhaseOptions",
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
