"""The sagakit error tree.

Every error sagakit raises derives from :class:`SagakitError`. Driver and broker
errors are translated into this tree at one boundary (the store drivers and the
transports), so callers never see ``sqlite3`` or ``asyncpg`` exceptions.

::

    SagakitError                      .saga_id .step .attempt .retryable
    ├── ConfigurationError            bad URL, bad identifier, missing extra
    │   ├── DuplicateRegistration     a durable name registered twice
    │   └── DefinitionError           an invalid saga definition (names step and rule)
    │   └── NotStarted                the App (or its coordinator) is not running
    ├── MessageError                  bad input; never retryable, dead-lettered
    │   ├── MalformedMessage          not JSON, or not a valid envelope
    │   ├── OversizeMessage           larger than the payload limit (checked before decoding)
    │   ├── UnknownMessageType        no registered type under that name
    │   ├── SchemaMismatch            payload does not match the registered schema
    │   ├── BadSignature              unsigned or badly signed where signatures are required
    │   └── DeliveryLimitExceeded     delivered more often than Settings.max_deliveries
    ├── RoutingError                  a well-formed message nobody can take
    │   ├── NoHandler                 no handler for this type at this endpoint
    │   ├── UnknownSaga               a reply for a saga id the store does not know
    │   └── NoProcessInstance         held past its policy with no process-manager instance
    ├── BusinessError                 raised by a handler: becomes a failure reply
    │   ├── Cancelled                 the command came after its compensation; no effect
    │   ├── ResourceUnavailable       a reservation wants units the pool does not have
    │   ├── ReservationExpired        a confirm came after its reservation expired or was released
    │   └── PendingElsewhere          another saga holds the semantic lock on an aggregate
    ├── Refusal                       (internal) carries a BusinessError out of the handler
    ├── HandlerFailed                 a technical failure that exhausted its retries
    │   └── HandlerTimeout            a handler ran past Settings.handler_timeout (retryable)
    ├── StoreError                    database trouble (retryable)
    │   ├── StoreUnavailable          an outage: unreachable, refusing connections, shutting down
    │   ├── ConcurrencyConflict       optimistic version check lost (retryable)
    │   └── OutcomeExists             (internal) an inbox key already holds an outcome
    ├── TransportError                broker trouble (retryable)
    │   ├── LeaseLost                 another consumer took the message over (retryable)
    │   └── ForeignNamespace          removal refused: not the transport's own namespace
    ├── LockTimingWarning             a saga may confirm after its locks expire (a warning)
    ├── CommandFailed                 a `sagakit` command could not do its work (exit 1)
    ├── TwoPhaseError                 two-phase commit (sagakit.twophase)
    │   ├── AtomicAborted             rolled back: refused prepare, lost database, id collision
    │   ├── BranchNotFound            no in-doubt branch with that global id (operator resolve)
    │   └── AmbiguousOutcome          a commit found no branch and no record to vouch for it
    ├── ConsoleError                  the operator console (or its action model) refused
    │   ├── Unauthenticated           no token, or an unknown or revoked one (HTTP 401)
    │   ├── Forbidden                 the role may not, the console is read-only, CSRF failed (403)
    │   └── UnknownAction             an action nothing handles (yet)
    ├── DeadLetterError               dead-letter API misuse
    │   ├── DeadLetterNotFound        no dead letter with that number
    │   └── NotReplayable             a truncated or undecodable dead letter cannot be replayed
    ├── SagaError                     saga API misuse
    │   ├── SagaNotFound
    │   ├── SagaVersionUnknown        instance of a definition version not registered
    │   ├── InvalidOperatorAction     the action does not fit the instance's state
    │   ├── SagaIdInUse               start() with an id that names another definition's instance
    │   └── WaitTimeout               wait() ran out of time (also a TimeoutError)
    ├── ChoreographyError             choreography API misuse
    │   ├── MissingCorrelation        an event would leave without a correlation id
    │   ├── UndeclaredEvent           a handler published an event missing from its publishes=
    │   └── FlowNotFound              no tracked flow with that correlation id
    └── ProcessError                  a process manager's handler broke its declaration
        └── IllegalTransition         a handler moved to a state its registration does not allow
"""

from __future__ import annotations

from typing import Any


class SagakitError(Exception):
    """Base of every sagakit error; carries the saga context when known."""

    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        saga_id: str | None = None,
        step: str | None = None,
        attempt: int | None = None,
        retryable: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.saga_id = saga_id
        self.step = step
        self.attempt = attempt
        if retryable is not None:
            self.retryable = retryable

    def context(self) -> dict[str, Any]:
        """The saga context as a dict, for logs and dead-letter records."""
        return {"saga_id": self.saga_id, "step": self.step, "attempt": self.attempt}


