"""The generated gRPC code matches the .proto files (run `make protos` when not)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from deep3m import protos_build


def test_generated_code_is_up_to_date() -> None:
    stale = protos_build.stale_files()
    assert stale == [], f"run `make protos`: out of date: {stale}"


def test_check_command_exits_zero_when_up_to_date() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "deep3m.protos_build", "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture
def generated_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "v1"
    shutil.copytree(protos_build.GENERATED_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def test_a_changed_file_is_reported(generated_copy: Path) -> None:
    target = generated_copy / "postprocess_pb2.py"
    target.write_text(target.read_text() + "\n# edited by hand\n")
    assert protos_build.stale_files(generated_copy) == ["postprocess_pb2.py"]


def test_a_missing_file_is_reported_not_raised(generated_copy: Path) -> None:
    (generated_copy / "tiling_pb2_grpc.py").unlink()
    assert protos_build.stale_files(generated_copy) == ["tiling_pb2_grpc.py"]


def test_a_leftover_file_from_a_removed_proto_is_reported(generated_copy: Path) -> None:
    (generated_copy / "retired_pb2.py").write_text("# from a proto that is gone\n")
    assert protos_build.stale_files(generated_copy) == ["retired_pb2.py"]


def test_a_missing_output_folder_reports_everything(tmp_path: Path) -> None:
    stale = protos_build.stale_files(tmp_path / "absent")
    assert "common_pb2.py" in stale and "scheduler_pb2_grpc.py" in stale


def test_a_changed_proto_is_detected(tmp_path: Path, generated_copy: Path) -> None:
    protos = tmp_path / "protos"
    shutil.copytree(protos_build.PROTO_ROOT, protos)
    proto = protos / "deep3m" / "v1" / "postprocess.proto"
    proto.write_text(proto.read_text() + "\nmessage AddedLater { string note = 1; }\n")
    stale = protos_build.stale_files(generated_copy, protos)
    assert "postprocess_pb2.py" in stale
    assert "scheduler_pb2.py" not in stale


def test_main_reports_stale_files(
    monkeypatch: pytest.MonkeyPatch, generated_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (generated_copy / "common_pb2.pyi").unlink()
    monkeypatch.setattr(protos_build, "GENERATED_DIR", generated_copy)
    assert protos_build.main(["--check"]) == 1
    assert "common_pb2.pyi" in capsys.readouterr().out
