"""The root files as Hugging Face remote code: what save_pretrained writes, what from_pretrained(trust_remote_code=True)
imports in a fresh process, and several copies of the Triton kernel files living in one process."""

import importlib
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from conftest import KERNEL_DEVICE, REPO_ROOT, make_config, ragged_batch
from reference import Dims

KERNEL_FILES = ("flash_attn_triton.py", "geglu_triton.py", "layernorm_triton.py", "cross_entropy_triton.py")
CODE_FILES = ("configuration_mosaic_bert.py", "modeling_mosaic_bert.py", "bert_padding.py", "triton_utils.py",
              *KERNEL_FILES)

# Runs in a fresh interpreter whose sys.path does not hold the repository: everything it imports of the model comes
# from the saved folder, through transformers' module cache under HF_HOME.
FRESH_PROCESS_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    from transformers import AutoModelForMaskedLM

    folder, inputs_file = sys.argv[1], sys.argv[2]
    assert not any(os.path.isfile(os.path.join(p or ".", "modeling_mosaic_bert.py")) for p in sys.path), sys.path
    model = AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=True)
    inputs = torch.load(inputs_file)
    with torch.no_grad():
        logits = model(**inputs).logits
    torch.save(logits, os.path.join(os.path.dirname(inputs_file), "fresh_logits.pt"))
    modeling = sys.modules[type(model).__module__]
    kernel_functions = ("flash_attn_varlen_qkvpacked_func", "geglu", "dropout_add_layer_norm", "cross_entropy")
    print(json.dumps({
        "modules": {name.rsplit(".", 1)[-1]: module.__file__ for name, module in sys.modules.items()
                    if name.startswith("transformers_modules.") and getattr(module, "__file__", None)},
        "kernels": {name: getattr(getattr(modeling, name), "__module__", None) for name in kernel_functions},
    }))
""")


def tiny_masked_lm():
    from modeling_mosaic_bert import MosaicBertForMaskedLM

    return MosaicBertForMaskedLM(make_config(Dims())).eval()


def test_save_pretrained_then_from_pretrained_in_a_fresh_offline_process_imports_the_saved_kernels(tmp_path):
    """save_pretrained copies triton_utils.py beside the kernel files that import it; a fresh process with an empty,
    offline HF_HOME loads the folder as remote code, imports the four kernel modules from it (a missing sibling would
    silently fall back to PyTorch, so the test looks at where the kernel functions come from), and computes the
    in-process model's logits."""
    model = tiny_masked_lm()
    folder = tmp_path / "tiny-mosaic-bert"
    model.save_pretrained(folder)
    saved = set(os.listdir(folder))
    assert set(CODE_FILES) <= saved, f"save_pretrained left out {sorted(set(CODE_FILES) - saved)}"
    for name in CODE_FILES:
        with open(os.path.join(REPO_ROOT, name), "rb") as a, open(folder / name, "rb") as b:
            assert a.read() == b.read(), f"{name} was not copied as it is"

    ids, mask, token_types = ragged_batch(Dims(), [7, 3, 1], seqlen=9)
    inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": token_types}
    torch.save(inputs, tmp_path / "inputs.pt")
    with torch.no_grad():
        expected = model(**inputs).logits

    hf_home = tmp_path / "hf_home"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", FRESH_PROCESS_SCRIPT, str(folder), str(tmp_path / "inputs.pt")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])

    modules = report["modules"]
    for name in CODE_FILES:
        module = name.removesuffix(".py")
        assert module in modules, f"the fresh process did not import {module} as remote code: {sorted(modules)}"
        assert modules[module].startswith(str(hf_home)), modules[module]
        assert os.path.dirname(modules[module]) == os.path.dirname(modules["modeling_mosaic_bert"])
    for function, module in report["kernels"].items():
        assert module is not None and module.startswith("transformers_modules."), (function, module)
    torch.testing.assert_close(torch.load(tmp_path / "fresh_logits.pt"), expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------- several copies

def copy_kernels(folder, package: str, edit: dict | None = None):
    """The kernel files and triton_utils.py as the package `package` under folder (as transformers lays remote code
    out), with edit = {file: (old, new)} applied."""
    target = folder / package
    target.mkdir()
    (target / "__init__.py").write_text("")
    for name in ("triton_utils.py", *KERNEL_FILES):
        shutil.copy(os.path.join(REPO_ROOT, name), target / name)
    for name, (old, new) in (edit or {}).items():
        text = (target / name).read_text()
        assert text.count(old) == 1, f"{old!r} is not once in {name}"
        (target / name).write_text(text.replace(old, new))
    return target


# A changed GeGLU kernel: gelu(g) * v * 3 (stands for any older or newer version of the code)
TRIPLED_GEGLU = {"geglu_triton.py": ("y = 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476)) * v",
                                     "y = 1.5 * g * (1.0 + tl.erf(g * 0.7071067811865476)) * v")}


@pytest.fixture
def importable(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [n for n in sys.modules if n.startswith(("copy_a", "copy_b", "copy_c"))]:
        del sys.modules[name]


def test_a_changed_copy_of_a_kernel_file_registers_ops_of_its_own(importable):
    """Two packages in one process (two model folders as remote code): files that differ get distinct op namespaces
    and ops, files identical to the root package's share the root's."""
    import geglu_triton
    import layernorm_triton

    copy_kernels(importable, "copy_a")
    copy_kernels(importable, "copy_b", TRIPLED_GEGLU)
    a = importlib.import_module("copy_a.geglu_triton")
    b = importlib.import_module("copy_b.geglu_triton")
    assert a.OP_NAMESPACE == geglu_triton.OP_NAMESPACE and a.fwd_op is geglu_triton.fwd_op
    assert b.OP_NAMESPACE != a.OP_NAMESPACE and b.fwd_op is not a.fwd_op and b.bwd_op is not a.bwd_op
    assert b.OP_NAMESPACE in b.fwd_op._qualified_op_name and b.OP_NAMESPACE in b.bwd_op._qualified_op_name
    # The unchanged files of the changed package still share the root's ops.
    assert importlib.import_module("copy_b.layernorm_triton").fwd_op is layernorm_triton.fwd_op


def test_a_module_run_again_with_changed_code_registers_new_ops(importable):
    """transformers runs a remote-code module again, under the same name, when a folder of the same name brings other
    files: the new code must not find the old code's ops under its own name."""
    package = copy_kernels(importable, "copy_c")
    first = importlib.import_module("copy_c.geglu_triton")
    first_namespace, first_op = first.OP_NAMESPACE, first.fwd_op
    text = (package / "geglu_triton.py").read_text()
    old, new = TRIPLED_GEGLU["geglu_triton.py"]
    (package / "geglu_triton.py").write_text(text.replace(old, new))
    again = importlib.reload(first)
    assert again.OP_NAMESPACE != first_namespace and again.fwd_op is not first_op


@pytest.mark.interpreter
def test_two_copies_in_one_process_each_run_their_own_kernels(importable):
    """The package's copy and a changed copy, both imported: each geglu runs its own kernel."""
    import geglu_triton

    copy_kernels(importable, "copy_b", TRIPLED_GEGLU)
    changed = importlib.import_module("copy_b.geglu_triton")
    x = torch.randn(5, 64, dtype=torch.float32, device=KERNEL_DEVICE)
    gate, value = x.cpu().double().chunk(2, dim=-1)
    expected = F.gelu(gate) * value
    for module, scale in ((geglu_triton, 1.0), (changed, 3.0), (geglu_triton, 1.0)):
        torch.testing.assert_close(module.geglu(x).cpu().double(), scale * expected, rtol=1e-5, atol=1e-5)
