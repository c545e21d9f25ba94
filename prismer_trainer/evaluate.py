"""Evaluation as Prismer does it: captions by beam search (3 beams, length 8–20 counting the prompt)
scored with CIDEr (pycocoevalcap's scorer; the PTB tokenisation it normally runs through Java is replaced
by a small Python equivalent), and VQA in rank mode (top-k answers by first-token probability, re-scored
by their mean token log-likelihood).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import torch
import torch.nn.functional as F

from prismer_trainer.batches import to_model_inputs
from prismer_trainer.checkpoint import (
    EVAL_HINT,
    TOKENIZER_DIR,
    load_tensors,
    read_embeddings,
    read_metadata,
    reading_checkpoint,
)
from prismer_trainer.data import RunData
from prismer_trainer.distributed import Distributed, pick_device
from prismer_trainer.embeddings import LabelEmbeddings
from prismer_trainer.model import PrismerModel
from prismer_trainer.model_config import ModelConfig
from prismer_trainer.samples import image_key
from prismer_trainer.shards import dataset_shards
from prismer_trainer.stream import make_loader
from prismer_trainer.text import Tokenizer, load_tokenizer
from prismer_trainer.train_config import TrainConfig

logger = logging.getLogger(__name__)


# ================================================================================================
# Captions
# ================================================================================================
def prompt_ids(tokenizer: Tokenizer, prefix: str, batch: int, device: torch.device) -> torch.Tensor:
    """``<s> prefix`` for every sample (no ``</s>``), as Prismer's generation prompt."""
    ids = [tokenizer.bos_id, *(tokenizer.encode_text(prefix) if prefix else [])]
    return torch.tensor([ids] * batch, dtype=torch.long, device=device)


@torch.no_grad()
def generate_captions(
    model: PrismerModel,
    batch: Mapping[str, Any],
    tokenizer: Tokenizer,
    prefix: str,
    device: torch.device,
    num_beams: int = 3,
    min_length: int = 8,
    max_length: int = 20,
) -> list[str]:
    """Captions for a collated batch; the prompt is cut off. ``num_beams=1`` is greedy decoding."""
    experts = to_model_inputs(batch, device)
    prompt = prompt_ids(tokenizer, prefix, batch["rgb"].shape[0], device)
    out = model.generate(experts, prompt, num_beams=num_beams, min_length=min_length, max_length=max_length)
    captions = []
    for sequence in out.sequences.tolist():
        body = sequence[prompt.shape[1] :]
        if tokenizer.eos_id in body:
            body = body[: body.index(tokenizer.eos_id)]
        captions.append(tokenizer.decode(body).strip())
    return captions


def display_caption(caption: str) -> str:
    """Prismer's output form: capitalised, with a full stop."""
    return caption.capitalize() + "." if caption else caption


_NON_WORD = re.compile(r"[^a-z0-9' ]+")


def coco_tokenize(text: str) -> str:
    """Lower-case, punctuation removed, single spaces (what the PTB tokeniser + punctuation filter of
    coco-caption produce for ordinary captions)."""
    return " ".join(_NON_WORD.sub(" ", text.lower()).replace(" '", " ").split())


