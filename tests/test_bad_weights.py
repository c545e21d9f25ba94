"""Broken weight files: every neural expert stops with one line naming the expert and the file (exit 2).

Each expert's tiny weights (``tiny_experts``) are copied and damaged four ways (truncated, random bytes,
a state dict with other keys, one tensor of the wrong shape), then loaded through the registry as a
manifest would; one damage per expert also goes through ``label-pipeline run``. The offline messages of
``label-pipeline weights`` are checked against a hand-built cache.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from builders import photo_samples, write_manifest, write_wds
from tiny_experts import TINY_EXPERTS

from expert_zoo.registry import ExpertUnavailable, build_expert
from label_pipeline.cli import main
from label_pipeline.core.weights import WeightsUnreadable, load_error_reason, resolve_weights

pytest.importorskip("transformers")

NEURAL = ("depth", "normal", "edge", "seg_coco", "obj_detection", "ocr_detection")


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Each neural expert's manifest entry, pointing at good tiny weights (built once, copied per test)."""
    root = tmp_path_factory.mktemp("good_weights")
    return {task: TINY_EXPERTS[task](root) for task in NEURAL}


def _weight_file(weights: Path) -> Path:
    """The file holding the tensors: the path itself, or a model directory's safetensors file."""
    return weights if weights.is_file() else next(weights.glob("*.safetensors"))


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def _write_state(path: Path, state: dict[str, Any]) -> None:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path), metadata={"format": "pt"})
    else:
        torch.save(state, path)


def truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def random_bytes(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).bytes(4096))


def wrong_keys(path: Path) -> None:
    _write_state(path, {"backbone.conv.weight": torch.zeros(4, 3, 3, 3), "head.bias": torch.zeros(4)})


def wrong_shape(path: Path) -> None:
    """One tensor a size larger in every dimension (the normal checkpoint nests its state under "model")."""
    top = _read_state(path)
    state = top["model"] if isinstance(top.get("model"), dict) else top
    key = max(k for k, v in state.items() if v.ndim >= 1)
    state[key] = torch.zeros([n + 1 for n in state[key].shape])
    _write_state(path, top)


DAMAGES: dict[str, Callable[[Path], None]] = {
    "truncated": truncated,
    "random_bytes": random_bytes,
    "wrong_keys": wrong_keys,
    "wrong_shape": wrong_shape,
}


def _damaged_entry(entry: dict[str, Any], damage: str, directory: Path) -> tuple[dict[str, Any], Path]:
    """A copy of ``entry``'s weights under ``directory`` with ``damage`` applied; the entry pointing at it."""
    source = Path(entry["options"]["weights"])
    copy = directory / source.name
    directory.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        shutil.copytree(source, copy)
    else:
        shutil.copy(source, copy)
    DAMAGES[damage](_weight_file(copy))
    return {**entry, "options": {**entry["options"], "weights": str(copy)}}, copy