class ConfigurationError(SagakitError):
    """Wrong configuration: a bad URL, identifier or a missing optional extra."""


class DuplicateRegistration(ConfigurationError):
    """A durable name (message type, saga, participant) was registered twice."""


class DefinitionError(ConfigurationError):
    """A saga definition breaks a rule; the message names the step and the rule."""


class NotStarted(ConfigurationError):
    """An operation that needs a running App was called before ``start()``."""


class MessageError(SagakitError):
    """A message that can never be processed; it is dead-lettered with the reason."""


class MalformedMessage(MessageError):
    """Bytes that are not JSON or not a valid envelope."""


class OversizeMessage(MessageError):
    """A message over the payload limit; refused before decoding."""


class UnknownMessageType(MessageError):
    """No message type is registered under the envelope's type name."""


class SchemaMismatch(MessageError):
    """The payload does not match the registered schema of its type."""


class BadSignature(MessageError):
    """A message without a valid signature in a deployment that signs its messages."""


class DeliveryLimitExceeded(MessageError):
    """A message was delivered more often than allowed; dead-lettered, never retried.

    The usual cause is a handler that crashes its process or outlives every
    lease; the dead letter keeps the message for an operator.
    """


class RoutingError(SagakitError):
    """A well-formed message that no handler here can take."""


class NoHandler(RoutingError):
    """No handler for this message type at this endpoint."""


class UnknownSaga(RoutingError):
    """A reply or timer for a saga id that the store does not know."""


class NoProcessInstance(RoutingError):
    """A message for a process-manager instance that never appeared.

    Its per-message policy held it for a while (``Hold``); it is dead-lettered
    with the process manager's name and the key it looked for.
    """


class BusinessError(SagakitError):
    """Raise from a handler to refuse a command for a business reason.

    The local transaction's business changes are rolled back and a failure
    reply carrying :attr:`code` and the message goes back to the saga.
    """

    code: str = ""

    def __init__(self, message: str = "", *, code: str | None = None, **kw: Any) -> None:
        super().__init__(message or type(self).__name__, **kw)
        self.code = code or type(self).code or type(self).__name__


class Refusal(SagakitError):
    """Internal control flow of the hop, never raised to users.

    A handler refused its command with :attr:`error` (a :class:`BusinessError`):
    its transaction is rolled back and the failure recorded in a fresh one.
    """

    def __init__(self, error: BusinessError, after: Any = None) -> None:
        super().__init__(str(error), saga_id=error.saga_id, step=error.step)
        self.error = error
        #: run on the fresh transaction's scope once the failure is recorded
        #: (an event handler publishing its declared failure event)
        self.after = after


class HandlerFailed(SagakitError):
    """A handler kept failing for technical reasons until its retry policy gave up."""


class Cancelled(BusinessError):
    """The command arrived after its compensation; it had no effect."""

    code = "sagakit.Cancelled"


class ResourceUnavailable(BusinessError):
    """A reservation asked for units (or a whole item) that are not free; the saga compensates."""

    code = "sagakit.ResourceUnavailable"


class ReservationExpired(BusinessError):
    """A confirm found its reservation expired, released or missing; nothing was confirmed.

    Raised from the confirming step (best: the pivot), the saga compensates
    and the order, booking... is refused instead of being half done.
    """

    code = "sagakit.ReservationExpired"


class PendingElsewhere(BusinessError):
    """Another saga is in the middle of changing this aggregate (a semantic lock)."""

    code = "sagakit.PendingElsewhere"


class LockTimingWarning(SagakitError, UserWarning):
    """A saga definition may reach its confirm steps only after its locks have expired.

    Issued by ``Saga.build()`` with the numbers (the deadline and the
    shortest lock time-to-live); the saga still works, but some instances
    will find their reservations gone and compensate.
    """


class HandlerTimeout(HandlerFailed):
    """A handler ran longer than its timeout and was cancelled; it is retried."""

    retryable = True


class StoreError(SagakitError):
    """The database failed; the operation may succeed if retried."""

    retryable = True


class StoreUnavailable(StoreError):
    """The database can't be reached or refuses connections: an outage, not a bad message.

    The hop waits it out (``Settings.outage_patience``) instead of counting it
    against a message's retries; see :func:`is_outage`.
    """


class ConcurrencyConflict(StoreError):
    """Another process changed the saga instance first."""


class OutcomeExists(StoreError):
    """(Internal) an outcome stored without admission found the inbox key taken.

    The endpoint then admits the message the usual way and answers it as a
    duplicate would be; it never reaches a handler or a user.
    """

    retryable = False


