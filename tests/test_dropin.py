"""Drop-in for open_clip: code written for open_clip 3.3.0's CoCa API runs with ``coca_cli`` in its place.

The snippets are those of the seeds' guide (the CoCa page) and API pages (``CoCa``, ``CoCaLoss``),
run once with each library on the same converted weights and real photos; they must give the same
numbers. Sizes are the tiny model's where the pages use coca_ViT-L-14's (captions of 20 tokens, not 50
or 77), and two photos are captioned, not three: open_clip's generation takes seconds on a CPU.
"""

import inspect
import json
import pickle
import shutil

import pytest
import torch
from PIL import Image
from skimage import data

import coca_cli
from coca_cli import CocaError
from conftest import ROOT, one_error_line, openclip_reference, run_cli

NAME = "coca_tiny"


@pytest.fixture(scope="module")
def weights(tiny):
    """open_clip's weights file of the tiny reference model; both libraries load it by path."""
    return str(tiny[1].parent / "open_clip_pytorch_model.bin")


@pytest.fixture(scope="module")
def photos(photo_dir):
    return sorted(photo_dir.iterdir())


def same(theirs, ours, path="result"):
    """Equal token ids and strings, floats to 1e-5 (fp32 on a CPU, as in test_parity.py)."""
    assert type(ours) is type(theirs) or isinstance(theirs, torch.Tensor), path
    if isinstance(theirs, dict):
        assert ours.keys() == theirs.keys(), path
        for key in theirs:
            same(theirs[key], ours[key], f"{path}[{key!r}]")
    elif isinstance(theirs, (list, tuple)):
        assert len(ours) == len(theirs), path
        for i, (a, b) in enumerate(zip(theirs, ours)):
            same(a, b, f"{path}[{i}]")
    elif isinstance(theirs, torch.Tensor):
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, path
        if theirs.is_floating_point():
            assert (ours - theirs).abs().max() <= 1e-5, path
        else:
            assert torch.equal(ours, theirs), path
    else:
        assert ours == theirs, path


def both(snippet, *args):
    """(open_clip's result, ours) of a snippet written against ``open_clip``."""
    import open_clip

    return snippet(open_clip, *args), snippet(coca_cli, *args)


# -- the snippets, as the pages write them (``lib`` is ``open_clip``) -------------------------------

def guide_captioning(lib, weights, photos):
    """Guide: "Basic/Batch Caption Generation" and "Advanced Generation Options"."""
    model, _, transform = lib.create_model_and_transforms(model_name=NAME, pretrained=weights)
    model.eval()
    images = [Image.open(path).convert("RGB") for path in photos[:2]]
    images_tensor = torch.stack([transform(im) for im in images])
    with torch.no_grad():  # the guide adds torch.cuda.amp.autocast(), which does nothing on a CPU
        generated = model.generate(images_tensor)
    captions = [lib.decode(gen).split("<end_of_text>")[0].replace("<start_of_text>", "") for gen in generated]
    with torch.no_grad():
        advanced = model.generate(images_tensor[:1], seq_len=20, temperature=1.0, top_p=0.9)
    return {"generated": generated, "captions": captions, "advanced": advanced}


def guide_tasks(lib, weights, photos):
    """Guide: "Pretrained CoCa Models" and "Using CoCa for Multiple Tasks" (zero-shot and retrieval; its
    captioning is the snippet above)."""
    models = lib.list_pretrained()
    coca_models = [m for m in models if "coca" in m[0].lower()]
    model, _, preprocess = lib.create_model_and_transforms(NAME, pretrained=weights)
    tokenizer = lib.get_tokenizer(NAME)
    image = preprocess(Image.open(photos[0])).unsqueeze(0)
    text = tokenizer(["a dog", "a cat", "a car"])
    with torch.no_grad():
        image_features = model.encode_image(image)
        text_features = model.encode_text(text)
        image_features /= image_features.norm(dim=-1, keepdim=True)
        text_features /= text_features.norm(dim=-1, keepdim=True)
        similarity = (100.0 * image_features @ text_features.T).softmax(dim=-1)

    images = torch.stack([preprocess(Image.open(path)) for path in photos])
    texts = tokenizer([f"caption {i}" for i in range(100)])
    with torch.no_grad():
        all_image_features = model.encode_image(images)
        all_text_features = model.encode_text(texts)
    all_image_features /= all_image_features.norm(dim=-1, keepdim=True)
    all_text_features /= all_text_features.norm(dim=-1, keepdim=True)
    top5 = (all_image_features @ all_text_features.T).topk(5, dim=-1)
    return {"coca_models": sorted(coca_models), "text": text, "probabilities": similarity,
            "top5": (top5.values, top5.indices)}


