"""Caption generation for CoCa: group beam search and top-k / top-p sampling.

The results are token-for-token those of open_clip 3.3.0's ``CoCa.generate`` (which drives
Hugging Face ``transformers`` pieces), but the work is done incrementally:

* the image is encoded once per image, and the decoder's cross-attention keys/values are
  computed once per image and shared by all its beams;
* each step feeds only the newest token through the text encoder and the decoder, with the
  past kept in KV caches that are reordered when beams are;
* sampling drops finished captions from the batch; beam search stops computing an image
  once all its beam groups are done.

open_clip recomputes every position of every beam each step. The behaviours that matter for
identical output, some of which look like accidents but are reproduced on purpose, are
listed below and noted where they are implemented.

REFERENCE QUIRKS (open_clip 3.3.0 + transformers 4.55.4), all reproduced:

1. Beam search ranks candidates by the sum of *raw logits* (no log-softmax); the
   min-length and repetition-penalty processors are applied to raw logits too.
2. The pad id (0) is also the token "!". In sampling, a caption whose last token is the pad
   id counts as finished, so sampling "!" ends a caption. In the text encoder a key is hidden
   when the token *before* it is the pad id (see ``TextTransformer.key_keep_mask``).
3. When a beam group of an image is done, the reference refills its beams with copies of the
   first beam of the same group of the *first image* of the batch, plus a pad token. The
   rows are never used for the result; we reproduce them only so that custom stopping
   criteria see the same ``input_ids``.
4. A finished beam hypothesis is scored with the length it would have *with* its eos token
   (``sum / (len + 1)``), but a beam still running at the end with its own length.
5. Sampling forces eos when the *window* length (at most ``max_seq_len``) plus one reaches
   ``seq_len``, and the window slides once a caption is longer than ``max_seq_len``: the
   model then sees only the last ``max_seq_len`` tokens, from position 0.
6. Beam search ignores the ``text`` prefix; sampling continues it.
7. ``stopping_criteria`` replaces the max-length rule rather than adding to it.

Deliberate differences, none of which changes the tokens of a run open_clip completes: the
model is always put in eval mode (open_clip's beam search leaves it as it is); settings
open_clip asserts on or crashes on later (a ``seq_len`` beyond the positional embeddings)
are a ``ValueError`` up front; fixed-length sampling with custom criteria that never stop
ends at ``seq_len`` instead of looping forever; several eos ids are accepted.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .packed import packed_linears

SOT_TOKEN_ID = 49406
EOS_TOKEN_ID = 49407
GENERATION_TYPES = ("beam_search", "top_k", "top_p")

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


def _should_stop(criteria: Sequence[StoppingCriterion], input_ids: torch.Tensor) -> bool:
    """True when, for every row, at least one criterion says stop (scores are not provided)."""
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for criterion in criteria:
        verdict = criterion(input_ids, None)
        if isinstance(verdict, torch.Tensor):
            done = done | verdict.to(device=done.device, dtype=torch.bool)
        elif verdict:
            return True
    return bool(done.all())


def _criteria_max_length(criteria: Sequence[StoppingCriterion]) -> Optional[int]:
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

class _IncrementalDecoder:
    """Next-token logits for a set of rows (captions), fed one new token per step.

    Holds the text encoder's and the multimodal decoder's KV caches for the current rows and
    the cross-attention keys/values of their images. Rows come from ``image_index``: either
    one image per row, or (beam search) runs of ``rows_per_image`` consecutive rows sharing an
    image, in which case the image keys/values are shared, not copied.
    """

    def __init__(self, model, image_embs: torch.Tensor, max_len: int):
        self.text, self.decoder, self.max_len = model.text, model.text_decoder, max_len
        self.image_kv_all = self.decoder.image_kv(image_embs)  # per image, computed once
        self.image_kv = self.image_kv_all
        self.image_index: Optional[torch.Tensor] = None
        self.reset()

    def reset(self):
        self.text_cache = self.text.new_cache()
        self.decoder_cache = self.decoder.new_cache()

    @property
    def length(self) -> int:
        return self.text_cache[0].length

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
            for cache in (*self.text_cache, *self.decoder_cache):
                cache.select(index)

    def logits(self, seq: torch.Tensor) -> torch.Tensor:
        """Float logits [rows, vocab] after ``seq`` [rows, L]; the cache holds ``seq[:, :length]``."""
        if seq.shape[1] > self.max_len:
            raise ValueError(f"generation ran past the model's context length ({self.max_len} tokens); "
                             "give it a stopping criterion that ends it sooner")
        past = self.length
        previous = seq[:, past - 1] if past else None
        embs = self.text.step(seq[:, past:], self.text_cache, previous)
        return self.decoder.step(embs, self.decoder_cache, self.image_kv).float()


class _FullRecompute:
    """Fallback for text towers without a KV-cached ``step`` (the Hugging Face ones).

    Runs the whole model on the whole sequence each step, exactly like open_clip.
    """

    def __init__(self, model, image_latent: torch.Tensor, image_embs: torch.Tensor, max_len: int):
        self.model, self.max_len = model, max_len
        self.latent_all, self.embs_all = image_latent, image_embs
        self.latent, self.embs = image_latent, image_embs

    def reset(self):
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


def max_decode_length(model) -> int:
    """Longest token sequence the model can be run on, as in open_clip.

    The text encoder appends a CLS token, which needs a positional embedding of its own, and
    open_clip's decoder slices a causal mask of ``context_length`` positions.
    """
    limit = model.text_decoder.context_length
    text = model.text
    if hasattr(text, "positional_embedding"):
        n_pos = text.positional_embedding.shape[0] - (1 if getattr(text, "cls_emb", None) is not None else 0)
        limit = min(limit, n_pos)
    return limit


# --------------------------------------------------------------------------------------------
# group beam search
# --------------------------------------------------------------------------------------------

class BeamHypotheses:
    """The ``size`` best finished captions of one (image, beam group).

    Same bookkeeping as transformers' ``BeamHypotheses`` with ``early_stopping=False``, in
    Python floats, so ties and the stop rule come out the same: a hypothesis' score is its
    summed logits over its length (``length_penalty`` = 1), and a group is done once its worst
    kept hypothesis beats what the best running beam could reach at the current length.
    """

    def __init__(self, size: int, length_penalty: float = 1.0):
        self.size = size
        self.length_penalty = length_penalty
        self.items: list[tuple[float, torch.Tensor]] = []  # (score, tokens), in insertion order
        self.worst_score = 1e9

    def __len__(self) -> int:
        return len(self.items)

    def add(self, tokens: torch.Tensor, sum_logits: float, length: int):
        score = sum_logits / (length ** self.length_penalty)
        if len(self.items) < self.size or score > self.worst_score:
            self.items.append((score, tokens))
            if len(self.items) > self.size:
                ranked = sorted((s, i) for i, (s, _) in enumerate(self.items))
                del self.items[ranked[0][1]]
                self.worst_score = ranked[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def is_done(self, best_sum_logits: float, cur_len: int) -> bool:
        if len(self.items) < self.size:
            return False
        return self.worst_score >= best_sum_logits / (cur_len ** self.length_penalty)


def _beam_search(stepper, n_images: int, device, *, sot: int, eos_ids: list[int], pad: int, num_beams: int,
                 num_beam_groups: int, min_seq_len: int, repetition_penalty: float,
                 criteria: Sequence[StoppingCriterion]) -> torch.Tensor:
    B, N, G = n_images, num_beams, num_beam_groups
    S = N // G  # beams per group
    eos_t = torch.tensor(eos_ids, device=device)
    rows_all = torch.arange(B * N, device=device)
    # global row of beam 0 of every (image, group): rows are image-major, then group, then beam
    group_first_row = (torch.arange(B, device=device)[:, None] * N + torch.arange(G, device=device)[None, :] * S)

    input_ids = torch.full((B * N, 1), sot, dtype=torch.long, device=device)
    # Only the first beam of each group starts "alive" (0); the others at -1e9, so the first
    # step's candidates all extend the first beam and a group's beams do not start identical.
    beam_scores = torch.full((B, N), -1e9, dtype=torch.float32, device=device)
    beam_scores[:, ::S] = 0
    beam_scores = beam_scores.view(-1)
    hyps = [[BeamHypotheses(S) for _ in range(G)] for _ in range(B)]
    done = [[False] * G for _ in range(B)]

    # All beams of an image start identical: run the first step once per image.
    stepper.use_images(torch.arange(B, device=device))
    active_images = list(range(B))
    cache_pos = rows_all // N  # cached row of each global row (-1: not cached)
    first = True

    while True:
        cur_len = input_ids.shape[1]
        active = torch.tensor(active_images, device=device)
        active_rows = (active[:, None] * N + torch.arange(N, device=device)).view(-1)
        if first:
            logits = stepper.logits(input_ids[::N]).repeat_interleave(N, dim=0)
        else:
            logits_active = stepper.logits(input_ids[active_rows])
            if len(active_images) == B:
                logits = logits_active
            else:  # finished images are not computed; their rows are never used
                logits = logits_active.new_zeros(B * N, logits_active.shape[1])
                logits[active_rows] = logits_active
        V = logits.shape[1]

        scores = suppress_eos_before_min_length(logits, cur_len, min_seq_len, eos_t)
        scores = penalize_repetitions(scores, input_ids, repetition_penalty)
        scores = scores + beam_scores[:, None]
        # every (image, group) picks 2 * S candidates among its S beams x vocabulary; the groups
        # are independent (no diversity penalty in open_clip), so all are ranked in one call
        top_scores, top_flat = torch.topk(scores.view(B * G, S * V), 2 * S, dim=1, largest=True, sorted=True)
        top_parent = torch.div(top_flat, V, rounding_mode="floor")
        top_token = top_flat % V
        top_is_eos = torch.isin(top_token, eos_t)

        # The next beams are the S best candidates that do not end the caption.
        order = torch.sort(top_is_eos.to(torch.uint8), dim=1, stable=True)[1][:, :S]
        next_scores = top_scores.gather(1, order)
        next_tokens = top_token.gather(1, order)
        next_parent = top_parent.gather(1, order)
        parent_row = (group_first_row.view(-1, 1) + next_parent).view(B, G, S)

        done_before = torch.tensor(done, device=device)  # [B, G]
        if done_before.any():
            # A done group keeps score 0 and appends pad; the reference refills its beams from
            # beam 0 of the same group of image 0 (quirk 3).
            keep = ~done_before[..., None]
            next_scores = torch.where(keep.view(B * G, 1), next_scores, torch.zeros_like(next_scores))
            next_tokens = torch.where(keep.view(B * G, 1), next_tokens, torch.full_like(next_tokens, pad))
            parent_row = torch.where(keep, parent_row, group_first_row[0].view(1, G, 1))

        # Candidates among the top S that end the caption become hypotheses (on the CPU: few).
        ends = (top_is_eos[:, :S]).nonzero().tolist()
        top_scores_cpu = top_scores.cpu()
        parent_cpu = top_parent.cpu() if ends else None
        for bg, rank in ends:  # row-major: per (image, group), in rank order
            b, g = divmod(bg, G)
            if done[b][g]:
                continue
            row = b * N + g * S + int(parent_cpu[bg, rank])
            hyps[b][g].add(input_ids[row].clone(), top_scores_cpu[bg, rank].item(), cur_len + 1)
        if bool((top_is_eos.gather(1, order) & ~done_before.view(B * G, 1)).any()):
            raise ValueError("more beam candidates end in eos than there are beams; check eos_token_id")
        for b in range(B):
            for g in range(G):
                if not done[b][g]:
                    done[b][g] = hyps[b][g].is_done(top_scores_cpu[b * G + g, 0].item(), cur_len + 1)

        parent_row = parent_row.view(-1)
        input_ids = torch.cat([input_ids[parent_row], next_tokens.view(-1, 1)], dim=1)
        beam_scores = next_scores.view(-1)

        all_done = all(all(d) for d in done)
        if all_done or _should_stop(criteria, input_ids):
            break

        # Reorder the caches. Images whose groups are all done leave the batch; rows of a done
        # group inside a running image keep their own cache (their logits are never used).
        still = [b for b in active_images if not all(done[b])]
        new_rows = (torch.tensor(still, device=device)[:, None] * N + torch.arange(N, device=device)).view(-1)
        row_done = done_before.repeat_interleave(S, dim=1).view(-1)
        cache_parent = torch.where(row_done, rows_all, parent_row)
        stepper.select(cache_pos[cache_parent[new_rows]])
        cache_pos = torch.full((B * N,), -1, dtype=torch.long, device=device)
        cache_pos[new_rows] = torch.arange(new_rows.numel(), device=device)
        if first or still != active_images:
            stepper.use_images(torch.tensor(still, device=device).repeat_interleave(N), rows_per_image=N)
        active_images = still
        first = False

    return _finalize(hyps, done, input_ids, beam_scores, pad=pad, eos=eos_ids[0], N=N, G=G,
                     max_length=_criteria_max_length(criteria))


def _finalize(hyps, done, input_ids, beam_scores, *, pad: int, eos: int, N: int, G: int,
              max_length: Optional[int]) -> torch.Tensor:
    """Best hypothesis per image, padded to a common length; shorter ones get eos then pad."""
    B, S = len(hyps), N // G
    scores = beam_scores.tolist()
    length = input_ids.shape[1]
    for b in range(B):
        for g in range(G):
            if done[b][g]:
                continue
            for j in range(S):  # running beams are scored with their own length (quirk 4)
                row = b * N + g * S + j
                hyps[b][g].add(input_ids[row], scores[row], length)
    best = []
    for b in range(B):
        winner = None
        for g in range(G):
            for score, tokens in hyps[b][g].items:
                if winner is None or score >= winner[0]:  # ties: the later one, as a stable sort + pop
                    winner = (score, tokens)
        best.append(winner[1])
    lengths = [len(t) for t in best]
    out_len = max(lengths) + 1
    if max_length is not None:
        out_len = min(out_len, max_length)
    out = input_ids.new_full((B, out_len), pad)
    for i, tokens in enumerate(best):
        out[i, :lengths[i]] = tokens
        if lengths[i] < out_len:
            out[i, lengths[i]] = eos
    return out


# --------------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------------

def _sample(stepper, text: torch.Tensor, *, seq_len: int, max_seq_len: int, temperature: float, warp,
            eos_ids: list[int], pad: int, min_seq_len: int, repetition_penalty: float,
            criteria: Sequence[StoppingCriterion], fixed_output_length: bool,
            generator: Optional[torch.Generator]) -> torch.Tensor:
    device = text.device
    eos_t = torch.tensor(eos_ids, device=device)
    out = text
    pad_to = max(seq_len, _criteria_max_length(criteria) or 0)
    cached_rows: Optional[torch.Tensor] = None  # rows whose state the stepper holds, in order
    while True:
        x = out[:, -max_seq_len:]
        cur_len = x.shape[1]
        last = out[:, -1]
        finished = torch.isin(last, eos_t) | (last == pad)  # quirk 2: "!" (id 0) finishes too
        sample = torch.full((out.shape[0], 1), pad, dtype=torch.long, device=device)
        if bool(finished.all()):
            if not fixed_output_length or out.shape[1] >= pad_to:
                break  # (the second test only guards custom criteria that would never stop)
        elif cur_len + 1 == seq_len:
            # the last free position: end every running caption (no model call needed)
            sample[~finished] = eos_ids[0]
        else:
            rows = (~finished).nonzero().view(-1)
            if cached_rows is None or not torch.equal(rows, cached_rows):
                if cached_rows is None:
                    stepper.use_images(rows)
                else:  # captions finished: drop them from the batch
                    pos = torch.full((out.shape[0],), -1, dtype=torch.long, device=device)
                    pos[cached_rows] = torch.arange(cached_rows.numel(), device=device)
                    stepper.select(pos[rows])
                    stepper.use_images(rows)
                cached_rows = rows
            if out.shape[1] > max_seq_len:
                stepper.reset()  # the window slid: recompute it from position 0 (quirk 5)
            x_rows = x[rows]
            logits = stepper.logits(x_rows)
            scores = suppress_eos_before_min_length(logits, cur_len, min_seq_len, eos_t)
            scores = penalize_repetitions(scores, x_rows, repetition_penalty)
            probs = apply_temperature(warp(scores), temperature)
            sample[rows] = torch.multinomial(probs, 1, generator=generator)
        out = torch.cat([out, sample], dim=1)
        if _should_stop(criteria, out):
            break
    return out


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------

def _ids(value, default: int) -> list[int]:
    if value is None:
        return [default]
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.reshape(-1).tolist()]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


Spelling = Callable[..., Optional[str]]


def parameter(name: str, value=None) -> str:
    """How messages name a setting for Python callers: ``seq_len``, ``generation_type='top_k'``."""
    return name if value is None else f"{name}={value!r}"


def validate_options(*, generation_type="beam_search", seq_len=30, max_seq_len=77, min_seq_len=5, num_beams=6,
                     num_beam_groups=3, top_p=0.1, top_k=1, temperature=1.0, repetition_penalty=1.0,
                     spell: Spelling = parameter) -> None:
    """Reject bad generation settings with a one-line ValueError, before any model is loaded.

    ``spell(name, value=None)`` names the settings in the message: Python parameters by default,
    command-line options for the CLI.
    """
    if generation_type not in GENERATION_TYPES:
        raise ValueError(f"{spell('generation_type')} must be one of {', '.join(GENERATION_TYPES)}, "
                         f"not {generation_type!r}")
    if not isinstance(min_seq_len, int) or min_seq_len < 0:
        raise ValueError(f"{spell('min_seq_len')} must be a non-negative integer, not {min_seq_len!r}")
    if seq_len is not None and seq_len <= min_seq_len:  # None: the model's default, see fit_to_model
        raise ValueError(f"{spell('seq_len')} ({seq_len}) must be larger than {spell('min_seq_len')} ({min_seq_len})")
    if num_beams < 1 or num_beam_groups < 1 or num_beams % num_beam_groups:
        raise ValueError(f"{spell('num_beams')} ({num_beams}) must be a positive multiple of "
                         f"{spell('num_beam_groups')} ({num_beam_groups})")
    if generation_type == "beam_search" and num_beams < 2:
        raise ValueError(f"beam search needs {spell('num_beams')} >= 2, not {num_beams}; "
                         f"use {spell('generation_type', 'top_k')} for greedy")
    if not 0 < top_p <= 1:
        raise ValueError(f"{spell('top_p')} must be in (0, 1], not {top_p}")
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"{spell('top_k')} must be an integer >= 1, not {top_k!r}")
    if not temperature > 0:
        raise ValueError(f"{spell('temperature')} must be > 0, not {temperature}")
    if not repetition_penalty > 0:
        raise ValueError(f"{spell('repetition_penalty')} must be > 0, not {repetition_penalty}")
    if max_seq_len < 1:
        raise ValueError(f"{spell('max_seq_len')} must be >= 1, not {max_seq_len}")


def validate_for_model(model, *, generation_type="beam_search", seq_len=30, max_seq_len=77, prefix_len: int = 1,
                       spell: Spelling = parameter, **options) -> None:
    """:func:`validate_options`, and that the captions fit the model's context (``prefix_len``:
    the tokens sampling starts from, sot included)."""
    validate_options(generation_type=generation_type, seq_len=seq_len, max_seq_len=max_seq_len, spell=spell,
                     **options)
    limit = max_decode_length(model)  # the model runs on the caption but its last token: seq_len - 1
    sampling = generation_type != "beam_search"
    longest = min(max(prefix_len, seq_len - 1), max_seq_len) if sampling else seq_len - 1
    if longest <= limit:
        return
    window = spell("max_seq_len")  # sampling can slide a window instead (not every caller offers it)
    window_hint = f", or {window} <= {limit} to decode in a sliding window" if sampling and window else ""
    if sampling and prefix_len > limit and prefix_len >= seq_len:
        raise ValueError(f"the text prefix ({prefix_len} tokens) is longer than the {limit} tokens this model reads: "
                         f"shorten it{window_hint}")
    raise ValueError(f"{spell('seq_len', seq_len)} is too long for this model, whose captions have at most "
                     f"{limit + 1} tokens (start and end included): use {spell('seq_len')} <= {limit + 1}"
                     f"{window_hint}")


def default_seq_len(model, preferred: int = 30) -> int:
    """``preferred`` (the usual caption length), or the longest the model allows when that is less."""
    return min(preferred, max_decode_length(model) + 1)


def fit_to_model(model, options: dict, spell: Spelling = parameter) -> dict:
    """``generate`` options for ``model``: ``seq_len=None`` becomes :func:`default_seq_len`, and
    everything is checked against the model before any image is read."""
    options = {**options, "seq_len": options.get("seq_len") or default_seq_len(model)}
    validate_for_model(model, spell=spell, **options)
    return options


def generate(model, image: torch.Tensor, text: Optional[torch.Tensor] = None, seq_len: int = 30,
             max_seq_len: int = 77, temperature: float = 1.0, generation_type: str = "beam_search",
             top_p: float = 0.1, top_k: int = 1, pad_token_id: Optional[int] = None,
             eos_token_id: Optional[int] = None, sot_token_id: Optional[int] = None, num_beams: int = 6,
             num_beam_groups: int = 3, min_seq_len: int = 5,
             stopping_criteria: Optional[Sequence[StoppingCriterion]] = None, repetition_penalty: float = 1.0,
             fixed_output_length: bool = False, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Caption token ids for a batch of images [B, 3, H, W]; same tokens as open_clip's ``generate``.

    Args:
        text: a prompt to continue, [B, P] or [P] token ids starting with sot (sampling only;
            beam search ignores it, like open_clip). Default: just sot.
        seq_len: the caption length including sot and eos. Sampling ends every caption with
            eos there; beam search stops there by default.
        max_seq_len: sampling looks at the last ``max_seq_len`` tokens only.
        generation_type: ``"beam_search"`` (group beam search over raw logits), ``"top_k"``
            (``top_k=1`` is greedy) or ``"top_p"`` (nucleus sampling, keeps probability ``top_p``).
        temperature: divides the filtered logits before sampling (not used by beam search).
        num_beams, num_beam_groups: beams, split into independent groups.
        min_seq_len: eos is forbidden while a caption has fewer tokens (sot included).
        stopping_criteria: callables ``(input_ids, scores) -> bool | BoolTensor[rows]``; generation
            stops when every row is done. Replaces the default rule, ``MaxLength(seq_len)``.
        repetition_penalty: > 1 discourages tokens already in the caption.
        fixed_output_length: pad the result to ``seq_len`` tokens.
        generator: a ``torch.Generator`` (on the image's device) for reproducible sampling; the
            global RNG otherwise, consumed like open_clip's.

    Returns:
        LongTensor [B, L] of token ids starting with sot (beam search: L <= seq_len, eos then
        pad after shorter captions; sampling: pad after eos), [L] when ``text`` was 1-D.
    """
    prefix_len = 1 if text is None else text.shape[-1]
    validate_for_model(model, generation_type=generation_type, seq_len=seq_len, max_seq_len=max_seq_len,
                       min_seq_len=min_seq_len, num_beams=num_beams, num_beam_groups=num_beam_groups, top_p=top_p,
                       top_k=top_k, temperature=temperature, repetition_penalty=repetition_penalty,
                       prefix_len=prefix_len)
    device = image.device
    sot = _ids(sot_token_id, SOT_TOKEN_ID)[0]
    eos_ids = _ids(eos_token_id, EOS_TOKEN_ID)
    pad = int(model.pad_id if pad_token_id is None else pad_token_id)
    if stopping_criteria is None:
        criteria: list = [MaxLength(seq_len)]
    elif callable(stopping_criteria):
        criteria = [stopping_criteria]
    else:
        criteria = list(stopping_criteria)
    repetition_penalty = float(repetition_penalty)

    prompt = None if generation_type == "beam_search" else _prompt(text, image.shape[0], sot, device)

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), packed_linears():
            image_latent, image_embs = model._encode_image(image)
            limit = max_decode_length(model)
            if hasattr(model.text, "step"):
                stepper = _IncrementalDecoder(model, image_embs, limit)
            else:
                stepper = _FullRecompute(model, image_latent, image_embs, limit)

            if generation_type == "beam_search":
                out = _beam_search(stepper, image.shape[0], device, sot=sot, eos_ids=eos_ids, pad=pad,
                                   num_beams=num_beams, num_beam_groups=num_beam_groups, min_seq_len=min_seq_len,
                                   repetition_penalty=repetition_penalty, criteria=criteria)
                if fixed_output_length and out.shape[1] < seq_len:
                    out = torch.cat([out, out.new_full((out.shape[0], seq_len - out.shape[1]), pad)], dim=1)
            else:
                if generation_type == "top_k":
                    warp = functools.partial(keep_top_k, k=top_k)
                else:
                    warp = functools.partial(keep_top_p, p=top_p)
                out = _sample(stepper, prompt, seq_len=seq_len, max_seq_len=max_seq_len, temperature=temperature,
                              warp=warp, eos_ids=eos_ids, pad=pad, min_seq_len=min_seq_len,
                              repetition_penalty=repetition_penalty, criteria=criteria,
                              fixed_output_length=fixed_output_length, generator=generator)
                if text is not None and text.dim() == 1:
                    out = out.squeeze(0)
    finally:
        model.train(was_training)
    # a normal tensor, not an inference tensor, so that it can go on into autograd (e.g. as targets)
    return out.clone()


def _prompt(text: Optional[torch.Tensor], n_images: int, sot: int, device) -> torch.Tensor:
    """The [B, P] token ids sampling continues: ``text``, or sot alone."""
    if text is None:
        return torch.full((n_images, 1), sot, dtype=torch.long, device=device)
    text = torch.as_tensor(text).to(device=device, dtype=torch.long)
    if text.dim() == 1:
        text = text[None, :]
    if text.dim() != 2 or text.shape[1] == 0:
        raise ValueError(f"text must be [batch, length] or [length] token ids, not of shape {tuple(text.shape)}")
    if text.shape[0] == 1 and n_images > 1:
        text = text.expand(n_images, -1)
    if text.shape[0] != n_images:
        raise ValueError(f"text has {text.shape[0]} rows for {n_images} images")
    return text
