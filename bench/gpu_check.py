"""One GPU check: the six experts at full size, Prismer's settings next to ours, then the whole
pipeline with all six sharing the card; a JSON and a Markdown report (what bench/gpu_check.sh runs).

1. Experts (bench/experts.py's timing): each expert's real architecture, built in code with random
   weights (no download: the weights change no forward cost), timed on synthetic 480×640 images at
   Prismer's settings (fp16 autocast, Prismer's batch sizes: 64 depth/normal/edge, 32 detection/OCR,
   4 segmentation; NCHW, eager) and at ours (bf16, channels_last where the expert uses it, its
   batch size), plus ours with ``torch.compile`` for the convolutional experts (``COMPILED``: where
   it helps; the transformers recompile per input shape and would eat the time budget).
2. Pipeline: ``run_ray`` on a local Ray with this one GPU, the six experts as actors sharing it
   through fractional ``num_gpus`` (1/8 of the card each, no re-planning), over synthetic images in
   WebDataset shards; per expert images/s and busy fraction (from the run's statistics), the
   pipeline's images/s, and its ratio to the experts' bound on one card (1 / Σ 1/rate).

``--dry-run`` runs the same code on the CPU with the tests' tiny networks and a few small images
(a test runs it). Random weights make detection and OCR post-processing a worst case (their heads
fire everywhere): their pre+post columns are upper bounds.

    bench/gpu_check.sh                 # on the GPU machine: < 8 minutes, writes gpu_check/
    bench/gpu_check.sh --dry-run --out /tmp/gpu_check
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

import experts as expert_bench  # noqa: E402 - bench/experts.py (its timing, its weight builders)

logger = logging.getLogger("bench.gpu_check")
TASKS = expert_bench.TASKS
COMPILED = ("edge", "normal", "ocr_detection")  # static-shape CNNs: torch.compile pays off within budget


@dataclasses.dataclass
class Mode:
    """What differs between the real check and the dry run."""

    device: str
    full_size: bool
    images: int  # per timed pass, per expert
    size: tuple[int, int]
    warmup: int
    shards: int  # of the pipeline's input
    per_shard: int


FULL = Mode("cuda", True, 64, (480, 640), 1, shards=4, per_shard=64)
DRY = Mode("cpu", False, 1, (48, 64), 0, shards=1, per_shard=2)


# -- 1. experts --------------------------------------------------------------------------------------
def expert_args(task: str, mode: Mode) -> argparse.Namespace:
    """bench/experts.py's options for one expert: always both settings (the dry run too, with tiny
    networks), compiled where it helps on the real run."""
    compile_on = mode.full_size and task in COMPILED
    return argparse.Namespace(batch=None, dtype="auto", full_size=True, compile="on" if compile_on else "off")


def build_entries(tasks: Sequence[str], mode: Mode, directory: Path) -> dict[str, dict[str, Any]]:
    """Each expert's manifest entry, with weights written under ``directory`` (full size: random;
    dry run: the tests' tiny networks at their small input sizes)."""
    entries = {}
    for task in tasks:
        started = time.perf_counter()
        if mode.full_size:
            entries[task] = expert_bench.full_size_entry(task, directory)
        else:
            entries[task] = expert_bench.tiny_experts.TINY_EXPERTS[task](directory)
        logger.info("%s: weights built in %.1f s", task, time.perf_counter() - started)
    return entries


def time_experts(entries: dict[str, dict[str, Any]], mode: Mode, device: Any) -> list[expert_bench.Result]:
    """Every setting of every expert (one failing setting is a failed row, not a failed check)."""
    images = expert_bench.bench_images(mode.images, mode.size)
    weights = "full-size, random" if mode.full_size else "tiny"
    results = []
    for task, entry in entries.items():
        for setting in expert_bench.settings_for(task, expert_args(task, mode), device):
            logger.info("%s: timing %s", task, setting.label)
            try:
                results.append(
                    expert_bench.run_setting(task, entry, setting, images, device, mode.warmup, weights)
                )
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory at Prismer's batch size
                logger.exception("%s (%s) failed", task, setting.label)
                failed = expert_bench.Result(task, setting, weights, failed=True)
                failed.notes.append(f"{type(exc).__name__}: {exc}".splitlines()[0][:160])
                results.append(failed)
            finally:
                expert_bench._release(device)
    return results


