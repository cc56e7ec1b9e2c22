"""Group beam search over raw logits, token-for-token that of transformers as open_clip drives it.

The beams of an image are split into groups that search independently; each group keeps its
best finished captions in a :class:`BeamHypotheses`. Quirk numbers refer to the list in
``generation.py``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .decoding import (StoppingCriterion, criteria_max_length, penalize_repetitions, should_stop,
                       suppress_eos_before_min_length)


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


def beam_search(stepper, n_images: int, device, *, sot: int, eos_ids: list[int], pad: int, num_beams: int,
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
    active_rows = rows_all
    cache_pos = rows_all // N  # cached row of each global row (-1: not cached)
    cache_is_identity = False  # cache_pos[row] == row (all images running, past the first step)
    first = True
    group_first_row = group_first_row.view(B * G, 1)

    # Per step the host reads back only small tensors (the top 2S candidates of each group), and
    # tensors the host already knows (which rows run, which groups are done) are rebuilt only
    # when that changes: on a GPU each op here is a kernel launch, like those of the model.
    while True:
        cur_len = input_ids.shape[1]
        if first:
            logits = stepper.logits(input_ids[::N]).repeat_interleave(N, dim=0)
        elif len(active_images) == B:
            logits = stepper.logits(input_ids)
        else:  # finished images are not computed; their rows are never used
            logits_active = stepper.logits(input_ids[active_rows])
            logits = logits_active.new_zeros(B * N, logits_active.shape[1])
            logits[active_rows] = logits_active
        V = logits.shape[1]

        scores = suppress_eos_before_min_length(logits, cur_len, min_seq_len, eos_t)
        scores = penalize_repetitions(scores, input_ids, repetition_penalty)
        scores = scores + beam_scores.view(-1, 1)
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
        parent_row = (group_first_row + top_parent.gather(1, order)).view(B, G, S)

        any_done = any(map(any, done))
        done_before = torch.tensor(done, device=device) if any_done else None  # [B, G]
        if any_done:
            # A done group keeps score 0 and appends pad; the reference refills its beams from
            # beam 0 of the same group of image 0 (quirk 3).
            keep = ~done_before[..., None]
            next_scores = torch.where(keep.view(B * G, 1), next_scores, torch.zeros_like(next_scores))
            next_tokens = torch.where(keep.view(B * G, 1), next_tokens, torch.full_like(next_tokens, pad))
            parent_row = torch.where(keep, parent_row, group_first_row[:G].view(1, G, 1))

        # Candidates among the top S that end the caption become hypotheses (on the CPU: few).
        top_scores_cpu, top_is_eos_cpu = top_scores.tolist(), top_is_eos.tolist()
        parent_cpu = None
        for bg, is_eos in enumerate(top_is_eos_cpu):  # row-major: per (image, group), in rank order
            b, g = divmod(bg, G)
            if done[b][g]:
                continue
            if sum(is_eos) > S:
                raise ValueError("more beam candidates end in eos than there are beams; check eos_token_id")
            for rank in range(S):
                if is_eos[rank]:
                    parent_cpu = top_parent.tolist() if parent_cpu is None else parent_cpu
                    row = b * N + g * S + parent_cpu[bg][rank]
                    hyps[b][g].add(input_ids[row].clone(), top_scores_cpu[bg][rank], cur_len + 1)
        for b in range(B):
            for g in range(G):
                if not done[b][g]:
                    done[b][g] = hyps[b][g].is_done(top_scores_cpu[b * G + g][0], cur_len + 1)

        parent_row = parent_row.view(-1)
        input_ids = torch.cat([input_ids[parent_row], next_tokens.view(-1, 1)], dim=1)
        beam_scores = next_scores.view(-1)

        all_done = all(all(d) for d in done)
        if all_done or should_stop(criteria, input_ids):
            break

        # Reorder the caches. Images whose groups are all done leave the batch; rows of a done
        # group inside a running image keep their own cache (their logits are never used).
        still = [b for b in active_images if not all(done[b])]
        if still != active_images:
            active_rows = (torch.tensor(still, device=device)[:, None] * N + torch.arange(N, device=device)).view(-1)
        cache_parent = parent_row
        if any_done:
            cache_parent = torch.where(done_before.repeat_interleave(S, dim=1).view(-1), rows_all, parent_row)
        if len(still) < B:
            cache_parent = cache_parent[active_rows]
        stepper.select(cache_parent if cache_is_identity else cache_pos[cache_parent])
        cache_is_identity = len(still) == B
        if not cache_is_identity:
            cache_pos = torch.full((B * N,), -1, dtype=torch.long, device=device)
            cache_pos[active_rows] = torch.arange(active_rows.numel(), device=device)
        if first or still != active_images:
            stepper.use_images(torch.tensor(still, device=device).repeat_interleave(N), rows_per_image=N)
        active_images = still
        first = False

    return _finalize(hyps, done, input_ids, beam_scores, pad=pad, eos=eos_ids[0], N=N, G=G,
                     max_length=criteria_max_length(criteria))


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
