"""Weight resolution: turn an expert's ``weights`` source string into a local path.

Accepted sources:

* ``hf-hub:org/repo/path/in/repo.ext@revision`` — one file from the Hugging Face Hub (revision optional);
  ``hf-hub:org/repo[@revision]`` — the whole repo snapshot directory (e.g. a transformers model).
* a local file or directory path, or a ``file://`` URL — returned as is.
* an ``http(s)://`` URL — downloaded once into the cache, atomically.

Hub files live in the standard Hugging Face cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
``~/.cache/huggingface/hub``), in the hub's own layout, so files fetched with ``hf download`` /
``huggingface-cli download``, transformers or any other Hugging Face tool are found, and the other way
round. A file already in that cache is used without asking the Hub. Files that earlier versions put
in the private cache (``$LABEL_PIPELINE_CACHE/hf``) are still found there. URL downloads go to
``url/`` under the cache dir (argument, else ``$LABEL_PIPELINE_CACHE``, else ``~/.cache/label_pipeline``).
With ``HF_HUB_OFFLINE=1`` or ``LABEL_PIPELINE_OFFLINE=1`` nothing touches the network: only the caches.

:func:`fetch_weights` resolves every source of a run before any expert loads, so all that is missing is
reported at once (:class:`MissingWeights`), with one command that fetches it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from label_pipeline.core.errors import ExpertUnavailable

logger = logging.getLogger(__name__)

HF_PREFIX = "hf-hub:"
_CHUNK = 1 << 20
_HTTP_TIMEOUT_S = 60
_TRUE = {"1", "on", "yes", "true"}
_OFFLINE_SWITCHES = ("HF_HUB_OFFLINE", "LABEL_PIPELINE_OFFLINE")


class WeightsUnavailable(ExpertUnavailable):
    """An expert's weights cannot be found or fetched; the message says how to get them.

    ``hint`` replaces the default advice (``make weights``), e.g. offline, where that would fail the same way.
    ``target`` says where a file copied by hand must go for this source to be found (offline misses).
    """

    def __init__(
        self, expert: str, source: str, reason: str, hint: str | None = None, target: str | None = None
    ) -> None:
        if hint is None:
            hint = f"fetch them with: make weights EXPERTS={expert}"
            if source.startswith(HF_PREFIX):
                hint += f"; or {_MANUAL_HINT}"
        super().__init__(f"weights for expert {expert!r} unavailable from {source!r}: {reason}; {hint}")
        self.expert, self.source, self.reason, self.hint, self.target = expert, source, reason, hint, target

    def __reduce__(self) -> tuple[type, tuple[str, str, str, str, str | None]]:
        # Rebuilt from its fields when it crosses a process boundary (a Ray actor that failed to load).
        return (type(self), (self.expert, self.source, self.reason, self.hint, self.target))


class WeightsUnreadable(ExpertUnavailable):
    """Weights were found but cannot be loaded (truncated, garbage, wrong keys or shapes): one line naming
    the expert, the file and what to do, instead of the loader's traceback."""

    def __init__(self, expert: str, path: str | Path, reason: str) -> None:
        hint = _repair_hint(expert, Path(path))
        super().__init__(f"expert {expert!r}: cannot load weights from {path}: {reason}; {hint}")
        self.expert, self.path, self.reason = expert, Path(path), reason

    def __reduce__(self) -> tuple[type, tuple[str, Path, str]]:
        return (type(self), (self.expert, self.path, self.reason))


_MANUAL_HINT = (
    "download the file manually and pass its local path as the expert's `weights` option in the manifest"
)
_MAX_REASON = 300
_SENTENCE_END = re.compile(r"\.\s+(?=[A-Z])")  # not "e.g. x"


