"""oneDNN-prepacked weights for fast CPU decoding.

Decoding multiplies a dozen rows (the beams) by every weight of the text encoder and the
decoder once per token, so on a CPU its time goes into reading weights from memory, not into
arithmetic. oneDNN reads a weight reordered ("prepacked") into its blocked layout two to three
times faster than the row-major layout ``F.linear`` is given (see benchmarks/RESULTS.md).
Inside ``packed_linears()``, :func:`linear` uses such a copy, made on first use and kept until
the weight changes, and fuses what follows the matmul into it (oneDNN post-ops): the exact
GELU of an MLP's first layer, or the residual added to a block's output projection. Each fused
op is a pass over the activations (and, on a GPU, a kernel) that no longer runs on its own.
Results equal ``F.linear``'s up to float rounding (~1e-6).

The ops are oneDNN's own (``torch.ops.mkldnn``, the ones Inductor's CPU freezing uses); where a
build lacks them, or they disagree with ``F.linear``, everything falls back to ``F.linear``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

_enabled = contextvars.ContextVar("coca_packed_linears", default=False)
# parameter -> {(offset, shape, stride) of the view used: ((version, data_ptr), packed weight)}
_packs: WeakIdKeyDictionary = WeakIdKeyDictionary()


@functools.cache
def available() -> bool:
    """Whether this torch build has oneDNN's packed linear, and it agrees with ``F.linear``."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        weight = torch.arange(32, dtype=torch.float32).reshape(8, 4) / 32  # no RNG: keeps seeds intact
        x = torch.arange(12, dtype=torch.float32).reshape(3, 4) / 12
        packed = torch.ops.mkldnn._reorder_linear_weight(weight)
        reference = F.linear(x, weight)
        y = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        y_gelu = torch.ops.mkldnn._linear_pointwise(x, packed, None, "gelu", [], "none")
        y_add = torch.ops.mkldnn._linear_pointwise.binary(x, reference, packed, None, "add")
        return (torch.allclose(y, reference, atol=1e-5) and torch.allclose(y_gelu, F.gelu(reference), atol=1e-5)
                and torch.allclose(y_add, 2 * reference, atol=1e-5))
    except (AttributeError, RuntimeError):
        return False


@contextlib.contextmanager
def packed_linears(enabled: bool = True) -> Iterator[None]:
    """Let :func:`linear` use packed weights (CPU, fp32, no autograd) inside this block."""
    token = _enabled.set(enabled and torch.backends.mkldnn.enabled and available())
    try:
        yield
    finally:
        _enabled.reset(token)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
           gelu: bool = False, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear``, then the exact GELU (``gelu``) or ``residual +`` (not both), through a packed
    copy of ``weight`` with that step fused into the matmul inside ``packed_linears()`` where it
    applies."""
    if (_enabled.get() and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
            and (residual is None or (not gelu and residual.shape == (*x.shape[:-1], weight.shape[0])
                                      and residual.dtype == x.dtype and residual.is_contiguous()))):
        packed = _packed(weight, rows=x.numel() // x.shape[-1])
        if packed is not None:
            if residual is not None:
                return torch.ops.mkldnn._linear_pointwise.binary(x, residual, packed, bias, "add")
            return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "gelu" if gelu else "none", [],
                                                      "none" if gelu else "")
    y = F.linear(x, weight, bias)
    if gelu:
        y = F.gelu(y)
    return y if residual is None else residual + y


def forget(parameters) -> None:
    """Drop the packed copies of ``parameters``: a model going back to training needs the memory,
    and its first update makes them stale anyway."""
    for parameter in parameters:
        _packs.pop(parameter, None)


def _packed(weight: torch.Tensor, rows: int) -> Optional[torch.Tensor]:
    """The packed copy of ``weight`` (a parameter or a view of one), cached on that parameter.

    oneDNN picks the blocking for ``rows`` input rows (the first call's); others still work.
    """
    root = weight if weight._base is None else weight._base
    if root.is_inference():  # a temporary (e.g. concatenated) weight: not worth packing
        return None
    geometry = (weight.storage_offset(), tuple(weight.shape), weight.stride())
    state = (root._version, root.data_ptr())  # changes when the weights are updated or reloaded
    views = _packs.setdefault(root, {})
    cached = views.get(geometry)
    if cached is None or cached[0] != state:
        cached = views[geometry] = (state, torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), max(rows, 1)))
    return cached[1]
