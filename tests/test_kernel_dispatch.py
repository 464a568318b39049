"""The kernels' two routes: eager calls run the implementations through a torch.autograd.Function (little host time
per call), traced calls (torch.compile, tensor subclasses) the registered custom ops. Both must compute the same
values and gradients, and a traced call must reach the op."""

import pytest
import torch

import cross_entropy_triton as ce
import flash_attn_triton as fa
import geglu_triton as gg
import layernorm_triton as ln
import triton_utils
from conftest import KERNEL_DEVICE

pytestmark = pytest.mark.interpreter

DTYPE = torch.float32


def _grads(outputs, inputs, grad_outputs):
    return torch.autograd.grad(outputs, inputs, grad_outputs)


def _both_routes(call_public, op_packet, inputs, op_args):
    """Public function's output and input gradients (eager route) against the registered op called directly."""
    eager = call_public(*inputs)
    via_op = op_packet(*op_args(inputs))
    via_op = via_op[0] if isinstance(via_op, tuple) else via_op
    dout = torch.randn_like(eager)
    return (eager, _grads(eager, inputs, dout)), (via_op, _grads(via_op, inputs, dout))


def _assert_same(a, b):
    (out_a, grads_a), (out_b, grads_b) = a, b
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=0)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(ga, gb, rtol=0, atol=0)


def test_geglu_eager_route_equals_the_registered_op():
    x = torch.randn(5, 2 * 24, device=KERNEL_DEVICE, dtype=DTYPE, requires_grad=True)
    _assert_same(*_both_routes(gg.geglu, gg.fwd_op, (x,), lambda i: (i[0], None, 0.0)))


def test_layernorm_eager_route_equals_the_registered_op():
    x, residual = (torch.randn(6, 40, device=KERNEL_DEVICE, dtype=DTYPE, requires_grad=True) for _ in range(2))
    weight, bias, x_bias = (torch.randn(40, device=KERNEL_DEVICE, dtype=DTYPE, requires_grad=True) for _ in range(3))
    inputs = (x, residual, weight, bias, x_bias)
    _assert_same(*_both_routes(
        lambda *i: ln.dropout_add_layer_norm(*i[:4], 1e-5, 0.0, i[4]), ln.fwd_op, inputs,
        lambda i: (*i[:4], 1e-5, None, 0.0, i[4])))


def test_cross_entropy_eager_route_equals_the_registered_op():
    logits = torch.randn(7, 33, device=KERNEL_DEVICE, dtype=DTYPE, requires_grad=True)
    labels = torch.tensor([0, 5, -100, 32, 1, -100, 7], device=KERNEL_DEVICE)
    _assert_same(*_both_routes(lambda lg: ce.cross_entropy(lg, labels), ce.fwd_op, (logits,),
                               lambda i: (i[0], labels, -100)))


def test_attention_eager_route_equals_the_registered_op():
    heads, head_dim, lengths = 2, 16, [3, 1, 6]
    qkv = torch.randn(sum(lengths), 3, heads, head_dim, device=KERNEL_DEVICE, dtype=DTYPE, requires_grad=True)
    cu = torch.tensor([0, 3, 4, 10], device=KERNEL_DEVICE, dtype=torch.int32)
    slopes = torch.tensor([0.5, 0.25], device=KERNEL_DEVICE)
    scale = head_dim ** -0.5
    _assert_same(*_both_routes(lambda t: fa.flash_attn_varlen_qkvpacked_func(t, cu, 6, slopes), fa.fwd_op, (qkv,),
                               lambda i: (i[0], cu, 6, slopes, scale)))


def test_traced_calls_go_through_the_registered_op(monkeypatch):
    calls = []
    real = gg.fwd_op

    def counting_op(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(gg, "forward_call", triton_utils.autograd_or_op(
        counting_op, gg._forward, gg._setup_context, gg._backward_of_forward))
    x = torch.randn(4, 2 * 8, device=KERNEL_DEVICE, dtype=DTYPE)
    gg.geglu(x)
    assert not calls, "an eager call of plain tensors went through the custom op"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    gg.geglu(x)
    assert len(calls) == 1, "a call under torch.compile must reach the registered op (its fake implementation)"


def test_tensor_subclasses_count_as_traced():
    plain = torch.zeros(2)
    assert not triton_utils.traced((plain, torch.nn.Parameter(torch.zeros(2)), None, 0.5))

    class Sub(torch.Tensor):
        pass

    assert triton_utils.traced((plain, plain.as_subclass(Sub)))


def test_sdpa_under_torch_compile_leaves_the_elementwise_kernels_to_the_compiler(monkeypatch):
    """With "sdpa", a compiled graph calls the attention kernel but leaves GeGLU and dropout + residual + LayerNorm to
    the compiler (which fuses them and launches them from its own code); "flash_attention_2" keeps every kernel, and
    outside torch.compile nothing changes."""
    import modeling_mosaic_bert as m

    if m.flash_attn_varlen_qkvpacked_func is None:
        pytest.skip("Triton is not installed")
    tensor = torch.empty(4, 8, device="meta", dtype=torch.bfloat16)
    eager = {(impl, elementwise): m.kernel_policy_reason(impl, tensor, elementwise=elementwise)
             for impl in ("sdpa", "flash_attention_2") for elementwise in (False, True)}
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    compiled = {(impl, elementwise): m.kernel_policy_reason(impl, tensor, elementwise=elementwise)
                for impl in ("sdpa", "flash_attention_2") for elementwise in (False, True)}
    assert "leaves elementwise work to the compiler" in compiled["sdpa", True]
    assert compiled["sdpa", False] == eager["sdpa", False] == eager["sdpa", True]  # the device rule alone
    assert compiled["flash_attention_2", True] is None and eager["flash_attention_2", True] is None

    # The modules ask with the right flag: GeGLU and the residual LayerNorm as elementwise work, attention not.
    from conftest import make_config
    from reference import Dims

    layer = m.MosaicBertLayer(make_config(Dims(), attn_implementation="sdpa"))
    rows = torch.empty(4, layer.mlp.intermediate_size * 2, device="meta", dtype=torch.bfloat16)
    hidden = torch.empty(4, layer.mlp.wo.out_features, device="meta", dtype=torch.bfloat16)
    assert "compiler" in layer.mlp.kernel_unsupported_reason(rows)
    assert "compiler" in layer.mlp.layernorm.kernel_unsupported_reason(hidden, hidden)
    qkv = torch.empty(4, 3, 2, 8, device="meta", dtype=torch.bfloat16)
    mask = torch.ones(1, 4, dtype=torch.bool, device="meta")
    layout = m.TokenLayout(mask, torch.empty(4, dtype=torch.int64, device="meta"),
                           torch.empty(2, dtype=torch.int32, device="meta"), max_seqlen=4)
    assert "compiler" not in layer.attention.self.kernel_unsupported_reason(qkv, layout, torch.empty(2), False)
