"""JSON patches on saga data (pure), and the diff the history keeps."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sagakit import InvalidOperatorAction
from sagakit.saga.patch import apply_patch, diff

DOC = {"order": {"items": [{"sku": "a", "qty": 1}], "total": 10}, "note": None}


def test_add_replace_remove_test_and_the_diff() -> None:
    patch = [
        {"op": "test", "path": "/order/total", "value": 10},
        {"op": "replace", "path": "/order/total", "value": 12},
        {"op": "add", "path": "/order/items/-", "value": {"sku": "b", "qty": 2}},
        {"op": "remove", "path": "/note"},
        {"op": "add", "path": "/order/items/0/qty", "value": 3},
    ]
    after = apply_patch(DOC, patch)
    assert after == {
        "order": {"items": [{"sku": "a", "qty": 3}, {"sku": "b", "qty": 2}], "total": 12}
    }
    assert DOC["order"]["total"] == 10  # the input is left alone
    assert diff(DOC, after, patch)[0] == {"path": "/order/total", "before": 10, "after": 12}


@pytest.mark.parametrize(
    "patch",
    [
        [],
        [{"op": "move", "path": "/a", "from": "/b"}],
        [{"op": "replace", "path": "/nope", "value": 1}],
        [{"op": "replace", "path": "order", "value": 1}],
        [{"op": "add", "path": "/order/items/5", "value": 1}],
        [{"op": "test", "path": "/order/total", "value": 11}],
        [{"op": "replace", "path": "/order/total"}],
        [{"op": "remove", "path": ""}],
        ["not an op"],
    ],
)
def test_a_bad_patch_is_refused(patch: list) -> None:  # type: ignore[type-arg]
    with pytest.raises(InvalidOperatorAction):
        apply_patch(DOC, patch)


@given(
    st.dictionaries(
        st.text(min_size=1, max_size=5).filter(lambda k: "/" not in k and "~" not in k),
        st.integers(),
    ),
    st.integers(),
)
def test_replacing_every_member_then_testing_it_holds(doc: dict, value: int) -> None:  # type: ignore[type-arg]
    patch = [{"op": "replace", "path": f"/{k}", "value": value} for k in doc]
    if not patch:
        return
    after = apply_patch(doc, patch)
    apply_patch(after, [{"op": "test", "path": f"/{k}", "value": value} for k in doc])
    assert set(after) == set(doc)
