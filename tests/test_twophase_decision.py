"""The pure part of two-phase commit: global ids and what recovery does with a branch."""

from __future__ import annotations

import pytest

from sagakit.errors import ConfigurationError
from sagakit.twophase.decision import Gid, decide, forgettable, gid, parse, plan


def test_global_ids_round_trip_and_refuse_strangers() -> None:
    text = gid("a1", "0193abc", "customers")
    assert text == "sk_a1_0193abc_customers" and len(text) < 200
    assert parse(text) == Gid("a1", "0193abc", "customers")
    assert parse("sk_a1_0193abc_pending_enrollments") == Gid("a1", "0193abc", "pending_enrollments")
    for foreign in ("citus_1_2_3_4", "sk_A1_x_y", "sk_a1_x_", "sk_a1_x_y'; DROP", "x" * 300):
        assert parse(foreign) is None
    for bad in (("a_1", "g", "r"), ("a1", "g-1", "r"), ("a1", "g", "Customers")):
        with pytest.raises(ConfigurationError):
            gid(*bad)


def g(group: str, resource: str = "customers", node: str = "n1") -> str:
    return gid(node, group, resource)


def test_the_verdicts() -> None:
    b = Gid("n1", "g1", "customers")
    assert decide(b, 99.0, recorded=True, active=True, safe_age=5).verdict == "skip"
    assert decide(b, 0.0, recorded=True, active=False, safe_age=5).verdict == "commit"
    assert decide(b, 1.0, recorded=False, active=False, safe_age=5).verdict == "wait"
    assert decide(b, 6.0, recorded=False, active=False, safe_age=5).verdict == "rollback"


def test_a_branch_must_be_in_both_scans_and_of_this_node() -> None:
    again = {g("old"): 60.0, g("new"): 60.0, g("other", node="n2"): 60.0, "stranger": 60.0}
    plans = plan([g("old"), g("gone")], [], [], again, node="n1", safe_age=5)
    assert [(str(p.gid), p.verdict) for p in plans] == [(g("old"), "rollback")]


def test_a_group_that_records_between_the_scans_is_never_rolled_back() -> None:
    """Active was read before the records: a group that was active then is skipped even
    if its record is missing from the later snapshot."""
    plans = plan([g("busy")], ["busy"], [], {g("busy"): 60.0}, node="n1", safe_age=0)
    assert [p.verdict for p in plans] == ["skip"]


def test_records_are_forgotten_only_when_every_branch_is_seen_gone() -> None:
    recorded = {"done": ["customers", "enrollments"], "half": ["customers", "enrollments"],
                "busy": ["customers"], "unseen": ["customers", "ledger"]}  # fmt: skip
    left = [Gid("n1", "half", "enrollments")]
    out = forgettable(recorded, left, ["busy"], ["customers", "enrollments"])
    assert out == ["done"]
