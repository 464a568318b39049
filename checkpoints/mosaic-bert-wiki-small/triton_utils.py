"""What the four Triton kernel files of MosaicBERT share: the dropout mask, the interpreter flag, output allocation,
input checks and the naming of their PyTorch custom ops.

flash_attn_triton.py, geglu_triton.py, layernorm_triton.py and cross_entropy_triton.py import this module relatively
(``from .triton_utils import ...``), so Hugging Face remote code copies it beside them, or from sys.path (tests,
scripts). Shipped as remote code: imports only torch and triton, and touches no GPU at import time.
"""

import contextlib
import hashlib

import torch
import triton
import triton.language as tl


# The dropout keep-mask of the chunk-th BLOCK of elements: [u >= p] for BLOCK uniforms u in [0, 1) from BLOCK / 4
# Philox calls (Triton's tl.rand4x, as in Triton's low-memory dropout tutorial) on the counters
# chunk * BLOCK / 4 + [0, BLOCK / 4). Each call gives four numbers: one call per element would make the random
# numbers, not the memory traffic, the cost of a kernel. Distinct chunks get distinct counters, and a forward and a
# backward kernel passing the same seed and chunk get the same mask, so the mask is never stored. BLOCK >= 4.
@triton.jit
def keep_mask(Seed, p, chunk, BLOCK: tl.constexpr):
    counters = (chunk * (BLOCK // 4) + tl.arange(0, BLOCK // 4)).to(tl.uint32)
    r0, r1, r2, r3 = tl.rand4x(tl.load(Seed), counters)
    return tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), (BLOCK,)) >= p


# True when Triton decorated the kernels for its CPU interpreter (TRITON_INTERPRET=1 set before import): they then run
# on CPU tensors. Read once here: torch.compile cannot trace type() of a Triton kernel object.
INTERPRET = type(keep_mask).__name__ == "InterpretedFunction"

_poison_outputs = False


@contextlib.contextmanager
def poisoned_outputs():
    """Within this block, fresh kernel outputs are filled with NaN instead of left uninitialised, so that an element
    the kernels forget to write shows up as NaN instead of stale memory (tests)."""
    global _poison_outputs
    previous, _poison_outputs = _poison_outputs, True
    try:
        yield
    finally:
        _poison_outputs = previous


def new_output(shape, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised tensor for a kernel to write, on like's device, in dtype (default like's); NaN-filled inside
    `poisoned_outputs`."""
    dtype = like.dtype if dtype is None else dtype
    if _poison_outputs:
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


def dropout_seed(dropout_p: float, device: torch.device) -> torch.Tensor | None:
    """The Philox seed of one call with dropout probability dropout_p: a (1,) int64 tensor on device, drawn from
    torch's generator (so torch.manual_seed makes the mask repeatable, with no host synchronisation), or None when
    dropout_p is 0. Raises ValueError unless 0 <= dropout_p < 1."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return torch.randint(2**31 - 1, (1,), device=device, dtype=torch.int64) if dropout_p > 0 else None


def seed_arg(seed: torch.Tensor | None, like: torch.Tensor):
    """(pointer, HAS_DROPOUT) for a kernel's Seed argument: without a seed, any tensor (never read)."""
    return (like, False) if seed is None else (seed, True)


# ----------------------------------------------------------------------------------------------------------------
# Input checks: each returns why the kernels cannot take an input, or None. Metadata only, no device synchronisation.
# ----------------------------------------------------------------------------------------------------------------


def tensors_reason(**named) -> str | None:
    """Every argument must be a torch.Tensor, the first one on a device the kernels run on (CUDA, or the CPU in
    Triton's interpreter), the others on the first one's device."""
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            return f"{name} must be a torch.Tensor, got {type(t).__name__}"
    (first, t0), *others = named.items()
    if t0.device.type != "cuda" and not INTERPRET:
        return (f"{first} is on {t0.device}; the Triton kernels need a CUDA device "
                "(or TRITON_INTERPRET=1 set before import, for CPU tensors)")
    if INTERPRET and t0.device.type != "cpu":
        return f"{first} is on {t0.device}; in Triton's interpreter mode the kernels run on CPU tensors"
    for name, t in others:
        if t.device != t0.device:
            return f"{name} is on {t.device} but {first} is on {t0.device}; all must be on one device"
    return None


def dtype_reason(name: str, t: torch.Tensor, allowed) -> str | None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        return f"{name} dtype {t.dtype} is not supported ({names})"
    return None


