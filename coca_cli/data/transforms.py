"""Image loading and preprocessing for CoCa.

The transforms built here give the same tensors as open_clip 3.3.0's
``image_transform`` / ``image_transform_v2`` (which is what
``open_clip.create_model_and_transforms`` hands back for CoCa models), but only
depend on torchvision.  The order of operations deliberately follows open_clip:
geometric ops (resize / crop / pad) run on the image *in its original PIL mode*
and the conversion to RGB happens afterwards.  This matters for exact parity on
palette images (Pillow resizes mode ``P`` with nearest-neighbour), RGBA images
(Pillow resizes with premultiplied alpha) and 16-bit images (values are clipped
to 255 only after resizing).  One deliberate departure keeps memory bounded by the output
size: an image more than 64 times longer than wide (or the reverse) is cropped before it is
resized, not after (see ``ResizeCoverCrop``).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import random
import re
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import (
    ColorJitter,
    Compose,
    Grayscale,
    InterpolationMode,
    Normalize,
    RandomResizedCrop,
    Resize,
    ToTensor,
)

from ..files import NotRegularFile, open_regular
from .samples import SkipSample

__all__ = [
    "OPENAI_MEAN",
    "OPENAI_STD",
    "PreprocessCfg",
    "AugmentationCfg",
    "image_transform",
    "image_transform_v2",
    "ImageLoadError",
    "load_image",
]

OPENAI_MEAN: Tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD: Tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

SizeLike = Union[int, Tuple[int, int]]

_RESIZE_MODES = ("shortest", "longest", "squash")
# open_clip accepts 'random' too; at inference it silently means bicubic.
_INTERPOLATIONS = ("bicubic", "bilinear", "random")


@dataclass
class PreprocessCfg:
    """Preprocessing settings, mirroring the fields of open_clip's PreprocessCfg."""

    size: SizeLike = 224
    mean: Tuple[float, ...] = OPENAI_MEAN
    std: Tuple[float, ...] = OPENAI_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill_color: int = 0


@dataclass
class AugmentationCfg:
    """The subset of open_clip's AugmentationCfg honoured by its default (non-timm) path.

    ``color_jitter`` only takes effect when ``color_jitter_prob`` is set (as in
    open_clip).  ``ratio``, ``re_prob`` and ``re_count`` are accepted for
    config compatibility but, like open_clip without timm, ignored (with a
    warning).  ``use_timm=True`` is not supported.
    """

    scale: Tuple[float, float] = (0.9, 1.0)
    ratio: Optional[Tuple[float, float]] = None
    color_jitter: Optional[Tuple[float, float, float, float]] = None
    re_prob: Optional[float] = None
    re_count: Optional[int] = None
    use_timm: bool = False
    color_jitter_prob: Optional[float] = None
    gray_scale_prob: Optional[float] = None


# --------------------------------------------------------------------------- #
# small building blocks
# --------------------------------------------------------------------------- #


def _pair(size: SizeLike) -> Tuple[int, int]:
    """(height, width) from an int or a 1/2-element sequence."""
    if isinstance(size, numbers.Number):
        return int(size), int(size)
    size = tuple(size)
    if len(size) == 1:
        return int(size[0]), int(size[0])
    if len(size) != 2:
        raise ValueError(f"image size must be an int or (height, width), got {size!r}")
    return int(size[0]), int(size[1])


def _triple(value, default) -> Tuple[float, ...]:
    value = value or default
    if isinstance(value, (list, tuple)):
        return tuple(value)
    return (value,) * 3


class ToRGB:
    """``PIL.Image.convert('RGB')`` for PIL images; arrays/tensors pass through.

    Pillow's conversion covers L, LA, P (with or without transparency), RGBA,
    CMYK, YCbCr, I, F and 16-bit I;16 images (16-bit values are clipped to 255).
    """

    def __call__(self, img):
        if isinstance(img, Image.Image):
            return img.convert("RGB")
        return img

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ToTensorIfNeeded(ToTensor):
    """torchvision ``ToTensor`` that leaves tensors untouched."""

    def __call__(self, pic):
        if isinstance(pic, torch.Tensor):
            return pic
        return super().__call__(pic)