def api_coca(lib, weights, photos):
    """API page "CoCa": training outputs, contrastive matching and generation with custom parameters (its
    beam search with the default settings is the guide's)."""
    model, _, preprocess = lib.create_model_and_transforms(NAME, pretrained=weights)
    images = torch.stack([preprocess(Image.open(path)) for path in photos[:4]])
    captions = lib.get_tokenizer(NAME)(["a red car", "two dogs on a beach", "an astronaut", "a cup of coffee"])
    with torch.no_grad():
        output = model(images, captions)
    model.eval()
    with torch.no_grad():
        image_emb = model.encode_image(images, normalize=True)
        text_emb = model.encode_text(captions, normalize=True)
        logit_scale = model.logit_scale.exp()
        probs = (logit_scale * (image_emb @ text_emb.T)).softmax(dim=-1)
        torch.manual_seed(0)
        sampled = model.generate(images[:2], seq_len=20, generation_type="top_p", top_p=0.9, temperature=0.8,
                                 repetition_penalty=1.2, min_seq_len=10)
        diverse = model.generate(images[:2], seq_len=20, generation_type="beam_search", num_beams=10,
                                 num_beam_groups=5, min_seq_len=8)
    return {"output": {k: output[k] for k in ("image_features", "text_features", "logits", "labels")},
            "probs": probs, "sampled": sampled, "diverse": diverse}


def api_coca_loss(lib, weights, photos):
    """API page "CoCaLoss": the usage example, dictionary output, caption-only training and a subclass."""
    model = lib.create_model(NAME, pretrained=weights)
    _, _, preprocess = lib.create_model_and_transforms(NAME, pretrained=weights)
    loss_fn = lib.CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0, pad_id=0)
    images = torch.stack([preprocess(Image.open(path)) for path in photos[:4]])
    captions = lib.get_tokenizer(NAME)(["a red car", "two dogs on a beach", "an astronaut", "a cup of coffee"])
    output = model(images, captions)
    clip_loss, caption_loss = loss_fn(output["image_features"], output["text_features"], output["logits"],
                                      output["labels"], output["logit_scale"])
    total_loss = clip_loss + caption_loss
    total_loss.backward()
    loss_dict = loss_fn(output["image_features"], output["text_features"], output["logits"], output["labels"],
                        output["logit_scale"], output_dict=True)
    caption_only = lib.CoCaLoss(caption_loss_weight=1.0, clip_loss_weight=0.0, pad_id=0)
    zero_clip, _ = caption_only(output["image_features"], output["text_features"], output["logits"],
                                output["labels"], output["logit_scale"])

    class AdaptiveCoCaLoss(lib.CoCaLoss):
        """Dynamically adjust loss weights during training."""

        def __init__(self, *args, initial_caption_weight=2.0, **kwargs):
            super().__init__(caption_loss_weight=initial_caption_weight, *args, **kwargs)
            self.step = 0

        def forward(self, *args, **kwargs):
            self.caption_loss_weight = 2.0 + (self.step / 10000)
            self.step += 1
            return super().forward(*args, **kwargs)

    adaptive = AdaptiveCoCaLoss(clip_loss_weight=1.0, pad_id=0)
    adapted = [adaptive(output["image_features"], output["text_features"], output["logits"], output["labels"],
                        output["logit_scale"])[1].detach() for _ in range(2)]
    gradients = {name: param.grad for name, param in model.named_parameters()
                 if name in ("logit_scale", "visual.proj", "text.text_projection", "text_decoder.text_projection")}
    return {"losses": (clip_loss.detach(), caption_loss.detach()),
            "loss_dict": {k: v.detach() for k, v in loss_dict.items()}, "zero_clip": float(zero_clip),
            "adapted": adapted, "gradients": gradients}


def test_guide_captioning_gives_the_same_captions(weights, photos):
    theirs, ours = both(guide_captioning, weights, photos)
    same(theirs["generated"], ours["generated"])
    same(theirs["advanced"], ours["advanced"])
    # coca's decode already strips the start and end tokens, and the space after the last word
    assert ours["captions"] == [caption.strip() for caption in theirs["captions"]]
    assert len(set(ours["captions"])) > 1  # the photos are told apart


