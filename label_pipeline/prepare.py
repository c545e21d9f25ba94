"""``python -m label_pipeline.prepare coco|vg``: check a downloaded dataset's files, name what's missing.

COCO and Visual Genome come as archives the user downloads and unpacks. This command resolves the
dataset's manifest under ``--data-root``, checks every path it names (image folders and annotation
json), and prints, for each missing one, where it comes from and how to unpack it. When everything is
there it reads the annotations as the labelling run will, checks that a sample of the images they
name exists, and prints the command that labels the dataset.

Exit codes: 0 = ready to label, 1 = something is missing, 2 = usage or configuration error.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace

import fsspec

from label_pipeline.config import ConfigError, Manifest, load_manifest
from label_pipeline.core.entry import EXIT_FAILURES, EXIT_OK, run_command, setup_console
from label_pipeline.sources import build_source
from label_pipeline.sources.chunked import ChunkedSource

logger = logging.getLogger("label_pipeline.prepare")
EXIT_MISSING = EXIT_FAILURES  # files are missing or incomplete
SPOT_CHECK = 200  # images looked up, spread evenly over the annotation entries


@dataclass(frozen=True)
class Expected:
    """One file or folder a dataset needs, relative to the manifest's path for it."""

    role: str  # "images" (a folder under source.images) or "file" (a manifest path, matched by name)
    name: str
    what: str
    origin: str
    min_files: int = 0  # images: how many the full folder holds


BLIP = "https://storage.googleapis.com/sfr-vision-language-research/datasets"
EXPECTED: dict[str, list[Expected]] = {
    "coco": [
        Expected(
            "images",
            "train2014",
            "COCO 2014 train images",
            "http://images.cocodataset.org/zips/train2014.zip (unzip -d <images>)",
            82_783,
        ),
        Expected(
            "images",
            "val2014",
            "COCO 2014 val images (Karpathy val/test are drawn from it)",
            "http://images.cocodataset.org/zips/val2014.zip (unzip -d <images>)",
            40_504,
        ),
        Expected(
            "file",
            "coco_karpathy_train.json",
            "Karpathy-split train captions (BLIP's list)",
            f"{BLIP}/coco_karpathy_train.json",
        ),
        Expected(
            "file",
            "coco_karpathy_val.json",
            "Karpathy-split val captions (BLIP's list)",
            f"{BLIP}/coco_karpathy_val.json",
        ),
        Expected(
            "file",
            "coco_karpathy_test.json",
            "Karpathy-split test captions (BLIP's list)",
            f"{BLIP}/coco_karpathy_test.json",
        ),
    ],
    "vg": [
        Expected(
            "images",
            "VG_100K",
            "Visual Genome images, part 1",
            "https://cs.stanford.edu/people/rak248/VG_100K_2/images.zip (unpack it so that the "
            "images are <images>/VG_100K/*.jpg)",
        ),
        Expected(
            "images",
            "VG_100K_2",
            "Visual Genome images, part 2",
            "https://cs.stanford.edu/people/rak248/VG_100K_2/images2.zip (unpack it so that the "
            "images are <images>/VG_100K_2/*.jpg)",
        ),
        Expected(
            "file",
            "image_data.json",
            "Visual Genome image metadata (ids, urls, sizes)",
            "https://homes.cs.washington.edu/~ranjay/visualgenome/data/dataset/image_data.json.zip "
            "(unzip it)",
        ),
        Expected(
            "file",
            "vg_caption.json",
            "VG captions as BLIP lists them (or region_descriptions.json)",
            f"{BLIP}/vg_caption.json",
        ),
    ],
}


@dataclass
class Check:
    path: str
    expected: Expected
    found: bool
    files: int | None = None  # images in a folder


def manifest_paths(manifest: Manifest) -> dict[str, str]:
    """Every file a coco/vg source reads, by base name."""
    source = manifest.source
    files = [*source.annotations, source.image_data, source.captions]
    return {path.rstrip("/").rsplit("/", 1)[-1]: path for path in files if path}


def check_expected(manifest: Manifest, dataset: str) -> list[Check]:
    images = manifest.source.images or ""
    files = manifest_paths(manifest)
    checks = []
    for expected in EXPECTED[dataset]:
        if expected.role == "images":
            expected = replace(expected, origin=expected.origin.replace("<images>", images))
            checks.append(_check_folder(f"{images.rstrip('/')}/{expected.name}", expected))
        elif expected.name in files:  # a manifest edited to other files is checked for those
            path = files.pop(expected.name)
            fs, local = fsspec.core.url_to_fs(path)
            checks.append(Check(path, expected, fs.isfile(local)))
    for name, path in sorted(files.items()):  # files the manifest names that we have no entry for
        fs, local = fsspec.core.url_to_fs(path)
        checks.append(
            Check(path, Expected("file", name, "named by the manifest", "(your own file)"), fs.isfile(local))
        )
    return checks


