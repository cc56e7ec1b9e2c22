"""Caption generation for CoCa: group beam search and top-k / top-p sampling.

The results are token-for-token those of open_clip 3.3.0's ``CoCa.generate`` (which drives
Hugging Face ``transformers`` pieces), but the work is done incrementally:

* the image is encoded once per image, and the decoder's cross-attention keys/values are
  computed once per image and shared by all its beams;
* each step feeds only the newest token through the text encoder and the decoder, with the
  past kept in KV caches that are reordered when beams are;
* sampling drops finished captions from the batch; beam search stops computing an image
  once all its beam groups are done.

This module holds ``generate``, its option checks and sampling; group beam search is in
``beam_search.py``, and the step both share (cached logits, processors, stopping criteria) in
``decoding.py``.

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
from typing import Callable, Optional, Sequence

import torch

from .beam_search import beam_search
from .decoding import (FullRecompute, IncrementalDecoder, MaxLength, StoppingCriterion, apply_temperature,
                       criteria_max_length, keep_top_k, keep_top_p, penalize_repetitions, should_stop,
                       suppress_eos_before_min_length)
from .packed import packed_linears

SOT_TOKEN_ID = 49406
EOS_TOKEN_ID = 49407
GENERATION_TYPES = ("beam_search", "top_k", "top_p")
FLOAT32_MAX = torch.finfo(torch.float32).max


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
# sampling
# --------------------------------------------------------------------------------------------

def _sample(stepper, text: torch.Tensor, *, seq_len: int, max_seq_len: int, temperature: float, warp,
            eos_ids: list[int], pad: int, min_seq_len: int, repetition_penalty: float,
            criteria: Sequence[StoppingCriterion], fixed_output_length: bool,
            generator: Optional[torch.Generator]) -> torch.Tensor:
    device = text.device
    eos_t = torch.tensor(eos_ids, device=device)
    out = text
    pad_to = max(seq_len, criteria_max_length(criteria) or 0)
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
        if should_stop(criteria, out):
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
    for name, value in (("temperature", temperature), ("repetition_penalty", repetition_penalty)):
        if not 0 < value <= FLOAT32_MAX:  # also NaN and inf, and what float32 logits would see as inf
            raise ValueError(f"{spell(name)} must be a finite number > 0, not {value}")
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
             fixed_output_length: bool = False, generator: Optional[torch.Generator] = None,
             compile: bool = False) -> torch.Tensor:
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
        compile: run the decoding step under ``torch.compile`` (CUDA graphs on a GPU); the same
            tokens, faster once compiled for long or many generations.

    Returns:
        LongTensor [B, L] of token ids starting with sot (beam search: L <= seq_len, eos then
        pad after shorter captions; sampling: pad after eos), [L] when ``text`` was 1-D.
    """
    prefix_len = 1 if text is None else text.shape[-1]
    if compile:
        check_compile(image.device)
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
    stepper = None
    try:
        with torch.inference_mode(), packed_linears(enabled=not compile):  # compiled: Inductor's own kernels
            image_latent, image_embs = model._encode_image(image)
            limit = max_decode_length(model)
            if hasattr(model.text, "step"):
                stepper = IncrementalDecoder(model, image_embs, limit, compile=compile,
                                             expected_len=criteria_max_length(criteria))
            else:
                stepper = FullRecompute(model, image_latent, image_embs, limit)

            if generation_type == "beam_search":
                out = beam_search(stepper, image.shape[0], device, sot=sot, eos_ids=eos_ids, pad=pad,
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
        if stepper is not None:
            stepper.release()  # its KV caches' memory, for the next call
        model.train(was_training)
    # a normal tensor, not an inference tensor, so that it can go on into autograd (e.g. as targets)
    return out.clone()


def check_compile(device) -> None:
    """Raise a one-line ValueError where ``torch.compile`` cannot run on ``device``, before it
    fails mid-run when Inductor first needs its compiler (C++ on a CPU, Triton on CUDA)."""
    import torch._dynamo

    device_type = torch.device(device).type
    try:
        torch._dynamo.eval_frame.check_if_dynamo_supported()
    except RuntimeError as err:
        raise ValueError(f"compile is not available here: {err}") from None
    if device_type == "cpu":
        from torch._inductor.cpp_builder import get_cpp_compiler

        try:
            get_cpp_compiler()  # what Inductor runs to build CPU kernels
        except Exception:  # noqa: BLE001 - InvalidCxxCompiler, or a broken install
            raise ValueError("compile on CPU needs a C++ compiler: install g++ (or set CXX to one)") from None
    elif device_type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise ValueError("compile on CUDA needs Triton: pip install triton")


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