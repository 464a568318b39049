"""The model with the libraries users plug an encoder into, the real ones, on CPU: ONNX export through
torch.onnx.export(dynamo=True) run in onnxruntime (and scripts/export_onnx.py), transformers' attention switch
through from_pretrained and sentence-transformers, a PEFT LoRA classifier's adapter round trip, sentence-transformers
training, and Trainer.predict with run_mlm-style metrics.

Every test loads a tiny model the way a user loads a checkpoint: a MosaicBertForMaskedLM saved with save_pretrained
(so, like the checkpoints pretraining writes, with no pooler weights) next to the repository's tokenizer files, read
back through the Auto classes with trust_remote_code=True, offline. Each head is exported once for all its tests.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
import sys

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT, TOKENIZER_FILES

# Large enough initial weights that attention is far from uniform: a wrong ALiBi position or a leaked padded key
# moves the outputs by much more than the tolerances below.
TINY = dict(
    vocab_size=30528, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
    initializer_range=0.2,
)
SENTENCES = [
    "The cat sat on the mat.",
    "Paris is the capital of France, and the largest city of the country by population.",
    "Hi",
    "Water is made of hydrogen and oxygen.",
]


def load_export_script():
    spec = importlib.util.spec_from_file_location("export_onnx", f"{REPO_ROOT}/scripts/export_onnx.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A folder as pretraining leaves it: MLM weights (no pooler), config, code and the tokenizer."""
    from configuration_mosaic_bert import MosaicBertConfig
    from modeling_mosaic_bert import MosaicBertForMaskedLM

    folder = tmp_path_factory.mktemp("tiny-mosaic-bert")
    torch.manual_seed(0)
    MosaicBertForMaskedLM(MosaicBertConfig(**TINY)).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(f"{REPO_ROOT}/{name}", folder)
    return str(folder)


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=True)


def load(checkpoint: str, auto_class: str, **kwargs) -> torch.nn.Module:
    import transformers

    return getattr(transformers, auto_class).from_pretrained(checkpoint, trust_remote_code=True, **kwargs).eval()


# --------------------------------------------------------------------------------------------------------------
# ONNX: torch.onnx.export(dynamo=True) with dynamic batch and seqlen, run in onnxruntime on new padded shapes
# --------------------------------------------------------------------------------------------------------------

# The sequence-classification head is exported by the script's test below (each export takes seconds).
EXPORTED_HEADS = {"AutoModel": ["last_hidden_state", "pooler_output"], "AutoModelForMaskedLM": ["logits"]}


@pytest.fixture(scope="module", params=list(EXPORTED_HEADS))
def exported(request, checkpoint, tokenizer, tmp_path_factory):
    """(eager model, onnxruntime session) for one head, exported from a right-padded 2 x 16 tokenizer batch."""
    import onnxruntime as ort

    model = load(checkpoint, request.param)
    example = dict(tokenizer(SENTENCES[:2], padding="max_length", max_length=16, truncation=True,
                             return_tensors="pt"))
    batch, seqlen = torch.export.Dim("batch"), torch.export.Dim("seqlen")
    path = tmp_path_factory.mktemp("onnx") / f"{request.param}.onnx"
    torch.onnx.export(
        model, (), str(path), kwargs=example, dynamo=True,
        dynamic_shapes={name: {0: batch, 1: seqlen} for name in example},
        input_names=list(example), output_names=EXPORTED_HEADS[request.param],
    )
    return model, ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def pad_in_the_middle(inputs: dict) -> dict:
    """A right-padded batch with each row's padding moved between the first half of its tokens and the rest
    (ALiBi distances then differ between padded and real-token positions)."""
    mask = inputs["attention_mask"]
    order = torch.empty_like(mask)
    for row, length in enumerate(mask.sum(-1).tolist()):
        half, seqlen = length // 2, mask.shape[1]
        order[row] = torch.cat([torch.arange(half), torch.arange(length, seqlen), torch.arange(half, length)])
    return {name: tensor.gather(1, order) for name, tensor in inputs.items()}


