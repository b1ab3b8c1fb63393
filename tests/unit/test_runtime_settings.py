"""Settings from DEEP3M_* environment variables."""

from __future__ import annotations

import logging

import pytest
from deep3m.core.errors import InvalidArgumentError
from deep3m.runtime.settings import (
    Settings,
    SettingsError,
    env_var,
    unknown_env_vars,
    warn_unknown_env_vars,
)

pytestmark = pytest.mark.usefixtures("clean_env")


def test_defaults_without_environment() -> None:
    s = Settings()
    assert s.store_url == "file://./deep3m-data"
    assert s.port_for("postprocess") == 50055
    assert s.worker_enabled is True


def test_environment_sets_strings_ints_floats_and_bools(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEP3M_STORE_URL", "s3://bucket/prefix")
    monkeypatch.setenv("DEEP3M_GRPC_PORT", "6000")
    monkeypatch.setenv("DEEP3M_RPC_TIMEOUT_SECONDS", "2.5")
    monkeypatch.setenv("DEEP3M_WORKER_ENABLED", "false")
    monkeypatch.setenv("DEEP3M_AUTOSCALE_ENABLED", "1")
    s = Settings()
    assert s.store_url == "s3://bucket/prefix"
    assert s.grpc_port == 6000 and s.port_for("scheduler") == 6000
    assert s.rpc_timeout_seconds == 2.5
    assert s.worker_enabled is False
    assert s.autoscale_enabled is True


def test_variable_names_are_case_insensitive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("deep3m_log_level", "debug")
    assert Settings().log_level == "DEBUG"


def test_an_empty_variable_means_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEP3M_GRPC_PORT", "")
    monkeypatch.setenv("DEEP3M_WORKER_ENABLED", "")
    s = Settings()
    assert s.grpc_port == 0
    assert s.worker_enabled is True


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("DEEP3M_GRPC_PORT", "fifty", "valid integer"),
        ("DEEP3M_GRPC_PORT", "70000", "less than or equal to 65535"),
        ("DEEP3M_WORKER_ENABLED", "maybe", "valid boolean"),
        ("DEEP3M_LEASE_SECONDS", "0", "greater than 0"),
        ("DEEP3M_LOG_FORMAT", "xml", "json"),
        ("DEEP3M_LOG_LEVEL", "loud", "DEBUG"),
        ("DEEP3M_STORE_URL", "gs://bucket", "unsupported store URL scheme 'gs'"),
    ],
)
def test_a_bad_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as caught:
        Settings()
    err = caught.value
    assert isinstance(err, InvalidArgumentError)
    assert err.field == name
    assert name in err.message and repr(value) in err.message
    assert expected in err.message


def test_several_bad_values_are_all_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEP3M_GRPC_PORT", "x")
    monkeypatch.setenv("DEEP3M_BATCH_SIZE", "0")
    with pytest.raises(SettingsError) as caught:
        Settings()
    assert "DEEP3M_GRPC_PORT" in caught.value.message
    assert "DEEP3M_BATCH_SIZE" in caught.value.message


def test_secrets_are_not_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings(s3_secret_access_key=123)  # type: ignore[arg-type]
    assert "123" not in caught.value.message
    assert caught.value.field == "s3_secret_access_key"


def test_unknown_variables_are_ignored_not_fatal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEP3M_STORE_ULR", "file:///typo")
    monkeypatch.setenv("DEEP3M_TEST_S3", "1")  # another tool's variable
    assert Settings().store_url == "file://./deep3m-data"
    assert unknown_env_vars() == ["DEEP3M_STORE_ULR", "DEEP3M_TEST_S3"]


def test_unknown_variables_are_logged_as_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="deep3m.test"):
        warn_unknown_env_vars(
            logging.getLogger("deep3m.test"),
            {"DEEP3M_GRPC_PORT": "1", "DEEP3M_GRCP_PORT": "2", "HOME": "/"},
        )
    assert [r.getMessage() for r in caplog.records] == [
        "ignoring unknown settings variables: DEEP3M_GRCP_PORT"
    ]