@contextlib.contextmanager
def loading_weights(expert: str, path: str | Path) -> Iterator[None]:
    """Run an expert's weight loading; any failure becomes one :class:`WeightsUnreadable` naming ``path``.

    Broken files fail in many library-specific ways (``UnpicklingError``, ``RuntimeError`` from the zip
    reader or a strict ``load_state_dict``, ``KeyError``/``IndexError`` while reading shapes, safetensors'
    own errors, ``OSError``), so everything but an already-actionable :class:`ExpertUnavailable` is
    wrapped; the original traceback stays chained and is logged at debug level.
    """
    try:
        yield
    except ExpertUnavailable:
        raise
    except Exception as exc:
        logger.debug("loading weights for %s from %s failed", expert, path, exc_info=True)
        raise WeightsUnreadable(expert, path, load_error_reason(exc)) from exc


def load_error_reason(exc: BaseException) -> str:
    """One short line saying why loading failed: the exception's type and the gist of its message."""
    text = " ".join(str(exc).split())
    if text.startswith("Weights only load failed") or "WeightsUnpickler error:" in text:
        # torch's message suggests ``weights_only=False``, i.e. running the file's code: keep only the cause.
        cause = text
        for lead in ("from a trusted source.", "WeightsUnpickler error:"):
            cause = cause.split(lead, 1)[-1]
        cause = _SENTENCE_END.split(cause.split(" Check the documentation")[0], maxsplit=1)[0]
        text = f"not a plain tensor file ({cause.strip().rstrip('.')})"
    elif text.startswith("Error(s) in loading state_dict"):
        text = _state_dict_mismatch(text)
    elif len(text) > _MAX_REASON // 2 and (end := _SENTENCE_END.search(text, 20)):
        text = text[: end.start()]  # the first sentence: the rest is usually generic advice
    if len(text) > _MAX_REASON:
        text = text[: _MAX_REASON - 1] + "…"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _state_dict_mismatch(text: str) -> str:
    """torch's strict ``load_state_dict`` error (every key listed) → counts with one example each."""
    parts = []
    for label, heading in (("missing", "Missing key(s)"), ("unexpected", "Unexpected key(s)")):
        found = re.search(re.escape(heading) + r' in state_dict: ((?:"[^"]*"(?:, )?)+)', text)
        if found:
            keys = re.findall(r'"([^"]*)"', found.group(1))
            parts.append(f"{len(keys)} {label} keys (e.g. {keys[0]})")
    shapes = re.findall(
        r"size mismatch for ([^:]+): copying a param with shape torch\.Size\((\[[^\]]*\])", text
    )
    if shapes:
        parts.append(f"{len(shapes)} wrong shapes (e.g. {shapes[0][0]}: {shapes[0][1]} in the file)")
    return "strict load_state_dict failed: " + ", ".join(parts) if parts else text


def _repair_hint(expert: str, path: Path) -> str:
    """What to do about an unreadable file: refetch it when it is a cached download, else replace it."""
    resolved = path.resolve()
    roots = (cache_root().resolve(), hub_cache_dir().resolve())
    if not any(resolved.is_relative_to(root) for root in roots):
        return "replace it, or point the expert's `weights` option at a good file"
    # The hub cache keeps blobs under the repo folder and reuses them; only removing that folder refetches.
    repo = next((p for p in resolved.parents if p.name.startswith("models--")), None)
    doomed = repo or resolved
    return (
        f"delete {doomed} and run `make weights EXPERTS={expert}`, "
        "or point the expert's `weights` option at a good file"
    )


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks so large checkpoints don't fill memory."""
    digest = hashlib.sha256()
    for chunk in _file_chunks(path):
        digest.update(chunk)
    return digest.hexdigest()


def _file_chunks(path: str | Path) -> Iterator[bytes]:
    with open(path, "rb") as f:  # open() follows the hub cache's symlinks to their blobs
        while chunk := f.read(_CHUNK):
            yield chunk


# Files that decide what a model directory computes: its config, tokenizer and weights. READMEs,
# ``.gitattributes`` and weights in other frameworks (``tf_model.h5``, ``flax_model.msgpack``) do not.
_CONFIG_SUFFIXES = (".json", ".txt", ".model")