def expert_summary(results: list[expert_bench.Result]) -> dict[str, dict[str, Any]]:
    """Per expert: Prismer-style and best-of-ours images/s (what ``label-pipeline plan`` reads)."""
    summary: dict[str, dict[str, Any]] = {}
    for task in dict.fromkeys(r.task for r in results):
        rows = [r for r in results if r.task == task and not r.failed]
        base = next((r for r in rows if r.setting.label == "Prismer-style"), None)
        ours = [r for r in rows if r.setting.label.startswith("ours")]
        best = max(ours, key=lambda r: r.images_per_s, default=None)
        summary[task] = {
            "images_per_s": best.images_per_s if best else None,
            "setting": best.setting.label if best else None,
            "prismer_images_per_s": base.images_per_s if base else None,
            "speed_up": best.images_per_s / base.images_per_s
            if best and base and base.images_per_s
            else None,
            "rows": [_row(r) for r in results if r.task == task],
        }
    return summary


def _row(result: expert_bench.Result) -> dict[str, Any]:
    return {
        "setting": result.setting.label,
        "batch": result.batch,
        "dtype": result.dtype,
        "compile": result.setting.compile,
        "images_per_s": None if result.failed else round(result.images_per_s, 3),
        "forward_s": round(result.forward_s, 4),
        "seconds": round(result.seconds, 4),
        "peak_mib": result.peak_mib,
        "failed": result.failed,
        "notes": result.notes,
    }


# -- 2. the pipeline -------------------------------------------------------------------------------
def write_inputs(root: Path, mode: Mode) -> dict[str, str]:
    """Synthetic photos-ish images (bench/experts.py's) as JPEG WebDataset shards."""
    from label_pipeline.core.tario import write_tar

    images = expert_bench.bench_images(mode.shards * mode.per_shard, mode.size)
    (root / "in").mkdir(parents=True)
    for shard in range(mode.shards):
        samples = []
        for i in range(mode.per_shard):
            buffer = io.BytesIO()
            Image.fromarray(images[shard * mode.per_shard + i]).save(buffer, format="JPEG", quality=90)
            samples.append([(f"{shard:03d}{i:05d}.jpg", buffer.getvalue())])
        with open(root / "in" / f"{shard:05d}.tar", "wb") as handle:
            write_tar(handle, samples)
    return {"format": "webdataset", "path": f"{root}/in/{{00000..{mode.shards - 1:05d}}}.tar"}