@pytest.mark.slow
@pytest.mark.parametrize("padding", ["right", "left", "middle"])
def test_onnx_export_matches_eager_on_new_padded_shapes(exported, tokenizer, padding):
    model, session = exported
    names = [o.name for o in session.get_outputs()]
    # 4 x 21 and 3 x 9, neither the export example's 2 x 16; rows of 3 to 21 real tokens
    for texts, max_length in ((SENTENCES, None), (SENTENCES[1:], 9)):
        inputs = dict(tokenizer(texts, padding=True, truncation=max_length is not None, max_length=max_length,
                                padding_side="left" if padding == "left" else "right", return_tensors="pt"))
        if padding == "middle":
            inputs = pad_in_the_middle(inputs)
        assert (inputs["attention_mask"] == 0).any() and inputs["input_ids"].shape[0] != 2
        with torch.inference_mode():
            eager = model(**inputs).to_tuple()
        onnx = session.run(names, {name: tensor.numpy() for name, tensor in inputs.items()})
        assert len(onnx) == len(eager), names
        for name, got, expected in zip(names, onnx, eager):
            assert got.shape == tuple(expected.shape), name
            np.testing.assert_allclose(got, expected.numpy(), atol=1e-4, rtol=0, err_msg=name)
            # outputs of this size: a wrong ALiBi position or a padded key that leaks in would show
            assert float(expected.abs().max()) > 0.1, name


@pytest.mark.slow
def test_export_script_checks_onnxruntime_against_eager_and_times_both(checkpoint, tmp_path, capsys):
    """The classifier head, right- and left-padded 3 x 11 batches against the export's 2 x 16."""
    script = load_export_script()
    result = script.main([
        "--model", checkpoint, "--task", "sequence-classification", "--output", str(tmp_path / "model.onnx"),
        "--check-batch-size", "3", "--check-seqlen", "11", "--measure-latency", "--latency-shapes", "2x8", "1x5",
        "--latency-repeats", "2",
    ])
    assert (tmp_path / "model.onnx").exists()
    assert set(result["max_abs_diff"]) == {"logits"} and result["max_abs_diff"]["logits"] <= 1e-4
    assert [(row["batch_size"], row["seqlen"]) for row in result["latency"]] == [(2, 8), (1, 5)]
    assert all(row["onnxruntime"] > 0 and row["pytorch_eager"] > 0 for row in result["latency"])
    assert "max |onnxruntime - eager| of logits on 3 x 11" in capsys.readouterr().out


def test_export_script_check_fails_when_onnxruntime_drifts_from_eager(checkpoint, tokenizer):
    """A stand-in session returns eager's logits plus 2e-4 at one padded position: the check must refuse it."""
    script = load_export_script()
    model = load(checkpoint, "AutoModelForTokenClassification", num_labels=3)

    class Named:
        def __init__(self, name):
            self.name = name

    class DriftingSession:
        def get_inputs(self):
            return [Named(name) for name in script.INPUT_NAMES]

        def get_outputs(self):
            return [Named("logits")]

        def run(self, names, feed):
            with torch.inference_mode():
                logits = model(**{name: torch.from_numpy(array) for name, array in feed.items()}).logits.numpy()
            logits[-1, -1, 0] += 2e-4
            return [logits]

    options = script.ExportOptions(model=checkpoint, output="unused.onnx", check_batch_size=3, check_seqlen=7)
    with pytest.raises(ValueError, match="more than 0.0001"):
        script.check_export(model, DriftingSession(), tokenizer, options)
    assert script.check_export(model, DriftingSession(), tokenizer, dataclasses.replace(options, atol=3e-4))


