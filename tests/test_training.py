"""Training behaviour: HF Trainer, activation (gradient) checkpointing."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from transformers import TrainingArguments

from conftest import make_config, ragged_batch
from recipes.common import activation_checkpointing_active, enable_activation_checkpointing
from reference import Dims


def _m():
    import modeling_mosaic_bert as m

    return m


class _SeparableDataset(torch.utils.data.Dataset):
    """Class 0: tokens from [10, 50); class 1: tokens from [50, 90). Variable lengths, CLS=1 first."""

    def __init__(self, n=256, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for i in range(n):
            y = i % 2
            L = int(torch.randint(3, 12, (1,), generator=g))
            lo = 10 + 40 * y
            ids = torch.cat([torch.tensor([1]), torch.randint(lo, lo + 40, (L - 1,), generator=g)])
            self.items.append((ids, y))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        ids, y = self.items[i]
        return {"input_ids": ids, "labels": y}


def _collate(batch):
    S = max(len(b["input_ids"]) for b in batch)
    ids = torch.zeros(len(batch), S, dtype=torch.long)
    mask = torch.zeros(len(batch), S, dtype=torch.long)
    for i, b in enumerate(batch):
        L = len(b["input_ids"])
        ids[i, :L] = b["input_ids"]
        mask[i, :L] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([b["labels"] for b in batch])}


def test_trainer_loss_falls_on_separable_task(tmp_path):
    from transformers import Trainer

    torch.manual_seed(0)
    d = Dims(vocab_size=100, hidden_size=32, intermediate_size=64, num_labels=2)
    model = _m().MosaicBertForSequenceClassification(make_config(d))
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=16,
        max_steps=50,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        warmup_steps=0,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        dataloader_num_workers=0,
        seed=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_SeparableDataset(), data_collator=_collate)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) >= 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert first > 0.5, losses[:5]
    assert last < 0.5 * first and last < 0.25, f"loss did not fall: first={first:.3f} last={last:.3f}"
    # the trained model separates held-out data
    model.eval()
    batch = _collate([_SeparableDataset(n=64, seed=1)[i] for i in range(64)])
    with torch.no_grad():
        pred = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1)
    assert (pred == batch["labels"]).float().mean() > 0.9


def _grads(model, **inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}, out.loss.detach()


@pytest.mark.parametrize("cls_name", ["MosaicBertForMaskedLM", "MosaicBertForSequenceClassification"])
def test_gradient_checkpointing_gives_same_gradients(cls_name):
    m = _m()
    d = Dims(num_labels=3)
    cfg = make_config(d, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    torch.manual_seed(1)
    model = getattr(m, cls_name)(cfg).double()
    model.train()
    ids, mask, tt = ragged_batch(d, [6, 1, 4], seqlen=6)
    if cls_name == "MosaicBertForMaskedLM":
        labels = ids.masked_fill(mask == 0, -100)
    else:
        labels = torch.tensor([0, 2, 1])
    inputs = dict(input_ids=ids, attention_mask=mask, token_type_ids=tt, labels=labels)

    ref_grads, ref_loss = _grads(model, **inputs)

    assert model.supports_gradient_checkpointing
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the current spelling, not the deprecated alias
        enable_activation_checkpointing(model)
    assert activation_checkpointing_active(model)
    model.train()
    calls = []
    hook = model.bert.encoder.layer[0].mlp.gated_layers.register_forward_hook(lambda *a: calls.append(1))
    try:
        ck_grads, ck_loss = _grads(model, **inputs)
    finally:
        hook.remove()
    assert len(calls) >= 2, "layer 0 was not recomputed during backward: checkpointing is not active"
    torch.testing.assert_close(ck_loss, ref_loss, atol=1e-12, rtol=0)
    assert set(ck_grads) == set(ref_grads)
    assert len(ref_grads) == len(list(model.parameters()))
    for n in ref_grads:
        torch.testing.assert_close(ck_grads[n], ref_grads[n], atol=1e-10, rtol=1e-8, msg=lambda s, n=n: f"{n}: {s}")

    (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
    assert not activation_checkpointing_active(model)
    calls.clear()
    hook = model.bert.encoder.layer[0].mlp.gated_layers.register_forward_hook(lambda *a: calls.append(1))
    try:
        _grads(model, **inputs)
    finally:
        hook.remove()
    assert len(calls) == 1


# transformers >= 5.2x: `activation_checkpointing`; earlier 5.x: `gradient_checkpointing` (now its deprecated alias)
CHECKPOINTING_ARGUMENT = ("activation_checkpointing" if "activation_checkpointing" in
                          {f.name for f in dataclasses.fields(TrainingArguments)} else "gradient_checkpointing")


def test_gradient_checkpointing_with_trainer_runs(tmp_path):
    from transformers import Trainer

    d = Dims(vocab_size=100, num_labels=2)
    model = _m().MosaicBertForSequenceClassification(make_config(d))
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        max_steps=3,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        **{CHECKPOINTING_ARGUMENT: True},
    )
    trainer = Trainer(model=model, args=args, train_dataset=_SeparableDataset(n=32), data_collator=_collate)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        result = trainer.train()
    assert result.global_step == 3
    assert activation_checkpointing_active(model)
    assert torch.isfinite(torch.tensor(result.training_loss))


def test_activation_checkpointing_helper_uses_the_old_spelling_where_only_it_exists():
    """transformers releases before `activation_checkpointing_enable` have only `gradient_checkpointing_enable`."""

    class OldModel:
        def __init__(self):
            self.kwargs = None

        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            self.kwargs = gradient_checkpointing_kwargs

    old = OldModel()
    enable_activation_checkpointing(old)
    assert old.kwargs == {"use_reentrant": False}


def test_masked_lm_training_step_updates_tied_embedding_consistently():
    m = _m()
    d = Dims()
    model = m.MosaicBertForMaskedLM(make_config(d)).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ids, mask, tt = ragged_batch(d, [5, 3])
    labels = ids.masked_fill(mask == 0, -100)
    before = model.bert.embeddings.word_embeddings.weight.detach().clone()
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    opt.step()
    after = model.bert.embeddings.word_embeddings.weight
    assert not torch.equal(before, after.detach())
    assert torch.equal(model.cls.predictions.decoder.weight, after), "decoder and embeddings diverged after a step"