def weight_files(model_dir: Path) -> list[Path]:
    """The weight files ``from_pretrained`` loads: safetensors when present, else PyTorch ``.bin``."""
    for pattern in ("*.safetensors", "*.bin"):
        found = sorted(model_dir.glob(pattern))
        if found:
            return found
    raise FileNotFoundError(f"no *.safetensors or *.bin weights in {model_dir}")


def model_dir_digest(model_dir: Path) -> str:
    """sha256 over the names and contents of the config, tokenizer and weight files of a model dir."""
    files = sorted(p for p in model_dir.iterdir() if p.is_file() and p.suffix in _CONFIG_SUFFIXES)
    files += weight_files(model_dir)
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        for chunk in _file_chunks(path):
            digest.update(chunk)
    return digest.hexdigest()


def weights_digest(path: Path) -> str:
    """The identity of resolved weights, for the fingerprint: a file's sha256, or a model directory's."""
    return model_dir_digest(path) if path.is_dir() else file_sha256(path)


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The cache of URL downloads (``url/``; ``hf/`` holds hub files of earlier versions): argument, else
    ``$LABEL_PIPELINE_CACHE``, else ``~/.cache/label_pipeline``."""
    if cache_dir is None:
        cache_dir = os.environ.get("LABEL_PIPELINE_CACHE") or Path.home() / ".cache" / "label_pipeline"
    return Path(cache_dir).expanduser()


def hub_cache_dir() -> Path:
    """The standard Hugging Face hub cache, as huggingface_hub finds it: ``$HF_HUB_CACHE`` (or the older
    ``$HUGGINGFACE_HUB_CACHE``), else ``$HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``, else
    ``~/.cache/huggingface/hub``.

    Read at call time: huggingface_hub reads these variables once, at import, so a process (or a test)
    that sets them later would otherwise still use the old place.
    """
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expandvars(explicit)).expanduser()
    home = os.environ.get("HF_HOME")
    if not home:
        home = str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def offline_switches() -> list[str]:
    """Which of ``HF_HUB_OFFLINE`` and ``LABEL_PIPELINE_OFFLINE`` are set; read at call time."""
    return [k for k in _OFFLINE_SWITCHES if os.environ.get(k, "").strip().lower() in _TRUE]


def is_offline() -> bool:
    """True when either offline switch is set; read at call time so tests and CLIs can flip it."""
    return bool(offline_switches())


def _offline_failure(expert: str, source: str, copy_to: str) -> WeightsUnavailable:
    """Missing from the cache while offline: ``make weights`` alone would fail the same way, so the hint
    says to go online for it, or where to put the file by hand."""
    switches = offline_switches()
    reason = f"offline mode ({', '.join(f'{k}=1' for k in switches)}) and not in the cache"
    hint = (
        f"unset {' and '.join(switches)} and run `make weights EXPERTS={expert}`, "
        f"or copy {copy_to}, or {_MANUAL_HINT}"
    )
    return WeightsUnavailable(expert, source, reason, hint=hint, target=copy_to)


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
    """A hub file (or snapshot directory): from the standard hub cache, else from the private cache of
    earlier versions (``root/hf``), else (online) downloaded into the standard hub cache."""
    try:
        repo_id, filename, revision = parse_hf_source(source)
    except ValueError as exc:
        raise WeightsUnavailable(expert, source, str(exc)) from exc
    hub = hub_cache_dir()
    # A file already on disk is used as is: no request per expert replica, and it works offline.
    # Online, a snapshot that lacks its model files is completed; offline it is the best there is
    # (the loader then names what is missing).
    cached = _find_in_hub_caches(repo_id, filename, revision, root, complete=not is_offline())
    if cached is not None:
        return cached
    if is_offline():
        target = _hub_cache_target(hub, repo_id, filename, revision)
        raise _offline_failure(expert, source, target)
    logger.info("fetching %s from the Hugging Face Hub into %s", source, hub)
    found = _hub_lookup(repo_id, filename, revision, hub, local_only=False)
    if isinstance(found, Path):
        return found
    raise WeightsUnavailable(expert, source, f"download failed ({found})") from found


def _find_in_hub_caches(
    repo_id: str, filename: str | None, revision: str | None, root: Path, complete: bool = True
) -> Path | None:
    """The file (or snapshot directory) from the standard hub cache, else from the private one that
    earlier versions filled (``root/hf``), without network; None when neither holds it. ``complete``:
    a snapshot directory counts only when it holds a model (config and weights)."""
    for cache in (hub_cache_dir(), root / "hf"):
        if cache.is_dir():
            found = _hub_lookup(repo_id, filename, revision, cache, local_only=True)
            if isinstance(found, Path) and (filename is not None or not complete or _holds_a_model(found)):
                return found
    return None


def _holds_a_model(folder: Path) -> bool:
    """Whether a cached snapshot has a config and weights: another tool may have fetched only some of a
    repo's files (``hf download org/repo config.json``), and online the rest must still be fetched."""
    try:
        weight_files(folder)
    except FileNotFoundError:
        return False
    return (folder / "config.json").is_file()


