"""``python -m label_pipeline.download DATASET``: a published URL list → WebDataset input shards.

CC3M, SBU and CC12M are published as lists of (url, caption); img2dataset fetches the images. This
module

1. converts the published file, as published, into ``<shards>/_download/urls.parquet`` (columns
   ``url``, ``caption`` [, ``user_id``]) in the file's own row order, so a key is a row number;
2. runs img2dataset on it in incremental mode: shards that have their ``NNNNN_stats.json`` are done,
   so a stopped download picks up where it stopped;
3. prints the success rate per shard from img2dataset's stats (``read_download_summary``, which
   ``label-pipeline status`` shows too).

The shard folder and the image transform come from the dataset's manifest (``source.path`` and
``source.transform``), so the manifest that labels the shards also records how they were made.
What one download did is written to ``<shards>/_download/download.json``; a rerun with a different
transform or a changed published file is refused rather than mixing two kinds of shards.

Exit codes: 0 = every shard downloaded, 1 = finished with failed shards or no image at all (rerun to
retry), 2 = usage or configuration error, 130 = interrupted (rerun to resume). See docs/DATASETS.md.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import signal
import statistics
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from label_pipeline.config import ConfigError, Manifest, load_manifest
from label_pipeline.core.entry import EXIT_FAILURES, EXIT_OK, run_command, setup_console
from label_pipeline.core.timestamps import utc_now
from label_pipeline.sources.webdataset import expand_shard_urls

logger = logging.getLogger("label_pipeline.download")

TOOL = "img2dataset"
RECORD_DIR = "_download"  # a sub-folder: img2dataset reads every *.json beside the shards as stats
RECORD_NAME = "download.json"
URL_LIST_NAME = "urls.parquet"
STATS_SUFFIX = "_stats.json"
SHARD_DIGITS = 5  # img2dataset's oom_shard_count: shards are 00000.tar, 00001.tar, …
SAMPLES_PER_SHARD = 10_000  # a power of ten, so key = zero-padded row number of the published file
BATCH_ROWS = 100_000

RESIZE_MODES = ("keep_ratio", "border", "center_crop", "keep_ratio_largest", "no")
# Our default: shorter side down to 480 (the size Prismer's experts see), aspect kept, no padding,
# never upscaled. Prismer ran img2dataset's defaults (256 px, white border padding to a square),
# which puts the padding into every label map; `--resize-mode border --image-size 256` reproduces it.
DEFAULT_TRANSFORM: dict[str, Any] = {
    "resize_mode": "keep_ratio",
    "image_size": 480,
    "resize_only_if_bigger": True,
    "encode_format": "jpg",
    "encode_quality": 95,
}
TRANSFORM_KEYS = {"tool", *DEFAULT_TRANSFORM}
# Options that change what a shard holds: a resumed download must use the same ones.
CONTENT_OPTIONS = (*DEFAULT_TRANSFORM, "number_sample_per_shard")


@dataclass(frozen=True)
class UrlList:
    """How one dataset's URL list is published."""

    name: str
    filename: str
    origin: str
    rows: int  # rows of the published file (for the shard count in the manifest)
    tsv_columns: tuple[str, str] | None  # headerless TSV column order; None = SBU's JSON
    extra_columns: tuple[str, ...] = ()


URL_LISTS: dict[str, UrlList] = {
    "cc3m": UrlList(
        "cc3m",
        "Train_GCC-training.tsv",
        "https://ai.google.com/research/ConceptualCaptions/download (training split)",
        3_318_333,
        ("caption", "url"),
    ),
    "sbu": UrlList(
        "sbu",
        "sbu-captions-all.json",
        "https://www.cs.rice.edu/~vo9/sbucaptions/sbu-captions-all.tar.gz (tar xzf it)",
        1_000_000,
        None,
        ("user_id",),
    ),
    "cc12m": UrlList(
        "cc12m",
        "cc12m.tsv",
        "https://storage.googleapis.com/conceptual_12m/cc12m.tsv",
        12_423_374,
        ("url", "caption"),
    ),
}


# --- the published file → a Parquet url list ------------------------------------------------------


