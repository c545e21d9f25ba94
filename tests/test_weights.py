"""Weight resolution, offline: local paths, a local HTTP server on 127.0.0.1, a hand-built hub cache."""

from __future__ import annotations

import hashlib
import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from expert_zoo.registry import ExpertUnavailable
from label_pipeline.core.weights import (
    WeightsUnavailable,
    file_sha256,
    parse_hf_source,
    resolve_weights,
    url_cache_path,
)

PAYLOAD = b"fake checkpoint bytes " * 1000
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


@pytest.fixture(autouse=True)
def _online_by_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # conftest sets HF_HUB_OFFLINE=1; the HTTP tests only talk to 127.0.0.1 and opt in to "online" here.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("LABEL_PIPELINE_OFFLINE", raising=False)
    monkeypatch.delenv("LABEL_PIPELINE_CACHE", raising=False)
    # The hub tests below lay out the private cache of earlier versions (``cache_dir/hf``); an empty
    # standard hub cache keeps whatever this machine holds out of them (tests/test_weights_cache.py
    # covers the standard one).
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_hf_hub_cache"))


@pytest.fixture
def weights_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.pth"
    path.write_bytes(PAYLOAD)
    return path


class _Handler(http.server.BaseHTTPRequestHandler):
    requests: ClassVar[list[str]] = []  # replaced per server

    def do_GET(self) -> None:  # http.server's naming
        self.requests.append(self.path)
        if self.path.startswith("/short/"):
            # Promise the full length, send half, close: what a dropped connection looks like.
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD[: len(PAYLOAD) // 2])
            self.close_connection = True
            return
        if self.path.startswith("/missing/"):
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        self.wfile.write(PAYLOAD)

    def log_message(self, *args: object) -> None:  # keep test output quiet
        pass


@pytest.fixture
def server() -> Iterator[tuple[str, list[str]]]:
    """A threaded HTTP server on an ephemeral 127.0.0.1 port; yields (base URL, list of request paths)."""
    requests: list[str] = []
    handler = type("Handler", (_Handler,), {"requests": requests})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", requests
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_local_file_and_file_url(weights_file: Path) -> None:
    assert resolve_weights(str(weights_file), expert="depth") == weights_file
    assert resolve_weights(weights_file.as_uri(), expert="depth") == weights_file


def test_local_directory_returned_as_is(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert resolve_weights(str(tmp_path), expert="obj_detection") == tmp_path


def test_missing_local_path_is_actionable(tmp_path: Path) -> None:
    with pytest.raises(WeightsUnavailable, match="make weights EXPERTS=depth") as info:
        resolve_weights(str(tmp_path / "nope.pth"), expert="depth")
    assert isinstance(info.value, ExpertUnavailable)
    assert "nope.pth" in str(info.value)


def test_sha256_match_and_mismatch(weights_file: Path) -> None:
    assert file_sha256(weights_file) == PAYLOAD_SHA
    assert resolve_weights(str(weights_file), expert="depth", sha256=PAYLOAD_SHA.upper()) == weights_file
    wrong = "0" * 64
    with pytest.raises(WeightsUnavailable) as info:
        resolve_weights(str(weights_file), expert="depth", sha256=wrong)
    message = str(info.value)
    assert "sha256 mismatch" in message and str(weights_file) in message
    assert wrong in message and PAYLOAD_SHA in message


def test_http_download_is_cached(server: tuple[str, list[str]], tmp_path: Path) -> None:
    base, requests = server
    url = f"{base}/files/model.pth?dl=1"
    path = resolve_weights(url, expert="edge", sha256=PAYLOAD_SHA, cache_dir=tmp_path)
    assert path == url_cache_path(url, tmp_path) and path.name.endswith("-model.pth")
    assert path.read_bytes() == PAYLOAD
    assert resolve_weights(url, expert="edge", sha256=PAYLOAD_SHA, cache_dir=tmp_path) == path
    assert len(requests) == 1, "second call must come from the cache"
    assert list(path.parent.iterdir()) == [path], "no temp files left behind"


def test_cache_dir_from_env(
    server: tuple[str, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LABEL_PIPELINE_CACHE", str(tmp_path / "env_cache"))
    path = resolve_weights(f"{server[0]}/m.pth", expert="edge")
    assert path.is_relative_to(tmp_path / "env_cache")


@pytest.mark.parametrize("path", ["/short/model.pth", "/missing/model.pth", "/files/model.pth"])
def test_failed_download_leaves_nothing_in_cache(
    server: tuple[str, list[str]], tmp_path: Path, path: str
) -> None:
    url = server[0] + path
    # The good file with a wrong sha256 must be rejected before it lands in the cache, like a short body.
    with pytest.raises(WeightsUnavailable) as info:
        resolve_weights(url, expert="edge", sha256="f" * 64, cache_dir=tmp_path)
    assert url in str(info.value)
    cache = url_cache_path(url, tmp_path).parent
    assert not cache.exists() or list(cache.iterdir()) == []


@pytest.mark.parametrize("switch", ["HF_HUB_OFFLINE", "LABEL_PIPELINE_OFFLINE"])
def test_offline_url_with_empty_cache_fails_fast(
    server: tuple[str, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, switch: str
) -> None:
    monkeypatch.setenv(switch, "1")
    url = f"{server[0]}/files/model.pth"
    with pytest.raises(WeightsUnavailable) as info:
        resolve_weights(url, expert="seg_coco", cache_dir=tmp_path)
    message = str(info.value)
    assert "seg_coco" in message and url in message and "make weights EXPERTS=seg_coco" in message
    assert server[1] == [], "offline mode must not make requests"


def _fake_hub_cache(root: Path, repo_id: str, files: dict[str, bytes], commit: str = "a" * 40) -> Path:
    """Lay out ``files`` the way huggingface_hub's cache stores a snapshot; return the snapshot dir."""
    repo_dir = root / "hf" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    for name, data in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_bytes(data)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


def test_parse_hf_source() -> None:
    assert parse_hf_source("hf-hub:shikunl/prismer/expert_weights/10_model.pth") == (
        "shikunl/prismer",
        "expert_weights/10_model.pth",
        None,
    )
    assert parse_hf_source("hf-hub:org/repo@v1.0") == ("org/repo", None, "v1.0")
    with pytest.raises(ValueError):
        parse_hf_source("hf-hub:just-a-name")


def test_hf_hub_offline_from_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = _fake_hub_cache(tmp_path, "shikunl/prismer", {"expert_weights/10_model.pth": PAYLOAD})
    source = "hf-hub:shikunl/prismer/expert_weights/10_model.pth"
    path = resolve_weights(source, expert="depth", sha256=PAYLOAD_SHA, cache_dir=tmp_path)
    assert path == snapshot / "expert_weights" / "10_model.pth"
    pinned = resolve_weights(f"{source}@{'a' * 40}", expert="depth", cache_dir=tmp_path)
    assert pinned == path
    whole = resolve_weights("hf-hub:shikunl/prismer", expert="depth", cache_dir=tmp_path)
    assert whole == snapshot


@pytest.mark.parametrize("source", ["hf-hub:org/repo/weights.pth", "hf-hub:org/repo"])
def test_hf_hub_offline_empty_cache_fails_fast(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(WeightsUnavailable) as info:
        resolve_weights(source, expert="normal", cache_dir=tmp_path)
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert "normal" in message and source in message and "make weights EXPERTS=normal" in message
    assert "local path" in message and "weights" in message
