"""Transformer building blocks shared by the image encoder, text encoder and decoder.

Parameter names follow open_clip's (``attn.in_proj_weight``, ``mlp.c_fc`` ...), so an
open_clip CoCa state dict loads here with ``strict=True`` and back again.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .packed import linear


class LayerNorm(nn.LayerNorm):
    """LayerNorm that returns the input dtype (weights may be fp32 under autocast)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return y if y.dtype == x.dtype else y.to(x.dtype)  # no op per call when nothing changes


class LayerNormFp32(nn.LayerNorm):
    """LayerNorm computed in fp32, for models cast to fp16/bf16."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class Linear(nn.Linear):
    """``nn.Linear`` that can run on prepacked weights while decoding, with a GELU or a residual
    add fused into it (see ``packed.py``)."""

    def forward(self, x: torch.Tensor, *, gelu: bool = False, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        return linear(x, self.weight, self.bias, gelu=gelu, residual=residual)


class QuickGELU(nn.Module):
    """The sigmoid approximation of GELU used by OpenAI's CLIP weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.gamma = nn.Parameter(init_value * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class BufferPool:
    """Buffers one decoding call hands back for the next call to take again.

    The KV caches of a caption batch are tens of MB (47 MB for two images on coca_ViT-B-32).
    Freshly allocated each call, every 4 KB page of them costs a page fault when first written:
    ~12k faults, ~10% of such a call on a CPU (benchmarks/RESULTS.md). Only the buffers of the
    last ``keep`` are held, so a model moved to another device or given other batch sizes does
    not hold on to old ones. Taking pops a buffer (atomic under the GIL): two threads decoding
    with one model never share one.
    """

    def __init__(self):
        self._free: dict[tuple, list[torch.Tensor]] = {}

    def __getstate__(self):  # a saved or copied model does not carry its spare memory along
        return {"_free": {}}

    def __deepcopy__(self, memo):
        return BufferPool()

    def take(self, like: torch.Tensor, shape, zero: bool = False) -> torch.Tensor:
        """A buffer of ``shape`` with ``like``'s dtype and device: a kept one, or a new one."""
        free = self._free.get(self._key(shape, like))
        try:
            buffer = free.pop() if free else None
        except IndexError:  # another thread took the last one
            buffer = None
        if buffer is None:
            return like.new_zeros(shape) if zero else like.new_empty(shape)
        return buffer.zero_() if zero else buffer

    def keep(self, buffers: list[torch.Tensor]):
        """Hold ``buffers`` for the next call, instead of whatever was held before."""
        free: dict[tuple, list[torch.Tensor]] = {}
        for buffer in buffers:
            free.setdefault(self._key(buffer.shape, buffer), []).append(buffer)
        self._free = free

    @staticmethod
    def _key(shape, like: torch.Tensor) -> tuple:
        return tuple(shape), like.dtype, like.device


