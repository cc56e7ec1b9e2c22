"""CoCa's training objective: a CLIP contrastive loss plus a captioning cross-entropy.

Same names, arguments and values as open_clip's ``ClipLoss`` / ``CoCaLoss`` (checked by
``tests/test_loss.py``). Across processes the contrastive loss is computed over the features
of *all* ranks, gathered with ``torch.distributed``:

* ``gather_with_grad=False``: the other ranks' features are constants; only this rank's own
  slot carries gradient (open_clip's default).
* ``gather_with_grad=True``: the gather is differentiable, its backward sums every rank's
  gradient for this rank's features (a reduce-scatter).
* ``local_loss=True``: each rank scores only its own rows against everything gathered
  (``B_local x B_global`` logits instead of ``B_global x B_global``), labels offset by rank.

Distributed equivalence. With the same global batch, the update of W processes equals that
of one process on the whole batch when the gradient DDP averages is W times each rank's share
of the gradient of the *global* loss. For the two losses:

* caption: each rank sums its tokens' cross-entropy and divides by (global token count / W),
  so the average over ranks is the global token mean, and so is its gradient. (open_clip
  averages per-rank means: a token on a rank holding fewer tokens counts for more.)
* contrastive, ``gather_with_grad``: the gather's backward sums all ranks' gradients for
  this rank's features, so every rank holds the gradient of the global loss: exact, with
  ``local_loss`` on or off (with ``local_loss`` each rank's loss is its rows' share).
* contrastive, neither flag: every rank computes the full global loss but gradient flows only
  through its own features, i.e. one W-th of what the average needs; the features' gradient
  is scaled by W (``contrastive_features``), which makes it exact at no cost. open_clip does
  not, so there the contrastive gradient reaching the towers shrinks with the number of GPUs
  (``logit_scale`` excepted).
* contrastive, ``local_loss`` without ``gather_with_grad``: an approximation by construction
  (as in open_clip): the gradient through the other ranks' copies of this rank's features is
  never computed. Losses, the caption-only decoder and ``logit_scale`` still match after a step.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CocaError


def _no_horovod(use_horovod: bool) -> None:
    if use_horovod:
        raise CocaError("horovod is not supported: coca trains with torch.distributed "
                        "(coca train --gpus N, or torchrun)")


class _AllGather(torch.autograd.Function):
    """All ranks' tensors concatenated; backward hands each rank the *sum* over ranks of the
    gradient for its slice (as ``torch.distributed.nn.all_gather``, which is deprecated)."""

    @staticmethod
    def forward(ctx, tensor):
        import torch.distributed as dist

        tensor = tensor.contiguous()
        ctx.rank, ctx.world_size, ctx.rows = dist.get_rank(), dist.get_world_size(), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(ctx.world_size)]
        dist.all_gather(parts, tensor)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.contiguous()
        if dist.get_backend() == "nccl":
            mine = torch.empty_like(grad[:ctx.rows])
            dist.reduce_scatter_tensor(mine, grad)
            return mine
        dist.all_reduce(grad)  # gloo has no reduce-scatter
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_features(image_features: torch.Tensor, text_features: torch.Tensor, local_loss: bool = False,
                    gather_with_grad: bool = False, rank: int = 0, world_size: int = 1,
                    use_horovod: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of every rank concatenated in rank order, as open_clip's ``gather_features``."""
    _no_horovod(use_horovod)
    import torch.distributed as dist

    if gather_with_grad:
        return _AllGather.apply(image_features), _AllGather.apply(text_features)
    images = [torch.zeros_like(image_features) for _ in range(world_size)]
    texts = [torch.zeros_like(text_features) for _ in range(world_size)]
    dist.all_gather(images, image_features)
    dist.all_gather(texts, text_features)
    if not local_loss:  # keep the gradient path through this rank's own features
        images[rank], texts[rank] = image_features, text_features
    return torch.cat(images, dim=0), torch.cat(texts, dim=0)


