"""coca_cli.model.generation against open_clip 3.3.0's ``CoCa.generate`` (fp32, CPU): same tokens.

Both models get the same random weights. open_clip is the reference; transformers is used
only through it (and for its ``MaxLengthCriteria`` in one test).
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

import open_clip  # reference implementation (test extra)
from transformers import MaxLengthCriteria

from benchmarks.bench import randomize_
from coca_cli.model import decoding
from coca_cli.model.config import get_model_config
from coca_cli.model.coca import CoCa
from coca_cli.model.text import TextTransformer

ROOT = Path(__file__).resolve().parents[1]
SOT, EOS = 49406, 49407


# --------------------------------------------------------------------------- #
# models
# --------------------------------------------------------------------------- #

def _randomize_(model: torch.nn.Module, seed: int, eos_offset: float = 0.0, bang_offset: float = 0.0):
    """The benchmark's seeded random weights (logits far from degenerate), then offsets.

    ``eos_offset`` and ``bang_offset`` raise the average logit of eos / of token 0 ("!", also
    the pad id) so that captions end early, exercising the finishing paths.
    """
    randomize_(model, seed)
    with torch.no_grad():
        # the final LayerNorm's bias is the mean of its output: moving a column of the vocab
        # projection along it shifts that token's logit by about the offset
        beta = model.text_decoder.ln_final.bias
        proj = model.text_decoder.text_projection
        proj[:, EOS] += eos_offset * beta / beta.dot(beta)
        proj[:, 0] += bang_offset * beta / beta.dot(beta)


@functools.lru_cache(maxsize=None)
def build_pair(name: str = "coca_tiny", seed: int = 0, eos_offset: float = 0.0, bang_offset: float = 0.0,
               n_images: int = 4):
    """(open_clip model, our model, images): the single place where test models are made."""
    if name not in open_clip.list_models():
        open_clip.add_model_config(str(ROOT / "models" / f"{name}.json"))
    torch.manual_seed(seed)
    ref = open_clip.create_model(name)
    _randomize_(ref, seed + 1, eos_offset, bang_offset)
    ours = CoCa.from_config(get_model_config(name))
    ours.load_state_dict(ref.state_dict(), strict=True)
    size = ref.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    images = torch.randn(n_images, 3, size, size, generator=torch.Generator().manual_seed(seed + 2))
    return ref.eval(), ours.eval(), images


PLAIN = dict()                    # captions mostly run to the maximum length
EARLY = dict(eos_offset=16.0)      # eos is likely: beams finish, images finish at different steps
BANG = dict(eos_offset=12.0, bang_offset=5.0)  # "!" (= pad id) is likely too


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny models: per-op overhead dominates; and on a busy 2-core machine a second thread
    # makes every op wait for a core (B-32 took 100 s instead of 20 here)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _ends_early(out: torch.Tensor, seq_len: int) -> bool:
    """Some caption ended (eos or pad) before the last position."""
    if out.shape[1] < seq_len:
        return True
    finished = (out[:, 1:] == EOS) | (out[:, 1:] == 0)
    return bool(finished[:, : seq_len - 2].any())


def _same(ref_out: torch.Tensor, ours_out: torch.Tensor):
    assert ours_out.dtype == torch.long
    assert ours_out.shape == ref_out.shape, (ours_out.shape, ref_out.shape)
    assert torch.equal(ours_out, ref_out), f"\nopen_clip:\n{ref_out}\nours:\n{ours_out}"


# --------------------------------------------------------------------------- #
# beam search
# --------------------------------------------------------------------------- #

BEAM_CASES = [
    # (weights, kwargs, expect early finishing)
    (PLAIN, dict(seq_len=20), False),
    (PLAIN, dict(seq_len=12, num_beams=4, num_beam_groups=2), False),
    (PLAIN, dict(seq_len=15, num_beams=3, num_beam_groups=1), False),
    (PLAIN, dict(seq_len=10, num_beams=4, num_beam_groups=4), False),
    (PLAIN, dict(seq_len=16, repetition_penalty=1.5), False),
    (PLAIN, dict(seq_len=8, min_seq_len=2, fixed_output_length=True), False),
    (EARLY, dict(seq_len=30), True),
    (EARLY, dict(seq_len=30, num_beams=3, num_beam_groups=1), True),
    (EARLY, dict(seq_len=30, num_beams=4, num_beam_groups=4), True),
    (EARLY, dict(seq_len=30, num_beams=4, num_beam_groups=2, repetition_penalty=1.3), True),
    (EARLY, dict(seq_len=16, min_seq_len=2), True),
    (EARLY, dict(seq_len=30, min_seq_len=9), True),
    (EARLY, dict(seq_len=30, fixed_output_length=True), True),
    (BANG, dict(seq_len=16, num_beams=4, num_beam_groups=2), True),
]


@pytest.mark.parametrize("weights,kwargs,early", BEAM_CASES)
def test_beam_search_matches_open_clip(weights, kwargs, early):
    ref, ours, images = build_pair(**weights)
    with torch.no_grad():
        expected = ref.generate(images, **kwargs)
    got = ours.generate(images, **kwargs)
    _same(expected, got)
    # coverage guard: the early-finishing cases must keep finishing early
    assert _ends_early(expected, kwargs["seq_len"]) == early


def test_beam_search_images_leave_the_batch_and_stop_early(monkeypatch):
    """Images whose groups are all done stop being computed, and the search ends early."""
    ref, ours, images = build_pair(**EARLY)
    rows = []
    select = decoding.IncrementalDecoder.select

    def spy(self, index):
        rows.append(index.numel())
        return select(self, index)

    monkeypatch.setattr(decoding.IncrementalDecoder, "select", spy)
    kwargs = dict(seq_len=30, num_beams=3, num_beam_groups=1)
    got = ours.generate(images, **kwargs)
    with torch.no_grad():
        _same(ref.generate(images, **kwargs), got)
    assert rows[0] == 4 * 3 and min(rows) < 4 * 3  # some image left while others went on
    assert got.shape[1] < 30


class _Recorder:
    """A stopping criterion that never stops but records what it was shown."""

    def __init__(self):
        self.seen = []

    def __call__(self, input_ids, scores, **kwargs):
        self.seen.append(input_ids.clone())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


@pytest.mark.parametrize("kwargs", [dict(seq_len=30), dict(seq_len=30, num_beams=4, num_beam_groups=4)])
def test_stopping_criteria_see_the_same_input_ids(kwargs):
    """Including the rows the reference refills from image 0 once a group is done."""
    ref, ours, images = build_pair(**EARLY)
    seen_ref, seen_ours = _Recorder(), _Recorder()
    with torch.no_grad():
        expected = ref.generate(images, stopping_criteria=[seen_ref, MaxLengthCriteria(kwargs["seq_len"])], **kwargs)
    got = ours.generate(images, stopping_criteria=[seen_ours, MaxLengthCriteria(kwargs["seq_len"])], **kwargs)
    _same(expected, got)
    assert len(seen_ours.seen) == len(seen_ref.seen) > 3
    for a, b in zip(seen_ref.seen, seen_ours.seen):
        assert torch.equal(a, b)


def test_custom_stopping_criterion_stops_beam_search():
    _, ours, images = build_pair(**PLAIN)
    out = ours.generate(images[:2], seq_len=20, stopping_criteria=[decoding.MaxLength(7)])
    assert out.shape == (2, 7)
    out = ours.generate(images[:2], seq_len=20, stopping_criteria=[lambda ids, scores: ids.shape[1] >= 6])
    assert out.shape[0] == 2 and out.shape[1] <= 7


# --------------------------------------------------------------------------- #
# greedy and sampling
# --------------------------------------------------------------------------- #

PROMPT = torch.tensor([[SOT, 320, 1125, 539]] * 4)

GREEDY_CASES = [
    (PLAIN, dict(seq_len=25), False),
    (PLAIN, dict(seq_len=20, text=PROMPT), False),
    (PLAIN, dict(seq_len=25, fixed_output_length=True), False),
    (EARLY, dict(seq_len=20), True),
    (EARLY, dict(seq_len=20, text=PROMPT), True),
    (EARLY, dict(seq_len=20, text=PROMPT[0]), True),          # 1-D prompt, one image
    (EARLY, dict(seq_len=25, fixed_output_length=True), True),
    (EARLY, dict(seq_len=20, repetition_penalty=0.7, min_seq_len=8), True),
    (BANG, dict(seq_len=20), True),                            # "!" ends a caption (pad id)
    (BANG, dict(seq_len=30, max_seq_len=12, fixed_output_length=True), True),  # sliding window
]


@pytest.mark.parametrize("weights,kwargs,early", GREEDY_CASES)
def test_greedy_matches_open_clip(weights, kwargs, early):
    ref, ours, images = build_pair(**weights)
    if kwargs.get("text") is not None and kwargs["text"].dim() == 1:
        images = images[:1]
    kwargs = dict(kwargs, generation_type="top_k", top_k=1)
    torch.manual_seed(0)
    with torch.no_grad():
        expected = ref.generate(images, **kwargs)
    torch.manual_seed(0)
    got = ours.generate(images, **kwargs)
    _same(expected, got)
    flat = expected if expected.dim() == 2 else expected[None]
    assert _ends_early(flat, kwargs["seq_len"]) == early


SAMPLING_CASES = [
    (PLAIN, dict(generation_type="top_p", top_p=0.9, seq_len=20)),
    (PLAIN, dict(generation_type="top_k", top_k=50, temperature=0.7, seq_len=20)),
    (EARLY, dict(generation_type="top_p", top_p=0.9, seq_len=20)),
    (EARLY, dict(generation_type="top_k", top_k=5, temperature=1.5, seq_len=25, repetition_penalty=1.3)),
    (EARLY, dict(generation_type="top_p", top_p=0.5, seq_len=20, text=PROMPT)),
    (EARLY, dict(generation_type="top_p", top_p=1.0, seq_len=20, fixed_output_length=True)),
    (BANG, dict(generation_type="top_k", top_k=3, seq_len=40, max_seq_len=12)),
]


@pytest.mark.parametrize("weights,kwargs", SAMPLING_CASES)
def test_sampling_matches_open_clip_under_the_same_seed(weights, kwargs):
    """Same probabilities and the same torch.multinomial calls: the global RNG is used alike."""
    ref, ours, images = build_pair(**weights)
    torch.manual_seed(1234)
    with torch.no_grad():
        expected = ref.generate(images, **kwargs)
    torch.manual_seed(1234)
    got = ours.generate(images, **kwargs)
    _same(expected, got)


@pytest.mark.parametrize("kwargs", [
    dict(generation_type="top_p", top_p=0.9),
    dict(generation_type="top_k", top_k=20, temperature=1.3),
])
def test_sampling_with_a_generator_is_reproducible(kwargs):
    _, ours, images = build_pair(**PLAIN)
    rng_state = torch.get_rng_state()
    runs = {seed: ours.generate(images, seq_len=16, generator=torch.Generator().manual_seed(seed), **kwargs)
            for seed in (0, 1, 2)}
    again = ours.generate(images, seq_len=16, generator=torch.Generator().manual_seed(0), **kwargs)
    assert torch.equal(runs[0], again)
    assert not (torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2]))
    assert torch.equal(torch.get_rng_state(), rng_state)  # the global RNG is left alone


# --------------------------------------------------------------------------- #
# behaviour around the decoding
# --------------------------------------------------------------------------- #

def test_full_recompute_fallback_gives_the_same_tokens(monkeypatch):
    """Text towers without a KV-cached ``step`` (the Hugging Face ones) recompute each step."""
    _, ours, images = build_pair(**EARLY)
    kwargs = [dict(seq_len=14), dict(seq_len=14, generation_type="top_k", text=PROMPT)]
    incremental = [ours.generate(images, **kw) for kw in kwargs]
    monkeypatch.delattr(TextTransformer, "step")
    for kw, expected in zip(kwargs, incremental):
        assert torch.equal(ours.generate(images, **kw), expected)


def test_training_mode_is_restored_and_no_graph_is_built():
    _, ours, images = build_pair(**PLAIN)
    ours.train()
    try:
        out = ours.generate(images[:1], seq_len=8)
        assert ours.training and all(m.training for m in ours.modules())
        assert not out.requires_grad and not out.is_inference()
        ours.text.token_embedding(out).sum().backward()  # usable as an input to a training step
    finally:
        ours.eval()
        ours.zero_grad(set_to_none=True)
    out = ours.generate(images[:1], seq_len=8, generation_type="top_k")
    assert not ours.training


def test_bfloat16_autocast_runs():
    _, ours, images = build_pair(**PLAIN)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        beams = ours.generate(images[:2], seq_len=10)
        greedy = ours.generate(images[:2], seq_len=10, generation_type="top_k")
    assert beams.shape[0] == 2 and beams.shape[1] <= 10 and (beams[:, 0] == SOT).all()
    assert greedy.shape == (2, 10) and (greedy[:, 0] == SOT).all()


def test_longest_seq_len_is_what_open_clip_can_run():
    """Tiny: text context 32 + CLS → 33 positions; a caption of seq_len 33 is run on 32 tokens."""
    ref, ours, images = build_pair(**PLAIN)
    image = images[:1]
    kwargs = dict(num_beams=2, num_beam_groups=1, min_seq_len=1)
    with torch.no_grad():
        _same(ref.generate(image, seq_len=33, **kwargs), ours.generate(image, seq_len=33, **kwargs))
        with pytest.raises(RuntimeError):
            ref.generate(image, seq_len=34, **kwargs)
    with pytest.raises(ValueError, match="seq_len"):
        ours.generate(image, seq_len=34, **kwargs)
    with pytest.raises(ValueError, match="seq_len"):
        ours.generate(image, seq_len=34, generation_type="top_k")
    # sampling only ever looks at the last max_seq_len tokens
    assert ours.generate(image, seq_len=40, max_seq_len=20, generation_type="top_k", top_k=1).shape[1] <= 40


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_beams=5, num_beam_groups=3), "num_beams"),
    (dict(num_beams=1, num_beam_groups=1), "num_beams"),
    (dict(seq_len=5, min_seq_len=5), "min_seq_len"),
    (dict(min_seq_len=-1), "min_seq_len"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5, generation_type="top_p"), "top_p"),
    (dict(top_k=0, generation_type="top_k"), "top_k"),
    (dict(temperature=0.0, generation_type="top_k"), "temperature"),
    (dict(temperature=-1.0), "temperature"),
    (dict(generation_type="greedy"), "generation_type"),
    (dict(seq_len=34), "seq_len"),
    (dict(seq_len=34, generation_type="top_p"), "seq_len"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=-1.2), "repetition_penalty"),
])
def test_bad_settings_raise_value_error(kwargs, match):
    _, ours, images = build_pair(**PLAIN)
    with pytest.raises(ValueError, match=match):
        ours.generate(images[:1], **kwargs)


# --------------------------------------------------------------------------- #
# a real-size model
# --------------------------------------------------------------------------- #

def test_vit_b32_beam_search_and_greedy_match_open_clip():
    ref, ours, images = build_pair.__wrapped__("coca_ViT-B-32", n_images=2)  # not cached: large
    with torch.no_grad():
        expected = ref.generate(images[:1], seq_len=12)
    _same(expected, ours.generate(images[:1], seq_len=12))
    kwargs = dict(seq_len=12, generation_type="top_k", top_k=1)
    with torch.no_grad():
        expected = ref.generate(images, **kwargs)
    _same(expected, ours.generate(images, **kwargs))