def run_pipeline(entries: dict[str, dict[str, Any]], mode: Mode, root: Path) -> dict[str, Any]:
    """All experts on one (real or logical) GPU, one replica each on 1/8 of it; the run's stats."""
    import ray

    from label_pipeline.config import load_manifest
    from label_pipeline.run import RunOptions
    from label_pipeline.runners.ray_runner import run_ray

    source = write_inputs(root, mode)
    manifest = {
        "name": "gpu-check",
        "source": source,
        "output": str(root / "out"),
        "experts": list(entries.values()),
        # one replica per expert on its share of the card: the check measures sharing, not planning
        "runner": {"ray": {"calibration_batches": 0, "progress_interval_s": 30}},
    }
    (root / "gpu_check.yaml").write_text(yaml.safe_dump(manifest))
    ray.init(num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        started = time.perf_counter()
        run_ray(load_manifest(str(root / "gpu_check.yaml")), RunOptions(), progress=False)
        wall = time.perf_counter() - started
    finally:
        ray.shutdown()
    (path,) = (root / "out" / "stats").glob("ray-*.json")
    stats = json.loads(path.read_text())
    stats["wall_s"] = wall
    return stats


def pipeline_summary(stats: dict[str, Any], experts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    rates = {t: e["images_per_s"] for t, e in experts.items() if e.get("images_per_s")}
    bound = 1 / sum(1 / r for r in rates.values()) if len(rates) == len(stats["experts"]) else None
    per_expert = {
        task: {
            "images_per_s": entry.get("images_per_s"),
            "busy_fraction": entry.get("busy_fraction"),
            "gpu_share": entry["placement"]["num_gpus"],
            "device": entry["replicas"][0].get("device") if entry.get("replicas") else None,
            "batch_size": entry["placement"]["batch_size"],
        }
        for task, entry in stats["experts"].items()
    }
    rate = stats.get("images_per_s")
    return {
        "samples": stats["samples"],
        "elapsed_s": stats["elapsed_s"],
        "wall_s": round(stats["wall_s"], 2),
        "images_per_s": rate,
        "bound_images_per_s": bound,
        "efficiency": rate / bound if rate and bound else None,
        "experts": per_expert,
    }


# -- report ----------------------------------------------------------------------------------------
def markdown(report: dict[str, Any], table: str) -> str:
    pipeline = report["pipeline"]
    lines = [
        f"# GPU check ({'dry run, CPU, tiny networks' if report['dry_run'] else report['device']})",
        "",
        f"Command: `{report['command']}`; {report['elapsed_s']:.0f} s in all.",
        "",
        *(["A dry run checks the code path; its numbers mean nothing.", ""] if report["dry_run"] else []),
        table.replace("## Expert throughput", "## Experts: Prismer's settings and ours"),
        "## Pipeline: all experts sharing the card (fractional num_gpus)",
        "",
        f"{pipeline['samples']} images in {pipeline['elapsed_s']:.1f} s: "
        f"**{pipeline['images_per_s'] or 0:.2f} images/s**"
        + (
            f"; the experts alone on one card (1 / Σ 1/rate): {pipeline['bound_images_per_s']:.2f} images/s, "
            f"end-to-end ÷ that = **{pipeline['efficiency']:.2f}**"
            if pipeline.get("efficiency")
            else ""
        ),
        "",
        "| expert | GPU share | batch | device | images/s | busy |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for task, entry in pipeline["experts"].items():
        lines.append(
            f"| {task} | {entry['gpu_share']:g} | {entry['batch_size']} | {entry['device']} | "
            f"{entry['images_per_s'] or 0:.2f} | {entry['busy_fraction'] or 0:.0%} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny networks, few images")
    parser.add_argument("--out", default="gpu_check", help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--experts", default=",".join(TASKS), help="comma-separated subset of the six")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "httpx", "huggingface_hub", "expert_zoo"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    tasks = [t for t in args.experts.split(",") if t]
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        print(f"unknown expert(s) {unknown}; choose from {list(TASKS)}", file=sys.stderr)
        return 2
    import torch

    mode = DRY if args.dry_run else FULL
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device here: run with --dry-run, or on the GPU machine", file=sys.stderr)
        return 2
    device = torch.device(mode.device)
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        entries = build_entries(tasks, mode, Path(tmp))
        results = time_experts(entries, mode, device)
        experts = expert_summary(results)
        stats = run_pipeline(entries, mode, Path(tmp) / "pipeline")
    device_name = expert_bench.device_name(device)
    report = {
        "dry_run": args.dry_run,
        "device": device_name,
        "command": shlex.join(["bench/gpu_check.sh", *argv]),
        "elapsed_s": time.perf_counter() - started,
        "experts": experts,
        "pipeline": pipeline_summary(stats, experts),
        # what `label-pipeline plan --stats` reads: each expert's best images/s on one whole card
        "gpu_check": {
            "device": device_name,
            "experts": {t: {"images_per_s": e["images_per_s"]} for t, e in experts.items()},
        },
    }
    table_args = argparse.Namespace(images=mode.images, size=mode.size, full_size=mode.full_size)
    table = expert_bench.format_table(results, table_args, device, report["command"])
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "gpu_check.md").write_text(markdown(report, table))
    print(markdown(report, table))
    failed = any(r.failed for r in results) or not report["pipeline"]["images_per_s"]
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built here; never reach a hub
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    sys.exit(main())