def _check_folder(path: str, expected: Expected) -> Check:
    fs, local = fsspec.core.url_to_fs(path)
    if not fs.isdir(local):
        return Check(path, expected, False)
    return Check(path, expected, True, files=len(fs.ls(local, detail=False)))


def spot_check_images(manifest: Manifest) -> tuple[int, list[str]]:
    """Entries the annotations give, and those of an even sample whose image file is missing."""
    source = build_source(manifest.source)
    if not isinstance(source, ChunkedSource):  # prepare() only takes coco and vg, which list entries
        raise ConfigError(f"source.format {manifest.source.format!r}: no annotation entries to check")
    entries = source.list_entries()
    step = max(1, len(entries) // SPOT_CHECK)
    missing = []
    for entry in entries[::step][:SPOT_CHECK]:
        fs, local = fsspec.core.url_to_fs(entry.image_url)
        if not fs.exists(local):
            missing.append(entry.image_url)
    return len(entries), missing


def format_checks(checks: list[Check]) -> list[str]:
    lines = []
    for check in checks:
        if not check.found:
            lines.append(
                f"MISSING  {check.path}\n         {check.expected.what}; from {check.expected.origin}"
            )
            continue
        count = ""
        if check.files is not None:
            count = f"  ({check.files} files"
            if check.files < check.expected.min_files:
                count += f"; the full folder has {check.expected.min_files}: incomplete unpack?"
            count += ")"
        lines.append(f"ok       {check.path}{count}")
    return lines


def prepare(dataset: str, data_root: str, manifest_name: str | None = None) -> tuple[int, list[str]]:
    """The exit code and the report lines."""
    env = {**os.environ, "DATA_ROOT": data_root, "LABELS_ROOT": os.environ.get("LABELS_ROOT") or "labels"}
    manifest = load_manifest(manifest_name or dataset, env=env)
    if manifest.source.format != dataset:
        raise ConfigError(
            f"manifest {manifest.name}: source.format is {manifest.source.format!r}, not {dataset!r}"
        )
    checks = check_expected(manifest, dataset)
    lines = [
        f"{dataset}: checking the files manifest {manifest.name!r} reads (DATA_ROOT={data_root})",
        *format_checks(checks),
    ]
    if not all(c.found for c in checks):
        lines.append(
            f"download and unpack the missing files as shown, then run `make prepare DATASET={dataset} "
            f"DATA_ROOT={data_root}` again (or edit manifests/{dataset}.yaml if your layout differs)"
        )
        return EXIT_MISSING, lines
    entries, missing = spot_check_images(manifest)
    shards = math.ceil(entries / manifest.source.shard_size)
    lines.append(f"annotations list {entries} images -> {shards} shards of {manifest.source.shard_size}")
    if missing:
        lines += [f"MISSING  {url}" for url in missing[:10]]
        lines.append(
            f"{len(missing)} of the images checked are not where the annotations put them: is "
            f"{manifest.source.images} the folder that holds the image folders?"
        )
        return EXIT_MISSING, lines
    lines += [
        f"ready: the manifest resolves to images {manifest.source.images}, output {manifest.output}",
        f"label it: make labels DATASET={dataset} DATA_ROOT={data_root}",
        f"      or: DATA_ROOT={data_root} label-pipeline run {dataset}",
    ]
    return EXIT_OK, lines


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m label_pipeline.prepare", description=__doc__.splitlines()[0]
    )
    parser.add_argument("dataset", choices=sorted(EXPECTED))
    parser.add_argument("--data-root", default=os.environ.get("DATA_ROOT") or "data")
    parser.add_argument("--manifest", help="a manifest path (default: manifests/DATASET.yaml)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on the terminal")
    args = parser.parse_args(argv)
    setup_console(debug=args.debug)
    return run_command(lambda: _prepare_command(args), (ConfigError, OSError, ValueError, KeyError))


def _prepare_command(args: argparse.Namespace) -> int:
    code, lines = prepare(args.dataset, args.data_root, args.manifest)
    print("\n".join(lines))
    return code


if __name__ == "__main__":
    sys.exit(main())