class ResizeKeepRatio:
    """Resize keeping the aspect ratio so the image fits a (h, w) box.

    ``longest=True``: the longer side (relative to the box) matches the box
    and the other fits inside it.  ``longest=False``: the shorter side matches
    and the other overflows.  New side lengths use Python's ``round`` (as
    open_clip/timm do), unlike torchvision's int-size ``Resize`` which
    truncates.
    """

    def __init__(self, size: SizeLike, longest: bool,
                 interpolation: InterpolationMode = InterpolationMode.BICUBIC):
        self.size = _pair(size)
        self.longest = bool(longest)
        self.interpolation = interpolation

    def target_size(self, width: int, height: int) -> Tuple[int, int]:
        box_h, box_w = self.size
        scale_h, scale_w = height / box_h, width / box_w
        factor = max(scale_h, scale_w) if self.longest else min(scale_h, scale_w)
        # at least one pixel: fitting a 1 x 1,000,000 image into the box would round its width to 0
        return max(1, round(height / factor)), max(1, round(width / factor))

    def __call__(self, img):
        _, height, width = TF.get_dimensions(img)
        new_h, new_w = self.target_size(width, height)
        return TF.resize(img, [new_h, new_w], self.interpolation)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(size={self.size}, longest={self.longest}, "
                f"interpolation={self.interpolation.value})")


# When scaling would make an image more than this many times the output's area (aspect ratios
# past 64:1 for a square output), the 'shortest' mode resizes only the region its crop keeps.
CROP_FIRST_ABOVE = 64


class ResizeCoverCrop:
    """Scale the image to cover an (h, w) box, then center-crop it to the box ('shortest' mode).

    A square box scales the short side as torchvision's ``Resize(int)`` (long side truncated),
    another box as ``ResizeKeepRatio`` (rounded), as open_clip does. An image far from the box's
    aspect ratio would be huge once scaled (1 x 1,000,000 pixels: 224 x 224,000,000), so when the
    scaled image exceeds ``CROP_FIRST_ABOVE`` times the box, only the source region the crop keeps
    is resized (PIL's ``resize(box=...)``) and memory stays proportional to the output. Below
    that bound the whole image is resized then cropped, bit for bit as open_clip: the box's
    float32 coordinates and Pillow's choice of which axis to resample first would move some
    pixels by a level or two.
    """

    def __init__(self, size: SizeLike, interpolation: InterpolationMode = InterpolationMode.BICUBIC):
        self.size = _pair(size)
        self.interpolation = interpolation
        height, width = self.size
        self.keep_ratio = None if height == width else ResizeKeepRatio(self.size, longest=False)

    def scaled_size(self, width: int, height: int) -> Tuple[int, int]:
        """(height, width) of the image scaled to cover the box, before the crop."""
        if self.keep_ratio is not None:
            return self.keep_ratio.target_size(width, height)
        side = self.size[0]
        if width <= height:
            return int(side * height / width), side
        return side, int(side * width / height)

    def __call__(self, img):
        _, height, width = TF.get_dimensions(img)
        new_h, new_w = self.scaled_size(width, height)
        out_h, out_w = self.size
        if new_h * new_w <= CROP_FIRST_ABOVE * out_h * out_w or not isinstance(img, Image.Image):
            return TF.center_crop(TF.resize(img, [new_h, new_w], self.interpolation), [out_h, out_w])
        # the crop torchvision's center_crop would take, mapped back onto the source
        top, left = int(round((new_h - out_h) / 2.0)), int(round((new_w - out_w) / 2.0))
        scale_y, scale_x = height / new_h, width / new_w
        box = (left * scale_x, top * scale_y, (left + out_w) * scale_x, (top + out_h) * scale_y)
        return img.resize((out_w, out_h), TF.pil_modes_mapping[self.interpolation], box=box)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, interpolation={self.interpolation.value})"


class CenterCropOrPad:
    """Center-crop to (h, w); sides that are too short are first padded with ``fill``.

    Padding puts the odd pixel on the right/bottom.  Note that for a palette
    (``P``) image the fill value is a palette *index*.
    """

    def __init__(self, size: SizeLike, fill: int = 0):
        self.size = _pair(size)
        self.fill = fill

    def __call__(self, img):
        out_h, out_w = self.size
        _, height, width = TF.get_dimensions(img)
        pad_w = max(out_w - width, 0)
        pad_h = max(out_h - height, 0)
        if pad_w or pad_h:
            # torchvision order: left, top, right, bottom
            img = TF.pad(img, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2],
                         fill=self.fill)
        # torchvision's center_crop uses the same rounding as open_clip and is
        # a no-op when the image already has the target size.
        return TF.center_crop(img, [out_h, out_w])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, fill={self.fill})"


