"""One decoding step, shared by beam search and sampling: next-token logits from KV caches,
the logits processors applied to them, and the stopping criteria checked after."""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .layers import KVCache

StoppingCriterion = Callable[[torch.Tensor, Optional[torch.Tensor]], Union[bool, torch.Tensor]]


# --------------------------------------------------------------------------------------------
# stopping criteria
# --------------------------------------------------------------------------------------------

class MaxLength:
    """Stop once sequences have ``max_length`` tokens (the default rule, at ``seq_len``).

    Beam search also reads ``max_length`` from the criteria to cap the length of its final
    output, like transformers' ``MaxLengthCriteria`` (which is accepted as well).
    """

    def __init__(self, max_length: int):
        self.max_length = max_length

    def __call__(self, input_ids: torch.Tensor, scores: Optional[torch.Tensor] = None) -> bool:
        return input_ids.shape[1] >= self.max_length


def should_stop(criteria: Sequence[StoppingCriterion], input_ids: torch.Tensor) -> bool:
    """True when, for every row, at least one criterion says stop (scores are not provided)."""
    done: Optional[torch.Tensor] = None  # rows stopped by per-row verdicts; built only if there are any
    for criterion in criteria:
        verdict = criterion(input_ids, None)
        if isinstance(verdict, torch.Tensor):
            verdict = verdict.to(device=input_ids.device, dtype=torch.bool)
            done = verdict if done is None else done | verdict
        elif verdict:
            return True
    return done is not None and bool(done.all())


def criteria_max_length(criteria: Sequence[StoppingCriterion]) -> Optional[int]:
    for criterion in criteria:
        length = getattr(criterion, "max_length", None)
        if isinstance(length, int):
            return length
    return None


# --------------------------------------------------------------------------------------------
# logits processors: [rows, vocab] scores in, processed scores out
# --------------------------------------------------------------------------------------------

def suppress_eos_before_min_length(scores: torch.Tensor, cur_len: int, min_len: int, eos_ids: torch.Tensor) -> torch.Tensor:
    """Forbid ending a caption before it has ``min_len`` tokens (sot included).

    Without it short, generic captions win: every step a caption continues costs score, so
    stopping early is cheap.
    """
    if cur_len >= min_len:
        return scores
    scores = scores.clone()
    scores[:, eos_ids] = -math.inf
    return scores


def penalize_repetitions(scores: torch.Tensor, input_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make tokens already in a row's sequence less likely (CTRL's repetition penalty).

    Each seen token's score is divided by ``penalty`` when positive and multiplied by it when
    negative, so ``penalty`` > 1 always lowers it, once, however often it occurred. 1.0 is a
    no-op and skipped.
    """
    if penalty == 1.0:
        return scores
    seen = torch.gather(scores, 1, input_ids)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return scores.scatter(1, input_ids, seen)


def keep_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` highest scores (ties with the k-th included), set the others to -inf.

    ``k`` = 1 is greedy decoding.
    """
    k = min(k, scores.shape[-1])
    kth = torch.topk(scores, k)[0][..., -1:]
    return scores.masked_fill(scores < kth, -math.inf)


