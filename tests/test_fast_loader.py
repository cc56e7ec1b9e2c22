"""The training loader's fast path: JPEGs decoded at reduced size (same crop box, close pixels), the
cheap per-sample seeding, and --gpu-decode's logic run on the CPU (decode_jpeg has the same API)."""

import io
import random

import numpy as np
import pytest
import torch
import torchvision.io
from PIL import Image
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms import functional as TF

from coca_cli.data import transforms as T
from coca_cli.data.samples import SkipSample, decode_image, seeded
from conftest import PHOTOS, run_cli


def jpeg(size=(640, 480), mode="RGB") -> bytes:
    image = Image.open(PHOTOS[0]).convert(mode).resize(size, Image.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def pixels(tensor: torch.Tensor) -> np.ndarray:
    """A normalised image back in 0-255 levels."""
    mean, std = torch.tensor(T.OPENAI_MEAN).view(3, 1, 1), torch.tensor(T.OPENAI_STD).view(3, 1, 1)
    return ((tensor * std + mean) * 255).numpy()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * np.log10(255 ** 2 / np.mean((pixels(a) - pixels(b)) ** 2)))


def boxes_drawn(monkeypatch) -> list:
    """Every region resized, as (top, left, height, width) in the decoded (maybe reduced) image."""
    seen, crop_resize = [], T.crop_resize

    def spy(pixels, top, left, height, width, *args):
        seen.append((top, left, height, width))
        return crop_resize(pixels, top, left, height, width, *args)

    monkeypatch.setattr(T, "crop_resize", spy)
    return seen


@pytest.mark.parametrize("size,scale", [((640, 480), 2), ((1800, 1000), 4), ((384, 256), 1), ((7, 400), 1)])
def test_reduced_decoding_keeps_the_crop_and_is_close(size, scale, monkeypatch):
    data = jpeg(size)
    transform = T.image_transform(224, is_train=True)
    for seed in range(6):
        today = seeded(transform, decode_image(data), seed)  # decoded image: torchvision's path, as open_clip
        box = seeded(lambda im: RandomResizedCrop.get_params(im, (0.9, 1.0), (3 / 4, 4 / 3)), decode_image(data), seed)
        seen = boxes_drawn(monkeypatch)
        fast = seeded(transform, decode_image(data, lazy=True), seed)
        monkeypatch.undo()
        used = T.dct_scale(box[2], box[3], (224, 224))
        assert used == (scale if min(box[2], box[3]) >= 224 * scale else used)
        assert min(box[2], box[3]) / used >= 224 or used == 1  # never decoded below the output size
        # the same region of the photo, its corners in the reduced image's whole pixels (exact at full size)
        corners = lambda t, l, h, w: (t, l, t + h, l + w)  # noqa: E731
        assert len(seen) == 1
        assert corners(*seen[0]) == pytest.approx(tuple(v / used for v in corners(*box)), abs=0.5 if used > 1 else 0)
        if used > 1:  # compared with torchvision's crop of that whole-pixel box, at full size
            top, left, height, width = (v * used for v in seen[0])
            today = transform.transforms[-1](TF.to_tensor(TF.resized_crop(
                decode_image(data), top, left, height, width, [224, 224], TF.InterpolationMode.BICUBIC)))
        assert fast.shape == today.shape == (3, 224, 224)
        assert np.abs(pixels(fast) - pixels(today)).mean() < (0.1 if used == 1 else 1.5)
        assert psnr(fast, today) > (45 if used == 1 else 35)


