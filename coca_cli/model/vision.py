"""Image encoder: a ViT whose tokens are pooled by learned queries (attentional pooling).

CoCa needs two things from an image: one contrastive latent and a set of token embeddings
for the decoder to cross-attend to. open_clip's CoCa pools 256 queries: the first becomes
the latent, the other 255 the tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import CLIPVisionCfg, pair
from .layers import Attention, LayerNorm, Transformer


class AttentionalPooler(nn.Module):
    """Cross-attention from ``n_queries`` learned queries to the image tokens."""

    def __init__(self, dim: int, context_dim: int, heads: int = 8, n_queries: int = 256, norm_layer=LayerNorm):
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, dim))
        self.attn = Attention(dim, heads, kv_dim=context_dim)
        self.ln_q = norm_layer(dim)
        self.ln_k = norm_layer(context_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, context_dim] -> [B, n_queries, dim]
        q = self.ln_q(self.query).unsqueeze(0).expand(x.shape[0], -1, -1)  # [B, n_queries, dim]
        return self.attn(q, context=self.ln_k(x))


class PatchDropout(nn.Module):
    """Randomly drops a fraction of patch tokens during training (https://arxiv.org/abs/2212.00794)."""

    def __init__(self, prob: float):
        super().__init__()
        self.prob = prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.prob == 0.0:
            return x
        cls_token, patches = x[:, :1], x[:, 1:]
        keep = max(1, int(patches.shape[1] * (1 - self.prob)))
        index = torch.randn(patches.shape[:2], device=x.device).topk(keep, dim=-1).indices
        patches = patches.gather(1, index.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        return torch.cat([cls_token, patches], dim=1)


class VisionTransformer(nn.Module):
    def __init__(self, cfg: CLIPVisionCfg, output_dim: int, act_layer=nn.GELU, norm_layer=LayerNorm):
        super().__init__()
        self.image_size = cfg.image_size
        self.output_tokens = cfg.output_tokens
        self.pool_type = cfg.pool_type
        self.final_ln_after_pool = cfg.final_ln_after_pool
        width = cfg.width
        self.grid_size = tuple(side // cfg.patch_size for side in pair(cfg.image_size))  # patches down, across
        scale = width ** -0.5

        self.conv1 = nn.Conv2d(3, width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid_size[0] * self.grid_size[1] + 1, width))
        self.patch_dropout = PatchDropout(cfg.patch_dropout)
        self.ln_pre = nn.Identity() if cfg.no_ln_pre else norm_layer(width)
        self.transformer = Transformer(width, cfg.layers, width // cfg.head_width, cfg.mlp_ratio,
                                       cfg.ls_init_value, act_layer, norm_layer)
        if cfg.attentional_pool:
            self.attn_pool = AttentionalPooler(output_dim, width, cfg.attn_pooler_heads, cfg.attn_pooler_queries)
            pool_dim = output_dim
        else:
            self.attn_pool = None
            pool_dim = width
        self.ln_post = norm_layer(pool_dim)
        self.proj = nn.Parameter(scale * torch.randn(pool_dim, output_dim))

    def set_grad_checkpointing(self, enable: bool = True):
        self.transformer.grad_checkpointing = enable

    def forward(self, images: torch.Tensor):
        """[B, 3, H, W] -> latent [B, output_dim] and tokens [B, T, dim] for the decoder."""
        x = self.conv1(images)  # [B, width, grid, grid]
        x = x.flatten(2).transpose(1, 2)  # [B, grid*grid, width]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # [B, 1, width]
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # [B, 1 + grid*grid, width]
        x = self.ln_pre(self.patch_dropout(x))
        x = self.transformer(x)

        if self.attn_pool is not None:
            x = self.ln_post(self.attn_pool(x))  # [B, n_queries, output_dim]
            pooled, tokens = x[:, 0], x[:, 1:]  # [B, output_dim], [B, n_queries - 1, output_dim]
        elif self.final_ln_after_pool:
            pooled, tokens = self._global_pool(x)
            pooled = self.ln_post(pooled)
        else:
            pooled, tokens = self._global_pool(self.ln_post(x))
        pooled = pooled @ self.proj  # [B, output_dim]
        return (pooled, tokens) if self.output_tokens else pooled

    def _global_pool(self, x: torch.Tensor):
        if self.pool_type == "avg":
            return x[:, 1:].mean(dim=1), x[:, 1:]
        return x[:, 0], x[:, 1:]