def keep_top_p(scores: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the most likely tokens whose probabilities sum to ``p``.

    Tokens are sorted from least to most likely and dropped while the cumulative probability
    of what is dropped stays at or below 1 - p; the most likely token always survives.
    """
    ascending, order = torch.sort(scores, descending=False)
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= (1 - p)
    drop_sorted[..., -1:] = False
    drop = drop_sorted.scatter(1, order, drop_sorted)
    return scores.masked_fill(drop, -math.inf)


def apply_temperature(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """Probabilities from scores sharpened (< 1) or flattened (> 1) by ``temperature``.

    As in open_clip it comes after top-k / top-p filtering, so it changes which of the kept
    tokens is drawn, not which are kept.
    """
    return F.softmax(scores / temperature, dim=-1)


# --------------------------------------------------------------------------------------------
# incremental decoding state
# --------------------------------------------------------------------------------------------

class IncrementalDecoder:
    """Next-token logits for a set of rows (captions), fed one new token per step.

    Holds the text encoder's and the multimodal decoder's KV caches for the current rows and
    the cross-attention keys/values of their images. Rows come from ``image_index``: either
    one image per row, or (beam search) runs of ``rows_per_image`` consecutive rows sharing an
    image, in which case the image keys/values are shared, not copied.

    The step itself (``_step``) takes tensors only and makes no host-side decision, so with
    ``compile=True`` it runs under ``torch.compile`` (CUDA graphs on a GPU).
    """

    def __init__(self, model, image_embs: torch.Tensor, max_len: int, compile: bool = False,
                 expected_len: Optional[int] = None):
        self.text, self.decoder, self.max_len = model.text, model.text_decoder, max_len
        self.buffers = model.decode_buffers
        self.text_cache: Optional[KVCache] = None
        self.decoder_cache: Optional[KVCache] = None
        # the caches hold what captions are expected to need (see KVCache), growing if they need more
        self.capacity = min(max_len, expected_len or max_len)
        self.image_kv_all = self.decoder.image_kv(image_embs)  # per image, computed once
        self.image_kv = self.image_kv_all
        self.query_projections = self.decoder.query_projections()
        self.image_index: Optional[torch.Tensor] = None
        self.step, self.compiled = self._step, compile
        if compile:
            mode = "reduce-overhead" if image_embs.is_cuda else None
            self.step = torch.compile(self._step, mode=mode, dynamic=True)
        self.reset()

    def reset(self):
        self.release()
        self.length = 0  # positions cached
        self.text_cache = self.text.new_cache(self.capacity, static=self.compiled, pool=self.buffers)
        self.decoder_cache = self.decoder.new_cache(self.capacity, static=self.compiled, pool=self.buffers)

    def release(self):
        """Hand the caches' buffers back to the model's pool, for the next caches to take."""
        if self.text_cache is not None:
            self.buffers.keep(self.text_cache.allocated + self.decoder_cache.allocated)

    def use_images(self, image_index: torch.Tensor, rows_per_image: int = 1):
        index = image_index[::rows_per_image]
        if self.image_index is not None and torch.equal(index, self.image_index):
            return
        self.image_index = index
        n_images = self.image_kv_all[0][0].shape[0]
        if index.numel() == n_images and torch.equal(index, torch.arange(n_images, device=index.device)):
            self.image_kv = self.image_kv_all
        else:
            self.image_kv = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.image_kv_all]

    def select(self, index: torch.Tensor):
        """Keep/reorder cached rows: new row i continues old row ``index[i]``."""
        if self.length:
            for cache in (self.text_cache, self.decoder_cache):
                cache.select(index, self.length)

    def _step(self, tokens: torch.Tensor, positions: torch.Tensor, previous: Optional[torch.Tensor]) -> torch.Tensor:
        embs = self.text.step(tokens, positions, self.text_cache, previous)
        logits = self.decoder.step(embs, positions, self.decoder_cache, self.image_kv, self.query_projections)
        return logits if logits.dtype == torch.float32 else logits.float()

    def logits(self, seq: torch.Tensor) -> torch.Tensor:
        """Float logits [rows, vocab] after ``seq`` [rows, L]; the cache holds ``seq[:, :length]``."""
        if seq.shape[1] > self.max_len:
            raise ValueError(f"generation ran past the model's context length ({self.max_len} tokens); "
                             "give it a stopping criterion that ends it sooner")
        if seq.shape[1] > self.capacity:
            self.capacity = min(self.max_len, max(seq.shape[1], 2 * self.capacity))
            for cache in (self.text_cache, self.decoder_cache):
                cache.grow(self.capacity)
        past = self.length
        previous = seq[:, past - 1] if past else None
        positions = torch.arange(past, seq.shape[1], device=seq.device)
        self.length = seq.shape[1]
        for cache in (self.text_cache, self.decoder_cache):
            cache.attend_span(self.capacity if self.compiled else self.length)
        return self.step(seq[:, past:], positions, previous)


class FullRecompute:
    """Fallback for text towers without a KV-cached ``step`` (the Hugging Face ones).

    Runs the whole model on the whole sequence each step, exactly like open_clip.
    """

    def __init__(self, model, image_latent: torch.Tensor, image_embs: torch.Tensor, max_len: int):
        self.model, self.max_len = model, max_len
        self.latent_all, self.embs_all = image_latent, image_embs
        self.latent, self.embs = image_latent, image_embs

    def reset(self):
        pass

    def release(self):
        pass

    @property
    def length(self) -> int:
        return 0

    def use_images(self, image_index: torch.Tensor, rows_per_image: int = 1):
        self.latent = self.latent_all.index_select(0, image_index)
        self.embs = self.embs_all.index_select(0, image_index)

    def select(self, index: torch.Tensor):
        pass

    def logits(self, seq: torch.Tensor) -> torch.Tensor:
        if seq.shape[1] > self.max_len:
            raise ValueError(f"generation ran past the model's context length ({self.max_len} tokens); "
                             "give it a stopping criterion that ends it sooner")
        out = self.model(None, seq, image_latent=self.latent, image_embs=self.embs, output_labels=False)
        return out["logits"][:, -1].float()