class TransportError(SagakitError):
    """The message broker failed; the operation may succeed if retried."""

    retryable = True


class LeaseLost(TransportError):
    """Another consumer took this delivery over; roll back and let it finish."""


class ForeignNamespace(TransportError):
    """A transport refused to remove broker objects outside its own namespace.

    Raised by :meth:`~sagakit.transport.Transport.remove_namespace` when asked
    for another namespace than the transport's, or when an object it would
    delete is shared with, or belongs to, something else. Nothing was removed.
    """

    retryable = False


class CommandFailed(SagakitError):
    """A ``sagakit`` command could not do its work (exit status 1); the message says why."""


class TwoPhaseError(SagakitError):
    """Two-phase commit trouble (:mod:`sagakit.twophase`)."""


class AtomicAborted(TwoPhaseError):
    """An atomic group was rolled back on every database; nothing of it took effect.

    ``reason`` says why (a branch refused to prepare, a database went away
    before the commit decision, a global id was already in use), ``group_id``
    names the group and ``resource`` the branch that caused it, when known.
    Retryable when the cause was an outage.
    """

    def __init__(
        self, reason: str, *, group_id: str, resource: str | None = None, retryable: bool = False
    ) -> None:
        where = f" at {resource!r}" if resource else ""
        super().__init__(f"atomic group {group_id} aborted{where}: {reason}", retryable=retryable)
        self.reason, self.group_id, self.resource = reason, group_id, resource


class BranchNotFound(TwoPhaseError):
    """No prepared branch with that global id on that resource (resolved already?)."""


class AmbiguousOutcome(TwoPhaseError):
    """A commit of a prepared branch found nothing, and no decision record vouches for it.

    The branch may have been committed or rolled back by someone else; an
    operator must check the data.
    """


class DeadLetterError(SagakitError):
    """Misuse of the dead-letter API (:mod:`sagakit.ops.dead_letters`)."""


class DeadLetterNotFound(DeadLetterError):
    """No dead letter with that number (purged or replayed already)."""


class NotReplayable(DeadLetterError):
    """A dead letter that cannot be put back: its bytes are not the whole message.

    An oversize message keeps only a prefix, and bytes that are not an
    envelope would only be dead-lettered again; the message says which.
    """


class SagaError(SagakitError):
    """Misuse of the saga API."""


class SagaNotFound(SagaError):
    """No saga instance with that id."""


class SagaVersionUnknown(SagaError):
    """The instance's definition name and version are not registered here."""


class InvalidOperatorAction(SagaError):
    """An operator action that does not fit the instance's current state."""


class SagaIdInUse(SagaError):
    """``start()`` was given a saga id that already names an instance of another definition.

    Starting again with the same id *and* definition is idempotent and returns
    the id; reusing it for something else is a mistake worth hearing about.
    """


class WaitTimeout(SagaError, TimeoutError):
    """``wait()`` gave up before the saga reached a final state.

    It is also a :class:`TimeoutError`, so ``except TimeoutError`` keeps working.
    """


class ProcessError(SagakitError):
    """A process manager's handler returned a decision its registration forbids."""


class IllegalTransition(ProcessError):
    """A handler moved its instance to a state not in its ``to=``; a bug, not retried."""

    retryable = False


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` says a store or broker is unavailable (rather than the message bad).

    An outage is waited out; it never uses up a message's retries or sends it
    to the dead letters.
    """
    if isinstance(exc, StoreUnavailable):
        return True
    return isinstance(exc, TransportError) and exc.retryable and not isinstance(exc, LeaseLost)


class ChoreographyError(SagakitError):
    """Misuse of the choreography API (publishing, tracking, queries)."""


class MissingCorrelation(ChoreographyError):
    """An event would leave without a correlation id.

    Every event belongs to a business transaction; a handler that really
    begins a new one says so with ``ctx.publish(event, new_conversation=True)``.
    """


class UndeclaredEvent(ChoreographyError):
    """A handler published an event type missing from its ``publishes=`` list.

    The declaration is what ``sagakit check`` reads, so it must not lie.
    """


class FlowNotFound(ChoreographyError):
    """No tracked choreography instance has that correlation id."""


class ConsoleError(SagakitError):
    """The operator console, its API or its action model refused a request."""

    status = 400


class Unauthenticated(ConsoleError):
    """No credentials, or a token that is unknown or revoked."""

    status = 401


class Forbidden(ConsoleError):
    """Known, but not allowed: a role that may not, a read-only console, a failed CSRF check."""

    status = 403


class UnknownAction(ConsoleError):
    """An operator action nothing handles (yet): see ``sagakit.console.actions``."""

    status = 404
