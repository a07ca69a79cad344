import sagakit


def test_public_surface_is_pinned() -> None:
    assert sorted(sagakit.__all__) == sorted(
        [
            "Telemetry",
            "TelemetryOptions",
            "Actor",
            "UnknownAction",
            "Unauthenticated",
            "Tokens",
            "SagaQuery",
            "Operations",
            "Forbidden",
            "ForeignNamespace",
            "ConsoleError",
            "ActionRequest",
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
            "Decision",
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
            "ProcessManager",
            "ReservationExpired",
            "Reservations",
            "ResourceUnavailable",
            "RetryPolicy",
            "Saga",
            "SagaDefinition",
            "SagaNotFound",
            "SagaState",
            "SagaView",
            "Sagas",
            "SagakitError",
            "SchemaMismatch",
            "Settings",
            "StatelessSaga",
            "Store",
            "StoreError",
            "SystemClock",
            "Transport",
            "TransportError",
            "TwoPhaseOptions",
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
    )
    for name in sagakit.__all__:
        assert hasattr(sagakit, name), name


def test_no_pickle_or_eval_in_the_package() -> None:
    import pathlib

    src = pathlib.Path(sagakit.__file__).parent
    for path in src.rglob("*.py"):
        text = path.read_text()
        for banned in ("import pickle", "pickle.loads", "eval(", "exec("):
            assert banned not in text, f"{banned} in {path}"


def test_every_exception_is_in_the_error_tree() -> None:
    """No module defines an exception of its own; errors.py draws the whole tree."""
    import inspect
    import pathlib
    import re

    from sagakit import errors

    src = pathlib.Path(sagakit.__file__).parent
    for path in src.rglob("*.py"):
        if path.name == "errors.py" or "examples" in path.parts:  # the demo app has its own
            continue
        for m in re.finditer(
            r"^class (\w+)\((\w*(?:Error|Exception)\w*)\)", path.read_text(), re.M
        ):
            assert m.group(1).startswith("_"), f"{m.group(1)} in {path} belongs in errors.py"
    tree = inspect.getdoc(errors) or ""
    for name, cls in vars(errors).items():
        if inspect.isclass(cls) and issubclass(cls, errors.SagakitError):
            assert name in tree, f"{name} is missing from the tree in errors.py's docstring"


def test_waiting_too_long_is_a_sagakit_error_and_a_timeout() -> None:
    assert issubclass(sagakit.WaitTimeout, sagakit.SagakitError)
    assert issubclass(sagakit.WaitTimeout, TimeoutError)
