"""Beam search for the Prismer decoder, with HF transformers 4.26 semantics, batched.

Like the original, each step re-runs the whole prefix; only the vision tokens' cross-attention
keys/values are computed once. Lengths include the prompt, there is no early stopping, and a beam's score
is its sum of log-probabilities / length ** ``length_penalty``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

KeyValue = tuple[torch.Tensor, torch.Tensor]  # attention keys, values: [b, heads, tokens, head_dim]


class Decoder(Protocol):
    """What beam search needs of the text decoder (``prismer_trainer.model.TextDecoder``)."""

    def cross_keys_values(self, vision: torch.Tensor) -> list[KeyValue]: ...

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        vision: list[KeyValue],
        last_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class GenerationOutput:
    sequences: torch.Tensor  # [b, <= max_length] ids, prompt included; pad after an early </s>
    scores: torch.Tensor  # [b] beam score: sum of log-probs / sequence length ** length_penalty


class _Hypotheses:
    """The ``num_beams`` best finished sequences of one sample (HF ``BeamHypotheses``)."""

    def __init__(self, num_beams: int, length_penalty: float) -> None:
        self.num_beams, self.length_penalty = num_beams, length_penalty
        self.beams: list[tuple[float, torch.Tensor]] = []
        self.worst_score = 1e9

    def add(self, tokens: torch.Tensor, sum_logprobs: float) -> None:
        score = sum_logprobs / (tokens.shape[-1] ** self.length_penalty)
        if len(self.beams) < self.num_beams or score > self.worst_score:
            self.beams.append((score, tokens))
            if len(self.beams) > self.num_beams:
                ranked = sorted((s, i) for i, (s, _) in enumerate(self.beams))
                del self.beams[ranked[0][1]]
                self.worst_score = ranked[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def is_done(self, best_sum_logprobs: float, cur_len: int) -> bool:
        if len(self.beams) < self.num_beams:
            return False
        return self.worst_score >= best_sum_logprobs / cur_len**self.length_penalty

    def best(self) -> tuple[float, torch.Tensor]:
        return sorted(self.beams, key=lambda b: b[0])[-1]


@torch.no_grad()
def beam_search(
    decoder: Decoder,
    vision_tokens: torch.Tensor,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor | None,
    *,
    num_beams: int,
    max_length: int,
    min_length: int,
    length_penalty: float,
    pad_token_id: int,
    eos_token_id: int,
) -> GenerationOutput:
    """Beam search from ``prompt_ids`` over ``vision_tokens``; the best sequence per sample."""
    batch, prompt_len = prompt_ids.shape
    if prompt_len >= max_length:
        raise ValueError(f"prompt length {prompt_len} >= max_length {max_length}")
    if prompt_mask is None:
        prompt_mask = torch.ones_like(prompt_ids)
    ids = prompt_ids.repeat_interleave(num_beams, dim=0)
    mask = prompt_mask.repeat_interleave(num_beams, dim=0)
    # The vision tokens' cross-attention keys/values are the same at every step: project them once per
    # sample, then repeat them for each beam.
    vision = [
        (k.repeat_interleave(num_beams, dim=0), v.repeat_interleave(num_beams, dim=0))
        for k, v in decoder.cross_keys_values(vision_tokens)
    ]
    beam_scores = torch.zeros(batch, num_beams, device=ids.device)
    beam_scores[:, 1:] = -1e9  # all beams start identical: only the first may expand at step one
    beam_scores = beam_scores.view(-1)
    hyps = [_Hypotheses(num_beams, length_penalty) for _ in range(batch)]
    done = [False] * batch
    cur_len = prompt_len
    while True:
        _, logits = decoder(ids, mask, vision, last_only=True)
        logprobs = F.log_softmax(logits[:, -1].float(), dim=-1)
        if cur_len < min_length:
            logprobs[:, eos_token_id] = -float("inf")
        vocab = logprobs.shape[-1]
        scores = (logprobs + beam_scores[:, None]).view(batch, num_beams * vocab)
        top_scores, top_ids = torch.topk(scores, 2 * num_beams, dim=1, largest=True, sorted=True)
        beam_scores, tokens, sources = _select_beams(
            ids, top_scores, top_ids, vocab, hyps, done, cur_len, num_beams, pad_token_id, eos_token_id
        )
        ids = torch.cat([ids[sources], tokens[:, None]], dim=-1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
        cur_len += 1
        if all(done) or cur_len >= max_length:
            break
    return _finalize(ids, beam_scores, hyps, done, num_beams, max_length, pad_token_id, eos_token_id)


def _select_beams(
    ids: torch.Tensor,
    top_scores: torch.Tensor,
    top_ids: torch.Tensor,
    vocab: int,
    hyps: list[_Hypotheses],
    done: list[bool],
    cur_len: int,
    num_beams: int,
    pad_token_id: int,
    eos_token_id: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HF ``BeamSearchScorer.process``: keep the best ``num_beams`` non-EOS continuations per sample and move
    EOS continuations ranked within the top ``num_beams`` into the finished hypotheses."""
    batch = top_scores.shape[0]
    scores_l, ids_l = top_scores.tolist(), top_ids.tolist()  # one device sync per step
    new_scores = [[0.0] * num_beams for _ in range(batch)]
    new_tokens = [[pad_token_id] * num_beams for _ in range(batch)]
    new_sources = [[b * num_beams + j for j in range(num_beams)] for b in range(batch)]
    for b in range(batch):
        if done[b]:
            continue
        slot = 0
        for rank, (score, flat) in enumerate(zip(scores_l[b], ids_l[b])):
            source, token = b * num_beams + flat // vocab, flat % vocab
            if token == eos_token_id:
                if rank < num_beams:
                    hyps[b].add(ids[source].clone(), score)
                continue
            new_scores[b][slot], new_tokens[b][slot], new_sources[b][slot] = score, token, source
            slot += 1
            if slot == num_beams:
                break
        done[b] = hyps[b].is_done(max(scores_l[b]), cur_len)
    device = ids.device
    return (
        torch.tensor(new_scores, dtype=top_scores.dtype, device=device).view(-1),
        torch.tensor(new_tokens, dtype=ids.dtype, device=device).view(-1),
        torch.tensor(new_sources, dtype=torch.long, device=device).view(-1),
    )


def _finalize(
    ids: torch.Tensor,
    beam_scores: torch.Tensor,
    hyps: list[_Hypotheses],
    done: list[bool],
    num_beams: int,
    max_length: int,
    pad_token_id: int,
    eos_token_id: int,
) -> GenerationOutput:
    scores_l = beam_scores.tolist()
    for b, hyp in enumerate(hyps):
        if not done[b]:
            for j in range(num_beams):
                hyp.add(ids[b * num_beams + j], scores_l[b * num_beams + j])
    best = [hyp.best() for hyp in hyps]
    lengths = [seq.shape[-1] for _, seq in best]
    width = min(max(lengths) + 1, max_length)
    out = ids.new_full((len(best), width), pad_token_id)
    for b, (_, seq) in enumerate(best):
        out[b, : seq.shape[-1]] = seq
        if seq.shape[-1] < width:
            out[b, seq.shape[-1]] = eos_token_id
    scores = torch.tensor([s for s, _ in best], dtype=torch.float32, device=ids.device)
    return GenerationOutput(sequences=out, scores=scores)
