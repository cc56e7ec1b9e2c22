"""Parity of coca_cli.data.transforms with open_clip 3.3.0, plus load_image error handling."""

import io
import pickle
import random
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from coca_cli.data import transforms as T

import open_clip  # reference implementation (test extra)
from open_clip import transform as oc_transform


# --------------------------------------------------------------------------- #
# images
# --------------------------------------------------------------------------- #


def _make_images():
    astronaut = Image.fromarray(skdata.astronaut())            # 512x512 RGB
    chelsea = Image.fromarray(skdata.chelsea())                # 451x300 RGB
    coffee = Image.fromarray(skdata.coffee())                  # 600x400 RGB
    camera = Image.fromarray(skdata.camera())                  # 512x512 L

    rgba = chelsea.convert("RGBA")
    _, xx = np.mgrid[0:chelsea.height, 0:chelsea.width]
    rgba.putalpha(Image.fromarray(((xx * 255) // chelsea.width).astype(np.uint8)))

    palette = coffee.quantize(colors=64)                        # P
    palette_transparent = palette.copy()
    palette_transparent.info["transparency"] = 3

    i16 = Image.fromarray(skdata.camera().astype(np.uint16) * 181)  # I;16 (values up to ~46k)
    assert i16.mode == "I;16"

    return {
        "astronaut": astronaut,
        "chelsea": chelsea,
        "coffee": coffee,
        "camera_L": camera,
        "chelsea_RGBA": rgba,
        "coffee_P": palette,
        "coffee_P_transparency": palette_transparent,
        "astronaut_CMYK": astronaut.convert("CMYK"),
        "camera_I16": i16,
        "camera_LA": camera.convert("LA"),
        "thin_17x300": coffee.crop((100, 50, 117, 350)),      # 17 wide, 300 tall
        "flat_300x17": astronaut.crop((0, 200, 300, 217)),    # 300 wide, 17 tall
        "tiny_5x7": chelsea.resize((5, 7), Image.NEAREST),
        "wide_odd": coffee.crop((0, 0, 599, 223)),
    }


IMAGES = _make_images()


def _ref_eval(size, resize_mode, **kw):
    return oc_transform.image_transform(
        size, is_train=False, mean=T.OPENAI_MEAN, std=T.OPENAI_STD,
        interpolation=kw.pop("interpolation", "bicubic"), resize_mode=resize_mode, **kw)


def _assert_same(ours: torch.Tensor, ref: torch.Tensor):
    assert ours.dtype == ref.dtype == torch.float32
    assert ours.shape == ref.shape
    assert torch.equal(ours, ref), f"max abs diff {(ours - ref).abs().max().item()}"


# --------------------------------------------------------------------------- #
# eval parity
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("size", [224, 288])
@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
def test_eval_matches_open_clip(size, resize_mode):
    ours = T.image_transform(size, is_train=False, mean=T.OPENAI_MEAN, std=T.OPENAI_STD,
                             interpolation="bicubic", resize_mode=resize_mode)
    ref = _ref_eval(size, resize_mode)
    for name, img in IMAGES.items():
        out = ours(img)
        assert out.shape == (3, size, size), name
        _assert_same(out, ref(img))


@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
def test_eval_non_square_size_and_options(resize_mode):
    # non-square target, bilinear, custom fill and scalar mean/std
    for size, interp, fill in [((224, 160), "bicubic", 0), ((160, 256), "bilinear", 128),
                               (224, "bilinear", 255), (224, "random", 7)]:
        ours = T.image_transform(size, False, mean=0.5, std=0.25, interpolation=interp,
                                 resize_mode=resize_mode, fill_color=fill)
        ref = oc_transform.image_transform(size, False, mean=0.5, std=0.25, interpolation=interp,
                                           resize_mode=resize_mode, fill_color=fill)
        for name in ("chelsea", "thin_17x300", "coffee_P", "camera_L", "chelsea_RGBA"):
            _assert_same(ours(IMAGES[name]), ref(IMAGES[name]))


def test_defaults_and_v2():
    cfg = T.PreprocessCfg()
    assert (cfg.size, cfg.interpolation, cfg.resize_mode, cfg.fill_color) == (224, "bicubic", "shortest", 0)
    assert cfg.mean == T.OPENAI_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert cfg.std == T.OPENAI_STD == (0.26862954, 0.26130258, 0.27577711)

    ref = oc_transform.image_transform_v2(oc_transform.PreprocessCfg(), is_train=False)
    for tfm in (T.image_transform_v2(cfg, is_train=False), T.image_transform(224, False)):
        for img in IMAGES.values():
            _assert_same(tfm(img), ref(img))

    cfg2 = T.PreprocessCfg(size=288, resize_mode="longest", fill_color=100)
    ref2 = oc_transform.image_transform_v2(
        oc_transform.PreprocessCfg(size=288, resize_mode="longest", fill_color=100), is_train=False)
    for name in ("coffee", "thin_17x300", "coffee_P"):
        _assert_same(T.image_transform_v2(cfg2, False)(IMAGES[name]), ref2(IMAGES[name]))


def test_invalid_options():
    with pytest.raises(ValueError):
        T.image_transform(224, False, resize_mode="stretch")
    with pytest.raises(ValueError):
        T.image_transform(224, False, interpolation="nearest")
    with pytest.raises(TypeError):
        T.image_transform(224, True, aug_cfg={"bogus": 1})
    with pytest.raises(NotImplementedError):
        T.image_transform(224, True, aug_cfg={"use_timm": True})
    with pytest.raises(ValueError):
        T.image_transform(224, True, aug_cfg={"color_jitter_prob": 0.5})


# --------------------------------------------------------------------------- #
# against create_model_and_transforms('coca_ViT-B-32')
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def coca_transforms():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, train, val = open_clip.create_model_and_transforms("coca_ViT-B-32")
    return train, val


def test_val_matches_create_model_and_transforms(coca_transforms):
    _, ref = coca_transforms
    ours = T.image_transform_v2(T.PreprocessCfg(), is_train=False)
    for img in IMAGES.values():
        _assert_same(ours(img), ref(img))


def _run_seeded(tfm, img, seed):
    torch.manual_seed(seed)
    random.seed(seed)
    return tfm(img)


def test_train_matches_create_model_and_transforms(coca_transforms):
    ref, _ = coca_transforms
    ours = T.image_transform_v2(T.PreprocessCfg(), is_train=True)
    for seed, (name, img) in enumerate(IMAGES.items()):
        out = _run_seeded(ours, img, seed)
        assert out.shape == (3, 224, 224)
        _assert_same(out, _run_seeded(ref, img, seed))
    # different seeds actually give different crops
    img = IMAGES["astronaut"]
    assert not torch.equal(_run_seeded(ours, img, 0), _run_seeded(ours, img, 1))


@pytest.mark.parametrize("aug_cfg", [
    {"scale": (0.3, 1.0)},
    {"scale": (0.5, 0.8), "color_jitter": (0.4, 0.4, 0.4, 0.1), "color_jitter_prob": 0.8,
     "gray_scale_prob": 0.5},
    {"gray_scale_prob": 1.0},
])
def test_train_aug_cfg_matches_open_clip(aug_cfg):
    ours = T.image_transform(288, True, aug_cfg=aug_cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # open_clip warns about "unused" items it does use
        ref = oc_transform.image_transform(288, True, mean=T.OPENAI_MEAN, std=T.OPENAI_STD,
                                           aug_cfg=dict(aug_cfg))
    for seed, name in enumerate(("astronaut", "chelsea_RGBA", "camera_L", "coffee_P", "thin_17x300")):
        for rep in range(2):
            s = 100 * seed + rep
            _assert_same(_run_seeded(ours, IMAGES[name], s), _run_seeded(ref, IMAGES[name], s))


def test_train_accepts_open_clip_aug_cfg_object():
    cfg = oc_transform.AugmentationCfg(scale=(0.7, 0.9))
    ours = T.image_transform(224, True, aug_cfg=cfg)
    ref = oc_transform.image_transform(224, True, aug_cfg=cfg)
    img = IMAGES["coffee"]
    _assert_same(_run_seeded(ours, img, 3), _run_seeded(ref, img, 3))


# --------------------------------------------------------------------------- #
# load_image
# --------------------------------------------------------------------------- #


def _jpeg_bytes(img=None, quality=90):
    buf = io.BytesIO()
    (img or IMAGES["chelsea"]).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (struct.pack(">I", len(payload)) + kind + payload
            + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))


def _bomb_png(width=100_000, height=100_000) -> bytes:
    """A tiny valid-looking PNG whose header claims width x height 1-bit pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b""))


def _reason(path):
    with pytest.raises(T.ImageLoadError) as info:
        T.load_image(path)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.path == path
    assert err.reason in str(err)
    return err.reason


def test_load_image_success(tmp_path):
    jpg = tmp_path / "cat.jpg"
    jpg.write_bytes(_jpeg_bytes())
    png = tmp_path / "cat.png"
    IMAGES["chelsea_RGBA"].save(png)
    gif = tmp_path / "anim.gif"
    IMAGES["coffee"].save(gif, save_all=True, append_images=[IMAGES["astronaut"]])

    img = T.load_image(jpg)
    assert img.mode == "RGB" and img.size == IMAGES["chelsea"].size
    ref = open_clip.transform.image_transform(224, False)
    _assert_same(T.image_transform(224, False)(img), ref(Image.open(jpg)))

    img = T.load_image(str(png))
    assert img.mode == "RGBA"
    assert np.array_equal(np.asarray(img), np.asarray(IMAGES["chelsea_RGBA"]))

    img = T.load_image(gif)  # file handle already closed; first frame usable
    assert T.image_transform(224, False)(img).shape == (3, 224, 224)


def test_load_image_failures(tmp_path):
    assert _reason(tmp_path / "missing.jpg") == "file not found"

    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    assert _reason(empty) == "empty file"

    text = tmp_path / "notes.jpg"
    text.write_text("this is not a picture\n")
    assert _reason(text) == "not an image"

    full = _jpeg_bytes()
    truncated = tmp_path / "half.jpg"
    truncated.write_bytes(full[: len(full) // 2])
    assert _reason(truncated) == "truncated or corrupt image"

    png_buf = io.BytesIO()
    IMAGES["astronaut"].save(png_buf, format="PNG")
    half_png = tmp_path / "half.png"
    half_png.write_bytes(png_buf.getvalue()[: len(png_buf.getvalue()) // 2])
    assert _reason(half_png) == "truncated or corrupt image"

    assert _reason(tmp_path) == "is a directory"


def test_load_image_decompression_bomb(tmp_path):
    # real default limit: header claims 10^10 pixels (> 2x limit -> Pillow error)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_bomb_png())
    assert bomb.stat().st_size < 200
    assert _reason(bomb) == "image too large (10000000000 pixels)"

    # between the limit and 2x the limit Pillow only warns; we refuse it
    assert Image.MAX_IMAGE_PIXELS is not None
    side = int((Image.MAX_IMAGE_PIXELS * 1.5) ** 0.5)
    warn_bomb = tmp_path / "warn_bomb.png"
    warn_bomb.write_bytes(_bomb_png(side, side))
    assert _reason(warn_bomb) == f"image too large ({side * side} pixels)"


def test_load_image_respects_monkeypatched_limit(tmp_path, monkeypatch):
    png = tmp_path / "small.png"
    IMAGES["camera_L"].resize((40, 40)).save(png)  # 1600 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)   # 1000 < 1600 <= 2000: warning path
    assert _reason(png) == "image too large (1600 pixels)"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)    # 1600 > 1000: error path
    assert _reason(png) == "image too large (1600 pixels)"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1600)
    assert T.load_image(png).size == (40, 40)
    # the warning filter is scoped to load_image
    assert not any(f[2] is Image.DecompressionBombWarning and f[0] == "error"
                   for f in warnings.filters)


def test_image_load_error_is_picklable():
    err = T.ImageLoadError("x.jpg", "not an image")
    again = pickle.loads(pickle.dumps(err))
    assert isinstance(again, T.ImageLoadError)
    assert (again.path, again.reason) == ("x.jpg", "not an image")
    assert str(again) == "cannot load image x.jpg: not an image"
