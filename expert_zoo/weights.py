"""Weight resolution: turn an expert's ``weights`` source string into a local path.

Accepted sources:

* ``hf-hub:org/repo/path/in/repo.ext@revision`` — one file from the Hugging Face Hub (revision optional);
  ``hf-hub:org/repo[@revision]`` — the whole repo snapshot directory (e.g. a transformers model).
* a local file or directory path, or a ``file://`` URL — returned as is.
* an ``http(s)://`` URL — downloaded once into the cache, atomically.

Everything downloaded lives under the cache dir (argument, else ``$LABEL_PIPELINE_CACHE``, else
``~/.cache/label_pipeline``): hub files in ``hf/`` (the hub's own cache layout), URLs in ``url/``.
With ``HF_HUB_OFFLINE=1`` or ``LABEL_PIPELINE_OFFLINE=1`` nothing touches the network: only the cache is used.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

from expert_zoo.registry import ExpertUnavailable

logger = logging.getLogger(__name__)

HF_PREFIX = "hf-hub:"
_CHUNK = 1 << 20
_HTTP_TIMEOUT_S = 60
_TRUE = {"1", "on", "yes", "true"}


class WeightsUnavailable(ExpertUnavailable):
    """An expert's weights cannot be found or fetched; the message says how to get them."""

    def __init__(self, expert: str, source: str, reason: str) -> None:
        hint = f"fetch them with: make weights EXPERTS={expert}"
        if source.startswith(HF_PREFIX):
            hint += (
                "; or download the file manually and pass its local path as the expert's "
                "`weights` option in the manifest"
            )
        super().__init__(f"weights for expert {expert!r} unavailable from {source!r}: {reason}; {hint}")
        self.expert, self.source, self.reason = expert, source, reason


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks so large checkpoints don't fill memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The download cache: argument, else ``$LABEL_PIPELINE_CACHE``, else ``~/.cache/label_pipeline``."""
    if cache_dir is None:
        cache_dir = os.environ.get("LABEL_PIPELINE_CACHE") or Path.home() / ".cache" / "label_pipeline"
    return Path(cache_dir).expanduser()


def is_offline() -> bool:
    """True when either offline switch is set; read at call time so tests and CLIs can flip it."""
    return any(
        os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "LABEL_PIPELINE_OFFLINE")
    )


def resolve_weights(
    source: str, *, expert: str, sha256: str | None = None, cache_dir: str | Path | None = None
) -> Path:
    """Return a local path for ``source`` (see module doc), verifying ``sha256`` for files when given."""
    root = cache_root(cache_dir)
    if source.startswith(HF_PREFIX):
        path = _resolve_hf(source, expert, root)
    elif source.startswith(("http://", "https://")):
        return _resolve_url(source, expert, root, sha256)  # verifies itself, before caching
    else:
        path = _resolve_local(source, expert)
    if sha256 and path.is_file():
        _verify(path, sha256, expert, source)
    return path


def prefetch(
    sources: Mapping[str, str],
    *,
    sha256s: Mapping[str, str] | None = None,
    cache_dir: str | Path | None = None,
) -> dict[str, Path]:
    """Resolve every ``expert -> source``; tries all, then raises one error listing any failures."""
    resolved: dict[str, Path] = {}
    failures: list[str] = []
    for expert, source in sources.items():
        try:
            resolved[expert] = resolve_weights(
                source, expert=expert, sha256=(sha256s or {}).get(expert), cache_dir=cache_dir
            )
            logger.info("weights for %s: %s", expert, resolved[expert])
        except WeightsUnavailable as exc:
            logger.error("%s", exc)
            failures.append(str(exc))
    if failures:
        raise ExpertUnavailable(
            f"{len(failures)} of {len(sources)} weight sources failed:\n" + "\n".join(failures)
        )
    return resolved


def _verify(path: Path, expected: str, expert: str, source: str, shown: Path | None = None) -> None:
    """Raise unless ``path`` hashes to ``expected``; ``shown`` is the name to report (for temp files)."""
    actual = file_sha256(path)
    if actual != expected.strip().lower():
        raise WeightsUnavailable(
            expert,
            source,
            f"sha256 mismatch for {shown or path}: expected {expected.strip().lower()}, got {actual}",
        )