def _hub_lookup(
    repo_id: str, filename: str | None, revision: str | None, cache: Path, local_only: bool
) -> Path | Exception:
    """The path huggingface_hub gives for a file (or, with no ``filename``, a snapshot directory) in the
    hub cache at ``cache``, or the error it raised."""
    # Imported here so that local-path users never pay for (or need) huggingface_hub.
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError

    # local_files_only is passed explicitly: huggingface_hub reads HF_HUB_OFFLINE only once, at import.
    try:
        if filename is None:
            # A model directory for transformers: config, tokenizer and PyTorch weights only
            # (hub repos often also hold TF / Flax / ONNX copies of the same weights).
            folder = huggingface_hub.snapshot_download(
                repo_id,
                allow_patterns=SNAPSHOT_PATTERNS,
                revision=revision,
                cache_dir=cache,
                local_files_only=local_only,
            )
            return Path(folder)
        path = huggingface_hub.hf_hub_download(
            repo_id, filename, revision=revision, cache_dir=cache, local_files_only=local_only
        )
        return Path(path)
    except (OSError, EntryNotFoundError, HFValidationError) as exc:
        return exc


def _hub_cache_target(hub: Path, repo_id: str, filename: str | None, revision: str | None) -> str:
    """Where a file (or, with no ``filename``, a model directory) must go for an offline hub lookup."""
    repo_dir = hub / f"models--{repo_id.replace('/', '--')}"
    what = "the file" if filename else "the model directory's files"
    if revision and len(revision) == 40 and all(c in "0123456789abcdef" for c in revision.lower()):
        return f"{what} to {repo_dir / 'snapshots' / revision / (filename or '')}"
    # Any snapshot name works once the ref names it: the hub cache does not check it is a commit hash.
    ref = repo_dir / "refs" / (revision or "main")
    return f"{what} to {repo_dir / 'snapshots' / 'local' / (filename or '')} and write 'local' into {ref}"


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
        raise _offline_failure(expert, url, f"the file to {target}")
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


# -- every expert's weights, before any expert loads ----------------------------------------------
@dataclass(frozen=True)
class WeightSource:
    """A file or model directory an expert loads, named before anything is loaded.

    ``default``: the expert's own default source, i.e. what ``make weights EXPERTS=<expert>`` fetches
    (a source set in the manifest is not).
    """

    expert: str  # task:backend
    source: str
    sha256: str | None = None
    default: bool = True


