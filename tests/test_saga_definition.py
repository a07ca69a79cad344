import pytest

import sagakit as sk
from tests.helpers import Data, DidIt, Do, Undo


def base() -> sk.Saga[Data]:
    return sk.Saga("s", Data)


def test_valid_definition_has_named_groups() -> None:
    d = (
        base()
        .step("a")
        .invoke("p", lambda d: Do(d.key))
        .compensate("p", lambda d: Undo(d.key))
        .step("b", parallel=True)
        .invoke("q", lambda d: Do(d.key))
        .on_reply(DidIt, lambda d, r: d)
        .step("c")
        .invoke("r", lambda d: Do(d.key))
        .pivot()
        .step("d")
        .invoke("r", lambda d: Do(d.key))
        .retry()
        .build()
    )
    assert [[s.name for s in g] for g in d.groups] == [["a", "b"], ["c"], ["d"]]
    assert [s.kind for s in d.steps] == ["compensatable", "compensatable", "pivot", "retriable"]


@pytest.mark.parametrize(
    ("make", "rule"),
    [
        (lambda: base().step("a").invoke("p", Do).step("a").invoke("p", Do), "unique"),
        (lambda: base().step("a"), "exactly one"),
        (
            lambda: (
                base()
                .step("a")
                .invoke("p", Do)
                .pivot()
                .step("b")
                .invoke("p", Do)
                .compensate("p", Undo)
            ),
            "only retriable steps may follow the pivot",
        ),
        (
            lambda: base().step("a").invoke("p", Do).pivot().step("b").invoke("p", Do).pivot(),
            "more than one pivot",
        ),
        (
            lambda: base().step("a").invoke("p", Do).pivot().compensate("p", Undo),
            "pivot cannot have a compensation",
        ),
        (lambda: base().step("a", parallel=True).invoke("p", Do), "first step"),
        (
            lambda: (
                base().step("a").invoke("p", Do).step("b", parallel=True).invoke("p", Do).pivot()
            ),
            "parallel group",
        ),
        (
            lambda: base().step("a").invoke("p", Do).retry().compensate("p", Undo),
            "retriable step cannot have a compensation",
        ),
        (lambda: base().step("a").local(lambda d: d).compensate("p", Undo), "local step"),
        (lambda: sk.Saga("s", dict).step("a").invoke("p", Do), "data type"),
        (lambda: sk.Saga("s", Data, version=0).step("a").invoke("p", Do), "version"),
        (lambda: base(), "no steps"),
    ],
)
def test_invalid_definitions_name_step_and_rule(make, rule: str) -> None:
    with pytest.raises(sk.DefinitionError, match=rule):
        make().build()


def test_error_names_the_step() -> None:
    with pytest.raises(sk.DefinitionError, match="step 'ship'"):
        (
            base()
            .step("pay")
            .invoke("p", Do)
            .pivot()
            .step("ship")
            .invoke("p", Do)
            .compensate("p", Undo)
            .build()
        )


def test_duplicate_saga_registration_raises(tmp_path) -> None:
    app = sk.App(f"sqlite:///{tmp_path}/x.db")
    d = base().step("a").invoke("p", Do).build()
    app.saga(d)
    with pytest.raises(sk.DuplicateRegistration):
        app.saga(d)
    app.saga(sk.Saga("s", Data, version=2).step("a").invoke("p", Do).build())