class RandomColorJitter:
    """Color jitter applied with probability ``p``.

    The coin flip uses Python's ``random`` module (not torch) so that a run
    seeded like open_clip's draws the very same augmentations.
    """

    def __init__(self, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, p=0.8):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"probability must be in [0, 1], got {p}")
        self.p = p
        self.jitter = ColorJitter(brightness=brightness, contrast=contrast,
                                  saturation=saturation, hue=hue)

    def __call__(self, img):
        return self.jitter(img) if random.random() < self.p else img

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p}, {self.jitter!r})"


class RandomGrayscale3:
    """3-channel grayscale with probability ``p`` (Python ``random`` coin flip)."""

    def __init__(self, p=0.2):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"probability must be in [0, 1], got {p}")
        self.p = p
        self.gray = Grayscale(num_output_channels=3)

    def __call__(self, img):
        return self.gray(img) if random.random() < self.p else img

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p})"


# Training loaders hand ReducedRandomResizedCrop JPEGs whose pixels are not decoded yet, so it can
# decode them at reduced size, and batch plain crops as uint8 (``PixelCrops``). False: decode every
# image whole, crop as torchvision does and normalise each sample in the worker (the path before
# issue 14; benchmarks switch it off to compare).
REDUCED_DECODE = True
_DCT_SCALES = (8, 4, 2, 1)  # the JPEG DCT scalings Pillow's draft offers: 1/8, 1/4, 1/2, 1


def crop_resize(pixels: torch.Tensor, top: int, left: int, height: int, width: int,
                size: Tuple[int, int], interpolation: InterpolationMode) -> torch.Tensor:
    """uint8 (C, H, W) -> uint8 (C, *size): the box resized with antialiasing, which for bicubic
    matches Pillow's resize within one level, about 4x faster. CPU or GPU alike."""
    region = pixels[None, :, top:top + height, left:left + width]  # (1, C, h, w)
    return F.interpolate(region, size=list(size), mode=interpolation.value, antialias=True)[0]


def dct_scale(height: int, width: int, size: Tuple[int, int]) -> int:
    """The largest JPEG DCT reduction that keeps a (height, width) crop at least ``size``, so the
    final resize still only shrinks it and no detail is lost."""
    return next(s for s in _DCT_SCALES if height / s >= size[0] and width / s >= size[1] or s == 1)