def cider(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> float:
    """Corpus CIDEr-D (pycocoevalcap) of one prediction per image against its references, ×100 as papers
    report it."""
    from pycocoevalcap.cider.cider import Cider

    keys = sorted(predictions)
    if not keys:
        return 0.0
    gts = {k: [coco_tokenize(r) for r in references[k]] for k in keys}
    res = {k: [coco_tokenize(predictions[k])] for k in keys}
    score, _ = Cider().compute_score(gts, res)
    return float(score) * 100


def sample_captions(
    model: PrismerModel, data: RunData, config: TrainConfig, device: torch.device, count: int
) -> list[tuple[str, str, str]]:
    """Greedy captions of the first ``count`` training images (no augmentation): (key, caption, reference)."""
    stream = data.stream(config, Distributed(), train=False, batch_size=count)
    was_training = model.training
    model.eval()
    try:
        batch = next(iter(stream))
        captions = generate_captions(
            model,
            batch,
            data.tokenizer,
            config.prefix,
            device,
            num_beams=1,
            min_length=1,
            max_length=config.max_tokens,
        )
    finally:
        model.train(was_training)
    return [(k, c, t) for k, c, t in zip(batch["keys"], captions, batch["texts"])]


# ================================================================================================
# VQA, rank mode
# ================================================================================================
@torch.no_grad()
def rank_answers(
    model: PrismerModel,
    batch: Mapping[str, Any],
    tokenizer: Tokenizer,
    answer_list: Sequence[str],
    device: torch.device,
    k: int = 16,
) -> list[str]:
    """For each question: the ``k`` answers whose first token is likeliest after the question, re-scored by
    the mean log-likelihood of all their tokens (and ``</s>``); the best one."""
    experts = to_model_inputs(batch, device)
    vision = model.encode(experts)
    lengths = batch["attention_mask"].sum(1).tolist()
    prompts = [ids[:n].tolist() for ids, n in zip(batch["input_ids"], lengths)]
    answers = [[*tokenizer.encode_text(" " + a.capitalize()), tokenizer.eos_id] for a in answer_list]
    k = min(k, len(answers))
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    _, logits = model.text_decoder(ids, mask, vision)
    last = mask.sum(1) - 1
    first = F.log_softmax(logits[torch.arange(len(prompts), device=device), last].float(), dim=-1)
    first_tokens = torch.tensor([a[0] for a in answers], device=device)
    top = first[:, first_tokens].topk(k, dim=1).indices.tolist()  # [b, k] answer indices

    sequences, targets = [], []
    for prompt, candidates in zip(prompts, top):
        for c in candidates:
            sequences.append(prompt + answers[c])
            targets.append([-100] * len(prompt) + answers[c])
    width = max(len(s) for s in sequences)
    seq = torch.full((len(sequences), width), tokenizer.pad_id, dtype=torch.long)
    tgt = torch.full((len(sequences), width), -100, dtype=torch.long)
    real = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, (s, t) in enumerate(zip(sequences, targets)):
        seq[i, : len(s)], tgt[i, : len(t)], real[i, : len(s)] = torch.tensor(s), torch.tensor(t), 1
    seq, tgt, real = seq.to(device), tgt.to(device), real.to(device)
    _, logits = model.text_decoder(seq, real, vision.repeat_interleave(k, 0))
    logprobs = -F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), tgt[:, 1:].reshape(-1), reduction="none"
    ).view(len(sequences), -1)
    counted = (tgt[:, 1:] != -100).float()
    score = ((logprobs * counted).sum(1) / counted.sum(1)).view(len(prompts), k)
    best = score.argmax(1).tolist()
    return [answer_list[top[b][best[b]]] for b in range(len(prompts))]


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 accuracy with ≥ 3 human answers (min(#matches / 3, 1)); exact match with fewer."""
    norm = [a.strip().lower() for a in answers]
    matches = norm.count(prediction.strip().lower())
    return min(matches / 3, 1.0) if len(norm) >= 3 else float(matches > 0)


# ================================================================================================
# `python -m prismer_trainer eval`
# ================================================================================================
@dataclass
class EvalOptions:
    checkpoint: Path
    split: str = "all"  # all | karpathy_train | karpathy_val | karpathy_test
    split_file: str | None = None
    dataset: str | None = None  # default: the dataset the checkpoint was trained on
    labels_root: str | None = None
    vqa_annotations: tuple[str, ...] = ()
    answer_list: str | None = None
    batch_size: int = 8
    max_samples: int | None = None
    out: Path | None = None
    device: str | None = None


def load_for_eval(
    checkpoint: Path, device: torch.device
) -> tuple[PrismerModel, Tokenizer, LabelEmbeddings, dict]:
    """Model (eval mode), tokenizer, label embeddings and the trainer metadata of a checkpoint dir."""
    meta = read_metadata(checkpoint, EVAL_HINT)
    weights = load_tensors(checkpoint / "model.pt", EVAL_HINT)
    with reading_checkpoint(checkpoint / "model.pt", EVAL_HINT):
        model = PrismerModel(ModelConfig.from_dict(meta["model_config"]))
        model.load_prismer_state_dict(weights)
    model.to(device).eval()
    tokenizer = load_tokenizer(checkpoint / TOKENIZER_DIR)
    return model, tokenizer, read_embeddings(checkpoint, EVAL_HINT), meta


def split_keys(split: str, split_file: str | None) -> set[str] | None:
    """Sample keys of a split: ``all`` → every sample; ``karpathy_<part>`` → the images listed in
    ``coco_karpathy_<part>.json`` (default dir ``${DATA_ROOT:-data}/coco/annotations/``, as in
    manifests/coco.yaml)."""
    if split == "all" and not split_file:
        return None
    if not split_file:
        if not split.startswith("karpathy_"):
            raise ValueError(f"unknown split {split!r}: use all, karpathy_train/val/test or --split-file")
        root = os.environ.get("DATA_ROOT", "data")
        split_file = f"{root}/coco/annotations/coco_{split}.json"
    with fsspec.open(split_file, "r", encoding="utf-8") as handle:
        data = json.load(handle)
    if isinstance(data, dict) and "images" in data:  # Karpathy's dataset_coco.json
        part = split.removeprefix("karpathy_")
        return {image_key(i["filename"]) for i in data["images"] if i.get("split") == part}
    return {image_key(item["image"]) for item in data}


def evaluate(options: EvalOptions) -> dict[str, Any]:
    """Caption CIDEr or VQA accuracy of a checkpoint over a split; writes predictions + metrics as JSON."""
    device = pick_device(options.device, Distributed())
    model, tokenizer, embeddings, meta = load_for_eval(options.checkpoint, device)
    config = TrainConfig.from_dict(meta["train_config"])
    dataset = options.dataset or meta["dataset"]
    labels = options.labels_root or meta.get("labels_root")
    shards = dataset_shards(dataset, labels)
    overlap = training_overlap(shards, meta)
    if overlap:
        logger.warning(
            "split %r overlaps the training data: %d of its %d shards are shards this checkpoint was "
            "trained on (dataset %s), so the scores measure memorisation, not generalisation; evaluate "
            "on labels of held-out images (--dataset / --labels-root)",
            options.split,
            overlap,
            len(shards),
            meta.get("dataset"),
        )
    data = RunData(
        shards,
        tuple(model.config.experts),
        tokenizer,
        embeddings,
        options.vqa_annotations or tuple(meta.get("vqa_annotations", ())),
    )
    stream = data.stream(
        config,
        Distributed(),
        train=False,
        keys=split_keys(options.split, options.split_file),
        batch_size=options.batch_size,
    )
    batches = make_loader(stream, num_workers=min(2, config.num_workers))
    if config.task == "vqa":
        answer_list = read_answer_list(options.answer_list)
        result = _evaluate_vqa(model, batches, tokenizer, answer_list, config, device, options.max_samples)
    else:
        result = _evaluate_captions(model, batches, tokenizer, config, device, options.max_samples)
    result.update(
        checkpoint=str(options.checkpoint),
        split=options.split,
        dataset=dataset,
        training_overlap_shards=overlap,
    )
    out = options.out or options.checkpoint / f"eval_{options.split}.json"
    Path(out).write_text(json.dumps(result, indent=1, ensure_ascii=False))
    logger.info("predictions and metrics written to %s", out)
    return result


def training_overlap(shards: Sequence[str], meta: Mapping[str, Any]) -> int:
    """How many of ``shards`` the checkpoint was trained on (its dataset's shards, as they are now).

    The trainer reads every sample of its dataset's shards, so any shared shard means the split holds
    training images (a key-filtered split of the training dataset included). 0 when the training
    shards can no longer be listed.
    """
    try:
        trained = dataset_shards(meta["dataset"], meta.get("labels_root"))
    except (KeyError, FileNotFoundError, OSError, ValueError):
        return 0
    seen = {_same_file_key(url) for url in trained}
    return sum(_same_file_key(url) in seen for url in shards)


def _same_file_key(url: str) -> str:
    return url if "://" in url else os.path.realpath(url)


def format_metrics(result: Mapping[str, Any]) -> str:
    """The metrics of an ``evaluate`` result as a table, under one line naming what was scored (and a
    warning when the split holds training images)."""
    metric = "CIDEr" if result["task"] == "caption" else "accuracy"
    score = result.get(metric)
    rows = [("metric", "value"), (metric, "n/a (no ground truth)" if score is None else f"{score:.2f}")]
    rows.append(("samples", str(result.get("samples"))))
    width = max(len(name) for name, _ in rows)
    lines = [
        f"{result.get('checkpoint')} on {result.get('dataset')} (split {result.get('split')})",
        *(f"{name:<{width}}  {value}" for name, value in rows),
    ]
    if result.get("training_overlap_shards"):
        lines.append(
            f"WARNING: {result['training_overlap_shards']} shard(s) of this split were used for training: "
            "this is not a held-out score"
        )
    return "\n".join(lines)


def _evaluate_captions(
    model: PrismerModel,
    batches: Iterable[dict[str, Any]],
    tokenizer: Tokenizer,
    config: TrainConfig,
    device: torch.device,
    max_samples: int | None,
) -> dict[str, Any]:
    predictions: dict[str, str] = {}
    references: dict[str, list[str]] = {}
    for batch in batches:
        captions = generate_captions(
            model,
            batch,
            tokenizer,
            config.prefix,
            device,
            config.num_beams,
            config.min_length,
            config.max_length,
        )
        for key, caption, refs in zip(batch["keys"], captions, batch["references"]):
            predictions[key], references[key] = display_caption(caption), refs
        if max_samples and len(predictions) >= max_samples:
            break
    return {
        "task": "caption",
        "samples": len(predictions),
        "CIDEr": cider(predictions, references),
        "predictions": [{"image_id": k, "caption": v} for k, v in sorted(predictions.items())],
    }


def read_answer_list(path: str | None) -> list[str]:
    """The candidate answers of VQA's rank mode (a JSON list)."""
    if not path:
        raise ValueError("VQA evaluation (rank mode) needs --answer-list FILE (a JSON list of answers)")
    with fsspec.open(path, "r", encoding="utf-8") as handle:
        return json.load(handle)


def _evaluate_vqa(
    model: PrismerModel,
    batches: Iterable[dict[str, Any]],
    tokenizer: Tokenizer,
    answer_list: Sequence[str],
    config: TrainConfig,
    device: torch.device,
    max_samples: int | None,
) -> dict[str, Any]:
    predictions, scores = [], []
    for batch in batches:
        answers = rank_answers(model, batch, tokenizer, answer_list, device, config.vqa_candidates)
        for qid, answer, truth in zip(batch["question_ids"], answers, batch["answers"]):
            predictions.append({"question_id": qid, "answer": answer})
            if truth:
                scores.append(vqa_accuracy(answer, truth))
        if max_samples and len(predictions) >= max_samples:
            break
    accuracy = 100 * sum(scores) / len(scores) if scores else None
    return {"task": "vqa", "samples": len(predictions), "accuracy": accuracy, "predictions": predictions}
