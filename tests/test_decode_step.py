"""The decoding step: preallocated KV caches written in place, and the step under torch.compile.

Equality with open_clip is tests/test_generation.py's; here the compiled step must give the
tokens of the eager one (fp32, CPU), through the Python API and `coca caption --compile`.
"""

import pytest
import torch

from conftest import PHOTOS, one_error_line, run_cli
from coca_cli.model.layers import BufferPool, KVCache, step_mask

FAST = ["--seq-len", "8", "--min-seq-len", "2", "--num-beams", "4", "--num-beam-groups", "2"]


@pytest.fixture(scope="module")
def model(tiny):
    from coca_cli import create_model_and_transforms

    return create_model_and_transforms(None, pretrained=str(tiny[1]))[0]


@pytest.mark.parametrize("static", [True, False])
def test_cache_is_written_in_place_and_reordered(static):
    """Compiled (static): one buffer, reordered in place; eager: one copy into a spare buffer."""
    cache = KVCache(layers=2, max_len=5, static=static)
    k = torch.arange(2 * 3.0).view(2, 1, 3, 1)  # [B, heads, T_new, head_dim]
    cache.write(0, torch.arange(3), k, -k)
    buffer = cache.kv  # [keys/values, layers, B, heads, max_len, head_dim]
    cache.write(0, torch.tensor([3]), k[:, :, :1] + 10, k[:, :, :1])
    assert cache.kv is buffer and buffer.shape == (2, 2, 2, 1, 5, 1)  # static shape, no copy to grow it
    cache.select(torch.tensor([1, 1]), length=4)
    assert (cache.kv is buffer) == static
    keys, values = cache.kv[:, 0]  # layer 0's
    assert keys[:, 0, :4, 0].tolist() == [[3, 4, 5, 13], [3, 4, 5, 13]]
    if static:
        assert keys[:, 0, 4, 0].tolist() == [0, 0]  # never written: zero, so finite where attended
        assert cache.past(0)[0].data_ptr() == buffer.data_ptr()  # the views a compiled step reads
    cache.attend_span(4)
    k_past, v_past = cache.past(0)
    assert k_past.shape == (2, 1, 4, 1) and v_past[0, 0, :, 0].tolist() == [-3, -4, -5, 3]
    cache.select(torch.tensor([0]), length=4)  # fewer rows: the first rows of the other buffer
    assert cache.kv.shape[2] == 1 and cache.kv[1, 0, 0, 0, :4, 0].tolist() == [-3, -4, -5, 3]
    assert len(cache.allocated) == 2  # the buffer and one spare, nothing more


@pytest.mark.parametrize("static", [True, False])
def test_cache_grows_keeping_what_was_written(static):
    cache = KVCache(layers=1, max_len=2, static=static)
    k = torch.arange(2 * 2.0).view(2, 1, 2, 1)
    cache.write(0, torch.arange(2), k, -k)
    cache.write_keep(torch.arange(2), torch.tensor([[True, False], [True, True]]))
    cache.grow(5)
    cache.write(0, torch.tensor([2]), k[:, :, :1] + 10, k[:, :, :1])
    cache.write_keep(torch.tensor([2]), torch.tensor([[True], [False]]))
    assert cache.kv.shape == (2, 1, 2, 1, 5, 1) and cache.max_len == 5
    assert cache.kv[0, 0, :, 0, :3, 0].tolist() == [[0, 1, 10], [2, 3, 12]]
    assert cache.keep.tolist() == [[True, False, True, False, False], [True, True, False, False, False]]


def test_buffer_pool_hands_back_what_the_last_call_kept():
    pool, like = BufferPool(), torch.zeros(1)
    first = pool.take(like, (2, 3))
    assert pool.take(like, (2, 3)) is not first  # nothing kept yet: a new one
    pool.keep([first, torch.ones(4)])
    assert pool.take(like.double(), (2, 3)) is not first  # another dtype: a new one
    first.fill_(float("nan"))
    again = pool.take(like, (2, 3), zero=True)
    assert again is first and again.eq(0).all()  # static caches attend unwritten positions: zeroed
    assert pool.take(like, (2, 3)) is not first  # taken once, not twice
    pool.keep([])
    assert pool.take(like, (4,)).data_ptr() != 0 and not pool._free  # keep replaces what was held
    pool.keep([first])
    import copy, pickle
    assert not copy.deepcopy(pool)._free and not pickle.loads(pickle.dumps(pool))._free


def _kept(model) -> list:
    return [b for buffers in model.decode_buffers._free.values() for b in buffers]


def test_generate_decodes_in_the_last_calls_caches(model):
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    kwargs = dict(seq_len=8, min_seq_len=2, num_beams=4, num_beam_groups=2)
    first = model.generate(images, **kwargs)
    kept = _kept(model)
    # per cache (text, decoder): the first step's, one row per image, then two of a row per beam
    assert sorted(b.shape[2] for b in kept) == [2, 2, 8, 8, 8, 8]
    assert torch.equal(model.generate(images, **kwargs), first)
    assert {b.data_ptr() for b in _kept(model)} == {b.data_ptr() for b in kept}


