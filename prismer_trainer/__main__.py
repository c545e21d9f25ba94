"""``python -m prismer_trainer train|eval`` (see ``--help``).

    python -m prismer_trainer train --dataset demo --config tiny
    torchrun --nproc_per_node 8 -m prismer_trainer train --dataset cc12m --config prismer_base
    python -m prismer_trainer train --dataset coco --config prismer_base --stage caption \\
        --init-checkpoint runs/cc12m-prismer_base-pretrain/checkpoints/step_00050000
    python -m prismer_trainer eval --checkpoint runs/coco-prismer_base-caption --split karpathy_test
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from label_pipeline.core.entry import run_command, setup_console
from prismer_trainer.model_config import PRESETS
from prismer_trainer.train_config import PARALLEL, PRECISIONS, STAGES, stage_config

logger = logging.getLogger("prismer_trainer")
LOG_FORMAT = "%(asctime)s %(levelname).1s %(message)s"

# Flags that set a TrainConfig field directly.
_OVERRIDES = {
    "max_steps": int,
    "epochs": float,
    "batch_size": int,
    "micro_batch_size": int,
    "lr": float,
    "num_workers": int,
    "seed": int,
    "precision": str,
    "parallel": str,
    "grad_clip": float,
    "log_every": int,
    "checkpoint_every": int,
    "resolution": int,
}


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m prismer_trainer", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on the terminal")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train Prismer on label shards")
    train.add_argument("--dataset", required=True, help="label set under $LABELS_ROOT (or a shards dir/glob)")
    train.add_argument("--config", default="prismer_base", choices=sorted(PRESETS), help="model preset")
    train.add_argument("--stage", default="pretrain", choices=STAGES)
    train.add_argument("--out", type=Path, help="run directory (default runs/<dataset>-<config>-<stage>)")
    train.add_argument("--labels-root", help="default $LABELS_ROOT or ./labels")
    train.add_argument("--experts", default="auto", help="auto | all | none (PrismerZ) | comma list")
    train.add_argument("--tokenizer", help="word | hub id | local dir (default: word for tiny, else RoBERTa)")
    train.add_argument(
        "--label-embeddings", help="CLIP-PCA tables dir (default: the label root's embeddings/)"
    )
    train.add_argument(
        "--init-checkpoint", help="start from these weights (checkpoint dir or state-dict file)"
    )
    train.add_argument("--no-pretrained", action="store_true", help="do not load CLIP/RoBERTa (random init)")
    train.add_argument("--no-resume", action="store_true", help="ignore checkpoints in the run directory")
    train.add_argument("--vqa-annotations", action="append", default=[], help="VQA rows JSON (repeatable)")
    train.add_argument("--stop-after", type=int, help="leave after N steps (the schedule still spans all)")
    train.add_argument("--threads", type=int, help="torch CPU threads")
    train.add_argument("--device", help="e.g. cpu, cuda:0 (default: this rank's GPU, else CPU)")
    train.add_argument(
        "--tensorboard",
        metavar="DIR",
        help="also log loss, lr and samples/s as TensorBoard event files in DIR (pip install tensorboard)",
    )
    train.add_argument("--precision", choices=PRECISIONS)
    train.add_argument("--parallel", choices=PARALLEL, help="ddp | fsdp (SHARD_GRAD_OP) under torchrun")
    for name, kind in _OVERRIDES.items():
        if name not in ("precision", "parallel"):
            train.add_argument(f"--{name.replace('_', '-')}", type=kind, dest=name)
    train.add_argument(
        "--set", action="append", default=[], metavar="FIELD=JSON", help="any TrainConfig field"
    )

    ev = sub.add_parser("eval", help="caption CIDEr / VQA accuracy of a checkpoint")
    ev.add_argument("--checkpoint", type=Path, required=True, help="checkpoint dir, or a run dir (latest)")
    ev.add_argument("--split", default="all", help="all | karpathy_train | karpathy_val | karpathy_test")
    ev.add_argument("--split-file", help="JSON list of {image, ...} naming the split's images")
    ev.add_argument("--dataset", help="default: the dataset the checkpoint was trained on")
    ev.add_argument("--labels-root")
    ev.add_argument("--vqa-annotations", action="append", default=[])
    ev.add_argument("--answer-list", help="VQA candidate answers (JSON list), rank mode")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--max-samples", type=int)
    ev.add_argument("--out", type=Path, help="results JSON (default <checkpoint>/eval_<split>.json)")
    ev.add_argument("--device")
    return parser


def _field_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides = {name: getattr(args, name) for name in _OVERRIDES if getattr(args, name, None) is not None}
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects FIELD=VALUE, got {item!r}")
        try:
            overrides[name.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[name.strip()] = value
    return overrides


def run_train(args: argparse.Namespace) -> int:
    from prismer_trainer.train import TrainOptions, train

    config = stage_config(args.stage, args.config, **_field_overrides(args))
    options = TrainOptions(
        dataset=args.dataset,
        out_dir=args.out or Path("runs") / f"{Path(args.dataset).name}-{args.config}-{args.stage}",
        labels_root=args.labels_root,
        experts=args.experts,
        tokenizer=args.tokenizer,
        label_embeddings=args.label_embeddings,
        init_checkpoint=args.init_checkpoint,
        pretrained=not args.no_pretrained,
        resume=not args.no_resume,
        vqa_annotations=tuple(args.vqa_annotations),
        stop_after=args.stop_after,
        threads=args.threads,
        device=args.device,
        tensorboard=args.tensorboard,
    )
    result = train(config, options)
    if result.losses:
        first, last = result.losses[min(result.losses)], result.losses[max(result.losses)]
        logger.info(
            "done: %d steps, loss %.3f -> %.3f, checkpoint %s",
            result.steps,
            first,
            last,
            result.last_checkpoint,
        )
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from prismer_trainer.checkpoint import STATE_FILE, latest_checkpoint
    from prismer_trainer.evaluate import EvalOptions, evaluate, format_metrics

    checkpoint = args.checkpoint
    if not (checkpoint / STATE_FILE).exists():
        checkpoint = latest_checkpoint(checkpoint)
        if checkpoint is None:
            raise FileNotFoundError(
                f"{args.checkpoint}: not a checkpoint, and it holds no complete checkpoint"
            )
    result = evaluate(
        EvalOptions(
            checkpoint=checkpoint,
            split=args.split,
            split_file=args.split_file,
            dataset=args.dataset,
            labels_root=args.labels_root,
            vqa_annotations=tuple(args.vqa_annotations),
            answer_list=args.answer_list,
            batch_size=args.batch_size,
            max_samples=args.max_samples,
            out=args.out,
            device=args.device,
        )
    )
    print(format_metrics(result))
    return 0


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    main_rank = os.environ.get("RANK", "0") == "0"
    setup_console(debug=args.debug, quiet=not main_rank, fmt=LOG_FORMAT, stream=sys.stdout)
    from prismer_trainer.pretrained import PretrainedUnavailable
    from prismer_trainer.text import TokenizerUnavailable
    from prismer_trainer.train import TensorBoardUnavailable

    usage_errors = (
        TokenizerUnavailable,
        PretrainedUnavailable,
        TensorBoardUnavailable,
        FileNotFoundError,
        ValueError,
    )
    command = run_train if args.command == "train" else run_eval
    return run_command(lambda: command(args), usage_errors, "checkpoints are kept; rerun to resume")


if __name__ == "__main__":
    sys.exit(main())