def unit_stride_reason(name: str, t: torch.Tensor) -> str | None:
    """The kernels address the last dimension as contiguous (any stride on the others)."""
    if t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
        return f"{name} must have unit stride on its last dimension, got strides {t.stride()}"
    return None


def contiguous_reason(name: str, t: torch.Tensor) -> str | None:
    if not t.is_contiguous():
        return f"{name} must be contiguous, got strides {t.stride()}"
    return None


# ----------------------------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------------------------


def op_namespace(kernel_file: str) -> str:
    """The torch.library namespace of the ops of one copy of a kernel file: "mosaic_bert_" and a hash of that file
    and of this one.

    Ops are global to the process, while one process can hold several copies of this code: Hub remote code imports
    the files of each model folder under a module name of its own (the package's and an older checkpoint's, say), and
    runs a module again, under the same name, when a folder's files changed. Under one fixed namespace a second copy
    would either fail to register its ops or, skipping them, silently run the first copy's kernels. Named after their
    content, each copy registers and runs its own ops; identical copies share theirs, which run the same code."""
    digest = hashlib.sha256()
    for path in (kernel_file, __file__):
        with open(path, "rb") as f:
            digest.update(f.read())
    return f"mosaic_bert_{digest.hexdigest()[:16]}"


def define_ops(namespace: str, forward, backward, setup_context, backward_of_forward):
    """Registers the forward op and the backward op of a kernel pair as PyTorch custom ops in namespace (see
    `op_namespace`), with fake implementations (so torch.compile traces them) and autograd on the forward op, unless
    an identical copy of the kernel file registered them already. Returns their two OpOverloadPackets.

    forward, backward: (name, schema, implementation, fake implementation) each; the schemas are spelled out, so they
    read the same on every supported PyTorch version. setup_context(ctx, inputs, output) and
    backward_of_forward(ctx, *grad_outputs) are torch.library.register_autograd's two functions.
    """
    ops = getattr(torch.ops, namespace)
    if not hasattr(ops, forward[0]):
        defined = []
        for name, schema, implementation, fake in (forward, backward):
            custom_op = torch.library.custom_op(f"{namespace}::{name}", implementation, mutates_args=(),
                                                schema=schema)
            custom_op.register_fake(fake)
            defined.append(custom_op)
        defined[0].register_autograd(backward_of_forward, setup_context=setup_context)
    return getattr(ops, forward[0]), getattr(ops, backward[0])


# A custom op costs about 100 us of host time per call in eager mode (dispatch, schema checks, the autograd wrapper;
# measured on an H200 host with torch 2.11), against about 10 us for a torch.autograd.Function: with ~500 kernel
# calls in a training step of MosaicBERT-base, the ops alone kept the host busier than the GPU. So eager calls go
# straight to the implementations, and the registered ops serve whoever traces the model (torch.compile,
# torch.export, tensor subclasses such as FSDP's DTensor), which needs their fake implementations. Both routes run
# the same implementation and backward.


def traced(args) -> bool:
    """Whether a call must go through the registered op: under torch.compile, or when a tensor argument is of a
    subclass (FakeTensor, FunctionalTensor, DTensor, ...) rather than a plain tensor or nn.Parameter."""
    if torch.compiler.is_compiling():
        return True
    return any(isinstance(a, torch.Tensor) and type(a) not in (torch.Tensor, torch.nn.Parameter) for a in args)


def eager_or_op(op, implementation):
    """A callable that runs implementation(*args) directly on eager tensors and op(*args) when `traced`."""

    def call(*args):
        return op(*args) if traced(args) else implementation(*args)

    return call


def autograd_or_op(op, implementation, setup_context, backward_of_forward):
    """A callable for a forward op with autograd: on eager tensors a torch.autograd.Function built from the same
    implementation, setup_context and backward_of_forward that `define_ops` registered; op(*args) when `traced`."""

    class EagerFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            ctx.set_materialize_grads(False)  # no zero gradients allocated for the outputs nobody differentiates
            output = implementation(*args)
            setup_context(ctx, args, output)
            return output

        @staticmethod
        @torch.autograd.function.once_differentiable  # the kernels' backward is not itself differentiable: refuse
        def backward(ctx, *grad_outputs):  # create_graph=True clearly. Secondary outputs get None here, zeros on
            return backward_of_forward(ctx, *grad_outputs)  # the op route: every backward_of_forward ignores them

    def call(*args):
        return op(*args) if traced(args) else EagerFunction.apply(*args)

    return call