class ReducedRandomResizedCrop(RandomResizedCrop):
    """torchvision's RandomResizedCrop (same parameters, same random draws, same crop box), which,
    given a JPEG not decoded yet (``samples.decode_image(data, lazy=True)``), decodes it at the
    smallest DCT scaling that keeps the crop at least the output size (Pillow's ``draft``), or
    whole with torchvision's decoder where no scaling does, and resizes only the crop.
    A decoded image takes torchvision's path, bit for bit as open_clip."""

    @staticmethod
    def get_params(img, scale: Sequence[float], ratio: Sequence[float]) -> Tuple[int, int, int, int]:
        """torchvision's ``get_params``: the same draws from the same generator in the same float32
        arithmetic, so the same box (i, j, h, w), with one scratch tensor instead of three new
        ones an attempt. Crops of 90-100% of a photo often take all ten attempts (the aspect
        ratio must fit too), and the allocations were most of the cost."""
        _, height, width = TF.get_dimensions(img)
        area = height * width
        low, high = torch.log(torch.tensor(ratio)).tolist()
        draw = torch.empty(1)
        for _ in range(10):
            target_area = area * draw.uniform_(scale[0], scale[1]).item()
            aspect_ratio = draw.uniform_(low, high).exp_().item()
            w = int(round(math.sqrt(target_area * aspect_ratio)))
            h = int(round(math.sqrt(target_area / aspect_ratio)))
            if 0 < w <= width and 0 < h <= height:
                i = torch.randint(0, height - h + 1, size=(1,)).item()
                j = torch.randint(0, width - w + 1, size=(1,)).item()
                return i, j, h, w
        in_ratio = width / height  # no box fitted: the centre crop
        if in_ratio < min(ratio):
            w, h = width, int(round(width / min(ratio)))
        elif in_ratio > max(ratio):
            w, h = int(round(height * max(ratio))), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def forward(self, img):
        crop = self._crop(img)
        if isinstance(img, Image.Image) and isinstance(crop, torch.Tensor):  # resized as a tensor
            return Image.fromarray(crop.permute(1, 2, 0).squeeze(2).contiguous().numpy())
        return crop

    def pixels(self, img) -> torch.Tensor:
        """The crop as a uint8 (3, H, W) RGB tensor: exactly ``ToTensor(ToRGB(forward(img))) * 255``,
        without building the PIL image in between where the crop was resized as a tensor."""
        crop = self._crop(img)
        if isinstance(crop, Image.Image):
            crop = pil_pixels(crop.convert("RGB"))
        return crop if crop.shape[0] == 3 else crop.expand(3, -1, -1)  # grayscale: as convert("RGB")

    def _crop(self, img) -> Union[Image.Image, torch.Tensor]:
        """The crop: of an undecoded JPEG, decoded at a DCT reduction where the crop allows and
        resized by ``crop_resize`` (a uint8 (C, H, W) tensor); of anything else, torchvision's."""
        if not (isinstance(img, Image.Image) and undecoded_jpeg(img)) or self.interpolation not in (
                InterpolationMode.BICUBIC, InterpolationMode.BILINEAR):
            if isinstance(img, Image.Image):
                decode_pixels(img)
            return super().forward(img)
        top, left, height, width = self.get_params(img, self.scale, self.ratio)  # in the full image
        scale = dct_scale(height, width, self.size)
        pixels = jpeg_pixels(img) if scale == 1 else None
        if pixels is None:
            if scale > 1:  # draft's box: the full image in the reduced one's coordinates
                full_width = img.width
                _, box = img.draft(img.mode, (img.width // scale, img.height // scale))
                scale = full_width / box[2]
            decode_pixels(img)
            pixels = pil_pixels(img)
        # The box in whole decoded pixels: at a DCT reduction it moves by at most half a reduced
        # pixel. torch's uint8 resize reads the region in place (Pillow's own resize is ~2x slower).
        bottom, right = round((top + height) / scale), round((left + width) / scale)
        top, left = round(top / scale), round(left / scale)
        return crop_resize(pixels, top, left, bottom - top, right - left, self.size, self.interpolation)


def jpeg_pixels(img: Image.Image) -> Optional[torch.Tensor]:
    """A lazily opened JPEG (RGB or L) decoded whole by torchvision as a uint8 (C, H, W) tensor:
    Pillow's pixels (both are libjpeg-turbo), about 2x faster than Pillow's decode and copy out,
    which go through its 4-byte pixels. None where torchvision does not read it (its decoder
    gone from a later release, or a file it refuses): Pillow decodes it then, and decides whether
    the sample is readable. libjpeg prints its own warning for a damaged file it can still read,
    where Pillow is silent."""
    data = getattr(img.fp, "getvalue", None)  # decode_image's bytes; a file opened by path has none
    if data is None:
        return None
    try:
        pixels = torchvision_jpeg(torch.frombuffer(bytearray(data()), dtype=torch.uint8), gray=img.mode == "L")
    except (ImportError, RuntimeError):
        return None
    return pixels if pixels.shape[1:] == (img.height, img.width) else None


def torchvision_jpeg(data, gray: bool = False, device: Union[str, torch.device] = "cpu"):
    """torchvision's ``decode_jpeg`` (libjpeg-turbo on the CPU, nvjpeg on a GPU) of one uint8 tensor
    of bytes or a list of them, RGB or gray, without the DeprecationWarning torchvision 0.29 gives
    every call: its successor, torchcodec, is not a dependency."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(data, mode=ImageReadMode.GRAY if gray else ImageReadMode.RGB, device=device)


def pil_pixels(img: Image.Image) -> torch.Tensor:
    """A decoded 8-bit PIL image (L or RGB) as a uint8 (C, H, W) tensor over one copy of its
    pixels (read-only, which torch warns of: nothing writes to it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pixels = torch.frombuffer(img.tobytes(), dtype=torch.uint8)  # numpy's asarray copies twice
    return pixels.view(img.height, img.width, -1).permute(2, 0, 1)


class PixelCrops:
    """The plain training transform (crop, RGB, ToTensor, Normalize) split where it is cheapest:
    a loader worker makes each sample's uint8 crop, and the batch (``PixelBatch``) is converted
    and normalised in one go where it is moved to. Crops travel between processes at a quarter
    of the float size, and the arithmetic is ToTensor's then Normalize's, so the result is the
    transform's, bit for bit."""

    def __init__(self, transform: Compose):
        self.crop, self.normalize = transform.transforms[0], transform.transforms[-1]

    def __call__(self, img) -> torch.Tensor:
        return self.crop.pixels(img)


class PixelBatch:
    """A training batch of uint8 crops [N, 3, H, W]; ``.to(device, dtype)`` normalises it there."""

    def __init__(self, pixels: torch.Tensor, normalize: Normalize):
        self.pixels, self.normalize = pixels, normalize

    def __len__(self) -> int:
        return len(self.pixels)

    def pin_memory(self) -> "PixelBatch":
        return PixelBatch(self.pixels.pin_memory(), self.normalize)

    def to(self, device, dtype: Optional[torch.dtype] = None, non_blocking: bool = False) -> torch.Tensor:
        images = normalized(self.pixels.to(device, non_blocking=non_blocking), self.normalize)
        return images if dtype is None else images.to(dtype)


class BatchBuffers:
    """The CPU memory a training loop normalises its batches of crops into: one float32 buffer per
    micro-batch of a step, rewritten the next step. A fresh float batch (38.5 MB at 64 x 224 px)
    costs a page fault per 4 KB, as much time as the normalisation itself; with two workers on two
    cores that was a sixth of the loader's rate (benchmarks/RESULTS.md). The caller must be done
    with a slot's batch before it asks for that slot again."""

    def __init__(self):
        self._buffers: dict[int, torch.Tensor] = {}

    def to(self, images, device, dtype: Optional[torch.dtype] = None, slot: int = 0,
           non_blocking: bool = False) -> torch.Tensor:
        """``images.to(device, dtype)``; a PixelBatch bound for the CPU as float32 is written into
        ``slot``'s buffer."""
        if not (isinstance(images, PixelBatch) and torch.device(device).type == "cpu"
                and dtype in (None, torch.float32)):
            return images.to(device, dtype, non_blocking=non_blocking)
        buffer = self._buffers.get(slot)
        if buffer is None or buffer.shape != images.pixels.shape:
            buffer = self._buffers[slot] = torch.empty(images.pixels.shape)
        return normalized(images.pixels, images.normalize, out=buffer)


def normalized(pixels: torch.Tensor, normalize: Normalize, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """uint8 pixels (one image or a batch) as ToTensor then ``normalize`` make them, the same
    arithmetic, done in place on the float copy (or on ``out``, float32 of their shape)."""
    images = pixels.float() if out is None else out.copy_(pixels)
    return TF.normalize(images.div_(255), normalize.mean, normalize.std, inplace=True)


def plain_crop_pipeline(transform) -> bool:
    """A training transform built here that decodes JPEGs lazily and has nothing between the crop
    and the normalisation (colour jitter and grayscale need the PIL image)."""
    return (isinstance(transform, Compose) and decodes_lazily(transform)
            and [type(t) for t in transform.transforms[1:]] == [ToRGB, ToTensorIfNeeded, Normalize])


def fast_training_transform(transform):
    """What a training loader runs per sample for ``transform``: ``PixelCrops`` for the plain
    pipeline, else ``transform``."""
    return PixelCrops(transform) if plain_crop_pipeline(transform) else transform


def decodes_lazily(transform) -> bool:
    """Whether ``transform`` (a training transform built here) decodes lazily opened JPEGs itself."""
    if isinstance(transform, (DeferredDecode, PixelCrops)):
        return True
    return REDUCED_DECODE and isinstance(transform, Compose) and isinstance(
        transform.transforms[0], ReducedRandomResizedCrop)


def undecoded_jpeg(img: Image.Image) -> bool:
    """A JPEG opened lazily whose pixels ReducedRandomResizedCrop can decode at reduced size."""
    return REDUCED_DECODE and img.format == "JPEG" and img.mode in ("RGB", "L") and img.tile != []


def decode_pixels(img: Image.Image) -> None:
    """Decode a lazily opened image; one that cannot be decoded is an unusable sample."""
    try:
        img.load()
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001 - any decoder failure means this sample is unusable
        raise SkipSample("unreadable image") from None


# -- --gpu-decode: loader workers draw each crop, the training device decodes and resizes ----------

@dataclass
class EncodedJpeg:
    """A training sample left encoded by a loader worker: its JPEG bytes and the crop drawn for it."""

    data: torch.Tensor  # uint8 (bytes,)
    box: Tuple[int, int, int, int]  # top, left, height, width in the full image


class DeferredDecode:
    """The training transform for ``--gpu-decode``: for a lazily opened JPEG it only draws the crop
    (the same draws as ReducedRandomResizedCrop, so the same box) and hands the bytes on; the batch
    (``JpegBatch``) is decoded where it is moved to. Any other image gets the CPU transform."""

    def __init__(self, transform: Compose):
        self.transform = transform
        self.crop, self.normalize = transform.transforms[0], transform.transforms[-1]

    def __call__(self, img):
        if not (isinstance(img, Image.Image) and undecoded_jpeg(img)):
            return self.transform(img)
        box = self.crop.get_params(img, self.crop.scale, self.crop.ratio)
        return EncodedJpeg(torch.frombuffer(bytearray(img.fp.getvalue()), dtype=torch.uint8), box)

    def decode(self, items: list, device: torch.device) -> torch.Tensor:
        """(N, 3, H, W) float32 on ``device``: the EncodedJpeg items decoded there (one batched
        ``decode_jpeg`` call), cropped, resized and normalised as the CPU transform does; the rest
        (images that are not JPEG, which the CPU transform made in the worker) copied over."""
        jpegs = [item for item in items if isinstance(item, EncodedJpeg)]
        if len(jpegs) < len(items):
            _warn_once("--gpu-decode: some training images are not JPEG; those are decoded on the CPU")
        try:
            pixels = torchvision_jpeg([j.data for j in jpegs], device=device) if jpegs else []
        except RuntimeError:  # one JPEG the device cannot read fails the whole call: decode one by one
            pixels = [_decode_one(j.data, device) for j in jpegs]
        if any(image is None for image in pixels):
            _warn_once("--gpu-decode: a training JPEG could not be decoded; a black image stands in for it")
        out, pixels = [], iter(pixels)
        for item in items:
            if isinstance(item, EncodedJpeg):
                image = next(pixels)
                if image is None:
                    image = torch.zeros((3, *self.crop.size), dtype=torch.uint8, device=device)
                image = crop_resize(image, *item.box, self.crop.size, self.crop.interpolation)
                item = normalized(image, self.normalize)
            out.append(item.to(device))
        return torch.stack(out)


def _decode_one(data: torch.Tensor, device: torch.device) -> Optional[torch.Tensor]:
    """A JPEG on ``device``, decoded there or else on the CPU (torchvision's libjpeg reads some files
    nvjpeg refuses); None if neither can."""
    for where in (device, torch.device("cpu")):
        try:
            return torchvision_jpeg(data, device=where).to(device)
        except RuntimeError:
            continue
    return None


_warned: set = set()


def _warn_once(message: str) -> None:
    """One line on stderr, once per process: the batch is decoded far from any console object."""
    if message not in _warned:
        _warned.add(message)
        print(f"warning: {message}", file=sys.stderr)


class JpegBatch:
    """A training batch whose JPEGs are still encoded: the training loop's ``.to(device, dtype)``
    decodes them on that device (``DeferredDecode.decode``)."""

    def __init__(self, items: list, decoder: DeferredDecode):
        self.items, self.decoder = items, decoder

    def __len__(self) -> int:
        return len(self.items)

    def pin_memory(self) -> "JpegBatch":
        return self

    def to(self, device, dtype: Optional[torch.dtype] = None, non_blocking: bool = False) -> torch.Tensor:
        images = self.decoder.decode(self.items, torch.device(device))
        return images if dtype is None else images.to(dtype)


def stack_images(images: list, transform) -> Union[torch.Tensor, JpegBatch, PixelBatch]:
    """One training batch of what ``transform`` made of each sample."""
    if isinstance(transform, DeferredDecode):
        return JpegBatch(images, transform)
    if isinstance(transform, PixelCrops):
        return PixelBatch(torch.stack(images), transform.normalize)
    return torch.stack(images)


def gpu_decoding(transform, device: torch.device) -> Tuple[Any, Optional[str]]:
    """``--gpu-decode``: the training transform that leaves JPEGs to ``device``, or ``transform``
    unchanged and why not."""
    if device.type != "cuda":
        return transform, f"--gpu-decode needs a CUDA device (training on {device.type}): decoding on the CPU"
    if not plain_crop_pipeline(transform):
        return transform, "--gpu-decode supports crop and normalisation only: decoding on the CPU"
    try:
        from torchvision.io import decode_jpeg  # noqa: F401 - deprecated since torchvision 0.29
    except ImportError:
        return transform, "--gpu-decode needs torchvision.io.decode_jpeg, gone from this torchvision: decoding on the CPU"
    return DeferredDecode(transform), None


def _as_aug_cfg(aug_cfg) -> AugmentationCfg:
    if aug_cfg is None:
        return AugmentationCfg()
    if isinstance(aug_cfg, AugmentationCfg):
        return aug_cfg
    if isinstance(aug_cfg, Mapping):
        values = dict(aug_cfg)
    elif dataclasses.is_dataclass(aug_cfg):  # e.g. open_clip's own AugmentationCfg
        values = dataclasses.asdict(aug_cfg)
    else:
        raise TypeError(f"aug_cfg must be a dict or AugmentationCfg, got {type(aug_cfg).__name__}")
    known = {f.name for f in dataclasses.fields(AugmentationCfg)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise TypeError(f"unknown augmentation option(s): {', '.join(unknown)}")
    # a None entry means "use the default", as in open_clip
    return AugmentationCfg(**{k: v for k, v in values.items() if v is not None})


def _train_transform(image_size, mean, std, aug_cfg) -> Compose:
    aug = _as_aug_cfg(aug_cfg)
    if aug.use_timm:
        raise NotImplementedError("aug_cfg use_timm=True (timm's create_transform) is not supported")
    ignored = [name for name in ("ratio", "re_prob", "re_count") if getattr(aug, name) is not None]
    if ignored:
        warnings.warn(f"augmentation option(s) {ignored} only apply to timm transforms; ignored")

    steps = [
        # open_clip always crops with bicubic here, whatever `interpolation` says,
        # and uses torchvision's default aspect-ratio range.
        ReducedRandomResizedCrop(image_size, scale=tuple(aug.scale), interpolation=InterpolationMode.BICUBIC),
        ToRGB(),
    ]
    if aug.color_jitter_prob:
        jitter = aug.color_jitter
        if jitter is None or isinstance(jitter, numbers.Number) or len(jitter) != 4:
            raise ValueError("color_jitter_prob needs color_jitter = "
                             "(brightness, contrast, saturation, hue)")
        steps.append(RandomColorJitter(*jitter, p=aug.color_jitter_prob))
    if aug.gray_scale_prob:
        steps.append(RandomGrayscale3(aug.gray_scale_prob))
    steps += [ToTensorIfNeeded(), Normalize(mean=mean, std=std)]
    return Compose(steps)


def _eval_transform(image_size, mean, std, interpolation, resize_mode, fill_color) -> Compose:
    interp = InterpolationMode.BILINEAR if interpolation == "bilinear" else InterpolationMode.BICUBIC
    height, width = _pair(image_size)

    if resize_mode == "longest":
        # fit the whole image inside the box, then pad the short side
        steps = [ResizeKeepRatio((height, width), longest=True, interpolation=interp),
                 CenterCropOrPad((height, width), fill=fill_color)]
    elif resize_mode == "squash":
        # ignore the aspect ratio
        steps = [Resize((height, width), interpolation=interp)]
    else:  # shortest: fill the box, crop the overflow
        # open_clip's keep-ratio resize for a non-square box is always bicubic
        steps = [ResizeCoverCrop((height, width), interp if height == width else InterpolationMode.BICUBIC)]

    steps += [ToRGB(), ToTensorIfNeeded(), Normalize(mean=mean, std=std)]
    return Compose(steps)


def image_transform(
    image_size: SizeLike,
    is_train: bool,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    interpolation: Optional[str] = "bicubic",
    resize_mode: Optional[str] = "shortest",
    fill_color: int = 0,
    aug_cfg: Optional[Union[Mapping[str, Any], AugmentationCfg]] = None,
) -> Compose:
    """Build the train or eval preprocessing pipeline (PIL image -> normalised CHW float tensor).

    Eval: resize (``resize_mode`` 'shortest' = scale short side + center crop,
    'longest' = scale long side + center pad with ``fill_color``, 'squash' =
    stretch), convert to RGB, ToTensor, Normalize.

    Train: RandomResizedCrop (bicubic, ``aug_cfg.scale``, default (0.9, 1.0)),
    convert to RGB, optional colour jitter / grayscale, ToTensor, Normalize.
    ``interpolation``, ``resize_mode`` and ``fill_color`` do not affect it.
    """
    mean = _triple(mean, OPENAI_MEAN)
    std = _triple(std, OPENAI_STD)
    interpolation = interpolation or "bicubic"
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {_INTERPOLATIONS}, got {interpolation!r}")
    resize_mode = resize_mode or "shortest"
    if resize_mode not in _RESIZE_MODES:
        raise ValueError(f"resize_mode must be one of {_RESIZE_MODES}, got {resize_mode!r}")

    if is_train:
        return _train_transform(image_size, mean, std, aug_cfg)
    return _eval_transform(image_size, mean, std, interpolation, resize_mode, fill_color)


def image_transform_v2(
    cfg: PreprocessCfg,
    is_train: bool,
    aug_cfg: Optional[Union[Mapping[str, Any], AugmentationCfg]] = None,
) -> Compose:
    """``image_transform`` driven by a :class:`PreprocessCfg`."""
    return image_transform(
        cfg.size,
        is_train,
        mean=cfg.mean,
        std=cfg.std,
        interpolation=cfg.interpolation,
        resize_mode=cfg.resize_mode,
        fill_color=cfg.fill_color,
        aug_cfg=aug_cfg,
    )


# --------------------------------------------------------------------------- #
# loading
# --------------------------------------------------------------------------- #


class ImageLoadError(ValueError):
    """An image file could not be read; ``reason`` is a short human explanation."""

    def __init__(self, path, reason: str):
        super().__init__(path, reason)
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"cannot load image {self.path}: {self.reason}"


_PIXELS_RE = re.compile(r"\((\d+) pixels\)")


def _too_large(path, exc: Exception) -> ImageLoadError:
    match = _PIXELS_RE.search(str(exc))
    reason = f"image too large ({match.group(1)} pixels)" if match else "image too large"
    return ImageLoadError(path, reason)


def load_image(path: Union[str, os.PathLike]) -> Image.Image:
    """Open an image file and decode all of its pixels.

    Pillow's ``Image.MAX_IMAGE_PIXELS`` limit is enforced strictly: images above
    it are refused (Pillow by default only warns below twice the limit).
    Any failure is raised as :class:`ImageLoadError`.  The returned image keeps
    its original mode (no RGB conversion, no EXIF rotation); only the first
    frame of animated / multi-page files is decoded.
    """
    try:
        fh = open_regular(path)
    except NotRegularFile as exc:
        raise ImageLoadError(path, "not a regular file") from exc
    except FileNotFoundError as exc:
        raise ImageLoadError(path, "file not found") from exc
    except IsADirectoryError as exc:
        raise ImageLoadError(path, "is a directory") from exc
    except PermissionError as exc:
        raise ImageLoadError(path, "permission denied") from exc
    except OSError as exc:
        raise ImageLoadError(path, f"cannot open file ({exc.strerror or exc})") from exc

    with fh:
        if os.fstat(fh.fileno()).st_size == 0:
            raise ImageLoadError(path, "empty file")
        # Note: catch_warnings changes process-global warning filters for the
        # duration of the block.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                img = Image.open(fh)
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                raise _too_large(path, exc) from exc
            except UnidentifiedImageError as exc:
                raise ImageLoadError(path, "not an image") from exc
            except Exception as exc:  # plugin-specific header parse errors
                raise ImageLoadError(path, "truncated or corrupt image") from exc
            try:
                img.load()
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                raise _too_large(path, exc) from exc
            except MemoryError:
                raise
            except Exception as exc:  # OSError("image file is truncated"), zlib/struct errors, ...
                raise ImageLoadError(path, "truncated or corrupt image") from exc
    return img
