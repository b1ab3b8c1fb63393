"""Task queues and leases: the scheduler's pure core (no I/O, clock injected).

A *stage* of a job is a numbered set of tasks ``0 … n-1``. Each task is

    PENDING ──lease──▶ LEASED ──complete──▶ COMPLETING ──confirm──▶ DONE
       ▲                  │                     │
       └──fail/expire─────┘◀──────revert────────┘
                          └──fail (non-retryable or attempts used up)──▶ QUARANTINED

``COMPLETING`` covers the moment the caller persists the completion: the task
cannot be leased again meanwhile, so no stale worker can race the record, and
a failed write (``revert``) hands the lease back to the worker that holds it.

A stage stores its tasks compactly — one byte of state and one byte of attempt
count per task in numpy arrays — and hands out never-leased tasks from a
cursor, so a million-task stage costs about 2 MB and no Python object per task.
Re-queued tasks go to a small FIFO, failed ones to a heap keyed by their
not-before time (exponential backoff). Leasing is O(1) amortised.

Lease ids name the scheduler instance (*epoch*) that issued them. After a
restart, a renew, complete or fail for a lease of a known earlier epoch
*adopts* the lease when its task is still pending (nobody else holds it): the
work in flight during a restart is not lost. Within one epoch a lease that expired or
was re-leased is stale, and a stale completion never overwrites a newer one.
"""

from __future__ import annotations

import heapq
import secrets
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from deep3m.core.errors import (
    CancelledError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)

PENDING, LEASED, COMPLETING, DONE, QUARANTINED = range(5)
STATE_NAMES = ("pending", "leased", "completing", "done", "quarantined")
# Attempts are stored in one byte per task.
MAX_ATTEMPTS_LIMIT = 100
_SEP = ":"


@dataclass
class Lease:
    """A task held by a worker until ``deadline`` (unix seconds)."""

    lease_id: str
    job_id: str
    stage: str
    task: int
    role: str
    worker_id: str
    attempt: int  # 1-based: the attempt this lease is
    leased_at: float
    deadline: float
    length_s: float  # each renew extends the lease by this much
    cancelled: bool = False


@dataclass(frozen=True)
class FailOutcome:
    lease: Lease
    quarantined: bool
    attempts: int  # failed attempts so far
    retry_at: float = 0.0  # not-before time of the next attempt (when re-queued)
    dropped: bool = False  # the job was cancelled; the task is simply let go


@dataclass(frozen=True)
class Expired:
    lease: Lease
    quarantined: bool
    dropped: bool = False


@dataclass(frozen=True)
class StageCounts:
    total: int
    pending: int
    leased: int  # leased or completing
    done: int
    quarantined: int

    @property
    def settled(self) -> bool:
        """Nothing left to run or in flight (done, quarantined or dropped)."""
        return self.pending == 0 and self.leased == 0


@dataclass
class _Stage:
    job_id: str
    name: str
    role: str
    n: int
    max_attempts: int
    state: np.ndarray
    attempts: np.ndarray
    hold_until: float = 0.0
    cursor: int = 0
    # Re-queued (task, attempts when queued) and backed-off (not_before, task,
    # attempts) entries; an entry goes stale once its task moves on (state or
    # attempts changed), so nothing is ever searched or removed in place.
    ready: deque[tuple[int, int]] = field(default_factory=deque)
    delayed: list[tuple[float, int, int]] = field(default_factory=list)
    pending: int = 0
    leased: int = 0
    done: int = 0
    quarantined: int = 0
    cancelled: bool = False
    errors: dict[int, str] = field(default_factory=dict)

    def counts(self) -> StageCounts:
        return StageCounts(self.n, self.pending, self.leased, self.done, self.quarantined)

    def _pop(self, now: float) -> int | None:
        """The next leasable task, or None; skips entries whose task moved on."""
        if self.cancelled or self.pending == 0 or now < self.hold_until:
            return None
        while self.delayed and self.delayed[0][0] <= now:
            _, task, attempts = heapq.heappop(self.delayed)
            self.ready.append((task, attempts))
        while self.ready:
            task, attempts = self.ready.popleft()
            if self.state[task] == PENDING and self.attempts[task] == attempts:
                return task
        # Never-attempted tasks come from the cursor; tasks with attempts are
        # always queued in ``ready`` or ``delayed``.
        while self.cursor < self.n:
            task = self.cursor
            self.cursor += 1
            if self.state[task] == PENDING and self.attempts[task] == 0:
                return task
        return None