@pytest.mark.parametrize("damage", list(DAMAGES))
@pytest.mark.parametrize("task", NEURAL)
def test_damaged_weights_name_the_expert_and_the_file(
    task: str, damage: str, tiny_weights: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    entry, copy = _damaged_entry(tiny_weights[task], damage, tmp_path)
    with pytest.raises(WeightsUnreadable) as info:
        build_expert(entry["name"], device="cpu", options=entry["options"])
    message = str(info.value)
    assert info.value.expert == entry["name"] and info.value.path == copy
    assert f"expert {entry['name']!r}" in message and f"cannot load weights from {copy}:" in message
    assert "\n" not in message and len(message) < 700, message
    # A file the manifest names is not in the download cache: the advice is to replace it, not refetch.
    assert "point the expert's `weights` option at a good file" in message


def test_good_tiny_weights_still_load(tiny_weights: dict[str, dict[str, Any]]) -> None:
    for entry in tiny_weights.values():
        assert build_expert(entry["name"], device="cpu", options=entry["options"]).weights_digest


@pytest.mark.parametrize("task", NEURAL)
def test_run_with_damaged_weights_is_one_line_and_exit_2(
    task: str,
    tiny_weights: dict[str, dict[str, Any]],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    entry, copy = _damaged_entry(tiny_weights[task], "truncated", tmp_path / "weights")
    write_wds(tmp_path / "in" / "00000.tar", photo_samples(1))
    out = tmp_path / "out"
    source = {"format": "webdataset", "path": f"{tmp_path}/in/00000.tar"}
    experts = [tiny_weights["depth"], entry] if task == "obj_detection" else [entry]  # owlv2 needs depth
    manifest = write_manifest(tmp_path / "m.yaml", source, out, experts)
    with caplog.at_level(logging.ERROR):
        assert main(["run", str(manifest), "--no-progress", "--device", "cpu"]) == 2
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is None
    assert entry["name"] in errors[0].getMessage() and str(copy) in errors[0].getMessage()
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err + caplog.text
    assert not list(out.rglob("*.tar"))


def _hub_cache_with(hub: Path, repo_id: str, filename: str, data: bytes) -> Path:
    """A huggingface_hub cache at ``hub`` holding one file of ``repo_id`` (blob + snapshot link + ref), as
    a download leaves it; returns the repo folder."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    commit = "c" * 40
    blob = repo / "blobs" / "deadbeef"
    blob.parent.mkdir(parents=True)
    blob.write_bytes(data)
    link = repo / "snapshots" / commit / filename
    link.parent.mkdir(parents=True)
    link.symlink_to(blob)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return repo


@pytest.mark.parametrize("cache", ["hf_hub_cache", "private_cache_of_earlier_versions"])
def test_corrupt_cached_download_says_what_to_delete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, cache: str
) -> None:
    """A damaged file in a download cache: delete the repo folder (the hub reuses its blobs), refetch."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("LABEL_PIPELINE_CACHE", str(tmp_path / "cache"))
    hub = tmp_path / "hub" if cache == "hf_hub_cache" else tmp_path / "cache" / "hf"
    repo = _hub_cache_with(hub, "shikunl/prismer", "expert_weights/10_model.pth", b"junk")
    with caplog.at_level(logging.ERROR):
        assert main(["weights", "--experts", "edge:dexined"]) == 2
    message = caplog.records[0].getMessage()
    assert "'edge:dexined'" in message and "10_model.pth" in message
    assert f"delete {repo} and run `make weights EXPERTS=edge:dexined`" in message


def test_weights_offline_says_how_to_get_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Offline with an empty cache, ``make weights`` would fail the same way: name the switch and the path,
    and report every expert in one message with one command."""
    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("LABEL_PIPELINE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with caplog.at_level(logging.ERROR):
        assert main(["weights", "--experts", "edge:dexined,normal:nll_angmf"]) == 2
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(messages) == 2 and "2 of 2" in messages[1]
    missing = messages[0]
    assert "unset HF_HUB_OFFLINE" in missing and "HF_HUB_OFFLINE=1" in missing
    assert missing.count("make weights") == 1
    assert "make weights EXPERTS=edge:dexined,normal:nll_angmf" in missing
    repo = hub / "models--shikunl--prismer"
    target = repo / "snapshots" / "local" / "expert_weights" / "10_model.pth"
    assert f"copy the file to {target} and write 'local' into {repo / 'refs' / 'main'}" in missing
    assert "scannet.pt" in missing
    # Following the advice works: the copied file is found offline.
    target.parent.mkdir(parents=True)
    target.write_bytes(b"weights")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("local")
    source = "hf-hub:shikunl/prismer/expert_weights/10_model.pth"
    assert resolve_weights(source, expert="edge:dexined") == target


def test_load_error_reason_is_short_and_never_suggests_unsafe_loading(tmp_path: Path) -> None:
    class Payload:
        def __reduce__(self) -> tuple[Any, tuple[str]]:
            return (print, ("code ran",))

    path = tmp_path / "evil.pth"
    torch.save(Payload(), path)
    with pytest.raises(Exception) as info:
        torch.load(path, weights_only=True)
    reason = load_error_reason(info.value)
    assert reason.startswith("UnpicklingError: not a plain tensor file") and "print" in reason
    assert "weights_only" not in reason and len(reason) < 200
    assert issubclass(WeightsUnreadable, ExpertUnavailable)


def test_weight_errors_survive_pickling() -> None:
    """A Ray actor that fails to load sends its error back pickled: it must arrive whole."""
    import pickle

    from label_pipeline.core.weights import WeightsUnavailable

    for error in (
        WeightsUnreadable("edge:dexined", "/w/10_model.pth", "RuntimeError: truncated"),
        WeightsUnavailable("edge:dexined", "hf-hub:org/repo/f.pth", "offline", hint="unset HF_HUB_OFFLINE"),
    ):
        again = pickle.loads(pickle.dumps(error))
        assert type(again) is type(error) and str(again) == str(error)
