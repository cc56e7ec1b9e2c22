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
    param = next(model.parameters())
    for batch in iter_batches(list(paths), transform, batch_size, workers):
        features = None
        if batch.images is not None:
            images = batch.images.to(device=param.device, dtype=param.dtype, non_blocking=True)
            # Normalised in float32: in bf16 the unit norm would otherwise be off by up to ~0.4%.
            features = F.normalize(model.encode_image(images, normalize=False).float(), dim=-1).cpu()
        yield ImageFeatures(batch.paths, features, batch.failures)


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
    return torch.cat(chunks)