def test_guide_tasks_give_the_same_numbers(weights, photos):
    theirs, ours = both(guide_tasks, weights, photos)
    same(theirs, ours)
    assert len(ours["coca_models"]) == 4


def test_api_page_coca(weights, photos):
    theirs, ours = both(api_coca, weights, photos)
    same(theirs, ours)
    assert not torch.equal(ours["diverse"][0], ours["diverse"][1])  # the photos are told apart


def test_api_page_coca_loss(weights, photos):
    theirs, ours = both(api_coca_loss, weights, photos)
    same(theirs, ours)
    assert ours["zero_clip"] == 0 and ours["losses"][0] > 0
    assert ours["adapted"][1] > ours["adapted"][0]  # the subclass raised the caption weight


# -- every keyword of open_clip's signatures ---------------------------------------------------------

def _defaults(function) -> dict:
    """The keywords of one of open_clip's functions, at its defaults (the required ones left out)."""
    return {name: p.default for name, p in inspect.signature(function).parameters.items()
            if name != "self" and p.default is not inspect.Parameter.empty}


def test_every_openclip_keyword_is_accepted(weights, photos):
    """Each of open_clip's functions, called with every keyword it has at open_clip's default: the
    list comes from the installed open_clip, so a keyword it adds fails here until coca takes it."""
    import open_clip
    from open_clip.coca_model import CoCa as OpenClipCoCa

    model = coca_cli.create_model(**{**_defaults(open_clip.create_model), "model_name": NAME, "pretrained": weights})
    _, _, transform = coca_cli.create_model_and_transforms(
        **{**_defaults(open_clip.create_model_and_transforms), "model_name": NAME, "pretrained": weights})
    loaded, preprocess = coca_cli.create_model_from_pretrained(
        **{**_defaults(open_clip.create_model_from_pretrained), "model_name": NAME, "pretrained": weights})
    assert torch.equal(loaded.logit_scale, model.logit_scale)
    image = transform(Image.open(photos[0])).unsqueeze(0)
    assert torch.equal(preprocess(Image.open(photos[0])), image[0])

    # open_clip hands **model_kwargs to CoCa (cast_dtype it sets itself), pretrained_hf to pretrained_text
    constructor = {k: v for k, v in _defaults(OpenClipCoCa.__init__).items() if k != "cast_dtype"}
    ours = coca_cli.create_model(NAME, pretrained=weights, pretrained_hf=True, **constructor)
    ref = open_clip.create_model(NAME, pretrained=weights, pretrained_hf=True, **constructor)
    same(dict(ref.state_dict()), dict(ours.state_dict()))

    tokens = coca_cli.get_tokenizer(**_defaults(open_clip.get_tokenizer))(["an astronaut"])
    assert torch.equal(tokens, open_clip.get_tokenizer(**_defaults(open_clip.get_tokenizer))(["an astronaut"]))

    with torch.no_grad():
        generated = model.generate(image, **_defaults(OpenClipCoCa.generate))
        output = model(image.expand(2, -1, -1, -1), coca_cli.get_tokenizer(NAME)(["an astronaut", "a rocket"]))
    loss = coca_cli.CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0,
                             **_defaults(open_clip.CoCaLoss.__init__))
    losses = loss(output["image_features"], output["text_features"], output["logits"], output["labels"],
                  output["logit_scale"], **_defaults(open_clip.CoCaLoss.forward))
    assert generated[0, 0] == 49406 and len(losses) == 2


# -- the keywords that change something, against open_clip ------------------------------------------

def _features(lib, photos, **kwargs):
    """Image and text features of a model made with ``kwargs``, through its own transform."""
    model, _, transform = lib.create_model_and_transforms(NAME, **kwargs)
    images = torch.stack([transform(Image.open(path)) for path in photos])
    context = kwargs.get("force_context_length")
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(lib.get_tokenizer(NAME, context)(["a cat", "a rocket"]))


