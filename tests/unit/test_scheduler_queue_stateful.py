"""A stateful property test of ``TaskQueue``: random sequences of lease, renew, expire,
complete, fail, cancel and restart, checked against a small model of what must hold.

Invariants: every task is in exactly the state the model says (pending, leased, done,
quarantined) and the stage counts add up; no task is held by two leases; a done or
quarantined task is never leased again; attempts never exceed ``max_attempts``, and a
task that reaches them is quarantined; a stale lease (expired, taken over, finished or
of another worker) is refused; a restart from the persisted state (done and
quarantined tasks) loses nothing, and earlier leases are adopted only while their task
is pending.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from deep3m.core.errors import CancelledError, FailedPreconditionError
from deep3m.scheduler.queue import TaskQueue
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

ROLE, STAGE = "inference", "s"
JOBS = {"j0": 3, "j1": 2}
MAX_ATTEMPTS = 2
ADOPTED_LEASE_S = 5.0
HOLD_S = 1.0
WORKERS = ("w0", "w1")


@dataclass
class Live:
    job: str
    task: int
    worker: str
    deadline: float
    length: float
    cancelled: bool = False


class QueueMachine(RuleBasedStateMachine):
    leases = Bundle("leases")

    @initialize()
    def start(self) -> None:
        self.now = 1000.0
        self.epochs: list[str] = []
        self.live: dict[str, Live] = {}
        self.issued: set[str] = set()  # lease ids of the current instance
        self.old_ids: set[str] = set()  # lease ids of earlier instances (adoptable)
        self.done: set[tuple[str, int]] = set()
        self.quarantined: set[tuple[str, int]] = set()
        self.attempts: Counter[tuple[str, int]] = Counter()
        self.cancelled: set[str] = set()
        self.staged: set[str] = set()
        self.hold_until = 0.0
        self.queue = self._new_queue()
        for job, n in JOBS.items():
            self.queue.add_stage(job, STAGE, ROLE, n, max_attempts=MAX_ATTEMPTS)
            self.staged.add(job)

    def _new_queue(self) -> TaskQueue:
        queue = TaskQueue(backoff_s=0.25, max_backoff_s=1.0, default_lease_s=ADOPTED_LEASE_S)
        queue.allow_adoption_from(self.epochs)
        return queue

    # -- the model ------------------------------------------------------------------
    def _held_tasks(self, job: str) -> set[int]:
        return {lease.task for lease in self.live.values() if lease.job == job}

    def _pending(self, job: str, task: int) -> bool:
        key = (job, task)
        return (
            key not in self.done
            and key not in self.quarantined
            and task not in self._held_tasks(job)
        )

    def _count_attempt(self, lease_id: str, *, retryable: bool = True) -> bool:
        """A failed or expired attempt of a live lease; returns True when quarantined."""
        lease = self.live.pop(lease_id)
        key = (lease.job, lease.task)
        self.attempts[key] += 1
        if not retryable or self.attempts[key] >= MAX_ATTEMPTS:
            self.quarantined.add(key)
            return True
        return False

    def _expect(self, lease_id: str, worker: str) -> str:
        """What the queue must answer for ``lease_id`` held by ``worker`` now; applies the
        side effects it has (expiry of an overdue lease, adoption of an earlier one)."""
        lease = self.live.get(lease_id)
        if lease is None:
            if lease_id not in self.old_ids:
                return "stale"
            job, task = lease_id.split(":")[2], int(lease_id.split(":")[4])
            if job not in self.staged:
                return "stale"
            if job in self.cancelled:
                return "cancelled"
            if not self._pending(job, task):
                return "stale"
            self.live[lease_id] = Live(
                job, task, worker, self.now + ADOPTED_LEASE_S, ADOPTED_LEASE_S
            )
            return "ok"
        if lease.worker != worker:
            return "stale"
        if not lease.cancelled and self.now > lease.deadline:
            self._count_attempt(lease_id)
            return "stale"
        return "ok"

    def _refused(self, lease_id: str, worker: str, call: Callable[[], object]) -> bool:
        """Checks ``call`` is refused when the model says so; True when it was."""
        expected = self._expect(lease_id, worker)
        if expected == "ok":
            return False
        with pytest.raises(FailedPreconditionError if expected == "stale" else CancelledError):
            call()
        return True

    def _holder(self, lease_id: str, default: str = "w0") -> str:
        live = self.live.get(lease_id)
        return live.worker if live is not None else default

    # -- rules ------------------------------------------------------------------------
    @rule(
        target=leases,
        worker=st.sampled_from(WORKERS),
        max_tasks=st.integers(0, 3),
        lease_s=st.sampled_from([1.0, 4.0]),
    )
    def lease(self, worker: str, max_tasks: int, lease_s: float) -> object:
        got = self.queue.lease(ROLE, worker, max_tasks, self.now, lease_s)
        assert len(got) <= max_tasks
        if self.now < self.hold_until:
            assert got == []
        for lease in got:
            key = (lease.job_id, lease.task)
            assert lease.job_id not in self.cancelled
            assert key not in self.done, f"done task {key} leased again"
            assert key not in self.quarantined, f"quarantined task {key} leased again"
            assert lease.task not in self._held_tasks(lease.job_id), f"{key} leased twice"
            assert lease.attempt == self.attempts[key] + 1 <= MAX_ATTEMPTS
            assert lease.lease_id not in self.issued and lease.lease_id not in self.old_ids
            self.live[lease.lease_id] = Live(
                lease.job_id, lease.task, worker, self.now + lease_s, lease_s
            )
            self.issued.add(lease.lease_id)
        return multiple(*(lease.lease_id for lease in got))

    @rule(lease_id=leases, own=st.booleans())
    def renew(self, lease_id: str, own: bool) -> None:
        worker = self._holder(lease_id) if own or lease_id not in self.live else "intruder"
        if self._refused(lease_id, worker, lambda: self.queue.renew(lease_id, worker, self.now)):
            return
        got = self.queue.renew(lease_id, worker, self.now)
        lease = self.live[lease_id]
        assert got.cancelled == lease.cancelled
        if not lease.cancelled:
            lease.deadline = self.now + lease.length
        assert got.deadline == lease.deadline

    @rule(lease_id=leases, confirm=st.booleans())
    def complete(self, lease_id: str, confirm: bool) -> None:
        worker = self._holder(lease_id)
        if self._refused(lease_id, worker, lambda: self.queue.complete(lease_id, worker, self.now)):
            return
        lease = self.live[lease_id]
        if lease.cancelled:
            with pytest.raises(CancelledError):
                self.queue.complete(lease_id, worker, self.now)
            del self.live[lease_id]  # let go; the task is pending (and not leasable)
            return
        got = self.queue.complete(lease_id, worker, self.now)
        if confirm:
            self.queue.confirm(got)
            del self.live[lease_id]
            self.done.add((lease.job, lease.task))
        else:  # persisting failed: the worker keeps the lease
            self.queue.revert(got)

    @rule(lease_id=leases, retryable=st.booleans())
    def fail(self, lease_id: str, retryable: bool) -> None:
        worker = self._holder(lease_id)

        def call() -> object:
            return self.queue.fail(lease_id, worker, retryable, "boom", self.now)

        if self._refused(lease_id, worker, call):
            return
        got = self.queue.fail(lease_id, worker, retryable, "boom", self.now)
        if self.live[lease_id].cancelled:
            assert got.dropped
            del self.live[lease_id]
            return
        assert got.quarantined == self._count_attempt(lease_id, retryable=retryable)
        assert got.attempts <= MAX_ATTEMPTS

    @rule(dt=st.sampled_from([0.5, 1.5, 5.0]))
    def advance(self, dt: float) -> None:
        self.now += dt

    @rule()
    def expire(self) -> None:
        due = {lid for lid, lease in self.live.items() if lease.deadline < self.now}
        expired = self.queue.expire(self.now)
        assert {e.lease.lease_id for e in expired} == due
        for e in expired:
            if self.live[e.lease.lease_id].cancelled:
                assert e.dropped
                del self.live[e.lease.lease_id]
            else:
                assert e.quarantined == self._count_attempt(e.lease.lease_id)

    @precondition(lambda self: bool(self.staged - self.cancelled))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        job = data.draw(st.sampled_from(sorted(self.staged - self.cancelled)))
        flagged = self.queue.cancel_job(job)
        expected = {lid for lid, lease in self.live.items() if lease.job == job}
        assert {lease.lease_id for lease in flagged} == expected
        for lid in expected:
            self.live[lid].cancelled = True
        self.cancelled.add(job)

    @rule()
    def restart(self) -> None:
        """A new instance from what the scheduler persists: done and quarantined tasks."""
        self.epochs.append(self.queue.epoch)
        self.old_ids |= self.issued
        self.issued = set()
        self.live = {}
        self.attempts = Counter()  # attempts are not persisted: a restart forgives them
        self.hold_until = self.now + HOLD_S
        self.queue = self._new_queue()
        self.staged = set()
        for job, n in JOBS.items():
            if job in self.cancelled:
                continue  # a cancelled job is finished on restart, not queued
            counts = self.queue.add_stage(
                job,
                STAGE,
                ROLE,
                n,
                max_attempts=MAX_ATTEMPTS,
                done=[t for j, t in self.done if j == job],
                quarantined={t: "boom" for j, t in self.quarantined if j == job},
                hold_until=self.hold_until,
            )
            assert counts.done == sum(1 for j, _ in self.done if j == job)
            self.staged.add(job)

    # -- invariants ---------------------------------------------------------------------
    @invariant()
    def states_match_the_model(self) -> None:
        for job in self.staged:
            n = JOBS[job]
            held = self._held_tasks(job)
            counts = self.queue.counts(job, STAGE)
            done = {t for j, t in self.done if j == job}
            quarantined = {t for j, t in self.quarantined if j == job}
            assert not done & quarantined
            assert (counts.total, counts.done, counts.quarantined, counts.leased) == (
                n,
                len(done),
                len(quarantined),
                len(held),
            )
            pending = n - len(done) - len(quarantined) - len(held)
            assert counts.pending == (0 if job in self.cancelled else pending)
            for task in range(n):
                expected = (
                    "done"
                    if task in done
                    else "quarantined"
                    if task in quarantined
                    else "leased"
                    if task in held
                    else "pending"
                )
                assert self.queue.task_state(job, STAGE, task) == expected, (job, task)
                attempts = self.queue.attempts(job, STAGE, task)
                assert attempts == self.attempts[(job, task)] <= MAX_ATTEMPTS
                if attempts >= MAX_ATTEMPTS:
                    assert task in quarantined


QueueMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_task_queue_state_machine = QueueMachine.TestCase
