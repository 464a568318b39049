"""A masked-LM training step on a batch shaped like the last full one runs on a `PackedBatchGuess`: no host read
before the forward is queued. It must give exactly what the checked path gives, fall back to that path when the
batch has padding or more labels than the bound, and raise the checked path's ValueErrors for bad batches."""

import copy

import pytest
import torch

import modeling_mosaic_bert
from configuration_mosaic_bert import MosaicBertConfig
from conftest import collated_mlm_batch
from modeling_mosaic_bert import MosaicBertForMaskedLM

VOCAB = 300


@pytest.fixture
def guess_on_cpu(monkeypatch):
    """Lets the guess run on CPU tensors, where it changes nothing about speed but everything about what is tested."""
    monkeypatch.setattr(modeling_mosaic_bert, "GUESS_DEVICES", ("cuda", "cpu"))


def make_model(device="cpu", dtype=torch.float64):
    config = MosaicBertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=64, hidden_dropout_prob=0.0)
    torch.manual_seed(0)
    return MosaicBertForMaskedLM(config).to(device=device, dtype=dtype).train()


def collated(seed, batch=4, seqlen=16, padded_row=None, device="cpu"):
    return collated_mlm_batch(seed, VOCAB, batch, seqlen, padded_row, device)


def checked(model, batch):
    """The checked path's loss, compact logits and word-embedding gradient (the guess is off for this call)."""
    model.bert.packed_shape = None
    out = model(**batch)
    (grad,) = torch.autograd.grad(out.loss, model.bert.embeddings.word_embeddings.weight)
    return out.loss, out.logits, grad


def count_guesses(monkeypatch, model) -> list:
    seen = []
    confirm = model.bert.confirm_guess

    def spy(guess):
        result = confirm(guess)
        seen.append(result)
        return result

    monkeypatch.setattr(model.bert, "confirm_guess", spy)
    return seen


def test_full_batches_after_a_full_one_run_on_the_guess_and_equal_the_checked_path(guess_on_cpu, monkeypatch):
    model, reference = make_model(), make_model()
    guesses = count_guesses(monkeypatch, model)
    model(**collated(seed=0))  # a checked batch: learns that full (4, 16) batches come
    for seed in (1, 2, 3):
        batch = collated(seed)
        out = model(**batch)
        (grad,) = torch.autograd.grad(out.loss, model.bert.embeddings.word_embeddings.weight)
        loss, logits, ref_grad = checked(reference, batch)
        assert out.logits.shape == ((batch["labels"] != -100).sum().item(), VOCAB)
        torch.testing.assert_close(out.loss, loss, rtol=0, atol=1e-12)
        torch.testing.assert_close(out.logits, logits, rtol=0, atol=1e-12)
        torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-12)
    assert len(guesses) == 3 and None not in guesses


def test_a_padded_batch_after_full_ones_is_computed_on_the_checked_path(guess_on_cpu, monkeypatch):
    model, reference = make_model(), make_model()
    guesses = count_guesses(monkeypatch, model)
    model(**collated(seed=0))
    batch = collated(seed=1, padded_row=2)
    out = model(**batch)
    loss, logits, _ = checked(reference, batch)
    assert guesses == [None], "the guess ran and was refused"
    torch.testing.assert_close(out.loss, loss, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.logits, logits, rtol=0, atol=1e-12)
    assert model.bert.packed_shape is None
    model(**collated(seed=2))  # checked again; the next full batch guesses again
    model(**collated(seed=3))
    assert guesses[-1] is not None and len(guesses) == 2


def test_more_labels_than_the_bound_fall_back_to_the_checked_path(guess_on_cpu, monkeypatch):
    model, reference = make_model(), make_model()
    guesses = count_guesses(monkeypatch, model)
    model(**collated(seed=0, batch=8, seqlen=64))  # ~150 labels: a bound of ~320
    batch = collated(seed=1, batch=8, seqlen=64)
    batch["labels"] = batch["input_ids"].clone()  # 512 labels
    out = model(**batch)
    loss, logits, _ = checked(reference, batch)
    assert guesses == [None]
    assert out.logits.shape == (512, VOCAB)
    torch.testing.assert_close(out.loss, loss, rtol=0, atol=1e-12)


@pytest.mark.parametrize("bad", ["input_id", "token_type", "label", "mask_value"])
def test_bad_values_in_a_guessed_batch_raise_the_checked_paths_error(guess_on_cpu, bad):
    model = make_model()
    model(**collated(seed=0))
    batch = collated(seed=1)
    expected = {"input_id": "outside the vocabulary", "token_type": "token_type_ids holds",
                "label": "labels must lie in", "mask_value": "attention_mask must hold only 0"}[bad]
    if bad == "input_id":
        batch["input_ids"][1, 3] = VOCAB + 5
    elif bad == "token_type":
        batch["token_type_ids"][0, 0] = 7
    elif bad == "label":
        batch["labels"][2, 2] = -3
    else:
        batch["attention_mask"][3, 1] = 2
    with pytest.raises(ValueError, match=expected):
        model(**batch)


def test_the_guess_is_only_taken_where_a_host_read_waits_for_the_device(monkeypatch):
    model = make_model()
    guesses = count_guesses(monkeypatch, model)
    for seed in range(3):
        model(**collated(seed))
    assert guesses == [], "on the CPU (GUESS_DEVICES is CUDA only) every batch is checked first"


@pytest.mark.gpu
def test_full_bf16_batches_on_cuda_take_the_guess_and_agree_with_the_checked_path(monkeypatch):
    """On CUDA in bf16 the step after a full batch runs on the guess (confirmed) and gives the checked path's loss."""
    model = make_model(device="cuda", dtype=torch.float32)
    reference = copy.deepcopy(model)
    guesses = count_guesses(monkeypatch, model)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(**collated(seed=0, device="cuda"))
        batch = collated(seed=1, device="cuda")
        out = model(**batch)
        ref = reference(**batch)
    assert guesses and guesses[-1] is not None
    torch.testing.assert_close(out.loss.float(), ref.loss.float(), rtol=1e-3, atol=1e-3)


def test_an_evaluation_batch_between_training_batches_keeps_the_guess(guess_on_cpu, monkeypatch):
    model = make_model()
    guesses = count_guesses(monkeypatch, model)
    model(**collated(seed=0, batch=16, seqlen=64))
    model.eval()
    evaluation = collated(seed=1, batch=16, seqlen=64)
    evaluation["labels"] = torch.full_like(evaluation["labels"], -100)
    evaluation["labels"][0, 0] = 5  # one label: a bound sized from it would be far too small for training batches
    model(**evaluation)
    model.train()
    model(**collated(seed=2, batch=16, seqlen=64))  # ~300 labels
    assert guesses and guesses[-1] is not None, "an evaluation batch must not change what the guess expects"