@pytest.mark.parametrize("kwargs", [
    {"force_quick_gelu": True},
    {"force_image_size": 96},
    {"force_image_size": (96, 128)},  # non-square: the positional grid is interpolated to 6 x 8
    {"force_context_length": 20},  # text positions interpolated
    {"image_mean": (0.5, 0.4, 0.3), "image_std": (0.2, 0.3, 0.25), "image_interpolation": "bilinear",
     "image_resize_mode": "longest"},
    {"image_resize_mode": "squash"},
], ids=str)
def test_keyword_changes_the_numbers_as_in_openclip(weights, photos, kwargs):
    import open_clip

    theirs = _features(open_clip, photos, pretrained=weights, **kwargs)
    ours = _features(coca_cli, photos, pretrained=weights, **kwargs)
    same(theirs, ours)
    plain = _features(coca_cli, photos, pretrained=weights)
    changed = 1 if "force_context_length" in kwargs else 0  # the text features, or the image features
    assert (ours[changed] - plain[changed]).abs().max() > 1e-3


def test_preprocessing_is_openclips_pixel_for_pixel(weights):
    """The transforms of every image setting, on photos from scikit-image, bit for bit."""
    import open_clip

    settings = {"image_mean": (0.5, 0.5, 0.5), "image_std": (0.25, 0.25, 0.25), "image_interpolation": "bilinear",
                "image_resize_mode": "longest"}
    _, their_train, their_eval = open_clip.create_model_and_transforms(NAME, pretrained=weights, **settings)
    _, our_train, our_eval = coca_cli.create_model_and_transforms(NAME, pretrained=weights, **settings)
    _, their_pretrained = open_clip.create_model_from_pretrained(NAME, pretrained=weights, **settings)
    _, our_pretrained = coca_cli.create_model_from_pretrained(NAME, pretrained=weights, **settings)
    for photo in (data.astronaut(), data.camera(), data.coffee()):
        image = Image.fromarray(photo)
        assert torch.equal(our_eval(image), their_eval(image))
        assert torch.equal(our_pretrained(image), their_pretrained(image))
        torch.manual_seed(1)
        theirs = their_train(image)
        torch.manual_seed(1)
        assert torch.equal(our_train(image), theirs)


def test_force_patch_dropout_drops_the_same_patches_in_training(weights, photos):
    import open_clip

    ref = open_clip.create_model(NAME, pretrained=weights, force_patch_dropout=0.5).train()
    ours = coca_cli.create_model(NAME, pretrained=weights, force_patch_dropout=0.5).train()
    _, _, transform = coca_cli.create_model_and_transforms(NAME, pretrained=weights)
    images = torch.stack([transform(Image.open(path)) for path in photos])
    torch.manual_seed(3)
    theirs = ref.encode_image(images)
    torch.manual_seed(3)
    dropped = ours.encode_image(images)
    same(theirs, dropped)
    assert (dropped - ours.eval().encode_image(images)).abs().max() > 1e-3  # in training only


@pytest.mark.parametrize("precision, dtype, tolerance", [
    ("amp", torch.float32, 1e-5), ("amp_bf16", torch.float32, 1e-5), ("pure_fp16", torch.float16, 5e-3),
    ("pure_bf16", torch.bfloat16, 5e-2),
])
def test_precision_as_in_openclip(weights, photos, precision, dtype, tolerance):
    """Weights of the same dtypes as open_clip's, and numbers within that dtype's rounding of them."""
    import open_clip

    ref = open_clip.create_model(NAME, pretrained=weights, precision=precision)
    ours, _, transform = coca_cli.create_model_and_transforms(NAME, pretrained=weights, precision=precision)
    assert {p.dtype for p in ours.parameters()} == {p.dtype for p in ref.parameters()} == {dtype}
    images = torch.stack([transform(Image.open(path)) for path in photos[:2]]).to(dtype)
    text = coca_cli.get_tokenizer(NAME)(["a cat on a mat", "a rocket"])
    with torch.no_grad():
        theirs, mine = ref(images, text), ours(images, text)
    for key in ("image_features", "text_features", "logits"):
        assert (mine[key].float() - theirs[key].float()).abs().max() <= tolerance, key


