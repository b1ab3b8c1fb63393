"""The pure task queue: leases, renewals, completion, failure, backoff, expiry, cancel."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from deep3m.core.errors import CancelledError, FailedPreconditionError, InvalidArgumentError
from deep3m.scheduler.queue import TaskQueue, parse_lease_id

LEASE_S = 10.0


def make_queue(
    n: int = 5,
    *,
    max_attempts: int = 3,
    backoff_s: float = 2.0,
    role: str = "inference",
    job: str = "j1",
) -> TaskQueue:
    q = TaskQueue(backoff_s=backoff_s, max_backoff_s=60.0, default_lease_s=LEASE_S)
    q.add_stage(job, "predict", role, n, max_attempts=max_attempts)
    return q


def finish(q: TaskQueue, lease_id: str, worker: str, now: float) -> None:
    q.confirm(q.complete(lease_id, worker, now))


def test_lease_in_order_up_to_max_and_by_role() -> None:
    q = make_queue(5)
    q.add_stage("j2", "train", "training", 2, max_attempts=3)
    assert q.lease("postprocess", "w", 4, 0.0, LEASE_S) == []
    got = q.lease("inference", "w1", 3, 0.0, LEASE_S)
    assert [g.task for g in got] == [0, 1, 2]
    assert all(g.deadline == LEASE_S and g.attempt == 1 and g.worker_id == "w1" for g in got)
    assert len({g.lease_id for g in got}) == 3
    assert [g.task for g in q.lease("inference", "w2", 10, 0.0, LEASE_S)] == [3, 4]
    assert q.lease("inference", "w2", 10, 0.0, LEASE_S) == []
    assert q.role_counts() == {"inference": (0, 5), "training": (2, 0)}
    counts = q.counts("j1", "predict")
    assert (counts.total, counts.pending, counts.leased, counts.done) == (5, 0, 5, 0)


def test_oldest_job_first() -> None:
    q = make_queue(1, job="old")
    q.add_stage("new", "predict", "inference", 2, max_attempts=3)
    got = q.lease("inference", "w", 3, 0.0, LEASE_S)
    assert [(g.job_id, g.task) for g in got] == [("old", 0), ("new", 0), ("new", 1)]


def test_renew_extends_and_checks_the_worker() -> None:
    q = make_queue(1)
    (lease,) = q.lease("inference", "w1", 1, 0.0, LEASE_S)
    assert q.renew(lease.lease_id, "w1", 5.0).deadline == 15.0
    with pytest.raises(FailedPreconditionError, match="held by worker 'w1'"):
        q.renew(lease.lease_id, "w2", 6.0)
    with pytest.raises(FailedPreconditionError, match="stale lease"):
        q.renew("nonsense", "w1", 6.0)


def test_complete_then_confirm_marks_done_and_is_not_repeatable() -> None:
    q = make_queue(2)
    a, b = q.lease("inference", "w", 2, 0.0, LEASE_S)
    held = q.complete(a.lease_id, "w", 1.0)
    # While the completion is being persisted the task is neither pending nor done.
    assert q.task_state("j1", "predict", a.task) == "completing"
    counts = q.confirm(held)
    assert (counts.done, counts.leased, counts.pending) == (1, 1, 0)
    with pytest.raises(FailedPreconditionError, match="stale lease"):
        q.complete(a.lease_id, "w", 2.0)
    finish(q, b.lease_id, "w", 2.0)
    assert q.counts("j1", "predict").settled
    assert q.counts("j1", "predict").done == 2


def test_revert_returns_the_lease_to_its_holder() -> None:
    q = make_queue(1)
    (lease,) = q.lease("inference", "w", 1, 0.0, LEASE_S)
    held = q.complete(lease.lease_id, "w", 1.0)
    q.revert(held)  # persisting failed
    assert q.task_state("j1", "predict", 0) == "leased"
    assert q.lease("inference", "other", 1, 2.0, LEASE_S) == []
    finish(q, lease.lease_id, "w", 3.0)
    assert q.counts("j1", "predict").done == 1


def test_expired_lease_is_requeued_and_its_completion_is_stale() -> None:
    q = make_queue(1)
    (old,) = q.lease("inference", "w1", 1, 0.0, LEASE_S)
    assert q.expire(5.0) == []
    (expired,) = q.expire(LEASE_S + 1)
    assert expired.lease.lease_id == old.lease_id and not expired.quarantined
    assert q.attempts("j1", "predict", 0) == 1
    (new,) = q.lease("inference", "w2", 1, LEASE_S + 1, LEASE_S)
    assert new.task == 0 and new.attempt == 2 and new.lease_id != old.lease_id
    # The stale worker comes back: refused, and the newer lease is untouched.
    with pytest.raises(FailedPreconditionError, match="stale lease"):
        q.complete(old.lease_id, "w1", LEASE_S + 2)
    with pytest.raises(FailedPreconditionError):
        q.fail(old.lease_id, "w1", True, "late", LEASE_S + 2)
    assert q.task_state("j1", "predict", 0) == "leased"
    finish(q, new.lease_id, "w2", LEASE_S + 3)
    assert q.counts("j1", "predict").done == 1


def test_a_completion_after_the_deadline_is_stale_even_before_the_reaper_runs() -> None:
    q = make_queue(1)
    (lease,) = q.lease("inference", "w", 1, 0.0, LEASE_S)
    with pytest.raises(FailedPreconditionError, match="expired"):
        q.complete(lease.lease_id, "w", LEASE_S + 0.5)
    assert q.task_state("j1", "predict", 0) == "pending"


def test_retryable_failure_backs_off_exponentially() -> None:
    q = make_queue(1, max_attempts=5, backoff_s=2.0)
    (lease,) = q.lease("inference", "w", 1, 0.0, LEASE_S)
    outcome = q.fail(lease.lease_id, "w", True, "flaky", 1.0)
    assert not outcome.quarantined and outcome.attempts == 1 and outcome.retry_at == 3.0
    assert q.lease("inference", "w", 1, 2.9, LEASE_S) == []
    (second,) = q.lease("inference", "w", 1, 3.0, LEASE_S)
    assert second.attempt == 2
    outcome = q.fail(second.lease_id, "w", True, "flaky", 4.0)
    assert outcome.retry_at == 8.0  # 2 s, then 4 s
    assert q.lease("inference", "w", 1, 7.9, LEASE_S) == []
    assert len(q.lease("inference", "w", 1, 8.0, LEASE_S)) == 1


def test_quarantine_after_max_attempts_and_at_once_when_not_retryable() -> None:
    q = make_queue(2, max_attempts=2, backoff_s=0.0)
    a, b = q.lease("inference", "w", 2, 0.0, LEASE_S)
    assert q.fail(b.lease_id, "w", False, "bad input", 0.0).quarantined
    assert not q.fail(a.lease_id, "w", True, "boom 1", 0.0).quarantined
    (again,) = q.lease("inference", "w", 1, 0.0, LEASE_S)
    assert again.task == 0
    outcome = q.fail(again.lease_id, "w", True, "boom 2", 0.0)
    assert outcome.quarantined and outcome.attempts == 2
    assert q.quarantined("j1", "predict") == {0: "boom 2", 1: "bad input"}
    counts = q.counts("j1", "predict")
    assert counts.settled and counts.quarantined == 2 and counts.done == 0
    assert q.lease("inference", "w", 5, 100.0, LEASE_S) == []


def test_expiry_counts_as_an_attempt() -> None:
    q = make_queue(1, max_attempts=2)
    assert len(q.lease("inference", "w", 1, 0.0, LEASE_S)) == 1
    q.expire(LEASE_S + 1)
    (second,) = q.lease("inference", "w", 1, LEASE_S + 1, LEASE_S)
    assert second.attempt == 2
    (expired,) = q.expire(2 * LEASE_S + 2)
    assert expired.quarantined
    assert "lease expired" in q.quarantined("j1", "predict")[0]


def test_cancel_drops_pending_and_flags_leases() -> None:
    q = make_queue(4)
    a, b = q.lease("inference", "w", 2, 0.0, LEASE_S)
    flagged = q.cancel_job("j1")
    assert {f.lease_id for f in flagged} == {a.lease_id, b.lease_id}
    assert q.lease("inference", "w", 4, 1.0, LEASE_S) == []
    assert q.role_counts()["inference"][0] == 0
    assert q.renew(a.lease_id, "w", 1.0).cancelled
    with pytest.raises(CancelledError):
        q.complete(a.lease_id, "w", 1.0)
    assert q.fail(b.lease_id, "w", True, "stopped", 1.0).dropped
    assert q.next_deadline() is None  # no lease left


def test_removed_job_answers_cancelled_to_remaining_leases() -> None:
    q = make_queue(2)
    (lease,) = q.lease("inference", "w", 1, 0.0, LEASE_S)
    q.remove_job("j1")
    assert not q.has_stage("j1", "predict")
    assert q.renew(lease.lease_id, "w", 1.0).cancelled
    (gone,) = q.expire(LEASE_S + 1)
    assert gone.dropped


def test_restarted_queue_adopts_leases_of_an_earlier_epoch() -> None:
    before = make_queue(3)
    a, b, c = before.lease("inference", "w", 3, 0.0, LEASE_S)
    finish(before, a.lease_id, "w", 1.0)
    # A new instance rebuilt from what was persisted: task 0 done.
    after = TaskQueue(default_lease_s=LEASE_S)
    assert after.epoch != before.epoch
    after.allow_adoption_from([before.epoch])
    after.add_stage("j1", "predict", "inference", 3, max_attempts=3, done=[0], hold_until=5.0)
    # Held back so the old holders can come back first.
    assert after.lease("inference", "x", 3, 1.0, LEASE_S) == []
    renewed = after.renew(b.lease_id, "w", 2.0)
    assert renewed.lease_id == b.lease_id and renewed.deadline == 2.0 + LEASE_S
    assert after.task_state("j1", "predict", 1) == "leased"
    # A completion for a task nobody holds is accepted without a renew first.
    after.confirm(after.complete(c.lease_id, "w", 3.0))
    # An old lease for a task already done is stale.
    with pytest.raises(FailedPreconditionError):
        after.complete(a.lease_id, "w", 3.0)
    after.confirm(after.complete(b.lease_id, "w", 4.0))
    assert after.counts("j1", "predict").done == 3


def test_leases_of_unknown_epochs_are_never_adopted() -> None:
    q = make_queue(1)
    forged = "feedbeef:1:j1:predict:0"
    with pytest.raises(FailedPreconditionError, match="stale lease"):
        q.complete(forged, "w", 0.0)
    with pytest.raises(FailedPreconditionError, match="stale lease"):
        q.renew(forged, "w", 0.0)
    q.allow_adoption_from(["feedbeef"])
    assert q.renew(forged, "w", 0.0).task == 0


def test_an_old_lease_of_a_task_leased_again_is_stale() -> None:
    before = make_queue(1)
    (old,) = before.lease("inference", "w1", 1, 0.0, LEASE_S)
    after = TaskQueue(default_lease_s=LEASE_S)
    after.allow_adoption_from([before.epoch])
    after.add_stage("j1", "predict", "inference", 1, max_attempts=3)
    (new,) = after.lease("inference", "w2", 1, 0.0, LEASE_S)
    with pytest.raises(FailedPreconditionError, match="stale lease"):
        after.complete(old.lease_id, "w1", 1.0)
    after.confirm(after.complete(new.lease_id, "w2", 1.0))
    assert after.counts("j1", "predict").done == 1


def test_restored_quarantine_and_bad_arguments() -> None:
    q = TaskQueue()
    counts = q.add_stage(
        "j", "s", "tiling", 4, max_attempts=2, done=[0, 3], quarantined={1: "broken"}
    )
    assert (counts.done, counts.quarantined, counts.pending) == (2, 1, 1)
    assert [g.task for g in q.lease("tiling", "w", 4, 0.0, 1.0)] == [2]
    with pytest.raises(InvalidArgumentError, match="already exists"):
        q.add_stage("j", "s", "tiling", 1, max_attempts=2)
    with pytest.raises(InvalidArgumentError, match="max_attempts"):
        q.add_stage("k", "s", "tiling", 1, max_attempts=0)
    with pytest.raises(InvalidArgumentError, match="done task"):
        q.add_stage("k", "s", "tiling", 2, max_attempts=1, done=[2])


def test_lease_ids_name_their_task() -> None:
    q = make_queue(3)
    lease = q.lease("inference", "w", 3, 0.0, LEASE_S)[2]
    assert parse_lease_id(lease.lease_id) == ("j1", "predict", 2)
    assert parse_lease_id("garbage") is None


def test_a_million_task_stage_is_compact_and_leases_quickly() -> None:
    tracemalloc.start()
    try:
        q = TaskQueue()
        q.add_stage(
            "big",
            "predict",
            "inference",
            1_000_000,
            max_attempts=3,
            done=np.arange(0, 1_000_000, 2),
        )
        for _ in range(100):
            for lease in q.lease("inference", "w", 8, 0.0, 60.0):
                q.confirm(q.complete(lease.lease_id, "w", 1.0))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    counts = q.counts("big", "predict")
    assert counts.done == 500_000 + 800
    assert counts.pending == 1_000_000 - counts.done
    # Two bytes per task plus the restored index list; no object per task.
    assert peak < 16 * 1024 * 1024


def test_tasks_in_backoff_or_held_after_a_restart_are_counted_as_held() -> None:
    q = make_queue(3, max_attempts=5, backoff_s=2.0)
    q.add_stage("j2", "train", "training", 2, max_attempts=3, hold_until=50.0)
    a, _, _ = q.lease("inference", "w1", 3, 0.0, LEASE_S)
    q.fail(a.lease_id, "w1", True, "flaky", 1.0)  # back off until 3.0
    assert q.held_by_role(2.0) == {"inference": 1, "training": 2}
    assert q.role_counts()["inference"] == (1, 2)  # still pending, but not leasable yet
    assert q.held_by_role(3.0) == {"inference": 0, "training": 2}
    assert q.held_by_role(50.0)["training"] == 0
    (again,) = q.lease("inference", "w2", 1, 3.0, LEASE_S)
    assert again.task == a.task and q.held_by_role(3.0)["inference"] == 0


def test_leases_are_counted_per_worker_of_a_role() -> None:
    q = make_queue(4)
    q.add_stage("j2", "train", "training", 1, max_attempts=3)
    first = q.lease("inference", "pod-a", 3, 0.0, LEASE_S)
    q.lease("inference", "pod-b", 1, 0.0, LEASE_S)
    q.lease("training", "pod-a", 1, 0.0, LEASE_S)
    assert q.leases_by_worker("inference") == {"pod-a": 3, "pod-b": 1}
    assert q.leases_by_worker("training") == {"pod-a": 1}
    finish(q, first[0].lease_id, "pod-a", 1.0)
    assert q.leases_by_worker("inference") == {"pod-a": 2, "pod-b": 1}
    q.cancel_job("j1")  # cancelled leases are on their way out
    assert q.leases_by_worker("inference") == {}