class TaskQueue:
    """Every active stage of every job, by role. Not thread-safe: callers lock.

    ``backoff_s`` is the delay before the first retry; it doubles per failed
    attempt up to ``max_backoff_s``. ``epoch`` names this instance in lease ids;
    an adopted lease (see the module doc) lasts ``default_lease_s``.
    """

    def __init__(
        self,
        *,
        backoff_s: float = 2.0,
        max_backoff_s: float = 300.0,
        default_lease_s: float = 60.0,
        epoch: str | None = None,
    ) -> None:
        if backoff_s < 0 or max_backoff_s < 0:
            raise InvalidArgumentError("backoff must be >= 0", field="retry_backoff_seconds")
        if default_lease_s <= 0:
            raise InvalidArgumentError("default_lease_s must be > 0", field="lease_seconds")
        self.default_lease_s = default_lease_s
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.epoch = epoch or secrets.token_hex(4)
        if _SEP in self.epoch:
            raise InvalidArgumentError(
                f"epoch {self.epoch!r} must not contain {_SEP!r}", field="epoch"
            )
        self._seq = 0
        self._previous_epochs: frozenset[str] = frozenset()
        self._stages: dict[tuple[str, str], _Stage] = {}
        self._by_role: dict[str, list[_Stage]] = {}
        self._leases: dict[str, Lease] = {}
        # (job, stage, task) -> lease id of the current holder
        self._holder: dict[tuple[str, str, int], str] = {}

    def allow_adoption_from(self, epochs: Iterable[str]) -> None:
        """Earlier instances whose leases may be adopted (see the module doc)."""
        self._previous_epochs = frozenset(epochs) - {self.epoch}

    # -- stages ------------------------------------------------------------
    def add_stage(
        self,
        job_id: str,
        stage: str,
        role: str,
        n_tasks: int,
        *,
        max_attempts: int,
        done: Iterable[int] = (),
        quarantined: Mapping[int, str] | None = None,
        hold_until: float = 0.0,
    ) -> StageCounts:
        """Register a stage; ``done``/``quarantined`` restore a persisted one.

        ``hold_until`` keeps its pending tasks back until then, so workers that
        held leases before a restart can adopt them first.
        """
        key = (job_id, stage)
        if key in self._stages:
            raise InvalidArgumentError(
                f"stage {stage!r} of job {job_id!r} already exists", field="stage"
            )
        if n_tasks < 0:
            raise InvalidArgumentError(f"n_tasks must be >= 0, got {n_tasks}", field="n_tasks")
        if not 1 <= max_attempts <= MAX_ATTEMPTS_LIMIT:
            raise InvalidArgumentError(
                f"max_attempts must be 1..{MAX_ATTEMPTS_LIMIT}, got {max_attempts}",
                field="max_attempts",
            )
        st = _Stage(
            job_id,
            stage,
            role,
            n_tasks,
            max_attempts,
            np.zeros(n_tasks, dtype=np.uint8),
            np.zeros(n_tasks, dtype=np.uint8),
            hold_until=hold_until,
        )
        done_idx = np.fromiter(done, dtype=np.int64)
        if done_idx.size and (done_idx.min() < 0 or done_idx.max() >= n_tasks):
            raise InvalidArgumentError(f"done task numbers outside 0..{n_tasks - 1}", field="done")
        st.state[done_idx] = DONE
        for task, error in (quarantined or {}).items():
            if not 0 <= task < n_tasks:
                raise InvalidArgumentError(
                    f"quarantined task {task} outside 0..{n_tasks - 1}", field="quarantined"
                )
            if st.state[task] != DONE:
                st.state[task] = QUARANTINED
                st.errors[task] = error
        st.done = int(np.count_nonzero(st.state == DONE))
        st.quarantined = int(np.count_nonzero(st.state == QUARANTINED))
        st.pending = n_tasks - st.done - st.quarantined
        self._stages[key] = st
        self._by_role.setdefault(role, []).append(st)
        return st.counts()

    def _stage(self, job_id: str, stage: str) -> _Stage:
        try:
            return self._stages[(job_id, stage)]
        except KeyError:
            raise NotFoundError(
                f"job {job_id!r} has no active stage {stage!r}", field="stage"
            ) from None

    def has_stage(self, job_id: str, stage: str) -> bool:
        return (job_id, stage) in self._stages

    def counts(self, job_id: str, stage: str) -> StageCounts:
        return self._stage(job_id, stage).counts()

    def task_state(self, job_id: str, stage: str, task: int) -> str:
        return STATE_NAMES[int(self._stage(job_id, stage).state[task])]

    def attempts(self, job_id: str, stage: str, task: int) -> int:
        return int(self._stage(job_id, stage).attempts[task])

    def quarantined(self, job_id: str, stage: str) -> dict[int, str]:
        """Quarantined task numbers and their last error."""
        st = self._stage(job_id, stage)
        return {t: st.errors.get(t, "") for t in np.flatnonzero(st.state == QUARANTINED).tolist()}

    def remove_job(self, job_id: str) -> None:
        """Forget a finished job's stages; its remaining leases answer cancelled."""
        for key in [k for k in self._stages if k[0] == job_id]:
            st = self._stages.pop(key)
            self._by_role[st.role].remove(st)
            if not self._by_role[st.role]:
                del self._by_role[st.role]
        for lease in self._leases.values():
            if lease.job_id == job_id:
                lease.cancelled = True

    def cancel_job(self, job_id: str) -> list[Lease]:
        """Drop the job's pending tasks; flag its leases so renew answers cancelled."""
        flagged = []
        for (jid, _), st in self._stages.items():
            if jid != job_id or st.cancelled:
                continue
            st.cancelled = True
            st.pending = 0
            st.ready.clear()
            st.delayed.clear()
        for lease in self._leases.values():
            if lease.job_id == job_id and not lease.cancelled:
                lease.cancelled = True
                flagged.append(lease)
        return flagged

    # -- per-role statistics ---------------------------------------------
    def role_counts(self) -> dict[str, tuple[int, int]]:
        """(pending, leased) per role with an active stage."""
        out: dict[str, tuple[int, int]] = {}
        for role, stages in self._by_role.items():
            out[role] = (sum(s.pending for s in stages), sum(s.leased for s in stages))
        return out

    def held_by_role(self, now: float) -> dict[str, int]:
        """Pending tasks per role that may not be leased before a later time: in retry
        backoff, or in a stage held back after a restart. An autoscaler must not start
        workers for them."""
        out: dict[str, int] = {}
        for role, stages in self._by_role.items():
            held = 0
            for st in stages:
                if st.cancelled:
                    continue
                if now < st.hold_until:
                    held += st.pending
                    continue
                held += sum(
                    1
                    for not_before, task, attempts in st.delayed
                    if not_before > now
                    and st.state[task] == PENDING
                    and st.attempts[task] == attempts
                )
            out[role] = held
        return out

    def leases_by_worker(self, role: str) -> dict[str, int]:
        """Live leases of ``role`` per worker id (a pod's name on Kubernetes)."""
        out: dict[str, int] = {}
        for lease in self._leases.values():
            if lease.role == role and not lease.cancelled:
                out[lease.worker_id] = out.get(lease.worker_id, 0) + 1
        return out

    def next_deadline(self) -> float | None:
        return min((lease.deadline for lease in self._leases.values()), default=None)

    # -- leasing -----------------------------------------------------------
    def _new_lease_id(self, job_id: str, stage: str, task: int) -> str:
        self._seq += 1
        return _SEP.join((self.epoch, str(self._seq), job_id, stage, str(task)))

    def _grant(
        self, st: _Stage, task: int, lease_id: str, worker_id: str, now: float, lease_s: float
    ) -> Lease:
        st.state[task] = LEASED
        st.pending -= 1
        st.leased += 1
        lease = Lease(
            lease_id,
            st.job_id,
            st.name,
            task,
            st.role,
            worker_id,
            int(st.attempts[task]) + 1,
            now,
            now + lease_s,
            lease_s,
        )
        self._leases[lease_id] = lease
        self._holder[(st.job_id, st.name, task)] = lease_id
        return lease

    def lease(
        self, role: str, worker_id: str, max_tasks: int, now: float, lease_s: float
    ) -> list[Lease]:
        """Up to ``max_tasks`` tasks of ``role``, oldest job first."""
        if max_tasks <= 0:
            return []
        if lease_s <= 0:
            raise InvalidArgumentError(f"lease_s must be > 0, got {lease_s}", field="lease_seconds")
        granted: list[Lease] = []
        for st in self._by_role.get(role, ()):
            while len(granted) < max_tasks:
                task = st._pop(now)
                if task is None:
                    break
                granted.append(
                    self._grant(
                        st,
                        task,
                        self._new_lease_id(st.job_id, st.name, task),
                        worker_id,
                        now,
                        lease_s,
                    )
                )
            if len(granted) >= max_tasks:
                break
        return granted

    def _held(self, lease_id: str, worker_id: str, now: float) -> Lease:
        """The live lease ``lease_id`` of ``worker_id``; adopts one of an earlier epoch."""
        lease = self._leases.get(lease_id)
        if lease is None:
            lease = self._adopt(lease_id, worker_id, now)
        if lease.worker_id != worker_id:
            raise FailedPreconditionError(
                f"stale lease {lease_id!r}: held by worker {lease.worker_id!r}, not {worker_id!r}",
                field="lease_id",
            )
        if not lease.cancelled and now > lease.deadline:
            self._expire_one(lease, now)
            raise FailedPreconditionError(
                f"stale lease {lease_id!r}: it expired at {lease.deadline:.3f}", field="lease_id"
            )
        return lease

    def _adopt(self, lease_id: str, worker_id: str, now: float) -> Lease:
        stale = FailedPreconditionError(
            f"stale lease {lease_id!r}: it expired or the task was leased again", field="lease_id"
        )
        named = parse_lease_id(lease_id)
        if named is None or lease_id.split(_SEP)[0] not in self._previous_epochs:
            raise stale
        job_id, stage, task = named
        st = self._stages.get((job_id, stage))
        if st is None or not 0 <= task < st.n:
            raise stale
        if st.cancelled:
            raise CancelledError(f"job {st.job_id!r} was cancelled", field="job_id")
        if st.state[task] != PENDING:
            raise stale
        return self._grant(st, task, lease_id, worker_id, now, self.default_lease_s)

    def renew(self, lease_id: str, worker_id: str, now: float) -> Lease:
        """Extend a lease; a cancelled job's lease comes back with ``cancelled`` set."""
        lease = self._held(lease_id, worker_id, now)
        if not lease.cancelled:
            lease.deadline = now + lease.length_s
        return lease

    def _release(self, lease: Lease) -> _Stage | None:
        self._leases.pop(lease.lease_id, None)
        key = (lease.job_id, lease.stage, lease.task)
        if self._holder.get(key) == lease.lease_id:
            del self._holder[key]
        return self._stages.get((lease.job_id, lease.stage))

    def complete(self, lease_id: str, worker_id: str, now: float) -> Lease:
        """Begin completing: the task is no longer leasable; ``confirm`` or ``revert``.

        Raises FailedPreconditionError for a stale lease and CancelledError when
        the job was cancelled (the lease is dropped).
        """
        lease = self._held(lease_id, worker_id, now)
        if lease.cancelled:
            st = self._release(lease)
            if st is not None and st.state[lease.task] == LEASED:
                st.state[lease.task] = PENDING
                st.leased -= 1
            raise CancelledError(f"job {lease.job_id!r} was cancelled", field="job_id")
        st = self._stage(lease.job_id, lease.stage)
        st.state[lease.task] = COMPLETING
        self._leases.pop(lease_id)
        return lease

    def confirm(self, lease: Lease) -> StageCounts:
        """The completion is persisted: the task is done."""
        st = self._stages.get((lease.job_id, lease.stage))
        if st is None:  # the job ended meanwhile
            return StageCounts(0, 0, 0, 0, 0)
        if st.state[lease.task] == COMPLETING:
            st.state[lease.task] = DONE
            st.leased -= 1
            st.done += 1
        key = (lease.job_id, lease.stage, lease.task)
        if self._holder.get(key) == lease.lease_id:
            del self._holder[key]
        return st.counts()

    def revert(self, lease: Lease) -> None:
        """Persisting failed: the worker still holds the lease and may complete again."""
        st = self._stages.get((lease.job_id, lease.stage))
        if st is not None and st.state[lease.task] == COMPLETING:
            st.state[lease.task] = LEASED
            self._leases[lease.lease_id] = lease

    def release(self, lease_id: str, worker_id: str, now: float) -> Lease:
        """The worker gives the task back unfinished (it is shutting down): the task is
        leasable again at once, first in line, and no attempt is counted."""
        lease = self._held(lease_id, worker_id, now)
        st = self._release(lease)
        if st is not None and st.state[lease.task] == LEASED:
            st.state[lease.task] = PENDING
            st.leased -= 1
            if not (lease.cancelled or st.cancelled):
                st.pending += 1
                st.ready.appendleft((lease.task, int(st.attempts[lease.task])))
        return lease

    def fail(
        self, lease_id: str, worker_id: str, retryable: bool, error: str, now: float
    ) -> FailOutcome:
        """Record a failed attempt: back off and retry, or quarantine."""
        lease = self._held(lease_id, worker_id, now)
        st = self._release(lease)
        if lease.cancelled or st is None or st.cancelled:
            if st is not None and st.state[lease.task] == LEASED:
                st.state[lease.task] = PENDING
                st.leased -= 1
            return FailOutcome(lease, quarantined=False, attempts=lease.attempt, dropped=True)
        return self._failed(st, lease, retryable, error, now)

    def _failed(
        self,
        st: _Stage,
        lease: Lease,
        retryable: bool,
        error: str,
        now: float,
        *,
        backoff: bool = True,
    ) -> FailOutcome:
        task = lease.task
        attempts = min(int(st.attempts[task]) + 1, 255)
        st.attempts[task] = attempts
        st.leased -= 1
        if not retryable or attempts >= st.max_attempts:
            st.state[task] = QUARANTINED
            st.quarantined += 1
            st.errors[task] = error
            return FailOutcome(lease, quarantined=True, attempts=attempts)
        st.errors[task] = error
        st.state[task] = PENDING
        st.pending += 1
        if not backoff:
            st.ready.append((task, attempts))
            return FailOutcome(lease, quarantined=False, attempts=attempts, retry_at=now)
        delay = min(self.backoff_s * 2.0 ** (attempts - 1), self.max_backoff_s)
        heapq.heappush(st.delayed, (now + delay, task, attempts))
        return FailOutcome(lease, quarantined=False, attempts=attempts, retry_at=now + delay)

    def _expire_one(self, lease: Lease, now: float) -> Expired:
        st = self._release(lease)
        if lease.cancelled or st is None or st.cancelled:
            if st is not None and st.state[lease.task] == LEASED:
                st.state[lease.task] = PENDING
                st.leased -= 1
            return Expired(lease, quarantined=False, dropped=True)
        # Losing the lease counts as an attempt: a task that kills its workers
        # (out of memory, say) must not be retried forever. Re-queued at once:
        # a lost worker is rarely the task's fault.
        outcome = self._failed(
            st,
            lease,
            True,
            f"lease expired (attempt {lease.attempt}, worker "
            f"{lease.worker_id!r} stopped renewing it)",
            now,
            backoff=False,
        )
        return Expired(lease, quarantined=outcome.quarantined)

    def expire(self, now: float) -> list[Expired]:
        """Re-queue (or quarantine) every lease whose deadline has passed."""
        return [
            self._expire_one(lease, now)
            for lease in list(self._leases.values())
            if lease.deadline < now
        ]


def parse_lease_id(lease_id: str) -> tuple[str, str, int] | None:
    """(job id, stage, task number) named by a lease id, or None."""
    parts = lease_id.split(_SEP)
    if len(parts) != 5 or not parts[4].isdigit():
        return None
    return parts[2], parts[3], int(parts[4])
