"""What a run reads, assembled once for training and evaluation alike: the label shards, the experts the
model sees, the tokenizer, the label embeddings, and the batch streams over them."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from prismer_trainer.augment import AugmentConfig
from prismer_trainer.checkpoint import EMBEDDINGS_FILE, TOKENIZER_DIR, read_embeddings
from prismer_trainer.distributed import Distributed
from prismer_trainer.embeddings import LabelEmbeddings, default_embeddings
from prismer_trainer.model_config import DEFAULT_EXPERTS, KNOWN_EXPERTS, ModelConfig
from prismer_trainer.samples import QaIndex, SampleDecoder
from prismer_trainer.shards import caption_corpus, labels_root
from prismer_trainer.stream import BatchStream
from prismer_trainer.text import HFTokenizer, Tokenizer, WordTokenizer, load_tokenizer, pre_question
from prismer_trainer.train_config import TrainConfig

logger = logging.getLogger(__name__)


@dataclass
class RunData:
    """A run's data: its label shards and how their samples become model inputs."""

    shards: list[str]
    experts: tuple[str, ...]
    tokenizer: Tokenizer
    embeddings: LabelEmbeddings
    vqa_annotations: tuple[str, ...] = ()

    def stream(
        self,
        config: TrainConfig,
        world: Distributed,
        *,
        train: bool,
        start: int = 0,
        keys: set[str] | None = None,
        batch_size: int | None = None,
    ) -> BatchStream:
        """This rank's batches: augmented and endless from loader position ``start`` (``train``), or one
        in-order pass, resize only, over the samples ``keys`` names (all when None)."""
        return BatchStream(
            self.shards,
            self.decoder(config, train),
            self.embeddings,
            batch_size or config.micro_batch_size,
            train=train,
            seed=config.seed,
            rank=world.rank,
            world_size=world.world_size,
            shuffle_buffer=config.shuffle_buffer,
            start_batch=start,
            keys=keys,
        )

    def decoder(self, config: TrainConfig, train: bool) -> SampleDecoder:
        augment = None
        if train:
            augment = AugmentConfig(
                config.crop_scale, hflip=config.hflip, randaug_n=config.randaug_n, randaug_m=config.randaug_m
            )
        if config.task == "vqa" and not self.vqa_annotations:
            raise ValueError(
                "the vqa stage needs --vqa-annotations FILE (a list of {image, question, answer})"
            )
        return SampleDecoder(
            experts=self.experts,
            tokenizer=self.tokenizer,
            resolution=config.resolution,
            augment=augment,
            task=config.task,
            prefix=config.prefix,
            max_words=config.max_words,
            max_tokens=config.max_tokens,
            label_resolution=config.label_resolution,
            qa=QaIndex.from_files(self.vqa_annotations) if config.task == "vqa" else None,
            hashed_words=config.model == "tiny",  # real configs mask OCR words that lack stored features
        )


def resolve_experts(choice: str, model: str, dataset: str, root: str | None) -> tuple[str, ...]:
    """``all`` = Prismer's six; ``none`` = PrismerZ; ``auto`` = the experts the dataset was labelled with
    (its ``_run.json``) for ``tiny``, Prismer's six for the real models (missing members are masked)."""
    if choice == "none":
        return ()
    if choice == "all" or (choice == "auto" and model != "tiny"):
        return DEFAULT_EXPERTS
    if choice != "auto":
        experts = tuple(e.strip() for e in choice.split(",") if e.strip())
        unknown = [e for e in experts if e not in KNOWN_EXPERTS]
        if unknown:
            raise ValueError(f"unknown experts {unknown}; known: {list(KNOWN_EXPERTS)}")
        return experts
    run = Path(labels_root(root)) / dataset / "_run.json"
    if "/" in dataset or not run.exists():
        logger.warning("%s not found: training with Prismer's six experts", run)
        return DEFAULT_EXPERTS
    labelled = json.loads(run.read_text()).get("experts", {})
    return tuple(e for e in KNOWN_EXPERTS if e in labelled)


def resolve_tokenizer(
    choice: str | None,
    config: TrainConfig,
    shards: Sequence[str],
    vqa_annotations: Sequence[str],
    resume_from: Path | None,
) -> Tokenizer:
    """The checkpoint's tokenizer when resuming; else ``word`` (a vocabulary of this dataset's texts, for
    ``tiny``) or a transformers tokenizer (RoBERTa for the real presets)."""
    if resume_from is not None:
        return load_tokenizer(resume_from / TOKENIZER_DIR)
    if choice is None:
        choice = "word" if config.model == "tiny" else ModelConfig.preset(config.model).text_pretrained
    if choice != "word":
        return HFTokenizer(choice)
    if config.task == "vqa":
        rows = [r for rs in QaIndex.from_files(vqa_annotations).rows.values() for r in rs]
        answers = [a for r in rows for a in (r["answer"] if isinstance(r["answer"], list) else [r["answer"]])]
        questions = [pre_question(r["question"], config.max_words) for r in rows]
        return WordTokenizer.build(questions + [a.capitalize() for a in answers])
    return WordTokenizer.build(caption_corpus(shards, config.prefix, config.max_words))


def resolve_embeddings(
    choice: str | None,
    experts: tuple[str, ...],
    model: str,
    resume_from: Path | None,
    root: str | None = None,
) -> LabelEmbeddings:
    """The checkpoint's tables when resuming, else ``--label-embeddings DIR``, else the label root's."""
    if resume_from is not None and (resume_from / EMBEDDINGS_FILE).exists():
        return read_embeddings(resume_from)
    if choice:
        return LabelEmbeddings.from_dir(choice)
    return default_embeddings(root, experts, model)  # the label root's embeddings/ (docs/FORMAT.md)