def find_cached(source: str, cache_dir: str | Path | None = None) -> Path | None:
    """Where ``source`` already is on this machine (a cache or a local path), or None; no network and
    no hashing, so it is cheap enough for ``label-pipeline experts``."""
    root = cache_root(cache_dir)
    if source.startswith(HF_PREFIX):
        try:
            repo_id, filename, revision = parse_hf_source(source)
        except ValueError:
            return None
        return _find_in_hub_caches(repo_id, filename, revision, root)
    if source.startswith(("http://", "https://")):
        target = url_cache_path(source, root)
        return target if target.is_file() else None
    try:
        return _resolve_local(source, expert="")
    except WeightsUnavailable:
        return None


def fetch_weights(
    sources: Sequence[WeightSource], cache_dir: str | Path | None = None
) -> list[tuple[WeightSource, WeightsUnavailable]]:
    """Make every source available on this machine, fetching what is missing (unless offline), and
    return each one that failed with its error, in order; one failure does not stop the others.

    A source already on disk is only located here: its sha256 is checked once, when the expert loads it.
    """
    failures = []
    for item in dict.fromkeys(sources):  # several experts can share a file: fetched once
        if find_cached(item.source, cache_dir) is not None:
            continue
        try:
            resolve_weights(item.source, expert=item.expert, sha256=item.sha256, cache_dir=cache_dir)
        except WeightsUnavailable as exc:
            failures.append((item, exc))
    return failures


def require_weights(sources: Sequence[WeightSource], cache_dir: str | Path | None = None) -> None:
    """:func:`fetch_weights`, raising one :class:`MissingWeights` that names every failure."""
    failures = fetch_weights(sources, cache_dir)
    if failures:
        raise MissingWeights(failures)


class MissingWeights(ExpertUnavailable):
    """The weights of one or more experts cannot be had: one message listing each expert and source, and
    one command that fetches them all (or, offline, what to do instead)."""

    def __init__(self, failures: Sequence[tuple[WeightSource, WeightsUnavailable]]) -> None:
        self.failures = list(failures)
        super().__init__(missing_weights_message(self.failures))

    def __reduce__(self) -> tuple[type, tuple[list[tuple[WeightSource, WeightsUnavailable]]]]:
        return (type(self), (self.failures,))


def missing_weights_message(failures: Sequence[tuple[WeightSource, WeightsUnavailable]]) -> str:
    """Lines: a heading, one line per missing source (expert, source, why, and offline where to copy it),
    then one ``make weights`` command for the experts' default sources."""
    experts = list(dict.fromkeys(item.expert for item, _ in failures))
    lines = [f"weights missing for {len(experts)} expert(s): {', '.join(experts)} (nothing was loaded)"]
    for item, error in failures:
        why = f"not in the cache (to place it by hand, copy {error.target})" if error.target else error.reason
        if not item.default and item.source.startswith(HF_PREFIX) and not error.target:
            why += f"; fetch it with `{_hf_download_command(item.source)}`"
        lines.append(f"  {item.expert}: {item.source}: {why}")
    fetchable = list(dict.fromkeys(item.expert for item, _ in failures if item.default))
    command = f"make weights EXPERTS={','.join(fetchable)}" if fetchable else None
    switches = offline_switches()
    if switches:
        unset = " and ".join(switches)
        fix = f"unset {unset} and run `{command}`" if command else f"unset {unset} and run again"
        lines.append(
            f"{', '.join(f'{k}=1' for k in switches)} is set, so nothing can be fetched: {fix}; "
            f"or run that where there is network and copy the Hugging Face cache to {hub_cache_dir()}"
        )
    elif command:
        lines.append(f"fetch them all with: {command}")
    if any(not item.default for item, _ in failures):
        lines.append("`make weights` fetches default sources only: fix or fetch the manifest's as above")
    return "\n".join(lines)


def _hf_download_command(source: str) -> str:
    """The Hugging Face CLI command that puts ``source`` into the hub cache (``huggingface-cli download``
    before huggingface_hub 1.0)."""
    repo_id, filename, revision = parse_hf_source(source)
    parts = ["hf download", repo_id, *([filename] if filename else [])]
    return " ".join(parts + ([f"--revision {revision}"] if revision else []))