@dataclass
class Conversion:
    rows: int = 0
    malformed_rows: int = 0  # kept with an empty url, so row numbers (keys) stay aligned
    replaced_utf8_rows: int = 0


def tsv_rows(
    lines: Iterable[bytes], columns: tuple[str, str], counts: Conversion
) -> Iterator[dict[str, str]]:
    """Rows of a headerless two-column TSV. No quoting: a ``"`` in a caption is just a character.

    A caption containing a tab is rejoined (the url is the field at its own end of the line); a line
    with no tab keeps its row with an empty url, which img2dataset counts as a failed download.
    """
    url_first = columns == ("url", "caption")
    for raw in lines:
        text = raw.removesuffix(b"\n").removesuffix(b"\r").decode("utf-8", errors="replace")
        counts.rows += 1
        counts.replaced_utf8_rows += "\ufffd" in text
        fields = text.split("\t")
        if len(fields) < 2:
            counts.malformed_rows += 1
            yield {"url": "", "caption": text}
        elif url_first:
            yield {"url": fields[0].strip(), "caption": "\t".join(fields[1:])}
        else:
            yield {"url": fields[-1].strip(), "caption": "\t".join(fields[:-1])}


def sbu_rows(data: Any, counts: Conversion) -> Iterator[dict[str, str]]:
    """Rows of ``sbu-captions-all.json``: parallel lists ``image_urls``, ``captions``, ``user_ids``."""
    if not isinstance(data, dict) or not isinstance(data.get("image_urls"), list):
        raise ConfigError("SBU file: expected a JSON object with lists 'image_urls', 'captions', 'user_ids'")
    urls, captions = data["image_urls"], data.get("captions")
    user_ids = data.get("user_ids") or [None] * len(urls)
    if not isinstance(captions, list) or len(captions) != len(urls) or len(user_ids) != len(urls):
        raise ConfigError("SBU file: 'image_urls', 'captions' and 'user_ids' must be lists of one length")
    for url, caption, user_id in zip(urls, captions, user_ids):
        counts.rows += 1
        yield {
            "url": str(url or "").strip(),
            "caption": "" if caption is None else str(caption),
            "user_id": "" if user_id is None else str(user_id),
        }


def write_url_list(rows: Iterable[dict[str, str]], columns: Sequence[str], target: str) -> None:
    """Rows → Parquet (all string columns), written in batches, renamed into place when complete."""
    schema = pa.schema([(name, pa.string()) for name in columns])
    fs, path = fsspec.core.url_to_fs(target)
    partial = f"{path}.partial"
    with fs.open(partial, "wb") as handle, pq.ParquetWriter(handle, schema) as writer:
        batch: list[dict[str, str]] = []
        for row in rows:
            batch.append(row)
            if len(batch) >= BATCH_ROWS:
                writer.write_table(pa.Table.from_pylist(batch, schema))
                batch = []
        if batch:
            writer.write_table(pa.Table.from_pylist(batch, schema))
    fs.mv(partial, path)


def convert_published_file(spec: UrlList, source: str, target: str) -> Conversion:
    """The published file, unchanged in order, as an img2dataset Parquet url list at ``target``."""
    counts = Conversion()
    columns = ("url", "caption", *spec.extra_columns)
    with fsspec.open(source, "rb") as handle:
        if spec.tsv_columns is None:
            rows = sbu_rows(json.load(handle), counts)
        else:
            rows = tsv_rows(handle, spec.tsv_columns, counts)
        write_url_list(rows, columns, target)
    if counts.malformed_rows:
        logger.warning(
            "%s: %d lines without a tab were kept with an empty url", source, counts.malformed_rows
        )
    if counts.replaced_utf8_rows:
        logger.warning(
            "%s: %d lines had invalid UTF-8 (replaced by U+FFFD)", source, counts.replaced_utf8_rows
        )
    return counts


