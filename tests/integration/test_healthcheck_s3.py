"""The store round trip of the chart's ``helm test``, against a real S3 server (SeaweedFS)."""

from __future__ import annotations

import os

import pytest
from deep3m.core.store import Store
from deep3m.runtime.healthcheck import PROBE_PREFIX, main, store_round_trip
from deep3m.runtime.settings import Settings
from deep3m.testing.seaweed import SeaweedServer


@pytest.mark.s3
def test_s3_round_trip(
    s3_server: SeaweedServer, s3_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(os.environ):
        if name.upper().startswith("DEEP3M_"):
            monkeypatch.delenv(name)
    for name, value in s3_server.settings_env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("DEEP3M_STORE_URL", s3_prefix)
    settings = Settings()
    assert store_round_trip(settings) > 0
    assert main(["--store"]) == 0
    assert Store(s3_prefix, s3_server.storage_options).list(PROBE_PREFIX) == []
