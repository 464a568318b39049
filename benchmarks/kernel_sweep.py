"""Launch-shape sweep of the GeGLU and LayerNorm kernels on the pretraining step's shapes, with a correctness check.

    python benchmarks/kernel_sweep.py [--tokens 32768] [--out DIR]

The two elementwise kernels are bandwidth-bound; their launch shapes (columns per program, warps, and for the
LayerNorm backward the row groups per multiprocessor) are module constants chosen without a sweep. This script times
every candidate shape with `triton.testing.do_bench` in bf16 (MosaicBERT-base: 3072-wide GeGLU, 768-wide LayerNorm,
dropout 0.1 as in training), reports GB/s of the bytes each kernel must move, and checks each shape's dropout-free
output and gradients against float32 PyTorch (bf16 bounds), so a faster shape is also a correct one. It only
monkeypatches the module constants for the duration of a measurement; it changes no file. Writes kernel_sweep.json.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import geglu_triton as gg  # noqa: E402
import layernorm_triton as ln  # noqa: E402

GEGLU_SHAPES = [(block, warps) for block in (512, 1024, 2048, 4096) for warps in (2, 4, 8)
                if block // (32 * warps) >= 4]  # at least 4 elements per thread
LN_SHAPES = [(warps, groups) for warps in (2, 4, 8) for groups in (2, 4, 8, 16)]


def bench_ms(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def sweep_geglu(tokens: int, inner: int = 3072, p: float = 0.1) -> list[dict]:
    x = torch.randn(tokens, 2 * inner, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(tokens, inner, device="cuda", dtype=torch.bfloat16)
    gate, value = x.float().split(inner, dim=1)
    ref_y = F.gelu(gate) * value
    xr = x.float().requires_grad_()
    g, v = xr.split(inner, dim=1)
    (ref_dx,) = torch.autograd.grad(F.gelu(g) * v, xr, dy.float())
    seed = torch.tensor([1234], device="cuda", dtype=torch.int64)
    rows = []
    defaults = gg.BLOCK, gg.NUM_WARPS
    try:
        for block, warps in GEGLU_SHAPES:
            gg.BLOCK, gg.NUM_WARPS = block, warps
            y = gg._forward(x, None, 0.0)
            dx = gg._backward(dy, x, None, 0.0)
            errors = rel_err(y, ref_y), rel_err(dx, ref_dx)
            fwd = bench_ms(lambda: gg._forward(x, seed, p))
            bwd = bench_ms(lambda: gg._backward(dy, x, seed, p))
            fwd_bytes, bwd_bytes = x.nbytes + dy.nbytes, 2 * x.nbytes + dy.nbytes
            rows.append(dict(kernel="geglu", block=block, warps=warps, fwd_ms=fwd, bwd_ms=bwd,
                             fwd_gbs=fwd_bytes / fwd / 1e6, bwd_gbs=bwd_bytes / bwd / 1e6,
                             err_y=errors[0], err_dx=errors[1], ok=max(errors) < 1e-2,
                             default=(block, warps) == defaults))
    finally:
        gg.BLOCK, gg.NUM_WARPS = defaults
    return rows


def sweep_layer_norm(tokens: int, hidden: int = 768, p: float = 0.1) -> list[dict]:
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    residual = torch.randn_like(x)
    dy = torch.randn_like(x)
    weight = 1 + 0.1 * torch.randn(hidden, device="cuda")
    bias = 0.1 * torch.randn(hidden, device="cuda")
    leaves = [t.float().requires_grad_() for t in (x, residual, weight, bias)]
    ref_y = F.layer_norm(leaves[0] + leaves[1], (hidden,), leaves[2], leaves[3], 1e-12)
    ref_grads = torch.autograd.grad(ref_y, leaves, dy.float())
    seed = torch.tensor([1234], device="cuda", dtype=torch.int64)
    rows = []
    launch_config, groups_per_sm = ln._launch_config, ln.ROW_GROUPS_PER_SM
    default_warps = launch_config(hidden)[1]
    try:
        for warps, groups in LN_SHAPES:
            block = launch_config(hidden)[0]
            ln._launch_config, ln.ROW_GROUPS_PER_SM = (lambda h, b=block, w=warps: (b, w)), groups
            y, mean, rstd = ln._forward(x, residual, weight, bias, 1e-12, None, 0.0)
            grads = ln._backward(dy, x, residual, weight, bias, mean, rstd, None, 0.0)
            errors = [rel_err(y, ref_y)] + [rel_err(g, r) for g, r in zip(grads, ref_grads)]
            _, mean_p, rstd_p = ln._forward(x, residual, weight, bias, 1e-12, seed, p)
            fwd = bench_ms(lambda: ln._forward(x, residual, weight, bias, 1e-12, seed, p))
            bwd = bench_ms(lambda m=mean_p, r=rstd_p: ln._backward(dy, x, residual, weight, bias, m, r, seed, p))
            # forward: x, residual in, y out; backward: dy, x, residual in, dx, dresidual out
            fwd_bytes, bwd_bytes = 3 * x.nbytes, 5 * x.nbytes
            rows.append(dict(kernel="layernorm", block=block, warps=warps, groups_per_sm=groups, fwd_ms=fwd,
                             bwd_ms=bwd, fwd_gbs=fwd_bytes / fwd / 1e6, bwd_gbs=bwd_bytes / bwd / 1e6,
                             max_err=max(errors), ok=max(errors) < 1e-2,
                             default=(warps, groups) == (default_warps, groups_per_sm)))
    finally:
        ln._launch_config, ln.ROW_GROUPS_PER_SM = launch_config, groups_per_sm
    return rows


def copy_gbs(tokens: int) -> float:
    """The card's copy bandwidth on a buffer of the GeGLU projection's size, as the yardstick."""
    src = torch.empty(tokens, 6144, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    return 2 * src.nbytes / bench_ms(lambda: dst.copy_(src)) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("kernel_sweep.py needs a CUDA GPU")
    torch.manual_seed(0)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": args.tokens,
              "copy_gbs": copy_gbs(args.tokens), "rows": sweep_geglu(args.tokens) + sweep_layer_norm(args.tokens)}
    print(f"# {result['device']}, torch {result['torch']}, {args.tokens} tokens, bf16, dropout 0.1; "
          f"copy {result['copy_gbs']:,.0f} GB/s")
    print("| kernel | shape | fwd ms | fwd GB/s | bwd ms | bwd GB/s | correct | default |")
    print("|---|---|---:|---:|---:|---:|---|---|")
    for r in result["rows"]:
        shape = (f"block {r['block']}, {r['warps']} warps" if r["kernel"] == "geglu"
                 else f"{r['warps']} warps, {r['groups_per_sm']} bwd groups/SM")
        print(f"| {r['kernel']} | {shape} | {r['fwd_ms']:.3f} | {r['fwd_gbs']:,.0f} | {r['bwd_ms']:.3f} | "
              f"{r['bwd_gbs']:,.0f} | {'yes' if r['ok'] else 'NO'} | {'*' if r['default'] else ''} |")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "kernel_sweep.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