@pytest.mark.parametrize("precision, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_mixed_precision_runs_where_openclips_coca_fails(weights, photos, precision, dtype):
    """open_clip's fp16/bf16 keep embeddings in fp32, which its CoCa then multiplies with half-precision
    weights (a dtype error); coca casts the whole model and computes the norms in fp32."""
    import open_clip

    full, _, transform = coca_cli.create_model_and_transforms(NAME, pretrained=weights)
    images = torch.stack([transform(Image.open(path)) for path in photos[:2]])
    text = coca_cli.get_tokenizer(NAME)(["a cat on a mat", "a rocket"])
    with pytest.raises(RuntimeError, match="dtype"):
        open_clip.create_model(NAME, pretrained=weights, precision=precision)(images.to(dtype), text)
    half = coca_cli.create_model(NAME, pretrained=weights, precision=precision)
    with torch.no_grad():
        close = (half.encode_image(images.to(dtype)).float() - full.encode_image(images)).abs().max()
        tokens = half.generate(images.to(dtype), seq_len=10)
    assert 0 < close <= 2e-2 and tokens.shape[0] == 2


def test_model_kwargs_and_output_dict_as_in_openclip(weights):
    import open_clip

    kwargs = dict(nonscalar_logit_scale=True, init_logit_bias=-10.0, output_dict=True, load_weights=False)
    ref, ours = open_clip.create_model(NAME, **kwargs), coca_cli.create_model(NAME, **kwargs)
    for name in ("logit_scale", "logit_bias"):
        assert getattr(ours, name).shape == getattr(ref, name).shape == (1,)
        assert torch.equal(getattr(ours, name), getattr(ref, name))
    images, text = torch.randn(2, 3, 64, 64), coca_cli.get_tokenizer(NAME)(["a", "b"])
    assert ours(images, text).keys() == ref(images, text).keys()  # CoCa answers with a dict either way


def test_load_weights_false_and_require_pretrained(weights, tiny):
    import open_clip

    ref = tiny[0]
    random = coca_cli.create_model(NAME, pretrained=weights, load_weights=False)
    assert not torch.equal(random.visual.proj, ref.visual.proj)
    with pytest.raises(RuntimeError):
        open_clip.create_model(NAME, require_pretrained=True)
    with pytest.raises(CocaError, match="pretrained weights are required"):
        coca_cli.create_model(NAME, require_pretrained=True)
    with pytest.raises(CocaError, match="load_weights=True"):
        coca_cli.create_model_from_pretrained(NAME, pretrained=weights, load_weights=False)


def test_tower_weights_are_loaded_after_the_checkpoint(weights, tmp_path):
    """pretrained_image_path / pretrained_text_path: one tower's state dict over the model's weights."""
    import open_clip

    other = openclip_reference(NAME, seed=5)
    torch.save(other.visual.state_dict(), tmp_path / "visual.pt")
    torch.save({k: v for k, v in other.text.state_dict().items() if "resblocks.1" in k}, tmp_path / "text.pt")
    kwargs = dict(pretrained=weights, pretrained_image_path=str(tmp_path / "visual.pt"),
                  pretrained_text_path=str(tmp_path / "text.pt"))
    ref, ours = open_clip.create_model(NAME, **kwargs), coca_cli.create_model(NAME, **kwargs)
    same(dict(ref.state_dict()), dict(ours.state_dict()))
    assert torch.equal(ours.visual.proj, other.visual.proj)
    assert torch.equal(ours.text.transformer.resblocks[1].mlp.c_fc.weight,
                       other.text.transformer.resblocks[1].mlp.c_fc.weight)
    assert not torch.equal(ours.text.transformer.resblocks[0].mlp.c_fc.weight,
                           other.text.transformer.resblocks[0].mlp.c_fc.weight)


def test_pretrained_text_decides_whether_a_hugging_face_tower_loads_its_own_weights(monkeypatch, weights):
    """As open_clip: only when asked, and when neither a checkpoint nor a text tower file replaces them."""
    built = []

    class Built(Exception):
        pass

    def build(cfg, **kwargs):
        built.append(cfg.text_cfg.hf_model_pretrained)
        raise Built

    monkeypatch.setattr(coca_cli.CoCa, "from_config", build)
    for kwargs in ({}, {"pretrained_text": False}, {"pretrained_hf": False}, {"pretrained_text_path": weights},
                   {"pretrained": weights}, {"pretrained": weights, "load_weights": False}):
        with pytest.raises(Built):
            coca_cli.create_model("coca_roberta-ViT-B-32", **kwargs)
    assert built == [True, False, False, False, False, True]


def test_cache_dir_hf_hub_and_local_dir_model_names(tmp_path, weights, photos):
    """``hf-hub:org/repo`` (from ``cache_dir``) and ``local-dir:PATH`` as model names, config and
    preprocessing read from the open_clip_config.json they hold."""
    import open_clip

    commit = "0123456789abcdef0123456789abcdef01234567"
    cache = tmp_path / "cache"
    snapshot = cache / "models--someone--coca-tiny" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (cache / "models--someone--coca-tiny" / "refs").mkdir()
    (cache / "models--someone--coca-tiny" / "refs" / "main").write_text(commit)
    shutil.copy(weights, snapshot / "open_clip_pytorch_model.bin")
    model_cfg = json.loads((ROOT / "models" / f"{NAME}.json").read_text())
    preprocess_cfg = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "resize_mode": "squash"}
    (snapshot / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg,
                                                                "preprocess_cfg": preprocess_cfg}))
    image = Image.open(photos[0])
    for name, kwargs in (("hf-hub:someone/coca-tiny", {"cache_dir": str(cache)}), (f"local-dir:{snapshot}", {})):
        ref, _, their_transform = open_clip.create_model_and_transforms(name, **kwargs)
        ours, _, our_transform = coca_cli.create_model_and_transforms(name, **kwargs)
        pixels = our_transform(image)
        assert torch.equal(pixels, their_transform(image))
        with torch.no_grad():
            same(ref.encode_image(pixels[None]), ours.encode_image(pixels[None]))
        tokenizer = coca_cli.get_tokenizer(name, **kwargs)
        assert tokenizer.context_length == open_clip.get_tokenizer(name, **kwargs).context_length == 32
    plain = coca_cli.create_model_and_transforms(NAME, pretrained=weights)[2]
    assert not torch.equal(plain(image), pixels)  # the stored preprocessing was used