def test_export_script_latency_is_the_median_of_interleaved_timed_calls_after_warmup():
    script = load_export_script()
    # rounds of (a, b): a takes 3, 1, 2 s, b takes 10, 30, 20 s
    ticks = iter([0.0, 3.0, 3.0, 13.0, 20.0, 21.0, 21.0, 51.0, 60.0, 62.0, 62.0, 82.0])
    calls = []
    medians = script.median_latencies({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3,
                                      warmup=2, clock=lambda: next(ticks))
    assert medians == {"a": 2.0, "b": 20.0}
    assert calls == ["a", "b"] * 5


# --------------------------------------------------------------------------------------------------------------
# transformers' attention switch, through from_pretrained and sentence-transformers
# --------------------------------------------------------------------------------------------------------------


def test_attn_implementation_sdpa_is_accepted_by_from_pretrained_and_set_attn_implementation(checkpoint):
    model = load(checkpoint, "AutoModel", attn_implementation="sdpa")
    assert model.config._attn_implementation == "sdpa"
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    model.set_attn_implementation("sdpa")
    assert model.config._attn_implementation == "sdpa"


def test_sentence_transformers_sdpa_embeddings_equal_eager_ones(checkpoint):
    from sentence_transformers import SentenceTransformer

    embeddings = {}
    for implementation in ("eager", "sdpa"):
        encoder = SentenceTransformer(checkpoint, device="cpu", trust_remote_code=True,
                                      model_kwargs={"attn_implementation": implementation})
        assert encoder.transformers_model.config._attn_implementation == implementation
        embeddings[implementation] = encoder.encode(SENTENCES, batch_size=4, convert_to_tensor=True)
    assert embeddings["sdpa"].shape == (len(SENTENCES), TINY["hidden_size"])
    torch.testing.assert_close(embeddings["sdpa"], embeddings["eager"], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# PEFT: a LoRA classifier's adapter reloads onto a fresh base model with the same logits
# --------------------------------------------------------------------------------------------------------------


def test_peft_lora_classifier_reproduces_its_logits_after_adapter_reload(checkpoint, tokenizer, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    inputs = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    labels = torch.tensor([0, 1, 1, 0])
    torch.manual_seed(1)
    base = load(checkpoint, "AutoModelForSequenceClassification", num_labels=2)
    model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", target_modules=["Wqkv"], r=4, lora_alpha=8))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        trained = model(**inputs).logits
    model.save_pretrained(tmp_path / "adapter")

    torch.manual_seed(2)  # a fresh process would draw other random numbers for anything the files do not hold
    fresh = load(checkpoint, "AutoModelForSequenceClassification", num_labels=2)
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        logits = reloaded(**inputs).logits
    torch.testing.assert_close(logits, trained, atol=0, rtol=0)


# --------------------------------------------------------------------------------------------------------------
# sentence-transformers training; Trainer.predict on the masked-LM head
# --------------------------------------------------------------------------------------------------------------


def test_sentence_transformers_fit_trains_on_a_few_pairs(checkpoint, tmp_path):
    from sentence_transformers import InputExample, SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import CosineSimilarityLoss
    from torch.utils.data import DataLoader

    encoder = SentenceTransformer(checkpoint, device="cpu", trust_remote_code=True)
    pairs = [InputExample(texts=[SENTENCES[i], SENTENCES[j]], label=float(i == j))
             for i in range(len(SENTENCES)) for j in range(len(SENTENCES))]
    before = encoder.encode(SENTENCES, convert_to_tensor=True).clone()
    encoder.fit(train_objectives=[(DataLoader(pairs, batch_size=4), CosineSimilarityLoss(encoder))], epochs=1,
                warmup_steps=0, optimizer_params={"lr": 1e-3}, show_progress_bar=False,
                output_path=str(tmp_path / "fitted"))
    after = encoder.encode(SENTENCES, convert_to_tensor=True)
    assert torch.isfinite(after).all() and not torch.allclose(after, before)
    reloaded = SentenceTransformer(str(tmp_path / "fitted"), device="cpu", trust_remote_code=True)
    torch.testing.assert_close(reloaded.encode(SENTENCES, convert_to_tensor=True), after, atol=1e-6, rtol=1e-5)


def test_trainer_predict_masked_lm_logits_line_up_with_label_ids(checkpoint, tokenizer, tmp_path):
    """Trainer.predict concatenates the batches' logits and label_ids; run_mlm's metric compares
    argmax(logits) with the labels wherever they are not -100, which needs (batch, seqlen, vocab) logits."""
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    model = load(checkpoint, "AutoModelForMaskedLM")
    rows = [{"input_ids": ids} for ids in tokenizer(SENTENCES * 2)["input_ids"]]
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.5, seed=0)

    def compute_metrics(prediction):  # as in transformers' examples/pytorch/language-modeling/run_mlm.py
        labels = prediction.label_ids.reshape(-1)
        predictions = prediction.predictions.reshape(-1)
        labelled = labels != -100
        return {"accuracy": float((predictions[labelled] == labels[labelled]).mean())}

    trainer = Trainer(
        model=model, data_collator=collator, compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=lambda logits, labels: logits.argmax(dim=-1),
        args=TrainingArguments(str(tmp_path), per_device_eval_batch_size=3, report_to=[], use_cpu=True),
    )
    output = trainer.predict(rows)
    assert output.predictions.shape == output.label_ids.shape  # (rows, longest row over the batches)
    assert 0.0 <= output.metrics["test_accuracy"] <= 1.0
    labelled = output.label_ids != -100
    assert labelled.any() and (output.predictions[labelled] >= 0).all()
