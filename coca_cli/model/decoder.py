"""Multimodal text decoder: causal self-attention over the text, cross-attention to the image.

Each layer is a self-attention block followed by a cross-attention block (open_clip's
``resblocks[i]`` and ``cross_attn[i]``), then a final LayerNorm and a projection to the
vocabulary.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.utils.checkpoint
from torch import nn

from .config import MultimodalCfg
from .layers import KVCache, LayerNorm, ResidualBlock, causal_mask
from .packed import linear


class MultimodalDecoder(nn.Module):
    def __init__(self, cfg: MultimodalCfg, vocab_size: int, act_layer=nn.GELU, norm_layer=LayerNorm):
        super().__init__()
        self.context_length = cfg.context_length
        self.width, self.layers = cfg.width, cfg.layers
        self.grad_checkpointing = False

        def block(cross: bool) -> ResidualBlock:
            return ResidualBlock(cfg.width, cfg.heads, cfg.mlp_ratio, cfg.ls_init_value, act_layer, norm_layer,
                                 cross_attention=cross)

        self.resblocks = nn.ModuleList([block(cross=False) for _ in range(cfg.layers)])
        self.cross_attn = nn.ModuleList([block(cross=True) for _ in range(cfg.layers)])
        self.ln_final = norm_layer(cfg.width)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, vocab_size))
        nn.init.normal_(self.text_projection, std=cfg.width ** -0.5)

    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    def forward(self, image_embs: torch.Tensor, text_embs: torch.Tensor,
                positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """image_embs [B, N, width], text_embs [B, T, width] -> logits [B, T, vocab].

        With ``positions`` ([B, T] bool) only those positions are projected: logits [P, vocab].
        """
        mask = causal_mask(text_embs.shape[1], text_embs.device)
        x = text_embs
        for self_block, cross_block in zip(self.resblocks, self.cross_attn):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(self_block, x, mask, use_reentrant=False)
                x = torch.utils.checkpoint.checkpoint(cross_block, x, None, image_embs, use_reentrant=False)
            else:
                x = self_block(x, mask)
                x = cross_block(x, context=image_embs)
        if positions is not None:
            x = x[positions]  # [P, width]
        return self.ln_final(x) @ self.text_projection

    # -- incremental decoding -------------------------------------------------------------
    def new_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.resblocks]

    def image_kv(self, image_embs: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Cross-attention keys/values of the image tokens: computed once per image."""
        return [block.context_kv(image_embs) for block in self.cross_attn]

    def step(self, text_embs: torch.Tensor, cache: list[KVCache], image_kv) -> torch.Tensor:
        """Logits [B, vocab] of the last new position, given cached past positions."""
        x = text_embs
        for self_block, cross_block, layer_cache, (k, v) in zip(self.resblocks, self.cross_attn, cache, image_kv):
            x = self_block.step_self(x, layer_cache)
            x = cross_block.step_cross(x, k, v)
        return linear(self.ln_final(x[:, -1]), self.text_projection.T)
