"""GPU kernels by what they do, from their names: the categories that benchmarks/profile_step.py and
benchmarks/model.py report time under (ours: the Triton kernels by name; BERT: cuBLAS/cuDNN/inductor kernels)."""

CATEGORIES = [  # first match wins, on the lower-cased kernel name
    ("geglu kernel", ("_geglu_",)),
    ("cross-entropy kernel", ("_ce_",)),
    ("layernorm", ("layer_norm", "layernorm", "_ln_")),
    ("attention kernel", ("flash_attn", "_attn_fwd", "_attn_bwd", "_bwd_preprocess", "_fwd_kernel", "_bwd_",
                          "scaled_dot_product", "flash_attention", "sdpa", "fmha")),
    ("matmul", ("gemm", "cutlass", "sm90_xmma", "nvjet", "matmul", "wgmma", "addmm", "aten::mm", "bmm",
                "triton_tem")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("softmax / loss", ("softmax", "nll", "cross_entropy", "log_softmax")),
    ("elementwise / dropout / copies", ("elementwise", "vectorized", "unrolled", "dropout", "copy", "fill", "cat",
                                        "index", "scatter", "gather", "reduce", "gelu", "mul", "add")),
]


def categorize(name: str) -> str:
    lowered = name.lower()
    for category, keys in CATEGORIES:
        if any(key in lowered for key in keys):
            return category
    return "other"
