"""The trimmed text tower (training's ``caption_tokens_only``, ``encode_text``) against the full
padded sequence and against open_clip, on the same random weights."""

import pytest
import torch

from coca_cli.model.coca import CoCa
from coca_cli.model.config import get_model_config
from coca_cli.train.loss import CoCaLoss
from conftest import openclip_reference

SOT, EOS = 49406, 49407


def _models(name: str):
    ref = openclip_reference(name)
    ours = CoCa.from_config(get_model_config(name))
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours.train()


def _captions(lengths, context: int, seed: int = 0) -> torch.Tensor:
    """Rows of sot, random tokens, eos, then padding; ``lengths`` count sot and eos."""
    g = torch.Generator().manual_seed(seed)
    text = torch.zeros(len(lengths), context, dtype=torch.long)
    for row, n in enumerate(lengths):
        text[row, :n] = torch.randint(1, SOT, (n,), generator=g)
        text[row, 0], text[row, n - 1] = SOT, EOS
    return text


def assert_close(actual, expected, name="", rel=1e-5):
    """Equal to fp32 rounding: the largest difference is tiny next to the tensor's largest value."""
    assert actual.shape == expected.shape, name
    assert (actual - expected).abs().max() <= rel * max(expected.abs().max(), 1e-3), name


def _step(model, images, text, **forward):
    """Losses and every parameter's gradient of one training step (CoCaLoss(2, 1))."""
    model.zero_grad(set_to_none=True)
    out = model(images, text, **forward)
    losses = CoCaLoss(2.0, 1.0, pad_id=model.pad_id)(out["image_features"], out["text_features"], out["logits"],
                                                     out["labels"], out["logit_scale"], output_dict=True)
    sum(losses.values()).backward()
    return out, losses, {n: p.grad for n, p in model.named_parameters()}


# the longest caption: trimmed; leaving 2 pads (trimmed by one); 1 pad and the whole context (full path)
LONGEST = {"short": lambda L: 13, "two_pads": lambda L: L - 2, "one_pad": lambda L: L - 1, "full": lambda L: L}
CASES = [("coca_tiny", case) for case in LONGEST] + [("coca_ViT-B-32", "short"), ("coca_ViT-B-32", "full")]


@pytest.mark.parametrize("name,case", CASES)
def test_trimmed_text_tower_equals_the_full_path(name, case):
    _, model = _models(name)
    L, size = model.text.context_length, model.visual.image_size
    longest = LONGEST[case](L)
    text = _captions([5, longest, 9, 2], L)
    text[2, 3] = 0  # the pad id mid-caption ('!'): its successor's key is hidden, in both paths
    images = torch.randn(len(text), 3, size, size, generator=torch.Generator().manual_seed(1))

    latent, tokens = model.text(text)
    trim_latent, trim_tokens = model.text(text, trim=True)
    T = min(longest + 1, L)  # one past the last caption token
    assert trim_tokens.shape[1] == T
    assert_close(trim_latent, latent)
    assert_close(trim_tokens, tokens[:, :T])
    assert_close(model.encode_text(text), model._encode_text(text)[0])

    full_out, full, full_grads = _step(model, images, text)  # the whole padded sequence, all logits
    out, trimmed, grads = _step(model, images, text, caption_tokens_only=True)
    assert_close(out["text_features"], full_out["text_features"])
    for key in full:
        assert_close(trimmed[key], full[key], key)
    for pname, grad in full_grads.items():
        assert grad is not None and grads[pname] is not None, pname
        assert_close(grads[pname], grad, pname)


@pytest.mark.parametrize("name", ["coca_tiny", "coca_ViT-B-32"])
def test_trimmed_training_forward_matches_openclip(name):
    ref, ours = _models(name)
    L, size = ours.text.context_length, ours.visual.image_size
    text = _captions([4, 16, 11], L, seed=2)
    images = torch.randn(len(text), 3, size, size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = ref.eval()(images, text)
        out = ours.eval()(images, text, caption_tokens_only=True)
        caption = expected["labels"] != ours.pad_id  # [B, L-1]
        assert torch.equal(out["labels"][0], expected["labels"][caption])
        for key, want in (("text_features", expected["text_features"]), ("logits", expected["logits"][caption])):
            assert (out[key].squeeze(0) - want).abs().max() <= 1e-5, key
        assert (ours.encode_text(text) - ref.encode_text(text)).abs().max() <= 1e-5
    assert out["logits"].abs().max() > 0.1  # not a degenerate comparison
