"""The text side: a unimodal text encoder, then a multimodal decoder that reads the image.

``TextTransformer`` is a causal transformer over tokens with a CLS token appended: the CLS
output is the contrastive text feature, the other positions are the token embeddings the
decoder continues from. ``MultimodalDecoder`` runs each layer as a self-attention block then
a cross-attention block to the image tokens (open_clip's ``resblocks[i]`` and
``cross_attn[i]``), then a final LayerNorm and a projection to the vocabulary.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.utils.checkpoint
from torch import nn

from .config import CLIPTextCfg, MultimodalCfg
from .layers import BufferPool, KVCache, LayerNorm, ResidualBlock, Transformer, causal_mask, init_transformer_blocks
from .packed import linear


class TextTransformer(nn.Module):
    def __init__(self, cfg: CLIPTextCfg, output_dim: int, act_layer=nn.GELU, norm_layer=LayerNorm):
        super().__init__()
        self.context_length = cfg.context_length
        self.output_tokens = cfg.output_tokens
        self.pad_id = cfg.pad_id
        self.pool_type = cfg.pool_type
        self.heads = cfg.heads
        width = cfg.width
        self.num_pos = cfg.context_length + (1 if cfg.embed_cls else 0)

        self.token_embedding = nn.Embedding(cfg.vocab_size, width)
        self.cls_emb = nn.Parameter(torch.empty(width)) if cfg.embed_cls else None
        self.positional_embedding = nn.Parameter(torch.empty(self.num_pos, width))
        self.transformer = Transformer(width, cfg.layers, cfg.heads, cfg.mlp_ratio, cfg.ls_init_value,
                                       act_layer, norm_layer)
        self.ln_final = norm_layer(width)
        if cfg.proj_bias:
            self.text_projection = nn.Linear(width, output_dim)
        else:
            self.text_projection = nn.Parameter(torch.empty(width, output_dim))
        self.init_parameters()

    def init_parameters(self):
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if self.cls_emb is not None:
            nn.init.normal_(self.cls_emb, std=0.01)
        init_transformer_blocks(self.transformer.resblocks, self.transformer.width, self.transformer.layers)
        if isinstance(self.text_projection, nn.Linear):
            nn.init.normal_(self.text_projection.weight, std=self.transformer.width ** -0.5)
            nn.init.zeros_(self.text_projection.bias)
        else:
            nn.init.normal_(self.text_projection, std=self.transformer.width ** -0.5)

    def set_grad_checkpointing(self, enable: bool = True):
        self.transformer.grad_checkpointing = enable

    def key_keep_mask(self, text: torch.Tensor, previous: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """Which key positions may be attended, [B, T] bool (None: all of them).

        open_clip builds CoCa's padding mask with the CLS slot put first, so it is shifted by
        one: a key is hidden when the token *before* it is padding. Pretrained weights were
        trained with that mask, so we reproduce it. ``previous`` is the token preceding
        ``text`` when decoding incrementally (None at the start of the sequence).
        """
        if self.cls_emb is None:
            return None
        if previous is None:
            first = torch.ones_like(text[:, :1], dtype=torch.bool)
        else:
            first = (previous != self.pad_id).view(-1, 1)
            if text.shape[1] == 1:  # one new token (a decoding step): nothing to concatenate
                return first
        return torch.cat([first, text[:, :-1] != self.pad_id], dim=1)

    def _project(self, pooled: torch.Tensor) -> torch.Tensor:
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(pooled)
        return pooled @ self.text_projection

    def forward(self, text: torch.Tensor, trim: bool = False):
        """[B, L] token ids -> latent [B, output_dim] and token embeddings [B, T, width].

        T = L, or with ``trim`` (CLS models) only up to one past the last non-padding token: the
        key mask hides every key that follows padding, so later positions change nothing but
        their own outputs. The CLS token then comes right after the kept positions, with the
        positional embedding (index L) and the mask it has after the full padded sequence: the
        latent and the kept token embeddings are unchanged.
        """
        B, L = text.shape
        keep = self.key_keep_mask(text)  # [B, L] or None
        T = L
        if trim and keep is not None:
            order = torch.arange(2, L + 2, device=text.device)
            T = min(max(int(((text != self.pad_id) * order).amax()), 1), L)  # last non-padding + 2
        x = self.token_embedding(text[:, :T])  # [B, T, width]
        x = x + self.positional_embedding[:T].to(x.dtype)
        if self.cls_emb is not None:
            cls = (self.cls_emb + self.positional_embedding[L]).to(x.dtype)  # [width]
            x = torch.cat([x, cls.expand(B, 1, -1)], dim=1)  # [B, T+1, width]
            # the CLS key is visible only when the last token is not padding
            keep = torch.cat([keep[:, :T], text[:, -1:] != self.pad_id], dim=1)  # [B, T+1]
        mask = causal_mask(x.shape[1], x.device)  # [T(+1), T(+1)]
        if keep is not None:
            mask = (mask.unsqueeze(0) & keep[:, None, :]).unsqueeze(1)  # [B, 1, T+1, T+1]
        x = self.transformer(x, mask)

        if self.cls_emb is not None:
            pooled, tokens = self.ln_final(x[:, -1]), x[:, :-1]  # CLS [B, width], [B, T, width]
        else:
            x = self.ln_final(x)
            tokens = x
            index = {"argmax": text.argmax(dim=-1), "first": torch.zeros_like(text[:, 0])}.get(
                self.pool_type, torch.full_like(text[:, 0], L - 1))
            pooled = x[torch.arange(B, device=x.device), index]  # [B, width]
        pooled = self._project(pooled)  # [B, output_dim]
        return (pooled, tokens) if self.output_tokens else pooled

    # -- incremental decoding -------------------------------------------------------------
    def new_cache(self, max_len: int, static: bool = False, pool: Optional[BufferPool] = None) -> KVCache:
        return KVCache(len(self.transformer.resblocks), max_len, static, pool)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
             previous: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Token embeddings for new tokens [B, T_new] at ``positions`` [T_new], given the cached past
        (CLS not needed)."""
        x = self.token_embedding(tokens)  # [B, T_new, width]
        position_embs = self.positional_embedding.index_select(0, positions)
        x = x + (position_embs if position_embs.dtype == x.dtype else position_embs.to(x.dtype))
        keep = self.key_keep_mask(tokens, previous)
        keep = None if keep is None else cache.write_keep(positions, keep)
        mask = cache.mask(positions, keep)
        for layer, block in enumerate(self.transformer.resblocks):
            x = block.step_self(x, positions, cache, layer, mask)
        return x


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
        mask = causal_mask(text_embs.shape[1], text_embs.device)  # [T, T]
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
        return self.ln_final(x) @ self.text_projection  # [B, T, vocab] or [P, vocab]

    # -- incremental decoding -------------------------------------------------------------
    def new_cache(self, max_len: int, static: bool = False, pool: Optional[BufferPool] = None) -> KVCache:
        return KVCache(len(self.resblocks), max_len, static, pool)

    def image_kv(self, image_embs: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Cross-attention keys/values of the image tokens: computed once per image."""
        return [block.context_kv(image_embs) for block in self.cross_attn]  # per layer: k, v [B, heads, N, head_dim]

    def query_projections(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the cross-attention query weight and bias, sliced once for all steps."""
        return [block.attn.query_projection() for block in self.cross_attn]

    def step(self, text_embs: torch.Tensor, positions: torch.Tensor, cache: KVCache, image_kv,
             query_projections: Optional[list] = None) -> torch.Tensor:
        """Logits [B, vocab] of the last new position (at ``positions`` [T_new]), given the cached past."""
        x = text_embs
        mask = cache.mask(positions)  # [T_new, span] or None
        query_projections = query_projections or self.query_projections()
        for layer, (self_block, cross_block, (k, v)) in enumerate(zip(self.resblocks, self.cross_attn, image_kv)):
            x = self_block.step_self(x, positions, cache, layer, mask)
            x = cross_block.step_cross(x, k, v, query_projections[layer])
        return linear(self.ln_final(x[:, -1]), self.text_projection.t())  # [B, vocab]