class KVCache:
    """Keys and values of past positions for a stack of attention layers, preallocated.

    The buffers hold ``max_len`` positions from the first write on, and new positions are
    written in place at their indices (``index_copy_``), so the past is never copied to grow
    it. A compiled step attends all ``max_len`` positions, the same shapes every step, so it can
    be captured (CUDA graphs); an eager one only those written so far (``attend_span``), which
    is less attention work. Positions not written yet are never attended: queries only see keys
    at or before their own position. ``keep`` is the per-key mask shared by the layers (True = may be attended);
    the text encoder needs it because open_clip masks keys that follow a padding token.

    ``max_len`` should be the longest the captions can get, not the model's context: a buffer of
    76 positions holding 20 makes every step's attention read keys 76 positions apart, which costs
    a CPU step ~2x in attention. ``grow`` enlarges it if a caption runs longer after all.

    Buffers come from ``pool`` when one is given, and ``allocated`` lists them for handing back.
    """

    def __init__(self, layers: int, max_len: int, static: bool = False, pool: Optional[BufferPool] = None):
        self.layers, self.max_len, self.static = layers, max_len, static
        self.pool = pool or BufferPool()
        self.allocated: list[torch.Tensor] = []  # every buffer this cache took, to hand back to ``pool``
        self.spare: Optional[torch.Tensor] = None  # a second buffer for ``select`` to copy into
        self.span = max_len  # positions the next step attends (``attend_span``)
        self._past: Optional[list] = None  # this step's per-layer keys/values over ``span``
        self.kv: Optional[torch.Tensor] = None  # [2 (keys, values), layers, B, heads, max_len, head_dim]
        self.k: list[torch.Tensor] = []  # static: per layer views of it, [B, heads, max_len, head_dim]
        self.v: list[torch.Tensor] = []
        self.keep: Optional[torch.Tensor] = None  # [B, max_len] bool, or None when all keys are kept

    def _set(self, kv: torch.Tensor):
        self.kv, self._past = kv, None
        if self.static:  # a compiled step finds its per-layer views made, outside the graph
            self.k, self.v = (list(t.unbind(0)) for t in kv)

    def attend_span(self, span: int):
        """Attend the first ``span`` positions in the next step: eagerly only those written (less
        attention work), compiled all ``max_len`` (static shapes). Unwritten ones are masked."""
        self.span, self._past = span, None

    def past(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's keys and values over the attended span, [B, heads, span, head_dim]."""
        if self.static and self.span == self.max_len:
            return self.k[layer], self.v[layer]
        if self._past is None:  # once per step (after its first write made the buffer): 4 views, not 2 per layer
            self._past = [list(t.unbind(0)) for t in self.kv.narrow(4, 0, self.span).unbind(0)]
        return self._past[0][layer], self._past[1][layer]

    def write(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Store ``k``/``v`` [B, heads, T_new, head_dim] of one layer at ``positions`` [T_new], which
        lie inside the attended span."""
        if self.kv is None:
            B, heads, _, head_dim = k.shape
            self._set(self._buffer(k, (2, self.layers, B, heads, self.max_len, head_dim)))
        keys, values = self.past(layer)
        keys.index_copy_(2, positions, k)
        values.index_copy_(2, positions, v)

    def mask(self, positions: torch.Tensor, keep: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """The attention mask of a step at ``positions`` (``step_mask``). One eager query sees
        every key of its span, so only the key mask ``keep`` [B, max_len] is left, if any."""
        if positions.shape[0] == 1 and not self.static:
            return None if keep is None else keep.narrow(1, 0, self.span).view(-1, 1, 1, self.span)  # [B, 1, 1, span]
        return step_mask(positions, self.span, keep)

    def _buffer(self, like: torch.Tensor, shape) -> torch.Tensor:
        """A buffer from the pool. Eager steps never read unwritten positions, so it is left as it
        is (zeroing max_len positions costs more than the few written); a static step attends
        them masked, and a masked key's value still meets a zero weight, so it must be finite."""
        buffer = self.pool.take(like, shape, zero=self.static)
        self.allocated.append(buffer)
        return buffer

    def _spare_rows(self, rows: int) -> torch.Tensor:
        """The first ``rows`` rows of the spare buffer (rows only ever drop: finished captions)."""
        if self.spare is None or self.spare.shape[2] < rows:
            self.spare = self._buffer(self.kv, (*self.kv.shape[:2], rows, *self.kv.shape[3:]))
        return self.spare.narrow(2, 0, rows)

    def grow(self, max_len: int):
        """Hold ``max_len`` positions from now on, keeping everything written."""
        if self.kv is not None:
            kv = self._buffer(self.kv, (*self.kv.shape[:4], max_len, self.kv.shape[5]))
            kv.narrow(4, 0, self.max_len).copy_(self.kv)
            self.spare = None
            self._set(kv)
        if self.keep is not None:
            self.keep = torch.cat([self.keep, self.keep.new_zeros(self.keep.shape[0], max_len - self.max_len)], 1)
        self.max_len = self.span = max_len

    def write_keep(self, positions: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Store the key mask ``keep`` [B, T_new] at ``positions``; returns all of it, [B, max_len]."""
        if self.keep is None:
            self.keep = keep.new_zeros(keep.shape[0], self.max_len)
        return self.keep.index_copy_(1, positions, keep)

    def select(self, index: torch.Tensor, length: int):
        """Keep and reorder batch rows (beam reordering, dropping finished rows).

        Only the first ``length`` positions (all that was written) are copied, once: into the
        spare buffer (its first rows, for fewer rows), which is then swapped in. With ``static``
        (a compiled, captured step reads the buffer at one address) they are reordered in place.
        """
        if self.kv is not None:
            past = self.kv.narrow(4, 0, length)
            if self.static and index.numel() == self.kv.shape[2]:
                past.copy_(past.index_select(2, index))
            else:
                out = self._spare_rows(index.numel())
                torch.index_select(past, 2, index, out=out.narrow(4, 0, length))
                self.spare = self.kv
                self._set(out)
        if self.keep is not None:
            if self.static and index.numel() == self.keep.shape[0]:
                kept = self.keep.narrow(1, 0, length)
                kept.copy_(kept.index_select(0, index))
            else:  # a few bytes a row: one op copying all of it beats three copying only the past
                self.keep = self.keep.index_select(0, index)


def step_mask(positions: torch.Tensor, span: int, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Which of the first ``span`` cached keys new queries at ``positions`` [T_new] may attend, True = attend.

    Keys at or before the query's position: [T_new, span]; with a key mask ``keep``
    [B, >= span] also only those kept: [B, 1, T_new, span].
    """
    mask = torch.arange(span, device=positions.device) <= positions[:, None]
    if keep is None:
        return mask
    if keep.shape[1] != span:
        keep = keep.narrow(1, 0, span)
    return (mask & keep[:, None, :]).unsqueeze(1)


class Attention(nn.Module):
    """Multi-head attention through ``F.scaled_dot_product_attention``.

    Weights are laid out like ``nn.MultiheadAttention``: one fused ``in_proj_weight`` when
    queries and keys have the same width, separate ``q/k/v_proj_weight`` otherwise.
    """

    def __init__(self, dim: int, heads: int, kv_dim: Optional[int] = None):
        super().__init__()
        assert dim % heads == 0, "width must be divisible by the number of heads"
        kv_dim = kv_dim or dim
        self.heads = heads
        self.fused = kv_dim == dim
        if self.fused:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(dim, dim))
            self.k_proj_weight = nn.Parameter(torch.empty(dim, kv_dim))
            self.v_proj_weight = nn.Parameter(torch.empty(dim, kv_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self):
        for weight in (self.in_proj_weight,) if self.fused else (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
            nn.init.xavier_uniform_(weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def query_projection(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The query rows of the input projection (weight, bias): views, made once per decode."""
        dim = self.out_proj.weight.shape[0]
        weight = self.in_proj_weight[:dim] if self.fused else self.q_proj_weight
        return weight, self.in_proj_bias[:dim]

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        return x.view(B, T, self.heads, C // self.heads).transpose(1, 2)  # [B, heads, T, head_dim]

    def project_qkv(self, x: torch.Tensor):
        """Self-attention projections in one matmul: [B, T, C] -> 3 x [B, heads, T, head_dim]."""
        B, T, C = x.shape
        qkv = linear(x, self.in_proj_weight, self.in_proj_bias)  # [B, T, 3C]
        if T == 1:  # one position (a decoding step): the heads are in order already
            return qkv.view(B, 3, self.heads, 1, C // self.heads).unbind(1)
        return qkv.view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)

    def project_kv(self, context: torch.Tensor):
        """Cross-attention keys and values of a context, computed once and reusable."""
        dim = self.out_proj.weight.shape[0]
        if self.fused:  # the k and v rows of the fused weight, a view: no copy made (and saved) per call
            kv = F.linear(context, self.in_proj_weight[dim:], self.in_proj_bias[dim:])
            k, v = kv.chunk(2, dim=-1)
        else:
            b_k, b_v = self.in_proj_bias[dim:].chunk(2)
            k, v = F.linear(context, self.k_proj_weight, b_k), F.linear(context, self.v_proj_weight, b_v)
        return self._split_heads(k), self._split_heads(v)

    def project_q(self, x: torch.Tensor) -> torch.Tensor:
        """Queries [B, heads, T, head_dim]."""
        return self._split_heads(linear(x, *self.query_projection()))

    def attend(self, q, k, v, mask: Optional[torch.Tensor] = None, shape: Optional[tuple] = None) -> torch.Tensor:
        """q [B, h, Tq, d], k/v [B, h, Tk, d], boolean mask (True = attend) -> [B, Tq, C] (or
        ``shape``), heads merged; ``out_proj`` is the caller's, so it can fuse its residual add."""
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        B, h, T, d = x.shape
        shape = shape or (B, T, h * d)
        if T == 1:  # one query: its heads are in order already
            return x.reshape(shape)
        return x.transpose(1, 2).reshape(shape)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                residual: Optional[torch.Tensor] = None):
        if context is None:
            q, k, v = self.project_qkv(x)
        else:
            q = self.project_q(x)
            k, v = self.project_kv(context)
        return self.out_proj(self.attend(q, k, v, mask), residual=residual)


class ResidualBlock(nn.Module):
    """Pre-norm transformer block: attention then MLP, each with a residual.

    With ``cross_attention=True`` the block attends to a context (the image tokens) instead
    of to itself; the context gets its own LayerNorm, ``ln_1_kv``.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, ls_init_value: Optional[float] = None,
                 act_layer=nn.GELU, norm_layer=LayerNorm, cross_attention: bool = False):
        super().__init__()
        self.ln_1 = norm_layer(width)
        self.attn = Attention(width, heads)
        self.ls_1 = LayerScale(width, ls_init_value) if ls_init_value is not None else nn.Identity()
        if cross_attention:
            self.ln_1_kv = norm_layer(width)
        self.ln_2 = norm_layer(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", Linear(width, hidden)),
            ("gelu", act_layer()),
            ("c_proj", Linear(hidden, width)),
        ]))
        self.ls_2 = LayerScale(width, ls_init_value) if ls_init_value is not None else nn.Identity()
        self.exact_gelu = type(self.mlp.gelu) is nn.GELU and self.mlp.gelu.approximate == "none"

    @staticmethod
    def _add(x: torch.Tensor, layer_scale: nn.Module, projection: Linear, h: torch.Tensor) -> torch.Tensor:
        """x + layer_scale(projection(h)); without a layer scale the add is fused into the projection."""
        if isinstance(layer_scale, nn.Identity):
            return projection(h, residual=x)
        return x + layer_scale(projection(h))

    def _add_mlp(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_2(x)
        h = self.mlp.c_fc(h, gelu=True) if self.exact_gelu else self.mlp.gelu(self.mlp.c_fc(h))
        return self._add(x, self.ls_2, self.mlp.c_proj, h)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, context: Optional[torch.Tensor] = None):
        """x [B, T, C] -> [B, T, C]; context [B, N, C] (cross-attention); mask [T, T] or [B, 1, T, T]."""
        attn = self.attn
        if context is None:
            q, k, v = attn.project_qkv(self.ln_1(x))
        else:
            q, (k, v) = attn.project_q(self.ln_1(x)), attn.project_kv(self.ln_1_kv(context))
        x = self._add(x, self.ls_1, attn.out_proj, attn.attend(q, k, v, mask))
        return self._add_mlp(x)

    # -- incremental decoding -------------------------------------------------------------
    def step_self(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache, layer: int,
                  mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Run new positions ``x`` [B, T_new, C] at ``positions``, attending to the cache (see ``step_mask``)."""
        q, k, v = self.attn.project_qkv(self.ln_1(x))
        cache.write(layer, positions, k, v)
        x = self._add(x, self.ls_1, self.attn.out_proj, self.attn.attend(q, *cache.past(layer), mask))
        return self._add_mlp(x)

    def context_kv(self, context: torch.Tensor):
        return self.attn.project_kv(self.ln_1_kv(context))

    def step_cross(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   query_projection: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """Cross-attend new positions ``x`` [R, T, C] to a context's keys/values [K, heads, N, d].

        R may be a multiple m of K: rows then come in runs of m sharing one context (the beams
        of one image), and are folded into the query axis, so a context's keys/values are
        never copied per row. Each query attends independently, so the result is unchanged.
        """
        rows, T, C = x.shape
        contexts, heads = k.shape[:2]
        if rows % contexts:
            raise ValueError(f"{rows} rows cannot share {contexts} cross-attention contexts evenly")
        q = linear(self.ln_1(x), *(query_projection or self.attn.query_projection()))  # [R, T, C]
        q = q.view(contexts, rows // contexts * T, heads, C // heads).transpose(1, 2)  # [K, heads, m T, d]
        merged = self.attn.attend(q, k, v, shape=(rows, T, C))
        return self._add_mlp(self._add(x, self.ls_1, self.attn.out_proj, merged))


def causal_mask(size: int, device=None) -> torch.Tensor:
    """Boolean [size, size] mask, True where a query may attend (itself and the past)."""
    return torch.ones(size, size, dtype=torch.bool, device=device).tril()


def init_transformer_blocks(blocks, width: int, layers: int):
    """GPT-2/CLIP-style init: smaller output projections for deeper stacks."""
    proj_std = (width ** -0.5) * ((2 * layers) ** -0.5)
    attn_std = width ** -0.5
    fc_std = (2 * width) ** -0.5
    for block in blocks:
        nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
        nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
        nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
        nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)


class Transformer(nn.Module):
    """A stack of residual blocks, with optional activation checkpointing."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0,
                 ls_init_value: Optional[float] = None, act_layer=nn.GELU, norm_layer=LayerNorm):
        super().__init__()
        self.width, self.layers = width, layers
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList([
            ResidualBlock(width, heads, mlp_ratio, ls_init_value, act_layer, norm_layer) for _ in range(layers)
        ])

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        for block in self.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask)
        return x
