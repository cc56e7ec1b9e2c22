"""CoCa: an image encoder, a unimodal text encoder and a multimodal decoder.

    image -> VisionTransformer -> image latent ----------------------> contrastive loss
                               \\-> image tokens --\\                  /
    text  -> TextTransformer ---> text latent (CLS) -----------------/
                               \\-> token embeddings -> MultimodalDecoder -> caption logits
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import CLIPTextCfg, CLIPVisionCfg, CoCaConfig, MultimodalCfg
from . import packed
from .layers import BufferPool, LayerNorm, LayerNormFp32, QuickGELU
from .text import MultimodalDecoder, TextTransformer
from .vision import VisionTransformer


def _as(cls, cfg):
    return cls(**cfg) if isinstance(cfg, dict) else cfg


class CoCa(nn.Module):
    def __init__(
        self,
        embed_dim: int,
        multimodal_cfg: MultimodalCfg,
        text_cfg: CLIPTextCfg,
        vision_cfg: CLIPVisionCfg,
        quick_gelu: bool = False,
        init_logit_scale: float = math.log(1 / 0.07),
        init_logit_bias: Optional[float] = None,
        nonscalar_logit_scale: bool = False,
        cast_dtype: Optional[torch.dtype] = None,
        pad_id: int = 0,
    ):
        super().__init__()
        multimodal_cfg = _as(MultimodalCfg, multimodal_cfg)
        text_cfg = _as(CLIPTextCfg, text_cfg)
        vision_cfg = _as(CLIPVisionCfg, vision_cfg)
        act_layer = QuickGELU if quick_gelu else nn.GELU
        norm_layer = LayerNormFp32 if cast_dtype in (torch.float16, torch.bfloat16) else LayerNorm

        if text_cfg.hf_model_name:
            from .hf_text import HFTextEncoder  # optional dependency: transformers

            self.text = HFTextEncoder(text_cfg, output_dim=embed_dim)
        else:
            self.text = TextTransformer(text_cfg, embed_dim, act_layer, norm_layer)
        self.visual = VisionTransformer(vision_cfg, embed_dim, act_layer, norm_layer)
        self.text_decoder = MultimodalDecoder(multimodal_cfg, text_cfg.vocab_size, act_layer, norm_layer)

        shape = [1] if nonscalar_logit_scale else []
        self.logit_scale = nn.Parameter(torch.ones(shape) * init_logit_scale)
        self.logit_bias = nn.Parameter(torch.ones(shape) * init_logit_bias) if init_logit_bias is not None else None
        self.pad_id = pad_id
        self.context_length = multimodal_cfg.context_length
        self.decode_buffers = BufferPool()  # KV cache memory that one generate call leaves to the next

    @classmethod
    def from_config(cls, cfg: CoCaConfig, cast_dtype: Optional[torch.dtype] = None, **options) -> "CoCa":
        """``options``: constructor keywords that are not config fields (``nonscalar_logit_scale``,
        ``pad_id``), which open_clip's ``create_model`` passes on to ``CoCa``."""
        extra = {"pad_id": cfg.text_cfg.pad_id, **options}
        if cfg.init_logit_scale is not None:
            extra["init_logit_scale"] = cfg.init_logit_scale
        model = cls(cfg.embed_dim, cfg.multimodal_cfg, cfg.text_cfg, cfg.vision_cfg, quick_gelu=cfg.quick_gelu,
                    init_logit_bias=cfg.init_logit_bias, cast_dtype=cast_dtype, **extra)
        model.config = cfg
        return model

    def train(self, mode: bool = True) -> "CoCa":
        """Training mode also lets go of what decoding keeps for its next call (KV caches, packed
        CPU weights): hundreds of MB on large models, that training needs more."""
        if mode:
            self.decode_buffers.keep([])
            packed.forget(self.parameters())
        return super().train(mode)

    def set_grad_checkpointing(self, enable: bool = True):
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)
        self.text_decoder.set_grad_checkpointing(enable)

    def _encode_image(self, images: torch.Tensor, normalize: bool = True):
        latent, tokens = self.visual(images)
        return (F.normalize(latent, dim=-1) if normalize else latent), tokens

    def _encode_text(self, text: torch.Tensor, normalize: bool = True, trim: bool = False):
        """Latent [B, D] and token embeddings [B, T, width]; ``trim``: see ``TextTransformer``."""
        trim = trim and isinstance(self.text, TextTransformer)
        latent, tokens = self.text(text, trim=True) if trim else self.text(text)
        return (F.normalize(latent, dim=-1) if normalize else latent), tokens

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self._encode_image(images, normalize)[0]

    def encode_text(self, text: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self._encode_text(text, normalize, trim=True)[0]

    def forward(
        self,
        image: Optional[torch.Tensor],
        text: Optional[torch.Tensor] = None,
        image_latent: Optional[torch.Tensor] = None,
        image_embs: Optional[torch.Tensor] = None,
        output_labels: bool = True,
        *,
        caption_tokens_only: bool = False,
    ) -> dict:
        """open_clip's outputs: features, ``logits`` [B, T-1, vocab] and ``labels`` [B, T-1].

        ``caption_tokens_only`` (training): logits only where the label is a caption token (not
        padding), as [1, P, vocab] with labels [1, P]. The caption loss is the same, but the
        decoder runs only up to the longest caption and the vocabulary projection only on the
        P tokens (captions average ~11 of 76 positions), and the text encoder only up to the
        last position its CLS token can see (``TextTransformer`` ``trim``): the text features
        and the loss are unchanged.
        """
        if image_latent is None or image_embs is None:
            image_latent, image_embs = self._encode_image(image)  # [B, D], [B, N, width]
        if text is None:
            return {"image_features": image_latent, "image_embs": image_embs}

        trim = caption_tokens_only and output_labels
        text_latent, token_embs = self._encode_text(text, trim=trim)  # [B, D], [B, T, width]
        labels = text[:, 1:] if output_labels else None  # [B, L-1]
        if trim:
            caption = labels != self.pad_id  # [B, L-1]
            order = torch.arange(1, caption.shape[1] + 1, device=caption.device)
            longest = max(int((caption * order).max()), 1)  # causal: later positions change nothing before
            caption = caption[:, :longest]
            # position t predicts token t+1 (teacher forcing); the trimmed encoder ran at least this far
            logits = self.text_decoder(image_embs, token_embs[:, :longest], positions=caption)[None]
            labels = labels[:, :longest][caption][None]
        else:
            if output_labels:
                token_embs = token_embs[:, :-1]  # position t predicts token t+1 (teacher forcing)
            logits = self.text_decoder(image_embs, token_embs)
        out = {
            "image_features": image_latent,
            "text_features": text_latent,
            "logits": logits,
            "logit_scale": self.logit_scale.exp(),
        }
        if labels is not None:
            out["labels"] = labels
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out

    def generate(self, image: torch.Tensor, text: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        """Caption token ids for a batch of images; see :func:`coca_cli.model.generation.generate`."""
        from .generation import generate

        return generate(self, image, text, **kwargs)
