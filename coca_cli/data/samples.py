"""One sample: decoded, augmented from its own seed, or skipped with the reason counted."""

from __future__ import annotations

import contextlib
import io
import random
import warnings
from typing import Callable

import torch
from PIL import Image

from ..errors import CocaError


class SkipSample(Exception):
    """A sample that cannot be used; the message is the reason it is counted under."""


def decode_image(data: bytes, lazy: bool = False) -> Image.Image:
    """The image in ``data``, decoded; with ``lazy`` a JPEG's pixels are left for the training crop
    to decode at reduced size (transforms.ReducedRandomResizedCrop): only its header is read here."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if not (lazy and image.format == "JPEG"):
                image.load()
        return image
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001 - any decoder failure means this sample is unusable
        raise SkipSample("unreadable image") from None


@contextlib.contextmanager
def failing_on(sample: str):
    """An unexpected error while preparing a sample names the sample: from a loader worker it would
    otherwise arrive as a traceback about the worker. Unusable samples (SkipSample) pass through."""
    try:
        yield
    except (SkipSample, CocaError, MemoryError):
        raise
    except Exception as err:  # noqa: BLE001 - reported whole, in one line
        raise CocaError(f"failed on {sample}: {type(err).__name__}: {err}", exit_code=1) from None


def seeded(transform: Callable, image, seed: int):
    """Apply a random transform with its own seed, leaving the process's generators untouched.

    Only the CPU generator is seeded (transforms draw from it): ``torch.manual_seed`` would also
    reseed every GPU's generator, which is not restored here, and costs more than a crop."""
    state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        try:
            return transform(image)
        finally:
            random.setstate(state)


def sample_seed(*parts: int) -> int:
    value = 0
    for part in parts:
        value = (value * 1_000_003 + int(part)) % (1 << 62)
    return value
