"""deepseek_vl2.serving.weights: where the predictor finds its checkpoint, and what it says if it cannot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import deepseek_vl2.serving.weights as weights
from deepseek_vl2.serving import local_server
from deepseek_vl2.serving.weights import (
    WeightsNotFoundError, download_weights, is_checkpoint_dir, resolve_weights,
)  # fmt: skip

TINY_CHECKPOINT = Path(__file__).parent.parent / "fixtures" / "checkpoints" / "tiny-mla"


def _fake_checkpoint(directory: Path) -> Path:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text("{}")
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
    return directory


def test_recognises_a_checkpoint_directory(tmp_path: Path) -> None:
    assert is_checkpoint_dir(TINY_CHECKPOINT)
    assert not is_checkpoint_dir(tmp_path)


def test_explicit_directory_wins(tmp_path: Path) -> None:
    _fake_checkpoint(tmp_path / "weights" / "deepseek-vl2-small")
    env = {"DEEPSEEK_VL2_WEIGHTS": str(TINY_CHECKPOINT)}
    assert resolve_weights(env, project_root=tmp_path) == TINY_CHECKPOINT


def test_invalid_explicit_directory_is_an_error_not_a_fallback(tmp_path: Path) -> None:
    _fake_checkpoint(tmp_path / "weights" / "deepseek-vl2-small")
    env = {"DEEPSEEK_VL2_WEIGHTS": str(tmp_path / "nowhere")}
    with pytest.raises(
        WeightsNotFoundError, match="DEEPSEEK_VL2_WEIGHTS=.*nowhere is not a checkpoint"
    ):
        resolve_weights(env, project_root=tmp_path)


def test_default_variant_in_the_weights_folder(tmp_path: Path) -> None:
    local = _fake_checkpoint(tmp_path / "weights" / "deepseek-vl2-small")
    assert resolve_weights({}, project_root=tmp_path) == local


def test_variant_is_selected_by_environment(tmp_path: Path) -> None:
    _fake_checkpoint(tmp_path / "weights" / "deepseek-vl2-small")
    tiny = _fake_checkpoint(tmp_path / "weights" / "deepseek-vl2-tiny")
    env = {"DEEPSEEK_VL2_VARIANT": "deepseek-vl2-tiny"}
    assert resolve_weights(env, project_root=tmp_path) == tiny


def test_offline_without_weights_fails_fast_and_explains(tmp_path: Path) -> None:
    with pytest.raises(WeightsNotFoundError) as error:
        resolve_weights({"HF_HUB_OFFLINE": "1"}, project_root=tmp_path)
    message = str(error.value)
    assert "HF_HUB_OFFLINE" in message
    assert str(tmp_path / "weights" / "deepseek-vl2-small") in message  # where it looked
    assert "scripts/download_weights.py --variant deepseek-vl2-small" in message  # how to fix
    assert "DEEPSEEK_VL2_WEIGHTS" in message


def test_missing_weights_trigger_a_download_into_the_weights_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def fake_snapshot_download(repo_id: str, *, local_dir: Path, **options: object) -> str:
        calls.append((repo_id, Path(local_dir), options))
        _fake_checkpoint(Path(local_dir))
        return str(local_dir)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    env = {"DEEPSEEK_VL2_VARIANT": "deepseek-vl2-tiny"}
    result = resolve_weights(env, project_root=tmp_path)
    assert result == tmp_path / "weights" / "deepseek-vl2-tiny"
    [(repo_id, local_dir, options)] = calls
    assert repo_id == "deepseek-ai/deepseek-vl2-tiny"
    assert local_dir == result
    assert options["etag_timeout"] == weights.HUB_METADATA_TIMEOUT_S


def test_failed_download_says_where_it_looked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreachable_hub(repo_id: str, **options: object) -> str:
        raise OSError("Name or service not known")

    monkeypatch.setattr("huggingface_hub.snapshot_download", unreachable_hub)
    with pytest.raises(WeightsNotFoundError) as error:
        resolve_weights({}, project_root=tmp_path)
    message = str(error.value)
    assert "Name or service not known" in message
    assert "deepseek-ai/deepseek-vl2-small" in message
    assert str(tmp_path / "weights" / "deepseek-vl2-small") in message


def test_incomplete_download_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda repo_id, **options: "")
    with pytest.raises(WeightsNotFoundError, match="incomplete"):
        download_weights("deepseek-vl2-tiny", tmp_path / "out")


def test_unknown_variant_is_not_downloaded(tmp_path: Path) -> None:
    with pytest.raises(WeightsNotFoundError, match="unknown variant 'deepseek-vl3'"):
        download_weights("deepseek-vl3", tmp_path)


def test_the_default_folders_are_the_projects():
    # Both modules find the project from their own place in the package: the folder that holds
    # predict.py, where weights/<variant> and the server's working directory are.
    for root in (weights.PROJECT_ROOT, local_server.PROJECT_ROOT):
        assert (root / "predict.py").is_file() and (root / "weights").is_dir(), root