def _resolve_local(source: str, expert: str) -> Path:
    if source.startswith("file://"):
        source = urllib.request.url2pathname(urllib.parse.urlparse(source).path)
    path = Path(source).expanduser()
    if not path.exists():
        raise WeightsUnavailable(expert, source, f"no such file or directory: {path}")
    return path


def parse_hf_source(source: str) -> tuple[str, str | None, str | None]:
    """``hf-hub:org/repo/a/b.pth@rev`` → (``org/repo``, ``a/b.pth`` or None, ``rev`` or None)."""
    spec = source[len(HF_PREFIX) :]
    spec, _, revision = spec.rpartition("@") if "@" in spec else (spec, "", "")
    parts = [p for p in spec.split("/") if p]
    if len(parts) < 2:
        raise ValueError(f"expected hf-hub:org/repo[/path/in/repo][@revision], got {source!r}")
    return "/".join(parts[:2]), "/".join(parts[2:]) or None, revision or None


def _resolve_hf(source: str, expert: str, root: Path) -> Path:
    # Imported here so that local-path users never pay for (or need) huggingface_hub.
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError

    try:
        repo_id, filename, revision = parse_hf_source(source)
    except ValueError as exc:
        raise WeightsUnavailable(expert, source, str(exc)) from exc
    offline = is_offline()
    # local_files_only is passed explicitly: huggingface_hub reads HF_HUB_OFFLINE only once, at import.
    kwargs = {"revision": revision, "cache_dir": root / "hf", "local_files_only": offline}
    if not offline:
        logger.info("fetching %s from the Hugging Face Hub (cached under %s)", source, root / "hf")
    try:
        if filename is None:
            # A model directory for transformers: config, tokenizer and PyTorch weights only
            # (hub repos often also hold TF / Flax / ONNX copies of the same weights).
            folder = huggingface_hub.snapshot_download(repo_id, allow_patterns=SNAPSHOT_PATTERNS, **kwargs)
            return Path(folder)
        return Path(huggingface_hub.hf_hub_download(repo_id, filename, **kwargs))
    except (OSError, EntryNotFoundError, HFValidationError) as exc:
        reason = "offline mode and not in the cache" if offline else f"download failed ({exc})"
        raise WeightsUnavailable(expert, source, reason) from exc


SNAPSHOT_PATTERNS = ["*.json", "*.safetensors", "pytorch_model*.bin", "*.txt", "*.model", "vocab.*"]


def url_cache_path(url: str, root: Path) -> Path:
    """Where a URL's download is cached: ``url/<short hash of URL>-<basename>``."""
    name = Path(urllib.parse.urlparse(url).path).name or "download"
    return root / "url" / f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{name}"


def _resolve_url(url: str, expert: str, root: Path, sha256: str | None) -> Path:
    target = url_cache_path(url, root)
    if target.is_file():
        if sha256:
            _verify(target, sha256, expert, url)
        return target
    if is_offline():
        raise WeightsUnavailable(expert, url, f"offline mode and not in the cache ({target})")
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("downloading %s -> %s", url, target)
    # Temp file in the same directory so os.replace is an atomic rename: the cache never holds a partial file.
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as tmp:
            _download_to(url, tmp)
        if sha256:
            _verify(Path(tmp_name), sha256, expert, url, shown=target)
        os.replace(tmp_name, target)
    except (OSError, ValueError) as exc:
        raise WeightsUnavailable(expert, url, f"download failed ({exc})") from exc
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    logger.info("downloaded %s (%d bytes)", target, target.stat().st_size)
    return target


def _download_to(url: str, out: BinaryIO) -> None:
    with urllib.request.urlopen(url, timeout=_HTTP_TIMEOUT_S) as response:
        expected = response.headers.get("Content-Length")
        shutil.copyfileobj(response, out, _CHUNK)
    # A connection closed early can look like a clean EOF to urllib; the length check catches it.
    if expected is not None and out.tell() != int(expected):
        raise OSError(f"incomplete download: got {out.tell()} of {expected} bytes")
