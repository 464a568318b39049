"""Shared fixtures/helpers for the MosaicBERT test-suite.

* puts the repository root on ``sys.path`` (model files live there),
* keeps every Hugging Face cache in a throw-away folder and forces offline mode
  (the suite must never reach the Hub),
* provides ragged-batch builders and helpers that load the independent
  reference weights (tests/reference.py) into the model under test.
"""

from __future__ import annotations

import os
import sys
import tempfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
for p in (REPO_ROOT, TESTS_DIR):
    if p not in sys.path:
        sys.path.insert(0, p)

# Must happen before transformers / huggingface_hub are imported anywhere.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "HF_HOME" not in os.environ:
    os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="mosaic_bert_hf_home_")

import pytest  # noqa: E402
import torch  # noqa: E402

from reference import Dims  # noqa: E402

# True when the Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 before they are imported).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# True on a CUDA machine with the kernels compiled for the GPU (the interpreter would run them on CPU tensors).
HAS_CUDA = torch.cuda.is_available() and not INTERPRET
# Where the kernel tests put their tensors: the GPU, or the CPU for the interpreter.
KERNEL_DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run only with CUDA (and TRITON_INTERPRET unset); `interpreter` tests need the kernels to run, on
    a GPU or in Triton's CPU interpreter. Markers are declared in pyproject.toml."""
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (and TRITON_INTERPRET unset)")
    skip_kernels = pytest.mark.skip(reason="needs a CUDA GPU, or TRITON_INTERPRET=1 for Triton's CPU interpreter")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        elif "interpreter" in item.keywords and not (HAS_CUDA or INTERPRET):
            item.add_marker(skip_kernels)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64 on the CPU; fails on NaN/inf in x (an unwritten or overflowed element)."""
    x, ref = x.detach().cpu().double(), ref.detach().cpu().double()
    assert torch.isfinite(x).all(), "NaN/inf in the output (an unwritten element, or an overflow)"
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def dims() -> Dims:
    return Dims()


def make_config(d: Dims, **overrides):
    from configuration_mosaic_bert import MosaicBertConfig

    kw = d.config_kwargs()
    kw.update(overrides)
    return MosaicBertConfig(**kw)


def ragged_batch(d: Dims, lengths, seqlen=None, padding="right", seed=0, garbage_pads=True):
    """Batch with real lengths ``lengths``.

    padding: "right" | "left" | "middle" (real tokens split around a pad block).
    Pad positions get garbage ids / token types (the model must ignore them).
    Real tokens never use the pad id.
    Returns (input_ids, attention_mask, token_type_ids) as int64 tensors.
    """
    g = torch.Generator().manual_seed(seed)
    S = seqlen or max(lengths)
    B = len(lengths)
    ids = torch.randint(1, d.vocab_size, (B, S), generator=g)
    tt = torch.randint(0, d.type_vocab_size, (B, S), generator=g)
    mask = torch.zeros(B, S, dtype=torch.long)
    for b, L in enumerate(lengths):
        if padding == "right":
            pos = torch.arange(L)
        elif padding == "left":
            pos = torch.arange(S - L, S)
        elif padding == "middle":
            a = L // 2
            pos = torch.cat([torch.arange(a), torch.arange(S - (L - a), S)])
        else:
            raise ValueError(padding)
        mask[b, pos] = 1
    if not garbage_pads:
        ids = ids.masked_fill(mask == 0, d.pad_token_id)
        tt = tt.masked_fill(mask == 0, 0)
    return ids, mask, tt


def real_tokens(x: torch.Tensor, mask: torch.Tensor, b: int) -> torch.Tensor:
    return x[b][mask[b] != 0]


def load_reference_weights(model, sd: dict):
    """Strictly load the reference dict (exact original key names) into ``model``."""
    own = model.state_dict()
    sd = {k: v.to(own[k].dtype) if k in own else v for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    # tied decoder weight may be absent from the model's state dict keys
    missing = [k for k in missing if "alibi" not in k]
    assert not missing, f"model has keys the original checkpoint layout lacks: {missing}"
    assert not unexpected, f"original checkpoint keys the model does not accept: {unexpected}"
    return model


def build(model_cls, d: Dims, kind: str, seed=0, dtype=torch.float64, **cfg_overrides):
    """Model of ``model_cls`` with random reference weights, eval mode, given dtype."""
    from reference import random_state_dict

    cfg = make_config(d, **cfg_overrides)
    model = model_cls(cfg).eval()
    model = model.to(dtype)
    if kind == "base" and any(k.startswith("pooler.") for k in model.state_dict()):
        kind = "base_pooler"
    sd = random_state_dict(d, kind, seed=seed, dtype=dtype)
    load_reference_weights(model, sd)
    return model, sd


def assert_close(actual, expected, atol=1e-9, rtol=1e-7, msg=""):
    actual = actual.detach()
    expected = expected.detach().to(actual.dtype)
    assert actual.shape == expected.shape, f"{msg} shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{msg}\n{m}")


def collated_mlm_batch(seed: int, vocab: int, batch: int, seqlen: int, padded_row: int | None = None,
                       device="cpu") -> dict:
    """What DataCollatorForLanguageModeling gives for packed rows: input_ids, attention_mask (all ones, except the
    second half of padded_row), token_type_ids and labels on ~30% of the real tokens (-100 elsewhere)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, seqlen), generator=g)
    mask = torch.ones_like(ids)
    if padded_row is not None:
        mask[padded_row, seqlen // 2 :] = 0
    labels = torch.where((torch.rand(batch, seqlen, generator=g) < 0.3) & (mask == 1), ids, -100)
    inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids), "labels": labels}
    return {k: v.to(device) for k, v in inputs.items()}