def test_reduced_scale_is_used_on_coco_sized_photos(monkeypatch):
    """A 640x480 photo with a crop of at least 448x448 is decoded at half size."""
    data = jpeg((640, 480))
    drafts = []
    from PIL.JpegImagePlugin import JpegImageFile

    real = JpegImageFile.draft
    monkeypatch.setattr(JpegImageFile, "draft", lambda im, mode, size: drafts.append(size) or real(im, mode, size))
    transform = T.image_transform(224, is_train=True, aug_cfg={"scale": (1.0, 1.0)})
    seeded(transform, decode_image(data, lazy=True), 0)
    assert drafts == [(320, 240)]


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_whole_size_crops_are_decoded_by_torchvision_to_pillows_pixels(mode, monkeypatch):
    """Where no DCT scaling keeps the crop, torchvision decodes the JPEG: the pixels Pillow decodes,
    bit for bit, over chroma subsamplings, progressive and low quality; the transform gives the
    same tensor when torchvision is gone (ImportError) or refuses the file (RuntimeError), Pillow
    decoding it then; a JPEG opened by path, with no bytes at hand, is decoded by Pillow."""
    for options in ({"subsampling": 0}, {"subsampling": 1}, {"subsampling": 2}, {"progressive": True}, {"quality": 40}):
        buf = io.BytesIO()
        Image.open(PHOTOS[1]).convert(mode).resize((333, 251)).save(buf, "JPEG", **options)
        data = buf.getvalue()
        assert torch.equal(T.jpeg_pixels(decode_image(data, lazy=True)), T.pil_pixels(decode_image(data))), options
    transform = T.image_transform(224, is_train=True)
    data = jpeg((384, 256), mode)  # too small for a reduced decode
    decoded, real = [], T.torchvision_jpeg
    monkeypatch.setattr(T, "torchvision_jpeg", lambda *a, **k: decoded.append(1) or real(*a, **k))
    fast = seeded(transform, decode_image(data, lazy=True), 2)
    assert decoded == [1]
    monkeypatch.setattr(T, "torchvision_jpeg", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("refused")))
    assert torch.equal(seeded(transform, decode_image(data, lazy=True), 2), fast)
    monkeypatch.undo()
    monkeypatch.delattr(torchvision.io, "decode_jpeg")  # a torchvision without it: Pillow, and no --gpu-decode
    assert torch.equal(seeded(transform, decode_image(data, lazy=True), 2), fast)
    assert T.gpu_decoding(transform, torch.device("cuda")) == (transform, "--gpu-decode needs torchvision.io."
                                                                          "decode_jpeg, gone from this torchvision: decoding on the CPU")
    monkeypatch.undo()
    assert T.jpeg_pixels(Image.open(PHOTOS[0])) is None
    assert seeded(transform, Image.open(PHOTOS[0]), 2).shape == (3, 224, 224)


def test_old_path_switch_and_other_images_are_exact(monkeypatch):
    """REDUCED_DECODE = False (benchmarks' comparison) and images that are not RGB/L JPEGs take
    torchvision's path: bit for bit as a decoded image."""
    transform = T.image_transform(224, is_train=True)
    cmyk = jpeg(mode="CMYK")
    buf = io.BytesIO()
    Image.open(PHOTOS[1]).save(buf, "PNG")
    for data in (cmyk, buf.getvalue()):
        assert torch.equal(seeded(transform, decode_image(data, lazy=True), 3), seeded(transform, decode_image(data), 3))
    monkeypatch.setattr(T, "REDUCED_DECODE", False)
    data = jpeg()
    assert torch.equal(seeded(transform, decode_image(data, lazy=True), 3), seeded(transform, decode_image(data), 3))


def test_grayscale_jpeg_and_unreadable_jpeg():
    transform = T.image_transform(224, is_train=True)
    gray = jpeg(mode="L")
    fast, today = seeded(transform, decode_image(gray, lazy=True), 1), seeded(transform, decode_image(gray), 1)
    assert psnr(fast, today) > 40 and np.allclose(pixels(fast)[0], pixels(fast)[1], atol=1e-3)
    cut = jpeg()[:2000]  # the header reads, the pixels do not: skipped, as when decoded up front
    with pytest.raises(SkipSample, match="unreadable image"):
        seeded(transform, decode_image(cut, lazy=True), 1)


