"""Image and text embeddings: the one place images and texts are embedded, for every task.

Embeddings returned here are float32 on the CPU and L2-normalised whatever device and precision
the model runs in, so every score is a plain dot product (a cosine similarity) and results can be
mixed freely between batches, runs and devices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

from ..data.images import iter_batches
from ..errors import CocaError
from ..weights.convert import nonfinite_tensor


@dataclass
class ImageFeatures:
    """Embeddings of the images that loaded (in input order) and the reasons the others did not."""

    paths: list[Path]
    features: Optional[torch.Tensor]  # [len(paths), embed_dim]; None when no image loaded
    failures: list[tuple[Path, str]] = field(default_factory=list)

    @classmethod
    def concat(cls, parts: Iterable["ImageFeatures"]) -> "ImageFeatures":
        parts = list(parts)
        tensors = [p.features for p in parts if p.features is not None]
        return cls(paths=[path for p in parts for path in p.paths],
                   features=torch.cat(tensors) if tensors else None,
                   failures=[failure for p in parts for failure in p.failures])


@torch.no_grad()
def iter_image_features(model, transform: Callable, paths: Sequence[Path], batch_size: int = 32,
                        workers: int = 0) -> Iterator[ImageFeatures]:
    """Embed images batch by batch, on the model's device and in its precision.

    A generator so callers can show progress and stream results; unreadable images come back as
    ``failures`` instead of stopping the run. This is the one place images are embedded, for
    classification, retrieval and evaluation alike.
    """
    for batch in iter_batches(list(paths), transform, batch_size, workers):
        features = None if batch.images is None else image_features(model, batch.images, batch.paths)
        yield ImageFeatures(batch.paths, features, batch.failures)


@torch.no_grad()
def image_features(model, images: torch.Tensor, names: Sequence) -> torch.Tensor:
    """[len(images), embed_dim] normalised embeddings of a batch of transformed images, one per
    entry of ``names`` (which a non-finite error quotes)."""
    param = next(model.parameters())
    images = images.to(device=param.device, dtype=param.dtype, non_blocking=True)
    # Normalised in float32: in bf16 the unit norm would otherwise be off by up to ~0.4%.
    features = F.normalize(model.encode_image(images, normalize=False).float(), dim=-1).cpu()
    require_finite(model, features, "image", names)
    return features


def embed_images(model, transform: Callable, paths: Sequence[Path], batch_size: int = 32,
                 workers: int = 0) -> ImageFeatures:
    """All images at once (see :func:`iter_image_features`)."""
    return ImageFeatures.concat(iter_image_features(model, transform, paths, batch_size, workers))


@torch.no_grad()
def embed_texts(model, tokenizer: Callable, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """[len(texts), embed_dim] normalised text embeddings; texts are cheap, so batches are large."""
    device = next(model.parameters()).device
    chunks = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(list(texts[start:start + batch_size])).to(device)
        chunks.append(F.normalize(model.encode_text(tokens, normalize=False).float(), dim=-1).cpu())
        require_finite(model, chunks[-1], "text", [repr(t) for t in texts[start:start + batch_size]])
    return torch.cat(chunks)


def similarity(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """The image-text score of normalised embeddings, pair by pair (broadcast): their cosine
    similarity, a number in [-1, 1], not scaled. That is DataComp's "CLIP score"; CLIPScore's
    ``2.5 * max(cos, 0)`` is a fixed rescaling of it that changes no ranking. ``coca score``,
    ``coca caption --score`` and ``--candidates`` all score through :func:`score_texts`."""
    return (image_features * text_features).sum(dim=-1)


@torch.no_grad()
def score_texts(model, tokenizer: Callable, images: torch.Tensor, texts: Sequence[Sequence[str]],
                names: Sequence) -> torch.Tensor:
    """[images, k] scores of each transformed image with each of its ``k`` texts (``texts[i]`` are
    image i's); ``names`` name the images in errors."""
    features = image_features(model, images, names)
    k = len(texts[0])
    text_features = embed_texts(model, tokenizer, [text for per_image in texts for text in per_image])
    return similarity(features[:, None, :], text_features.view(len(texts), k, -1))


def require_finite(model, values: torch.Tensor, kind: str, names: Sequence) -> None:
    """Stop at the first NaN or inf: every score made from it would be NaN too (and NaN is not
    JSON). ``values`` holds one row per entry of ``names``, which the message quotes."""
    rows_ok = torch.isfinite(values.reshape(len(values), -1)).all(dim=1)
    if bool(rows_ok.all()):
        return
    name = names[int((~rows_ok).nonzero()[0])]
    damaged = nonfinite_tensor(model.state_dict())
    cause = (f"its weights are damaged (tensor {damaged} holds NaN or inf)" if damaged
             else "a numeric overflow (try --precision fp32)")
    raise CocaError(f"the model produced non-finite {kind} features for {name}: {cause}", exit_code=1)


def logit_scale(model) -> torch.Tensor:
    """The model's learned temperature ``logit_scale.exp()``, checked: a damaged one would turn
    every probability into NaN."""
    scale = model.logit_scale.detach().exp().float().cpu()
    if not bool(torch.isfinite(scale).all()):
        raise CocaError(f"the model's logit_scale is {model.logit_scale.item():g}, so its probabilities would "
                        "not be finite: its weights are damaged", exit_code=1)
    return scale
