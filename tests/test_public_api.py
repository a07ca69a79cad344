import sagakit


def test_public_surface_is_pinned() -> None:
    assert sorted(sagakit.__all__) == sorted(
        [
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
            "FakeClock",
            "Failure",
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
