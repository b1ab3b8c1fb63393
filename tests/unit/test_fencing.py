"""The scheduler fence: pure claim/check rules, and two schedulers on one store.

The two-scheduler story runs twice: on the in-memory conditional store, and
on a real S3 server (SeaweedFS, which honours ``If-None-Match``/``If-Match``
like AWS S3). The fence wired into the scheduler is tested in
``test_scheduler_fence.py`` (persistence, injected clocks) and
``tests/integration/test_two_schedulers.py`` (two scheduler processes).
"""

from __future__ import annotations

import uuid

import pytest
from deep3m.core.errors import InvalidArgumentError
from deep3m.scheduler.conditional import (
    ConditionalStore,
    ConditionFailed,
    MemoryConditionalStore,
    S3ConditionalStore,
)
from deep3m.scheduler.fencing import (
    FENCE_KEY,
    Fence,
    FencedDocuments,
    FencedError,
    FenceRecord,
    check_write,
    next_claim,
)
from deep3m.testing.clock import ManualClock
from deep3m.testing.seaweed import SeaweedServer

# -- pure rules ------------------------------------------------------------------------


def test_first_claim_is_epoch_one_and_a_takeover_raises_it() -> None:
    first = next_claim(None, "a", now=0.0, ttl_s=60.0)
    assert first == FenceRecord(1, "a", 60.0)
    assert next_claim(first, "a", now=30.0, ttl_s=60.0) == FenceRecord(1, "a", 90.0)
    assert next_claim(first, "b", now=60.0, ttl_s=60.0) == FenceRecord(2, "b", 120.0)


def test_a_live_fence_of_another_holder_is_refused() -> None:
    with pytest.raises(FencedError, match="'a' holds epoch 1") as err:
        next_claim(FenceRecord(1, "a", 60.0), "b", now=59.0, ttl_s=60.0)
    assert err.value.field == "fence"


@pytest.mark.parametrize(
    ("current", "now", "words"),
    [
        (None, 0.0, "no fence"),
        (FenceRecord(2, "b", 100.0), 0.0, "epoch 2 of 'b'"),
        (FenceRecord(1, "a", 10.0), 10.0, "lapse"),
    ],
)
def test_check_write_refuses_all_but_the_live_holder(
    current: FenceRecord | None, now: float, words: str
) -> None:
    mine = FenceRecord(1, "a", 10.0)
    with pytest.raises(FencedError, match=words):
        check_write(mine, current, now)
    check_write(mine, FenceRecord(1, "a", 10.0), 9.0)  # the holder itself may write


def test_bad_claims_are_refused() -> None:
    with pytest.raises(InvalidArgumentError):
        next_claim(None, "", now=0.0, ttl_s=1.0)
    with pytest.raises(InvalidArgumentError):
        next_claim(None, "a", now=0.0, ttl_s=0.0)


def test_memory_store_conditions() -> None:
    store = MemoryConditionalStore()
    etag = store.create("k", b"1")
    with pytest.raises(ConditionFailed):
        store.create("k", b"2")
    with pytest.raises(ConditionFailed):
        store.replace("k", b"3", "stale")
    assert store.replace("k", b"4", etag) != etag
    assert store.read("k") is not None and store.read("k")[0] == b"4"  # type: ignore[index]


# -- two schedulers on one store ---------------------------------------------------------


def two_schedulers(store: ConditionalStore) -> None:
    clock = ManualClock()
    old = Fence(store, "scheduler-old", ttl_s=60.0, clock=clock, monotonic=clock)
    new = Fence(store, "scheduler-new", ttl_s=60.0, clock=clock, monotonic=clock)
    assert old.acquire().epoch == 1
    old_docs = FencedDocuments(store, old)
    old_docs.write("scheduler/jobs/j1.json", {"state": "running"})

    # The replacement starts while the old one still holds a live fence: refused.
    with pytest.raises(FencedError, match="'scheduler-old' holds epoch 1"):
        new.acquire()

    # The old one is partitioned away and stops renewing; its lease runs out.
    clock.now += 61
    assert new.acquire().epoch == 2
    new_docs = FencedDocuments(store, new)
    new_docs.adopt(["scheduler/jobs/j1.json", "scheduler/jobs/absent.json"])
    assert new_docs.read("scheduler/jobs/j1.json") == {"state": "running", "fence_epoch": 2}

    # The old scheduler comes back and tries to write: refused at every step.
    with pytest.raises(FencedError, match="epoch 2 of 'scheduler-new'"):
        old_docs.write("scheduler/jobs/j1.json", {"state": "failed"})
    with pytest.raises(FencedError, match="fenced off"):
        old.renew()
    # Even a write that slips past the fence check (a stale read of the fence)
    # fails on the document's own etag, changed by the adoption.
    stale = FencedDocuments(store, new)
    stale._etags["scheduler/jobs/j1.json"] = old_docs._etags["scheduler/jobs/j1.json"]
    with pytest.raises(FencedError, match="another scheduler took over"):
        stale.write("scheduler/jobs/j1.json", {"state": "failed"})
    assert new_docs.read("scheduler/jobs/j1.json") == {"state": "running", "fence_epoch": 2}

    # The new holder keeps writing and renewing.
    new_docs.write("scheduler/jobs/j1.json", {"state": "done"})
    clock.now += 30
    assert new.renew().expires_at == clock.now + 60
    fence = store.read(FENCE_KEY)
    assert fence is not None and FenceRecord.from_json(fence[0]).holder == "scheduler-new"


def test_two_schedulers_in_memory() -> None:
    two_schedulers(MemoryConditionalStore())


@pytest.mark.s3
def test_two_schedulers_on_real_s3(s3_server: SeaweedServer) -> None:
    import botocore.session

    client = botocore.session.get_session().create_client(
        "s3",
        endpoint_url=s3_server.endpoint_url,
        region_name=s3_server.region,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key,
    )
    try:
        store = S3ConditionalStore(client, s3_server.bucket, f"fence-{uuid.uuid4().hex[:8]}")
        assert store.read(FENCE_KEY) is None
        two_schedulers(store)
    finally:
        client.close()


def test_a_concurrent_claim_loses_the_race() -> None:
    store = MemoryConditionalStore()
    clock = ManualClock()
    other = Fence(store, "other", clock=clock, monotonic=clock)

    class Racing(MemoryConditionalStore):
        """The shared store, where another claim lands between this one's read and write."""

        def read(self, key: str) -> tuple[bytes, str] | None:
            return store.read(key)

        def create(self, key: str, data: bytes) -> str:
            other.acquire()
            return store.create(key, data)

    with pytest.raises(FencedError, match="lost the race"):
        Fence(Racing(), "me", clock=clock, monotonic=clock).acquire()
    assert other.check().holder == "other"
