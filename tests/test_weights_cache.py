"""Weights through the standard Hugging Face cache, every missing weight in one message, the experts
table, and the data checked before any weight: all offline, on files laid out in temp directories."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest
from builders import photo_samples, write_manifest, write_wds

from expert_zoo.registry import builtin_names
from label_pipeline.cli import main
from label_pipeline.core.weights import (
    MissingWeights,
    WeightSource,
    find_cached,
    hub_cache_dir,
    require_weights,
    resolve_weights,
)

EDGE_SOURCE = "hf-hub:shikunl/prismer/expert_weights/10_model.pth"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _hub_file(hub: Path, repo_id: str, filename: str, data: bytes, ref: str = "main") -> Path:
    """``filename`` of ``repo_id`` laid out as huggingface_hub (and so `hf download`) leaves it:
    ``models--org--repo/snapshots/<commit>/<file>`` and ``refs/<ref>`` naming the commit."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    path = repo / "snapshots" / COMMIT / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(COMMIT)
    return path


@pytest.fixture
def caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Offline, an empty Hugging Face hub cache and an empty private cache: nothing of this machine's."""
    paths = {"hub": tmp_path / "hf_home" / "hub", "private": tmp_path / "private"}
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(paths["hub"]))
    monkeypatch.setenv("LABEL_PIPELINE_CACHE", str(paths["private"]))
    return paths


def test_file_in_the_hf_hub_cache_is_found_offline(caches: dict[str, Path]) -> None:
    """What `hf download shikunl/prismer expert_weights/10_model.pth` leaves is what the experts use."""
    path = _hub_file(caches["hub"], "shikunl/prismer", "expert_weights/10_model.pth", b"dexined")
    assert hub_cache_dir() == caches["hub"]
    assert resolve_weights(EDGE_SOURCE, expert="edge:dexined") == path
    assert resolve_weights(f"{EDGE_SOURCE}@{COMMIT}", expert="edge:dexined") == path
    assert resolve_weights("hf-hub:shikunl/prismer", expert="edge:dexined") == path.parents[1]
    assert find_cached(EDGE_SOURCE) == path
    assert not (caches["private"] / "hf").exists(), "nothing goes to the private cache"
    # huggingface_hub itself agrees on where the file is: the layout is the shared one.
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache("shikunl/prismer", "expert_weights/10_model.pth", cache_dir=caches["hub"])
    assert found is not None and Path(found) == path


def test_snapshot_without_weights_is_not_a_cached_model(caches: dict[str, Path]) -> None:
    """`hf download org/model config.json` leaves a snapshot without weights: not cached (online the rest
    is fetched); offline it is still returned, and the loader names what is missing."""
    config = _hub_file(caches["hub"], "org/model", "config.json", b"{}")
    assert find_cached("hf-hub:org/model") is None
    assert resolve_weights("hf-hub:org/model", expert="depth:dpt_hybrid") == config.parent
    _hub_file(caches["hub"], "org/model", "model.safetensors", b"weights")
    assert find_cached("hf-hub:org/model") == config.parent


