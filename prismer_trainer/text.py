"""Text: Prismer's caption/question cleaning, the tokenizers, and the token sequences the model trains on.

The word-level tokenizer is the offline demo's (built from the training captions); the real presets use
RoBERTa's BPE through transformers. Checkpoints carry their tokenizer (``Tokenizer.save``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from prismer_trainer.model_config import LEGACY_HUB_IDS

_SPECIAL_CHARS = re.compile(r'[.!"()*#:;~]')
_SPACES = re.compile(r"\s{2,}")


# ================================================================================================
# Captions and questions
# ================================================================================================
def pre_caption(caption: str, max_words: int = 30) -> str:
    """Prismer's caption cleaning: capitalise (which lower-cases the rest), turn ``.!"()*#:;~`` into
    spaces, squeeze whitespace, keep at most ``max_words`` words."""
    text = _SPECIAL_CHARS.sub(" ", caption.capitalize())
    text = _SPACES.sub(" ", text).rstrip("\n").strip(" ")
    words = text.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else text


def pre_question(question: str, max_words: int = 30) -> str:
    """:func:`pre_caption` for questions, ending in ``?``."""
    text = pre_caption(question, max_words)
    return text if text.endswith("?") else text + "?"


def training_text(caption: str, prefix: str = "", max_words: int = 30) -> str:
    """The supervised text: ``pre_caption(prefix + " " + caption)`` (fine-tune prefix "A picture of")."""
    return pre_caption(f"{prefix} {caption}" if prefix else caption, max_words)


# ================================================================================================
# Tokenizers
# ================================================================================================
class Tokenizer(Protocol):
    """What the loader and loop need from a tokenizer (word-level for the demo, RoBERTa's BPE for real)."""

    bos_id: int
    eos_id: int
    pad_id: int
    vocab_size: int

    def encode_text(self, text: str) -> list[int]: ...  # no special tokens

    def decode(self, ids: Sequence[int]) -> str: ...  # special tokens dropped

    def save(self, directory: Path) -> None: ...


class WordTokenizer:
    """A whitespace word vocabulary built from the training captions (the demo has no RoBERTa offline).

    Ids 0–3 are ``<s> <pad> </s> <unk>``, RoBERTa's ids for the first three, so the model's defaults hold.
    """

    SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
    kind = "word"

    def __init__(self, words: Sequence[str]) -> None:
        self.itos = [*self.SPECIALS, *(w for w in words if w not in self.SPECIALS)]
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.bos_id, self.pad_id, self.eos_id, self.unk_id = 0, 1, 2, 3
        self.vocab_size = len(self.itos)

    @classmethod
    def build(cls, texts: Sequence[str]) -> WordTokenizer:
        words = sorted({w for text in texts for w in text.split()})
        return cls(words)

    def encode_text(self, text: str) -> list[int]:
        return [self.stoi.get(w, self.unk_id) for w in text.split()]

    def decode(self, ids: Sequence[int]) -> str:
        special = {self.bos_id, self.pad_id, self.eos_id}
        return " ".join(self.itos[i] for i in ids if i not in special and 0 <= i < self.vocab_size)

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        payload = {"kind": self.kind, "words": self.itos[len(self.SPECIALS) :]}
        (directory / "word_vocab.json").write_text(json.dumps(payload, ensure_ascii=False))

    @classmethod
    def load(cls, directory: Path) -> WordTokenizer:
        return cls(json.loads((directory / "word_vocab.json").read_text())["words"])


class TokenizerUnavailable(RuntimeError):
    """RoBERTa's tokenizer cannot be loaded (offline, not cached); the message says what to do."""


class HFTokenizer:
    """A transformers tokenizer (``roberta-base`` / ``roberta-large`` or a local directory)."""

    kind = "hf"

    def __init__(self, source: str) -> None:
        try:
            from transformers import AutoTokenizer

            self.tok = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as exc:
            hub_id = LEGACY_HUB_IDS.get(source, source)
            raise TokenizerUnavailable(
                f"cannot load the tokenizer {source!r}: {exc}\nIt is neither a local directory nor in the "
                "Hugging Face cache, and the hub cannot be reached (HF_HUB_OFFLINE?). On a machine with "
                f"access run `huggingface-cli download {hub_id}` (or save_pretrained it to a directory and "
                "pass --tokenizer DIR); checkpoints carry their tokenizer, so eval needs no download."
            ) from exc
        self.bos_id, self.eos_id = self.tok.bos_token_id, self.tok.eos_token_id
        self.pad_id, self.vocab_size = self.tok.pad_token_id, len(self.tok)

    def encode_text(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tok.decode(list(ids), skip_special_tokens=True)).strip()

    def save(self, directory: Path) -> None:
        self.tok.save_pretrained(str(directory))


def load_tokenizer(directory: Path) -> Tokenizer:
    """The tokenizer saved next to a checkpoint."""
    if (directory / "word_vocab.json").exists():
        return WordTokenizer.load(directory)
    return HFTokenizer(str(directory))


# ================================================================================================
# Token sequences
# ================================================================================================
def caption_tokens(
    tokenizer: Tokenizer, text: str, prompt: str, max_length: int
) -> tuple[list[int], list[int]]:
    """``<s> text </s>`` (truncated to ``max_length``) and its targets: the ``<s> prompt`` positions
    are -100, as Prismer masks ``prompt_length = len(tok(prefix)) - 1`` tokens."""
    body = tokenizer.encode_text(text)[: max_length - 2]
    ids = [tokenizer.bos_id, *body, tokenizer.eos_id]
    prompt_length = 1 + len(tokenizer.encode_text(prompt)) if prompt else 1
    return ids, [-100] * prompt_length + ids[prompt_length:]


def question_answer_tokens(
    tokenizer: Tokenizer, question: str, answer: str | None, max_question: int = 35
) -> tuple[list[int], list[int]]:
    """VQA as Prismer: ``<s> question`` (≤ 35 tokens) then `` Answer </s>``; only the answer is supervised."""
    prompt = [tokenizer.bos_id, *tokenizer.encode_text(question)[:max_question]]
    if answer is None:
        return prompt, [-100] * len(prompt)
    target = [*tokenizer.encode_text(" " + answer.capitalize()), tokenizer.eos_id]
    return prompt + target, [-100] * len(prompt) + target
