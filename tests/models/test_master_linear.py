"""Linears over fp32 weights under autocast: autocast's forward and input gradient bit for bit, the weight and bias
gradients as fp32 sums written by their own GEMM / reduction (no bf16 gradient widened by another kernel)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sfd_scale.bench.dispatch_count import CudaAutocast, OpCounter
from sfd_scale.models import master_linear
from sfd_scale.models.master_linear import Linear, linear


def _operands(x_dtype=torch.float32, w_dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 16, 32, generator=g).to(x_dtype).requires_grad_()
    w = torch.randn(24, 32, generator=g).to(w_dtype).requires_grad_()
    b = torch.randn(24, generator=g).to(w_dtype).requires_grad_()
    return x, w, b


def _run(fn, x, w, b, autocast=True):
    """Output and (dx, dw, db) of sum(fn(x, w, b)^2), under CPU bf16 autocast."""
    for t in (x, w, b):
        t.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = fn(x, w, b)
    y.float().square().sum().backward()
    return y, x.grad, w.grad, b.grad


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_forward_and_input_gradient_are_autocasts_bit_for_bit(x_dtype):
    ours, ref = _run(linear, *_operands(x_dtype)), _run(F.linear, *_operands(x_dtype))
    assert ours[0].dtype == torch.bfloat16 and torch.equal(ours[0], ref[0])
    assert ours[1].dtype == x_dtype and torch.equal(ours[1], ref[1])


def test_parameter_gradients_are_fp32_sums_not_widened_bf16():
    x, w, b = _operands()
    y, _, dw, db = _run(linear, x, w, b)
    _, _, dw_autocast, db_autocast = _run(F.linear, *_operands())
    # the exact gradient of the bf16 products: dy and x as the backward sees them (bf16), summed in float64
    dy = (2 * y.float()).bfloat16().double()
    exact_dw = dy.reshape(-1, 24).T @ x.detach().bfloat16().double().reshape(-1, 32)
    exact_db = dy.reshape(-1, 24).sum(0)
    for ours, autocast, exact in ((dw, dw_autocast, exact_dw), (db, db_autocast, exact_db)):
        assert ours.dtype == autocast.dtype == torch.float32
        ours_err, autocast_err = (ours.double() - exact).abs().max(), (autocast.double() - exact).abs().max()
        assert ours_err <= 1e-6 * exact.abs().max()  # fp32 rounding of the sum only
        assert autocast_err > 100 * ours_err  # autocast's went through bf16 (8-bit mantissa)
        assert torch.allclose(ours, autocast, rtol=2 ** -7, atol=2 ** -7 * exact.abs().max().item())


def test_fp32_and_bf16_weights_are_plain_f_linear():
    for autocast, dtype in ((False, torch.float32), (True, torch.bfloat16)):
        ours = _run(linear, *_operands(w_dtype=dtype), autocast=autocast)
        ref = _run(F.linear, *_operands(w_dtype=dtype), autocast=autocast)
        assert all(torch.equal(a, r) for a, r in zip(ours, ref))


def test_compiled_is_eager_bit_for_bit():
    torch._dynamo.reset()
    compiled = _run(torch.compile(linear, dynamic=False), *_operands())
    torch._dynamo.reset()
    assert all(torch.equal(c, e) for c, e in zip(compiled, _run(linear, *_operands())))


def test_cost_model_counts_the_weight_gradient_as_a_gemm():
    """Under the cost model's CUDA-autocast stand-in on meta, a linear over fp32 weights runs the same path: three
    GEMMs (forward, input and weight gradient) and casts of x, w, b forward and of dx back, nothing for dw."""
    x, w, b = (t.detach().to("meta").requires_grad_() for t in _operands())
    counter = OpCounter(torch.device("meta"))
    with counter:
        with CudaAutocast(torch.bfloat16):
            y = F.linear(x, w, b)
        y.float().sum().backward()
    totals = counter.totals[("step", None)]
    assert totals["gemm_kernels"] == 3 and totals["gemm_flops"] == 3 * 2 * 64 * 32 * 24
    # x, w, b to bf16 and dx back, + the loss's y.float() and its gradient back to bf16 (autocast's path: 8)
    assert counter.ops["_to_copy"] == 4 + 2
    assert w.grad.dtype == torch.float32


def test_linear_module_is_nn_linear_with_the_same_init_and_keys():
    torch.manual_seed(3)
    ours = Linear(8, 5)
    torch.manual_seed(3)
    ref = nn.Linear(8, 5)
    assert isinstance(ours, nn.Linear) and ours.state_dict().keys() == ref.state_dict().keys()
    assert all(torch.equal(a, r) for a, r in zip(ours.state_dict().values(), ref.state_dict().values()))
    x = torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(ours(x), ref(x))


def test_autocast_dtype_of_devices_without_autocast_is_none():
    assert master_linear.autocast_dtype("meta") is None
    assert master_linear.autocast_dtype("cpu") is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert master_linear.autocast_dtype("cpu") == torch.bfloat16