def test_uint8_batches_equal_the_transform_bit_for_bit():
    """PixelCrops + PixelBatch (the loader's default): per sample the crop's uint8 pixels, per
    batch ToTensor's and Normalize's arithmetic; the same tensors as the transform gives, for
    JPEGs decoded at full and at reduced size, grayscale, CMYK and PNG with alpha."""
    transform = T.image_transform(224, is_train=True)
    crops = T.fast_training_transform(transform)
    assert isinstance(crops, T.PixelCrops)
    rgba = io.BytesIO()
    Image.open(PHOTOS[1]).convert("RGBA").save(rgba, "PNG")
    samples = [jpeg(), jpeg((1800, 1000)), jpeg((300, 240)), jpeg(mode="L"), jpeg(mode="CMYK"), rgba.getvalue()]
    items = [seeded(crops, decode_image(data, lazy=True), seed) for seed, data in enumerate(samples)]
    assert all(item.dtype == torch.uint8 and item.shape == (3, 224, 224) for item in items)
    batch = T.stack_images(items, crops)
    assert len(batch) == len(samples) and batch.pixels.dtype == torch.uint8
    expected = torch.stack([seeded(transform, decode_image(data, lazy=True), seed) for seed, data in enumerate(samples)])
    assert torch.equal(batch.to("cpu"), expected)
    assert torch.equal(batch.to("cpu", torch.bfloat16), expected.bfloat16())


def test_the_training_loop_normalises_crops_into_buffers_it_reuses():
    """BatchBuffers (the loop's ``.to``): a CPU float32 batch of crops lands in its slot's buffer,
    the same one each step (no fresh pages to fault in), with PixelBatch.to's values; each
    micro-batch of a step has a slot of its own; anything else is converted as before."""
    crops = T.fast_training_transform(T.image_transform(64, is_train=True))
    photos = [jpeg(), jpeg((300, 240)), jpeg(mode="L"), jpeg((800, 500))]

    def batch(seed, n=2):
        return T.stack_images([seeded(crops, decode_image(photos[(seed + i) % 4], lazy=True), seed + i)
                               for i in range(n)], crops)

    buffers = T.BatchBuffers()
    first = buffers.to(batch(0), "cpu", torch.float32)
    assert torch.equal(first, batch(0).to("cpu"))
    second = buffers.to(batch(1), "cpu", torch.float32, slot=0)
    assert second.data_ptr() == first.data_ptr() and torch.equal(second, batch(1).to("cpu"))
    other = buffers.to(batch(2), "cpu", slot=1)
    assert other.data_ptr() != second.data_ptr() and torch.equal(second, batch(1).to("cpu"))
    assert torch.equal(other, batch(2).to("cpu"))
    last = buffers.to(batch(3, n=1), "cpu", torch.float32)  # an epoch's short last batch: a buffer of its size
    assert last.shape == (1, 3, 64, 64) and torch.equal(last, batch(3, n=1).to("cpu"))
    half = buffers.to(batch(0), "cpu", torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half, batch(0).to("cpu", torch.bfloat16))
    floats = torch.rand(2, 3, 64, 64)
    assert buffers.to(floats, "cpu", torch.float32) is floats


def test_the_uint8_path_is_only_for_the_plain_transform(monkeypatch):
    jitter = T.image_transform(224, is_train=True, aug_cfg={"color_jitter_prob": 0.5, "color_jitter": (0.4, 0.4, 0.4, 0.1)})
    assert T.fast_training_transform(jitter) is jitter  # colour jitter works on the PIL image
    monkeypatch.setattr(T, "REDUCED_DECODE", False)
    plain = T.image_transform(224, is_train=True)
    assert T.fast_training_transform(plain) is plain


def test_seeded_draws_as_manual_seed_and_restores_the_generators():
    random.seed(5)
    torch.manual_seed(5)
    before = (random.random(), torch.rand(1))
    random.seed(5)
    torch.manual_seed(5)
    draws = seeded(lambda _: (random.random(), torch.rand(3)), None, 11)
    assert (random.random(), torch.rand(1)) == before
    torch.manual_seed(11)
    random.seed(11)
    assert draws[0] == random.random() and torch.equal(draws[1], torch.rand(3))


