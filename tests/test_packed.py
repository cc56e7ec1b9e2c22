"""Prepacked (oneDNN) linear layers used while decoding on CPU: same results as F.linear,
never stale after the weights change, and out of the way wherever they do not apply."""

import copy

import torch
import torch.nn.functional as F

from coca_cli.model import packed
from coca_cli.model.config import get_model_config
from coca_cli.model.coca import CoCa
from coca_cli.model.packed import linear, packed_linears


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(torch.randn(300, 64, generator=g)), torch.randn(300, generator=g), torch.randn(5, 7, 64, generator=g)


def test_the_fast_path_exists_on_this_cpu_build():
    # CI runs on x86 CPUs with oneDNN: if this fails, decoding silently lost its speed-up.
    assert packed.available()


def test_packed_linear_matches_f_linear_for_weights_and_views():
    weight, bias, x = _weights()
    with torch.no_grad(), packed_linears():
        assert torch.allclose(linear(x, weight, bias), F.linear(x, weight, bias), atol=1e-5)
        q_rows = weight[100:200]  # a view, cached separately from the whole weight
        assert torch.allclose(linear(x, q_rows), F.linear(x, q_rows), atol=1e-5)
        transposed = torch.nn.Parameter(torch.randn(64, 300))  # e.g. x @ text_projection
        assert torch.allclose(linear(x, transposed.T), x @ transposed, atol=1e-5)
    assert weight in packed._packs and len(packed._packs[weight]) == 2


def test_fused_gelu_and_residual_match_the_separate_ops():
    """oneDNN post-ops: the MLP's GELU and a block's residual add, fused into the matmul."""
    weight, bias, x = _weights()
    residual = torch.randn(*x.shape[:-1], weight.shape[0])
    expected_gelu, expected_add = F.gelu(F.linear(x, weight, bias)), residual + F.linear(x, weight, bias)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode(), packed_linears():
            assert torch.allclose(linear(x, weight, bias, gelu=True), expected_gelu, atol=1e-5)
            assert torch.allclose(linear(x, weight, bias, residual=residual), expected_add, atol=1e-5)
            # a residual the fused op cannot take (not contiguous) falls back, same result
            strided = residual.transpose(0, 1).contiguous().transpose(0, 1)
            assert torch.allclose(linear(x, weight, bias, residual=strided), expected_add, atol=1e-5)
    with torch.no_grad():  # outside the block: the separate ops themselves
        assert torch.equal(linear(x, weight, bias, gelu=True), expected_gelu)
        assert torch.equal(linear(x, weight, bias, residual=residual), expected_add)


def test_a_packed_copy_never_outlives_a_weight_update():
    weight, bias, x = _weights()
    with torch.inference_mode(), packed_linears():
        linear(x, weight, bias)
    with torch.no_grad():
        weight.mul_(-2)  # an optimizer step, or load_state_dict's copy_
    with torch.inference_mode(), packed_linears():
        assert torch.allclose(linear(x, weight, bias), F.linear(x, weight, bias), atol=1e-5)


def test_falls_back_where_packing_does_not_apply():
    weight, bias, x = _weights()
    with packed_linears():
        out = linear(x, weight, bias)  # autograd on: must stay differentiable
        assert out.requires_grad and out.grad_fn is not None
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert linear(x, weight, bias).dtype == torch.bfloat16
        with torch.no_grad():
            half = weight.detach().bfloat16()
            assert linear(x.bfloat16(), half).dtype == torch.bfloat16
    with torch.no_grad():  # outside the block: plain F.linear, nothing packed
        fresh = torch.nn.Parameter(weight.detach().clone())
        assert torch.equal(linear(x, fresh, bias), F.linear(x, fresh, bias))
    assert fresh not in packed._packs


def test_generate_after_reloading_weights_uses_the_new_weights():
    torch.manual_seed(0)
    model, other = (CoCa.from_config(get_model_config("coca_tiny")).eval() for _ in range(2))
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    before = model.generate(images, seq_len=8)
    expected = copy.deepcopy(other).generate(images, seq_len=8)
    assert not torch.equal(expected, before)  # otherwise the test shows nothing
    model.load_state_dict(other.state_dict())
    assert torch.equal(model.generate(images, seq_len=8), expected)
