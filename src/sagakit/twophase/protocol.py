"""One atomic group, presumed abort: prepare every branch, record, commit, forget.

::

    async with app.atomic("customers", "enrollments") as tx:
        await tx["customers"].execute("UPDATE customers SET status = 'VERIFIED' WHERE id = ?", c)
        await tx["enrollments"].execute("DELETE FROM pending WHERE customer = ?", c)

Leaving the block runs the protocol:

1. ``PREPARE`` each branch under ``sk_<node>_<group>_<resource>``;
2. write the commit record in the coordinator's store, in one local transaction;
3. ``COMMIT PREPARED`` each branch;
4. forget the record.

Anything that fails before step 2 rolls every branch back and raises
:class:`~sagakit.errors.AtomicAborted` with the reason. After step 2 the
group is committed: a branch that cannot be committed now (its database is
away) is left to recovery, which commits it because the record says so, and
is named in :attr:`AtomicTx.pending`. An exception raised by the block itself
rolls every branch back and propagates unchanged (a database error inside the
block becomes ``AtomicAborted``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from ..errors import AtomicAborted, StoreError, TwoPhaseError
from .decision import gid as make_gid
from .resource import Branch, BranchTx, Resource

if TYPE_CHECKING:
    from .coordinator import TwoPhase

log = logging.getLogger("sagakit.twophase")

#: called at each protocol point ("begun", "prepared:1", ..., "recorded", ...); tests crash here
Probe = Callable[[str], Awaitable[None]]


class AtomicTx:
    """The branches of a group in the block: ``tx["customers"]`` is that database's transaction."""

    def __init__(self, group_id: str) -> None:
        self.group_id = group_id
        self.branches: dict[str, Branch] = {}
        #: "committed" or "aborted" once the block is left
        self.outcome: str | None = None
        #: resources whose branch is committed by recovery rather than now
        self.pending: list[str] = []

    def __getitem__(self, resource: str) -> BranchTx:
        return self.branches[resource].tx


class Atomic:
    """The async context manager behind ``app.atomic(...)``."""

    def __init__(
        self, tp: TwoPhase, resources: list[Resource], group: str, key: str | None = None
    ) -> None:
        self.tp, self.resources, self.key = tp, resources, key
        self.atx = AtomicTx(group)
        self.result = b""

    @property
    def group(self) -> str:
        return self.atx.group_id

    async def __aenter__(self) -> AtomicTx:
        await self.tp.slots.acquire()
        self.tp.active.add(self.group)
        try:
            for r in self.resources:
                self.atx.branches[r.name] = await r.begin(self._gid(r))
        except StoreError as exc:
            await self._abandon()
            raise AtomicAborted(str(exc), group_id=self.group, retryable=exc.retryable) from exc
        except BaseException:
            await self._abandon()
            raise
        await self._point("begun")
        return self.atx

    async def __aexit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        if exc is not None:
            await self._abandon()
            if isinstance(exc, StoreError):
                raise AtomicAborted(
                    f"a statement failed: {exc}", group_id=self.group, retryable=exc.retryable
                ) from exc
            return
        try:
            await self._run()
        finally:
            await self._close()

    # -- the protocol --------------------------------------------------------

    async def _run(self) -> None:
        await self._prepare_all()
        await self._point("prepared")
        await self._record()
        await self._point("recorded")
        await self._commit_all()
        await self._point("committed")
        self.atx.outcome = "committed"
        if not self.atx.pending:
            await self._forget()

    async def _forget(self) -> None:
        """Drop the record; if the store is away, recovery drops it later (the group stands)."""
        try:
            await self.tp.records.forget(self.group)
        except StoreError as exc:
            log.warning("atomic group %s: record kept for recovery to forget (%s)", self.group, exc)

    async def _prepare_all(self) -> None:
        for i, (name, branch) in enumerate(self.atx.branches.items(), 1):
            try:
                await branch.prepare()
            except StoreError as exc:
                await self._abort(f"{name} refused to prepare: {exc}", name, exc.retryable)
            await self._point(f"prepared:{i}")

    async def _record(self) -> None:
        names = list(self.atx.branches)
        try:
            async with self.tp.store.transaction() as tx:
                await self.tp.records.decide(
                    tx, self.group, self.tp.node, names, self.key, self.result
                )
        except StoreError as exc:
            if not await self._recorded_after(exc):
                await self._abort(f"the commit record was not written: {exc}", None, True)

    async def _recorded_after(self, exc: StoreError) -> bool:
        """Whether a failed record write took effect after all (its COMMIT may have)."""
        try:
            return await self.tp.records.is_recorded(self.group)
        except StoreError:
            self.atx.outcome = "in doubt"
            raise TwoPhaseError(
                f"atomic group {self.group}: the commit record may or may not be written "
                f"({exc}); recovery will commit or roll back every branch by it",
                retryable=False,
            ) from exc

    async def _commit_all(self) -> None:
        for i, (name, branch) in enumerate(self.atx.branches.items(), 1):
            if not await self._commit_one(name, branch):
                self.atx.pending.append(name)
            await self._point(f"committed:{i}")

    async def _commit_one(self, name: str, branch: Branch) -> bool:
        """Commit a branch now (on its connection, else a fresh one); False: left to recovery."""
        try:
            found = await branch.commit()
        except StoreError:
            try:
                found = await self.tp.resource(name).commit_prepared(self._gid_of(name))
            except StoreError as exc:
                log.warning("atomic group %s: %s not committed yet (%s)", self.group, name, exc)
                return False
        if not found:
            log.warning("atomic group %s: branch %s was already finished", self.group, name)
        return True

    # -- failure -------------------------------------------------------------

    async def _abort(self, reason: str, resource: str | None, retryable: bool) -> None:
        await self._abandon()
        self.atx.outcome = "aborted"
        raise AtomicAborted(reason, group_id=self.group, resource=resource, retryable=retryable)

    async def _abandon(self) -> None:
        """Roll every branch back; one that cannot be reached is left to recovery (no record)."""
        for name, branch in self.atx.branches.items():
            try:
                await branch.rollback()
            except StoreError as exc:
                if getattr(branch, "prepared", False):
                    await self._rollback_elsewhere(name, exc)
        self.atx.outcome = "aborted"
        await self._close()

    async def _rollback_elsewhere(self, name: str, exc: StoreError) -> None:
        try:
            await self.tp.resource(name).rollback_prepared(self._gid_of(name))
        except StoreError:
            log.warning(
                "atomic group %s: %s left prepared for recovery (%s)", self.group, name, exc
            )

    async def _close(self) -> None:
        for branch in self.atx.branches.values():
            await branch.close()
        self.atx.branches = {}
        if self.group in self.tp.active:
            self.tp.active.discard(self.group)
            self.tp.slots.release()

    # -- helpers -------------------------------------------------------------

    def _gid(self, r: Resource) -> str:
        return make_gid(self.tp.node, self.group, r.name)

    def _gid_of(self, name: str) -> str:
        return make_gid(self.tp.node, self.group, name)

    async def _point(self, name: str) -> None:
        if self.tp.probe is not None:
            await self.tp.probe(name)