def test_hf_home_without_hf_hub_cache(
    caches: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    assert hub_cache_dir() == caches["hub"]  # $HF_HOME/hub, as huggingface_hub has it
    path = _hub_file(caches["hub"], "shikunl/prismer", "expert_weights/10_model.pth", b"dexined")
    assert resolve_weights(EDGE_SOURCE, expert="edge:dexined") == path


def test_private_cache_of_earlier_versions_is_still_read(caches: dict[str, Path]) -> None:
    path = _hub_file(caches["private"] / "hf", "shikunl/prismer", "expert_weights/10_model.pth", b"old")
    assert resolve_weights(EDGE_SOURCE, expert="edge:dexined") == path


def test_offline_miss_points_into_the_hf_hub_cache(caches: dict[str, Path]) -> None:
    with pytest.raises(MissingWeights) as info:
        require_weights([WeightSource("edge:dexined", EDGE_SOURCE)])
    message = str(info.value)
    target = caches["hub"] / "models--shikunl--prismer" / "snapshots" / "local" / "expert_weights"
    assert str(target / "10_model.pth") in message
    assert "unset HF_HUB_OFFLINE and run `make weights EXPERTS=edge:dexined`" in message


def _closed_port_url(name: str) -> str:
    """A URL on 127.0.0.1 that refuses connections at once: a download that fails without network."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/{name}"


def test_every_missing_weight_is_one_message_with_one_command(
    caches: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Online, each source is tried (a failed one does not stop the others); the message names every
    expert and source, and one command fetches the default ones."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    present = tmp_path / "present.pth"
    present.write_bytes(b"weights")
    sources = [
        WeightSource("depth:dpt_hybrid", _closed_port_url("dpt.pt")),
        WeightSource("edge:dexined", str(present)),
        WeightSource("normal:nll_angmf", _closed_port_url("scannet.pt")),
        WeightSource("ocr_features:clip_pca", str(tmp_path / "no_pca.npz"), default=False),
    ]
    with pytest.raises(MissingWeights) as info:
        require_weights(sources)
    lines = str(info.value).splitlines()
    assert lines[0].startswith("weights missing for 3 expert(s): depth:dpt_hybrid, normal:nll_angmf, ocr_")
    for item in (sources[0], sources[2], sources[3]):
        assert sum(item.expert in line and item.source in line for line in lines) == 1
    assert "no such file or directory" in lines[3]
    assert not any("edge:dexined" in line for line in lines), "what is there is not reported"
    commands = [line for line in lines if "make weights" in line]
    assert commands[0] == "fetch them all with: make weights EXPERTS=depth:dpt_hybrid,normal:nll_angmf"
    assert "default sources only" in commands[1], "a manifest's own source is not fetched by make weights"
    assert [item.expert for item, _ in info.value.failures] == [
        s.expert for s in sources if s.expert != "edge:dexined"
    ]


def test_run_reports_every_missing_weight_before_loading_any(
    caches: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("transformers")
    from tiny_experts import tiny_edge

    write_wds(tmp_path / "in" / "00000.tar", photo_samples(1))
    out = tmp_path / "out"
    experts = [tiny_edge(tmp_path), "normal:nll_angmf", "depth", "obj_detection"]  # three default sources
    manifest = write_manifest(
        tmp_path / "m.yaml", {"format": "webdataset", "path": f"{tmp_path}/in/00000.tar"}, out, experts
    )
    with caplog.at_level(logging.INFO):
        assert main(["run", str(manifest), "--no-progress", "--device", "cpu"]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    message = errors[0]
    for name, source in [
        ("normal:nll_angmf", "hf-hub:shikunl/prismer/expert_weights/scannet.pt"),
        ("depth:dpt_hybrid", "hf-hub:Intel/dpt-hybrid-midas"),
        ("obj_detection:owlv2", "hf-hub:google/owlv2-base-patch16-ensemble"),
    ]:
        assert f"{name}: {source}: not in the cache" in message
    assert message.count("make weights") == 1
    assert "make weights EXPERTS=normal:nll_angmf,depth:dpt_hybrid,obj_detection:owlv2" in message
    assert not any(r.getMessage().startswith("loaded ") for r in caplog.records), "no expert was loaded"
    assert not list(out.rglob("*.tar")) and not (out / "_run.json").exists()


def test_data_is_checked_before_weights(
    caches: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A dataset that is not there is the error, not the weights it would have needed."""
    manifest = write_manifest(
        tmp_path / "m.yaml",
        {"format": "webdataset", "path": f"{tmp_path}/nowhere/{{00000..00003}}.tar"},
        tmp_path / "out",
        ["normal:nll_angmf"],
    )
    with caplog.at_level(logging.ERROR):
        assert main(["run", str(manifest), "--no-progress"]) == 2
    message = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    assert "input shards exists" in message and "weights" not in message


def test_ray_runner_checks_weights_before_starting_ray(
    caches: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A local Ray run reports the missing weights before Ray starts (its actors share this machine's
    caches)."""
    pytest.importorskip("ray")
    from label_pipeline.config import load_manifest
    from label_pipeline.run import RunOptions
    from label_pipeline.runners import ray_runner

    def refuse(*_: object) -> bool:
        raise AssertionError("Ray must not start when weights are missing")

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray_runner, "connect", refuse)
    write_wds(tmp_path / "in" / "00000.tar", photo_samples(1))
    path = write_manifest(
        tmp_path / "m.yaml",
        {"format": "webdataset", "path": f"{tmp_path}/in/00000.tar"},
        tmp_path / "out",
        ["edge:dexined", "normal:nll_angmf"],
    )
    with pytest.raises(MissingWeights) as info:
        ray_runner.run_ray(load_manifest(str(path)), RunOptions())
    assert "make weights EXPERTS=edge:dexined,normal:nll_angmf" in str(info.value)


def test_experts_table(caches: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    _hub_file(caches["hub"], "shikunl/prismer", "expert_weights/10_model.pth", b"dexined")
    assert main(["experts"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["task", "backend", "default", "weights", "cached", "licence"]
    rows = {tuple(line.split()[:2]): line.split() for line in lines[1:] if not line.startswith(" ")}
    assert rows[("edge", "dexined")][2:5] == ["yes", "yes", "yes"], "default, needs weights, cached"
    assert rows[("edge", "canny")][2:5] == ["no", "no", "-"], "not the default, no weights"
    assert rows[("normal", "nll_angmf")][2:5] == ["yes", "yes", "no"], "not cached"
    assert rows[("ocr_detection", "charnet")][2] == "yes" and rows[("ocr_detection", "ppocr")][2] == "no"
    assert "CC-BY-NC-4.0" in " ".join(rows[("ocr_detection", "charnet")])
    builtin = {tuple(name.split(":")) for name in builtin_names()}
    assert builtin <= rows.keys()
    # Other tests in the same process register test-only experts (no licence); only ours must have one.
    assert all(rows[key][-1] != "?" for key in builtin), "every built-in expert has a licence"
    assert any("ocr_features:clip_pca also needs the option(s) pca" in line for line in lines)
    assert any(str(caches["hub"]) in line for line in lines), "the table says where the hub cache is"