def test_training_mode_lets_go_of_what_decoding_kept(model):
    """The KV caches and packed CPU weights a generate call leaves for the next are dropped when
    the model goes back to training (which needs the memory, and makes packed weights stale)."""
    from coca_cli.model import packed

    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    first = model.generate(images, seq_len=8)
    assert _kept(model) and any(p in packed._packs for p in model.parameters())
    model.train()
    assert not _kept(model) and not any(p in packed._packs for p in model.parameters())
    model.eval()
    assert torch.equal(model.generate(images, seq_len=8), first)
    assert _kept(model)


def test_reused_caches_are_never_read_before_written(model):
    """Steps through reorders and finished rows give the same logits in buffers a previous
    decoder left full of NaN as in fresh ones: no position is read before it is written."""
    from coca_cli.model.decoding import IncrementalDecoder
    from coca_cli.model.generation import max_decode_length

    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    seq = torch.randint(0, 1000, (4, 6), generator=torch.Generator().manual_seed(1))
    runs = []
    with torch.inference_mode():
        _, embs = model._encode_image(images)
        for fill in (None, float("nan")):
            if fill is not None:
                for buffer in _kept(model):
                    buffer.fill_(fill)
            decoder = IncrementalDecoder(model, embs, max_decode_length(model), expected_len=6)
            decoder.use_images(torch.tensor([0, 0, 1, 1]), rows_per_image=2)
            steps = [decoder.logits(seq[:, :n]) for n in (2, 3)]
            decoder.select(torch.tensor([1, 1, 3, 2]))
            rows = seq[[1, 1, 3, 2]]
            steps += [decoder.logits(rows[:, :n]) for n in (4, 5)]
            decoder.select(torch.tensor([2, 3]))  # the first image's captions finished
            decoder.use_images(torch.tensor([1, 1]), rows_per_image=2)
            steps.append(decoder.logits(rows[[2, 3]]))
            decoder.release()
            runs.append(torch.cat(steps))
    assert len(_kept(model)) == 4 and runs[0].isfinite().all() and torch.equal(runs[0], runs[1])


def test_decoder_sized_for_short_captions_grows_to_the_same_logits(model):
    """Caches sized for the captions expected (stopping criteria's max_length) grow when a caption
    runs longer, giving the logits of caches sized for the whole context, through beam reorders."""
    from coca_cli.model.decoding import IncrementalDecoder
    from coca_cli.model.generation import max_decode_length

    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        _, embs = model._encode_image(images)
        seq = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(1))
        logits = []
        for expected in (None, 2):
            decoder = IncrementalDecoder(model, embs, max_decode_length(model), expected_len=expected)
            decoder.use_images(torch.arange(2))
            steps = [decoder.logits(seq[:, :n]) for n in (1, 2, 3)]
            decoder.select(torch.tensor([1, 0]))
            rows = seq[[1, 0]]
            steps += [decoder.logits(rows[:, :n]) for n in range(4, 10)]
            logits.append(torch.stack(steps))
            assert decoder.capacity == (max_decode_length(model) if expected is None else 16)
    assert torch.equal(logits[0], logits[1])


def test_step_mask_is_causal_over_the_buffer():
    mask = step_mask(torch.tensor([1, 2]), 4)
    assert mask.tolist() == [[True, True, False, False], [True, True, True, False]]
    keep = torch.tensor([[True, False, True, True]])
    assert step_mask(torch.tensor([2]), 4, keep).tolist() == [[[[True, False, True, False]]]]


def test_compiled_step_gives_the_eager_tokens(model):
    """Beam search and seeded top-k / top-p sampling: the same tokens compiled as eager."""
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    options = [dict(generation_type="beam_search", num_beams=4, num_beam_groups=2),
               dict(generation_type="top_k", top_k=3),
               dict(generation_type="top_p", top_p=0.5, temperature=0.7)]
    for opts in options:
        eager, compiled = (model.generate(images, seq_len=8, min_seq_len=2, compile=c,
                                          generator=torch.Generator().manual_seed(1), **opts)
                           for c in (False, True))
        assert torch.equal(eager, compiled), opts


def test_caption_compile_cli_matches_eager(tiny, capsys):
    native = str(tiny[1])
    assert run_cli("caption", *PHOTOS, "--pretrained", native, *FAST) == 0
    eager = capsys.readouterr().out
    assert run_cli("caption", *PHOTOS, "--pretrained", native, *FAST, "--compile") == 0
    assert capsys.readouterr().out == eager


def test_compile_without_a_compiler_is_one_line(tiny, capsys, without_cxx_compiler):
    assert run_cli("caption", *PHOTOS, "--pretrained", str(tiny[1]), *FAST, "--compile") == 2
    assert one_error_line(capsys) == ("coca: error: --compile on CPU needs a C++ compiler: "
                                      "install g++ (or set CXX to one)\n")