def test_unknown_keyword_is_refused() -> None:
    with pytest.raises(SettingsError) as caught:
        Settings(stor_url="file:///x")  # type: ignore[call-arg]
    assert caught.value.field == "stor_url"
    assert "not a setting" in caught.value.message


def test_a_bad_keyword_is_named_as_the_field() -> None:
    with pytest.raises(SettingsError) as caught:
        Settings(grpc_port=-1)
    assert caught.value.field == "grpc_port"


def test_settings_are_immutable() -> None:
    s = Settings()
    with pytest.raises(ValueError, match="frozen"):
        s.grpc_port = 1  # type: ignore[misc]


def test_env_var_names() -> None:
    assert env_var("store_url") == "DEEP3M_STORE_URL"


def test_storage_options_empty_means_the_aws_chain() -> None:
    assert Settings().storage_options() == {}


def test_storage_options_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEP3M_S3_ENDPOINT_URL", "http://127.0.0.1:8333")
    monkeypatch.setenv("DEEP3M_S3_REGION", "eu-west-1")
    monkeypatch.setenv("DEEP3M_S3_ACCESS_KEY_ID", "AKIA")
    monkeypatch.setenv("DEEP3M_S3_SECRET_ACCESS_KEY", "s3cr3t")
    assert Settings().storage_options() == {
        "key": "AKIA",
        "secret": "s3cr3t",
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:8333", "region_name": "eu-west-1"},
    }


def test_storage_options_endpoint_only() -> None:
    options = Settings(s3_endpoint_url="http://minio:9000").storage_options()
    assert options == {"client_kwargs": {"endpoint_url": "http://minio:9000"}}


def test_lists_and_role_maps_parse_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEP3M_INPUT_ROOTS", "s3://raw, s3://other/prefix,")
    monkeypatch.setenv("DEEP3M_AUTOSCALE_DEPLOYMENTS", "inference=rel-inf, training=rel-train")
    monkeypatch.setenv("DEEP3M_AUTOSCALE_MAX_REPLICAS_BY_ROLE", '{"training": 3}')
    monkeypatch.setenv("DEEP3M_AUTOSCALE_TASKS_PER_REPLICA_BY_ROLE", "inference=8")
    s = Settings()
    assert s.input_roots == ("s3://raw", "s3://other/prefix")
    assert s.autoscale_deployments == {"inference": "rel-inf", "training": "rel-train"}
    assert s.autoscale_max_replicas_by_role == {"training": 3}
    assert s.autoscale_tasks_per_replica_by_role == {"inference": 8}
    assert Settings(input_roots='["s3://a", "s3://b"]').input_roots == ("s3://a", "s3://b")


@pytest.mark.parametrize(
    ("variable", "value", "words"),
    [
        ("DEEP3M_AUTOSCALE_DEPLOYMENTS", "inference", "'inference' is not role=value"),
        ("DEEP3M_AUTOSCALE_DEPLOYMENTS", "gpu=x", "unknown worker role 'gpu'"),
        ("DEEP3M_AUTOSCALE_DEPLOYMENTS", "training=a,training=b", "given twice"),
        ("DEEP3M_AUTOSCALE_MAX_REPLICAS_BY_ROLE", "training=-1", "training=-1 must be >= 0"),
        ("DEEP3M_AUTOSCALE_TASKS_PER_REPLICA_BY_ROLE", "inference=x", "is not an integer"),
    ],
)
def test_bad_role_maps_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, words: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as err:
        Settings()
    assert err.value.field == variable
    assert words in err.value.message


def test_settings_with_role_maps_are_usable_as_cache_keys() -> None:
    a = Settings(autoscale_deployments="inference=x", input_roots="s3://a")
    b = Settings(autoscale_deployments={"inference": "x"}, input_roots=("s3://a",))
    assert a == b and hash(a) == hash(b) and {a: 1}[b] == 1
    assert hash(a) != hash(Settings(autoscale_deployments="inference=y"))