# -- bad input: one clear error --------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"jit": True}, "compile=True"),
    ({"precision": "fp8"}, "unknown precision 'fp8' (choose from fp32, amp, amp_bf16, amp_bfloat16, fp16, bf16, "
                           "pure_fp16, pure_bf16)"),
    ({"force_patch_dropout": 1.5}, "vision_cfg.patch_dropout must be a number from 0 to below 1, got 1.5"),
    ({"force_image_size": (64, 0)}, "vision_cfg.image_size must be a positive integer or [height, width]"),
    ({"force_context_length": -1}, "text_cfg.context_length must be a positive integer, got -1"),
    ({"force_preprocess_cfg": {"interpolation": "nearest"}}, "interpolation must be one of"),
    ({"force_preprocess_cfg": {"resize": 1}}, "unknown preprocessing setting 'resize'"),
    ({"cast_dtype": torch.float16}, "unknown model option 'cast_dtype'"),
    ({"model_name": "hf-hub:"}, "names no repository"),
    ({"model_name": "local-dir:/nonexistent"}, "model name 'local-dir:/nonexistent': no such folder"),
], ids=str)
def test_bad_arguments_give_one_clear_error(kwargs, message):
    with pytest.raises(CocaError) as err:
        coca_cli.create_model(**{"model_name": NAME, **kwargs})
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_tokenizer_option_and_tower_file(weights, tmp_path):
    with pytest.raises(CocaError, match="clean='whitespace' is not supported"):
        coca_cli.get_tokenizer(NAME, clean="whitespace")
    assert coca_cli.get_tokenizer(NAME, clean="lower", reduction_mask="").context_length == 32
    with pytest.raises(CocaError, match="does not fit the model config: unexpected keys: logit_scale"):  # a whole model
        coca_cli.create_model(NAME, pretrained_image_path=weights)
    with pytest.raises(CocaError, match="checkpoint not found"):
        coca_cli.create_model(NAME, pretrained_text_path=str(tmp_path / "missing.pt"))


class _RunsCode:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_weights_only_false_still_refuses_a_pickle_that_runs_code(tmp_path):
    target = tmp_path / "planted"
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"logit_scale": _RunsCode(str(target))}, f, protocol=2)
    with pytest.raises(CocaError, match="refusing to load"):
        coca_cli.create_model(NAME, pretrained=str(tmp_path / "evil.pt"), weights_only=False)
    assert not target.exists()


def test_cli_names_the_precisions_in_one_line(tiny, photos, capsys):
    assert run_cli("classify", photos[0], "--labels", "a,b", "--pretrained", tiny[1], "--precision", "fp8") == 2
    assert "pure_bf16" in one_error_line(capsys)