def test_gpu_decode_logic_on_cpu():
    """DeferredDecode draws the same box as the CPU path, and JpegBatch.to decodes, crops and
    normalises like it (decode_jpeg on CPU tensors; on a GPU only the device differs)."""
    transform = T.image_transform(224, is_train=True)
    deferred, why = T.gpu_decoding(transform, torch.device("cuda"))  # only the device type is looked at
    assert why is None and isinstance(deferred, T.DeferredDecode)
    png = io.BytesIO()
    Image.open(PHOTOS[1]).save(png, "PNG")
    samples = [jpeg((640, 480)), jpeg((300, 500)), png.getvalue(), jpeg(mode="L")]
    items = [seeded(deferred, decode_image(d, lazy=True), s) for s, d in enumerate(samples)]
    assert [type(i).__name__ for i in items] == ["EncodedJpeg", "EncodedJpeg", "Tensor", "EncodedJpeg"]
    box = seeded(lambda im: RandomResizedCrop.get_params(im, (0.9, 1.0), (3 / 4, 4 / 3)), decode_image(samples[0]), 0)
    assert items[0].box == box
    batch = T.stack_images(items, deferred)
    assert len(batch) == 4 and batch.pin_memory() is batch
    images = batch.to("cpu", torch.float32)
    assert images.shape == (4, 3, 224, 224)
    cpu = [seeded(transform, decode_image(d), s) for s, d in enumerate(samples)]
    assert torch.equal(images[2], cpu[2])
    for i in (0, 1, 3):
        assert psnr(images[i], cpu[i]) > 35


def test_gpu_decode_falls_back_through_the_cli(tiny, tmp_path, capsys):
    """No GPU: one warning line, then training decodes on the CPU."""
    table = tmp_path / "train.csv"
    lines = ["filepath,title"]
    for i in range(4):
        path = tmp_path / f"{i}.jpg"
        path.write_bytes(jpeg((96 + 8 * i, 80)))
        lines.append(f"{path},photo number {i}")
    table.write_text("\n".join(lines) + "\n")
    assert run_cli("train", "--model", "coca_tiny", "--workers", "0", "--precision", "fp32", "--warmup", "1",
                   "--data", table, "--batch-size", "2", "--epochs", "1", "--device", "cpu", "--gpu-decode",
                   "--output", tmp_path / "run") == 0
    err = capsys.readouterr()
    warnings = [line for line in (err.out + err.err).splitlines() if "--gpu-decode" in line]
    assert warnings == ["warning: --gpu-decode needs a CUDA device (training on cpu): decoding on the CPU"]


def test_crop_box_draws_are_torchvisions():
    """ReducedRandomResizedCrop.get_params draws as torchvision's does: the same box from the same
    seed, and the generator left in the same state, over sizes that fit at once, take several
    attempts or fall back to the centre crop."""
    rng = random.Random(0)
    for _ in range(400):
        image = Image.new("L", (rng.choice([rng.randint(1, 12), rng.randint(1, 2000)]), rng.randint(1, 2000)))
        scale = rng.choice([(0.9, 1.0), (0.08, 1.0), (0.5, 0.6), (1.0, 1.0)])
        ratio = rng.choice([(3 / 4, 4 / 3), (1.0, 1.0), (0.5, 2.0)])
        seed = rng.randrange(1 << 30)
        torch.manual_seed(seed)
        theirs = RandomResizedCrop.get_params(image, scale, ratio), torch.rand(1)
        torch.manual_seed(seed)
        ours = T.ReducedRandomResizedCrop.get_params(image, scale, ratio), torch.rand(1)
        assert ours[0] == theirs[0] and torch.equal(ours[1], theirs[1]), (image.size, scale, ratio, seed)
