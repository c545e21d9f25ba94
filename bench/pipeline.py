"""Pipeline overhead benchmark (CPU): where does the time per image go, and what does the pipeline add?

Prints per-image cost of decode, each bare expert call, label encoding and tar writing; then
  * efficiency = sum of bare expert calls ÷ end-to-end run time on the same images (target ≥ 0.90)
  * decode saving = one decode per expert (N consumers) ÷ decode once + fan-out (target ≥ 4× for 6)
All numbers come from one process, so the ratios are comparable even on a noisy machine.

    python bench/pipeline.py                       # the demo with its two offline experts
    python bench/pipeline.py --experts edge:canny --consumers 6
"""

from __future__ import annotations

import argparse
import io
import logging
import tempfile
import time

from expert_zoo.registry import build_expert
from label_pipeline.config import load_manifest
from label_pipeline.core.decode import decode_image
from label_pipeline.core.tario import write_tar
from label_pipeline.run import RunOptions
from label_pipeline.runners.local import run_local
from label_pipeline.sources import ShardReadReport, build_source


def timed(fn, *args, repeat: int = 1):
    started = time.perf_counter()
    for _ in range(repeat):
        result = fn(*args)
    return result, (time.perf_counter() - started) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", default="demo")
    parser.add_argument("--experts", help="comma-separated; default: the manifest's")
    parser.add_argument("--consumers", type=int, default=6, help="experts reading each decoded image")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions of the cheap stages")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        env = {"DATA_ROOT": f"{tmp}/data", "LABELS_ROOT": f"{tmp}/labels"}
        manifest = load_manifest(args.manifest, env=env)
        if args.experts:
            manifest = manifest.with_experts(args.experts.split(","))
        source = build_source(manifest.source)
        samples = [s for shard in source.shards() for s in source.read(shard, ShardReadReport())]
        raw = [s.image for s in samples if s.image]
        n = len(raw)

        decoded, t_decode = timed(lambda: [decode_image(b).array for b in raw], repeat=args.repeat)
        experts = {r.task: build_expert(r, device="cpu") for r in manifest.experts}
        rows, labels_by_task, bare_total = [], {}, 0.0
        for task, expert in experts.items():
            deps = {dep: labels_by_task[dep] for dep in expert.spec.requires}
            bs = manifest.batch_size or expert.spec.batch_size
            expert(decoded[:1], {d: v[:1] for d, v in deps.items()})  # warm-up, as the e2e run's experts are
            started = time.perf_counter()
            labels = []
            for i in range(0, n, bs):
                labels += expert(decoded[i : i + bs], {d: v[i : i + bs] for d, v in deps.items()})
            elapsed = time.perf_counter() - started
            labels_by_task[task] = labels
            bare_total += elapsed
            rows.append((f"expert {task}", elapsed))
        _, t_encode = timed(
            lambda: [experts[t].encode(lab) for t, labs in labels_by_task.items() for lab in labs],
            repeat=args.repeat,
        )
        members = [[(f"k{i}.jpg", b)] for i, b in enumerate(raw)]
        _, t_write = timed(lambda: write_tar(io.BytesIO(), members), repeat=args.repeat)

        # One untimed run pays the one-off costs (imports, first-call set-up) that a long run amortises;
        # the timed run still loads its experts and lists the source, as every real run does.
        run_local(manifest, RunOptions(output=f"{tmp}/warm-up"), progress=False, device="cpu")
        started = time.perf_counter()
        summary = run_local(manifest, RunOptions(output=f"{tmp}/e2e"), progress=False, device="cpu")
        t_e2e = time.perf_counter() - started
        assert summary.samples == len(samples), (summary.samples, len(samples))

        # decode once + hand the same array to N consumers, vs every consumer decoding for itself
        _, t_once = timed(
            lambda: [[a for _ in range(args.consumers)] for a in (decode_image(b).array for b in raw)],
            repeat=args.repeat,
        )
        _, t_each = timed(
            lambda: [[decode_image(b).array for _ in range(args.consumers)] for b in raw], repeat=args.repeat
        )

    print(f"images: {n}   experts: {', '.join(experts)}   source: {args.manifest}\n")
    print(f"{'stage':<28}{'ms / image':>12}")
    for name, seconds in [("decode", t_decode), *rows, ("encode labels", t_encode), ("write tar", t_write)]:
        print(f"{name:<28}{1000 * seconds / n:>12.2f}")
    print(f"{'end-to-end run':<28}{1000 * t_e2e / n:>12.2f}")
    print()
    print(f"efficiency  sum(bare experts) / end-to-end = {bare_total / t_e2e:.3f}   (target >= 0.90)")
    print(f"decode saving ({args.consumers} consumers) = {t_each / t_once:.2f}x   (target >= 4x)")


if __name__ == "__main__":
    main()