def file_sha256(url: str) -> str:
    digest = hashlib.sha256()
    with fsspec.open(url, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


# --- the download record and the options -----------------------------------------------------------


@dataclass
class DownloadOptions:
    processes: int = 1
    threads: int = 64
    timeout: int = 10
    retries: int = 0
    samples_per_shard: int = SAMPLES_PER_SHARD


def tool_version() -> str:
    try:
        return f"{TOOL}=={importlib.metadata.version(TOOL)}"
    except importlib.metadata.PackageNotFoundError as exc:
        raise ConfigError(
            f"{TOOL} is not installed: pip install -e '.[download]' (or pip install {TOOL})"
        ) from exc


def resolve_transform(recorded: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest's ``source.transform`` over our defaults, then command-line overrides."""
    unknown = sorted(set(recorded) - TRANSFORM_KEYS)
    if unknown:
        raise ConfigError(f"source.transform: unknown key(s) {unknown}; allowed: {sorted(TRANSFORM_KEYS)}")
    transform = {**DEFAULT_TRANSFORM, **{k: v for k, v in recorded.items() if k != "tool"}}
    changed = {k: v for k, v in overrides.items() if v is not None and v != transform.get(k)}
    if changed and recorded:
        logger.warning(
            "downloading with %s instead of the manifest's source.transform %s: update the manifest so the "
            "labelled output records what the shards hold",
            changed,
            dict(recorded),
        )
    transform.update(changed)
    if transform["resize_mode"] not in RESIZE_MODES:
        raise ConfigError(f"source.transform.resize_mode: {transform['resize_mode']!r} not in {RESIZE_MODES}")
    if not isinstance(transform["image_size"], int) or transform["image_size"] < 1:
        raise ConfigError("source.transform.image_size: must be a positive integer")
    tool = tool_version()
    if recorded.get("tool") not in (None, tool):
        logger.warning("the manifest records %s but %s is installed", recorded["tool"], tool)
    return {"tool": tool, **transform}


def img2dataset_arguments(
    spec: UrlList, url_list: str, folder: str, transform: Mapping[str, Any], options: DownloadOptions
) -> dict[str, Any]:
    """Keyword arguments of ``img2dataset.download`` for one dataset."""
    return {
        "url_list": url_list,
        "input_format": "parquet",
        "url_col": "url",
        "caption_col": "caption",
        "save_additional_columns": list(spec.extra_columns) or None,
        "output_format": "webdataset",
        "output_folder": folder,
        "incremental_mode": "incremental",
        "number_sample_per_shard": options.samples_per_shard,
        "oom_shard_count": SHARD_DIGITS,
        "processes_count": options.processes,
        "thread_count": options.threads,
        "timeout": options.timeout,
        "retries": options.retries,
        "distributor": "multiprocessing",
        "enable_wandb": False,
        **{k: transform[k] for k in DEFAULT_TRANSFORM},
    }


def record_path(folder: str) -> str:
    return f"{folder.rstrip('/')}/{RECORD_DIR}/{RECORD_NAME}"


def read_record(folder: str) -> dict[str, Any] | None:
    fs, path = fsspec.core.url_to_fs(record_path(folder))
    if not fs.exists(path):
        return None
    with fs.open(path, "r", encoding="utf-8") as handle:
        return json.load(handle)


def write_record(folder: str, record: Mapping[str, Any]) -> None:
    fs, path = fsspec.core.url_to_fs(record_path(folder))
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(f"{path}.partial", "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=2, sort_keys=True)
    fs.mv(f"{path}.partial", path)


def check_resumable(previous: Mapping[str, Any], record: Mapping[str, Any], folder: str) -> None:
    """A rerun must read the same published file with the same content options as the first run."""
    if previous["input"]["bytes"] != record["input"]["bytes"]:
        raise ConfigError(
            f"{record['input']['file']} is not the file this download started from "
            f"({previous['input']['bytes']} bytes then, {record['input']['bytes']} now): keys would no "
            f"longer match rows. Restore it, or delete {folder} to start over"
        )
    before, now = previous.get("img2dataset", {}), record["img2dataset"]
    changed = sorted(k for k in CONTENT_OPTIONS if before.get(k) != now.get(k))
    if changed:
        details = ", ".join(f"{k}: {before.get(k)!r} then, {now.get(k)!r} now" for k in changed)
        raise ConfigError(
            f"{folder} was downloaded with other options ({details}); shards of one dataset must be made "
            f"the same way. Use the same options, or delete {folder} to start over"
        )


# --- the shard folder of a manifest ----------------------------------------------------------------


def shard_folder(manifest: Manifest) -> tuple[str, int]:
    """The one folder a webdataset manifest's shards live in, and how many shards it lists."""
    if manifest.source.format != "webdataset":
        raise ConfigError(f"manifest {manifest.name}: source.format must be webdataset to download into")
    urls = expand_shard_urls(manifest.source.required("path"))
    folders = sorted({url.rsplit("/", 1)[0] for url in urls})
    if len(folders) != 1:
        raise ConfigError(f"source.path: the shards must be in one folder to download into, got {folders}")
    return folders[0], len(urls)


# --- img2dataset's per-shard stats ----------------------------------------------------------------


@dataclass
class ShardStats:
    shard: str
    count: int
    successes: int
    failed_to_download: int
    failed_to_resize: int
    top_error: tuple[str, int] | None = None

    @property
    def rate(self) -> float:
        return self.successes / self.count if self.count else 0.0


@dataclass
class DownloadSummary:
    folder: str
    shards: list[ShardStats] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)  # a tar without stats: interrupted or running
    record: dict[str, Any] | None = None

    @property
    def expected(self) -> int | None:
        return None if self.record is None else self.record.get("shards_expected")

    @property
    def not_started(self) -> int | None:
        done = len(self.shards) + len(self.incomplete)
        return None if self.expected is None else max(self.expected - done, 0)

    @property
    def complete(self) -> bool:
        return not self.incomplete and self.not_started in (0, None)

    def total(self, name: str) -> int:
        return sum(getattr(s, name) for s in self.shards)


def _shard_stats(shard: str, stats: Mapping[str, Any]) -> ShardStats:
    errors = {k: v for k, v in (stats.get("status_dict") or {}).items() if k != "success"}
    top = max(errors.items(), key=lambda kv: (kv[1], kv[0])) if errors else None
    return ShardStats(
        shard,
        int(stats.get("count", 0)),
        int(stats.get("successes", 0)),
        int(stats.get("failed_to_download", 0)),
        int(stats.get("failed_to_resize", 0)),
        top,
    )


def read_download_summary(folder: str) -> DownloadSummary | None:
    """img2dataset's stats in a shard folder; None when it holds neither stats nor a download record."""
    fs, path = fsspec.core.url_to_fs(folder)
    if not fs.isdir(path):
        return None
    names = sorted(name.rstrip("/").rsplit("/", 1)[-1] for name in fs.ls(path, detail=False))
    stats_ids = [n[: -len(STATS_SUFFIX)] for n in names if n.endswith(STATS_SUFFIX)]
    record = read_record(folder)
    if not stats_ids and record is None:
        return None
    summary = DownloadSummary(folder, record=record)
    paths = [f"{path}/{shard}{STATS_SUFFIX}" for shard in stats_ids]
    contents = fs.cat(paths) if paths else {}  # one batched (concurrent on object stores) read
    done = set()
    for shard, stats_path in zip(stats_ids, paths):
        try:
            summary.shards.append(_shard_stats(shard, json.loads(contents[stats_path])))
            done.add(shard)
        except ValueError:  # cut short by a crash; img2dataset would still take the shard as done
            logger.warning(
                "%s is not valid JSON: delete it so the next download redoes the shard", stats_path
            )
    summary.incomplete = [
        n[: -len(".tar")] for n in names if n.endswith(".tar") and n[: -len(".tar")] not in done
    ]
    return summary


def format_download_summary(summary: DownloadSummary, max_rows: int = 20) -> str:
    """Totals, then the success rate of each shard (the lowest ``max_rows`` when there are more)."""
    record = summary.record or {}
    transform = record.get("transform") or {}
    made_by = ", ".join(
        str(x)
        for x in (transform.get("tool"), transform.get("resize_mode"), transform.get("image_size"))
        if x
    )
    count, ok = summary.total("count"), summary.total("successes")
    expected = "?" if summary.expected is None else summary.expected
    not_started = "?" if summary.not_started is None else summary.not_started
    lines = [
        f"download {summary.folder}" + (f"  ({made_by})" if made_by else ""),
        f"shards   {len(summary.shards)} downloaded / {len(summary.incomplete)} incomplete / "
        f"{not_started} not started / {expected} expected",
        f"images   {ok} of {count} urls ({_percent(ok, count)}); failed to download "
        f"{summary.total('failed_to_download')}, failed to resize {summary.total('failed_to_resize')}",
    ]
    if summary.shards:
        rows = summary.shards
        if len(rows) > max_rows:
            rows = sorted(rows, key=lambda s: (s.rate, s.shard))[:max_rows]
        lines.append(f"{'shard':<10}{'urls':>8}{'ok':>8}{'rate':>8}  most common error")
        for s in rows:
            error = f"{s.top_error[0][:60]} ({s.top_error[1]})" if s.top_error else ""
            lines.append(
                f"{s.shard:<10}{s.count:>8}{s.successes:>8}{_percent(s.successes, s.count):>8}  {error}"
            )
        if len(summary.shards) > max_rows:
            rates = [s.rate for s in summary.shards]
            lines.append(
                f"(the {max_rows} lowest of {len(rates)} shards; rate min {min(rates):.1%}, "
                f"median {statistics.median(rates):.1%}, max {max(rates):.1%})"
            )
    if summary.incomplete:
        lines.append(
            f"incomplete {', '.join(summary.incomplete)}: a tar without stats (interrupted, or still "
            "downloading); rerun the download before labelling these"
        )
    return "\n".join(lines)


def _percent(part: int, whole: int) -> str:
    return f"{part / whole:.1%}" if whole else "-"


# --- the command ------------------------------------------------------------------------------------


def url_list_path(folder: str) -> str:
    return f"{folder.rstrip('/')}/{RECORD_DIR}/{URL_LIST_NAME}"


def ensure_url_list(
    spec: UrlList, source: str, target: str, previous: Mapping[str, Any] | None
) -> dict[str, Any]:
    """Convert the published file once (a rerun reuses it); returns the record's ``input`` entry."""
    fs, path = fsspec.core.url_to_fs(target)
    if previous is not None and fs.exists(path):
        return dict(previous["input"])
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    logger.info("converting %s to %s", source, target)
    counts = convert_published_file(spec, source, target)
    source_fs, source_path = fsspec.core.url_to_fs(source)
    return {
        "file": source,
        "published_as": spec.filename,
        "bytes": source_fs.size(source_path),
        "sha256": file_sha256(source),
        "rows": counts.rows,
        "malformed_rows": counts.malformed_rows,
        "replaced_utf8_rows": counts.replaced_utf8_rows,
    }


def run_img2dataset(arguments: Mapping[str, Any]) -> None:
    """img2dataset's own entry point, in this process (it starts its worker processes itself)."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations checks PyPI on import
    import img2dataset

    previous = signal.getsignal(signal.SIGINT)  # img2dataset installs its own Ctrl-C handler
    try:
        img2dataset.download(**arguments)
    except SystemExit as exc:  # that handler's sys.exit(0) is its only exit: make Ctrl-C an interruption
        raise KeyboardInterrupt from exc
    finally:
        signal.signal(signal.SIGINT, previous)


def download(
    dataset: str,
    data_root: str,
    *,
    input_file: str | None = None,
    manifest: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    options: DownloadOptions | None = None,
) -> DownloadSummary:
    """Convert, record and download one dataset; returns the summary from img2dataset's stats."""
    spec = URL_LISTS[dataset]
    options = options or DownloadOptions()
    env = {**os.environ, "DATA_ROOT": data_root, "LABELS_ROOT": os.environ.get("LABELS_ROOT") or "labels"}
    loaded = load_manifest(manifest or dataset, env=env)
    folder, listed = shard_folder(loaded)
    source = input_file or f"{data_root.rstrip('/')}/{spec.filename}"
    source_fs, source_path = fsspec.core.url_to_fs(source)
    if not source_fs.exists(source_path):
        raise ConfigError(
            f"{source} is missing: {dataset}'s URL list {spec.filename} comes from {spec.origin}. "
            f"Put it there (or pass --input PATH)"
        )
    transform = resolve_transform(loaded.source.transform, overrides or {})
    arguments = img2dataset_arguments(spec, url_list_path(folder), folder, transform, options)
    record: dict[str, Any] = {
        "format_version": 1,
        "dataset": dataset,
        "transform": transform,
        "img2dataset": {k: v for k, v in arguments.items() if k not in ("url_list", "output_folder")},
        "url_list": f"{RECORD_DIR}/{URL_LIST_NAME}",
        "input": {"file": source, "bytes": source_fs.size(source_path)},
    }
    previous = read_record(folder)
    if previous is not None:
        check_resumable(previous, record, folder)
    record["input"] = ensure_url_list(spec, source, url_list_path(folder), previous)
    record["shards_expected"] = math.ceil(record["input"]["rows"] / options.samples_per_shard)
    record["created"] = (previous or {}).get("created") or utc_now()
    write_record(folder, record)
    if record["shards_expected"] > listed:
        logger.warning(
            "the manifest lists %d shards but this download makes %d: shards past the brace range in "
            "source.path will not be labelled",
            listed,
            record["shards_expected"],
        )
    logger.info("downloading %s (%d urls) into %s", dataset, record["input"]["rows"], folder)
    run_img2dataset(arguments)
    return read_download_summary(folder) or DownloadSummary(folder, record=record)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m label_pipeline.download",
        description="Download a web dataset's images from its published URL list into WebDataset shards.",
    )
    parser.add_argument("dataset", choices=sorted(URL_LISTS))
    parser.add_argument(
        "--data-root",
        default=os.environ.get("DATA_ROOT") or "data",
        help="holds the published file; shards go to the manifest's folder under it",
    )
    parser.add_argument("--input", help="the published file (default: DATA_ROOT/<its published name>)")
    parser.add_argument(
        "--manifest",
        help="manifest giving source.path and source.transform (default: manifests/DATASET.yaml)",
    )
    parser.add_argument("--resize-mode", choices=RESIZE_MODES, help="override the manifest's transform")
    parser.add_argument("--image-size", type=int, help="override the manifest's transform")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--threads", type=int, default=64, help="download threads per process")
    parser.add_argument("--timeout", type=int, default=10, help="seconds per url")
    parser.add_argument("--retries", type=int, default=0, help="extra tries per url")
    parser.add_argument("--samples-per-shard", type=int, default=SAMPLES_PER_SHARD)
    parser.add_argument(
        "--summary", action="store_true", help="only print the summary of the download so far"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on the terminal")
    return parser


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    setup_console(debug=args.debug)
    return run_command(lambda: _download_command(args), (ConfigError,), "finished shards are kept; " + RESUME)


RESUME = "run the same command again to resume"


def _download_command(args: argparse.Namespace) -> int:
    if args.summary:
        env = {**os.environ, "DATA_ROOT": args.data_root, "LABELS_ROOT": "-"}
        folder, _ = shard_folder(load_manifest(args.manifest or args.dataset, env=env))
        summary = read_download_summary(folder) or DownloadSummary(folder)
    else:
        options = DownloadOptions(
            args.processes, args.threads, args.timeout, args.retries, args.samples_per_shard
        )
        overrides = {"resize_mode": args.resize_mode, "image_size": args.image_size}
        summary = download(
            args.dataset,
            args.data_root,
            input_file=args.input,
            manifest=args.manifest,
            overrides=overrides,
            options=options,
        )
    print(format_download_summary(summary))
    if summary.complete and summary.total("successes") > 0:
        print(f"next: make labels DATASET={args.dataset} DATA_ROOT={args.data_root}")
        return EXIT_OK
    print(f"not complete: {RESUME} (finished shards are kept)")
    return EXIT_FAILURES


if __name__ == "__main__":
    sys.exit(main())