class ClipLoss(nn.Module):
    """Symmetric InfoNCE over image/text pairs: row i of the batch matches column i."""

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False):
        super().__init__()
        _no_horovod(use_horovod)
        self.local_loss, self.gather_with_grad, self.cache_labels = local_loss, gather_with_grad, cache_labels
        self.rank, self.world_size, self.use_horovod = rank, world_size, use_horovod
        self.prev_num_logits = 0
        self.labels: dict = {}

    def get_ground_truth(self, device, num_logits: int) -> torch.Tensor:
        if self.prev_num_logits == num_logits and device in self.labels:
            return self.labels[device]
        labels = torch.arange(num_logits, device=device, dtype=torch.long)
        if self.world_size > 1 and self.local_loss:
            labels = labels + num_logits * self.rank  # this rank's rows sit at this offset among all columns
        if self.cache_labels:
            self.labels[device], self.prev_num_logits = labels, num_logits
        return labels

    def get_logits(self, image_features, text_features, logit_scale, logit_bias=None):
        if self.world_size > 1:
            all_images, all_texts = gather_features(image_features, text_features, self.local_loss,
                                                    self.gather_with_grad, self.rank, self.world_size)
            if self.local_loss:
                per_image = logit_scale * image_features @ all_texts.T
                per_text = logit_scale * text_features @ all_images.T
            else:
                per_image = logit_scale * all_images @ all_texts.T
                per_text = per_image.T
        else:
            per_image = logit_scale * image_features @ text_features.T
            per_text = logit_scale * text_features @ image_features.T
        if logit_bias is not None:
            per_image, per_text = per_image + logit_bias, per_text + logit_bias
        return per_image, per_text

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict: bool = False):
        per_image, per_text = self.get_logits(image_features, text_features, logit_scale, logit_bias)
        labels = self.get_ground_truth(image_features.device, per_image.shape[0])
        loss = (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2
        return {"contrastive_loss": loss} if output_dict else loss


class CoCaLoss(ClipLoss):
    """``clip_loss_weight`` x contrastive loss and ``caption_loss_weight`` x caption cross-entropy.

    The caption loss is the mean cross-entropy of next-token predictions over the tokens that
    are not padding (``pad_id``). A contrastive weight of 0 skips the contrastive computation
    (no gather) and reports a zero.
    """

    def __init__(self, caption_loss_weight: float, clip_loss_weight: float, pad_id: int = 0,
                 local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False):
        super().__init__(local_loss, gather_with_grad, cache_labels, rank, world_size, use_horovod)
        self.clip_loss_weight = clip_loss_weight
        self.caption_loss_weight = caption_loss_weight
        self.pad_id = pad_id
        self.caption_loss = nn.CrossEntropyLoss(ignore_index=pad_id)

    def forward(self, image_features, text_features, logits, labels, logit_scale, output_dict: bool = False, *,
                logit_bias=None, caption_tokens: Optional[float] = None):
        """``caption_tokens`` (an extension; None = open_clip's behaviour): divide the summed
        caption cross-entropy by this count instead of this batch's own number of non-pad
        tokens. Training passes the global token count so that the loss, and its gradient
        once DDP averages it, do not depend on how a batch is split across ranks."""
        if self.clip_loss_weight:
            clip_loss = self.clip_loss_weight * super().forward(image_features, text_features, logit_scale,
                                                                logit_bias)
        else:
            clip_loss = torch.zeros((), device=logits.device)
        if caption_tokens is None:
            caption_loss = self.caption_loss(logits.permute(0, 2, 1), labels)
        else:
            caption_loss = F.cross_entropy(logits.permute(0, 2, 1), labels, ignore_index=self.pad_id,
                                           reduction="sum") / caption_tokens
        caption_loss = caption_loss * self.caption_loss_weight
        if output_dict:
            return {"contrastive_loss": clip_loss, "caption_loss": caption_loss}
        return clip_loss, caption_loss


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def contrastive_features(image_features, text_features, world_size: int, local_loss: bool, gather_with_grad: bool):
    """Scale the features' gradient by W where only this rank's features carry gradient into a
    loss every rank computes in full (neither flag): DDP's average then equals the gradient of
    the global loss (see the module docstring)."""
    if world_size > 1 and not local_loss and not gather_with_grad:
        return _ScaleGrad.apply(image_features, world_size), _ScaleGrad.apply(text_features, world_size)
    return image_features, text_features
