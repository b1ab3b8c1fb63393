"""Queue and job statistics: what the autoscaler asks for, and the Prometheus gauges.

``deep3m_tasks_pending{role}`` is what KEDA scales on, so it counts only tasks a
worker could lease now: tasks held back (retry backoff, the hold after a
restart) are left out. A held task turns leasable with time alone, so the
lease reaper refreshes the gauges every round (``Leasing.expire``), not only
when a lease, completion or failure changes the queue.
"""

from __future__ import annotations

from deep3m.core.events import JOB_STATES
from deep3m.runtime import metrics as m
from deep3m.runtime.settings import WORKER_ROLES
from deep3m.scheduler.state import SchedulerState

# Labelled children looked up once: these gauges change on every lease and completion.
_QUEUE_GAUGES = {
    role: (m.TASKS_PENDING.labels(role=role), m.TASKS_LEASED.labels(role=role))
    for role in WORKER_ROLES
}


class Statistics:
    """Counts per role and the gauges; methods named ``update_…`` need the lock held."""

    def __init__(self, state: SchedulerState) -> None:
        self.state = state

    def queue_stats(self) -> dict[str, tuple[int, int]]:
        """(pending, leased) tasks per worker role; every role is listed."""
        with self.state.lock:
            counts = self.state.queue.role_counts()
        return {role: counts.get(role, (0, 0)) for role in WORKER_ROLES}

    def held_by_role(self) -> dict[str, int]:
        """Pending tasks per role held back (retry backoff, post-restart hold)."""
        with self.state.lock:
            return self.state.queue.held_by_role(self.state.clock())

    def busy_by_pod(self, role: str) -> dict[str, int]:
        """Live leases of ``role`` per worker (pod) id, for pod-deletion costs."""
        with self.state.lock:
            return self.state.queue.leases_by_worker(role)

    def update_queue(self, role: str | None = None) -> None:
        """Refresh the queue gauges (of one role, on the hot paths)."""
        queue = self.state.queue
        counts = queue.role_counts()
        held = queue.held_by_role(self.state.clock())
        for name, (pending_gauge, leased_gauge) in _QUEUE_GAUGES.items():
            if role is not None and name != role:
                continue
            pending, leased = counts.get(name, (0, 0))
            pending_gauge.set(max(0, pending - held.get(name, 0)))
            leased_gauge.set(leased)

    def update_jobs(self) -> None:
        """Refresh ``deep3m_jobs{state}``, finished jobs not loaded yet included."""
        by_state = dict.fromkeys(JOB_STATES, 0)
        for job in self.state.jobs.values():
            by_state[job.state] += 1
        for entry in self.state.unloaded.values():
            state = str(entry.get("state", ""))
            if state in by_state:
                by_state[state] += 1
        for state, n in by_state.items():
            m.JOBS.labels(state=state).set(n)
