"""Same weights, same numbers: our model against open_clip 3.3.0 (fp32, CPU)."""

import pytest
import torch

from coca_cli import create_model, get_tokenizer

TEXTS = [
    "a dog sitting on a red sofa",
    "",
    "A PHOTO of the Eiffel tower at night &amp; fireworks",
    "two cats " * 60,  # truncated to the context length
]


@pytest.mark.parametrize("name", ["coca_tiny", "coca_ViT-B-32"])
def test_forward_matches_openclip(converted, name):
    import open_clip

    ref, native = converted(name)
    ours = create_model(None, pretrained=native)
    size = ours.visual.image_size
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    text = get_tokenizer(name)(TEXTS[:3])
    ref_text = open_clip.get_tokenizer(name)(TEXTS[:3])
    assert torch.equal(text, ref_text)
    with torch.no_grad():
        ref_out, out = ref(images, text), ours(images, text)
        for key in ("image_features", "text_features", "logits", "labels", "logit_scale"):
            assert out[key].shape == ref_out[key].shape, key
            assert (out[key].float() - ref_out[key].float()).abs().max() <= 1e-5, key
        for normalize in (True, False):
            assert (ours.encode_image(images, normalize) - ref.encode_image(images, normalize)).abs().max() <= 1e-5
            assert (ours.encode_text(text, normalize) - ref.encode_text(text, normalize)).abs().max() <= 1e-5
    assert out["logits"].abs().max() > 0.1  # not a degenerate comparison


def test_padding_and_truncation_match_openclip(converted):
    """Odd token layouts: the '!' token (id 0 = padding id) mid-text and over-long text."""
    ref, native = converted("coca_tiny")
    ours = create_model(None, pretrained=native)
    text = get_tokenizer("coca_tiny")(TEXTS)
    text[0, 3] = 0
    images = torch.randn(len(TEXTS), 3, 64, 64)
    with torch.no_grad():
        a, b = ref(images, text), ours(images, text)
    for key in ("text_features", "logits"):
        assert (a[key] - b[key]).abs().max() <= 1e-5


def test_forward_without_text_and_precomputed_image(converted):
    ref, native = converted("coca_tiny")
    ours = create_model(None, pretrained=native)
    images = torch.randn(2, 3, 64, 64)
    text = get_tokenizer("coca_tiny")(["a", "b c"])
    with torch.no_grad():
        image_only = ours(images)
        assert set(image_only) == {"image_features", "image_embs"}
        again = ours(None, text, image_latent=image_only["image_features"], image_embs=image_only["image_embs"],
                     output_labels=False)
        ref_again = ref(images, text, output_labels=False)
    assert "labels" not in again
    assert (again["logits"] - ref_again["logits"]).abs().max() <= 1e-5


@pytest.mark.parametrize("name", ["coca_tiny", "coca_ViT-B-32"])
def test_reverse_conversion_loads_into_openclip_strictly(converted, tmp_path, name):
    import open_clip

    from conftest import run_cli

    ref, native = converted(name)
    assert run_cli("convert", native, "--to", "openclip", "--output", tmp_path / "oc") == 0
    back = open_clip.create_model("local-dir:" + str(tmp_path / "oc"))
    strict = open_clip.create_model(name)
    strict.load_state_dict(torch.load(tmp_path / "oc" / "open_clip_pytorch_model.bin", weights_only=True), strict=True)
    for name, tensor in ref.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
        assert torch.equal(strict.state_dict()[name], tensor), name


def test_grad_checkpointing_gives_same_gradients(converted):
    _, native = converted("coca_tiny")
    images = torch.randn(2, 3, 64, 64)
    text = get_tokenizer("coca_tiny")(["a red car", "a blue boat"])
    grads = []
    for enable in (False, True):
        model = create_model(None, pretrained=native).train()
        model.set_grad_checkpointing(enable)
        out = model(images, text)
        loss = out["logits"].float().logsumexp(-1).mean() + (out["image_features"] @ out["text_features"].T).sum()
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.parametrize("name", ["coca_ViT-B-32", "coca_ViT-L-14", "coca_base"])
def test_every_config_has_openclip_state_dict_layout(name):
    """Same parameter names and shapes as open_clip, so its checkpoints load strictly (built on meta)."""
    import open_clip

    from coca_cli import CoCa, get_model_config

    with torch.device("meta"):
        theirs = open_clip.create_model(name, device="meta").state_dict()
        ours = CoCa.from_config(get_model_config(name)).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
