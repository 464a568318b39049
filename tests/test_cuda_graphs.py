"""`config.cuda_graphs`: masked-LM training on packed batches replays the encoder layers as two CUDA graphs. A replayed
step must give what the eager step gives (loss and every gradient), dropout must stay random from replay to replay,
and every situation the graphs cannot hold (padding, a second forward before the backward, a backward through an
older forward, hooks, checkpointing) must run eagerly or raise, never return stale numbers.

The capture itself needs CUDA (`gpu` marker); the choice of route is checked on the CPU.
"""

import copy

import pytest
import torch

import modeling_mosaic_bert
from configuration_mosaic_bert import MosaicBertConfig
from conftest import collated_mlm_batch, rel_err
from modeling_mosaic_bert import MosaicBertForMaskedLM, graphs_unsupported_reason

VOCAB = 512


def make_model(device, **overrides):
    kwargs = dict(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                  hidden_dropout_prob=0.0, cuda_graphs=True)
    kwargs.update(overrides)
    torch.manual_seed(0)
    return MosaicBertForMaskedLM(MosaicBertConfig(**kwargs)).to(device).train()


def packed_batch(seed, device, batch=8, seqlen=128, padded_row=None):
    return collated_mlm_batch(seed, VOCAB, batch, seqlen, padded_row, device)


def graph_state(model):
    return modeling_mosaic_bert._GRAPH_STATES.get(model.bert.encoder)


def loss_and_grads(model, batch):
    with torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def train_until_replaying(model):
    """Three packed steps: the first is checked, the second notes the key, the third captures and replays once."""
    for seed in range(3):
        loss_and_grads(model, packed_batch(seed, "cuda"))
    assert graph_state(model).graphs.generation == 1


def assert_same_step(graphed, eager, batch):
    loss, grads = loss_and_grads(graphed, batch)
    ref_loss, ref_grads = loss_and_grads(eager, batch)
    assert rel_err(loss, ref_loss) < 1e-3, (loss.item(), ref_loss.item())
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert rel_err(grad, ref_grads[name]) < 2e-2, name


def test_cuda_graphs_is_off_by_default_and_saved_with_the_config(tmp_path):
    assert MosaicBertConfig().cuda_graphs is False
    MosaicBertConfig(cuda_graphs=True).save_pretrained(tmp_path)
    assert MosaicBertConfig.from_pretrained(tmp_path).cuda_graphs is True


def test_the_graphs_are_refused_outside_plain_training():
    model = make_model("cpu")
    states = torch.zeros(4, 128, requires_grad=True)
    assert graphs_unsupported_reason(model.bert.encoder, states) == "not on CUDA"
    with torch.no_grad():
        assert graphs_unsupported_reason(model.bert.encoder, states).startswith("not training")
    model.eval()
    assert graphs_unsupported_reason(model.bert.encoder, states).startswith("not training")
    model.train()
    model.gradient_checkpointing_enable()
    assert "checkpointing" in graphs_unsupported_reason(model.bert.encoder, states)
    model.gradient_checkpointing_disable()
    handle = model.bert.encoder.layer[1].mlp.register_forward_pre_hook(lambda module, args: None)
    assert "hooks" in graphs_unsupported_reason(model.bert.encoder, states)
    handle.remove()
    assert graphs_unsupported_reason(model.bert.encoder, states) == "not on CUDA"


def test_on_the_cpu_packed_training_with_cuda_graphs_runs_eagerly(monkeypatch):
    monkeypatch.setattr(modeling_mosaic_bert, "GUESS_DEVICES", ("cuda", "cpu"))
    asked = []
    monkeypatch.setattr(modeling_mosaic_bert, "graphs_unsupported_reason",
                        lambda *args: asked.append(graphs_unsupported_reason(*args)) or asked[-1])
    model, reference = make_model("cpu"), make_model("cpu", cuda_graphs=False)
    for seed in range(3):
        batch = packed_batch(seed, "cpu", batch=2, seqlen=16)
        assert_same_step(model, reference, batch)
    assert asked == ["not on CUDA", "not on CUDA"]  # the two guessed batches were considered, and refused
    assert graph_state(model) is None  # refused before any key is kept


def test_layers_that_are_not_this_packages_own_are_refused():
    model = make_model("cpu")
    states = torch.zeros(4, 128, requires_grad=True)
    layer = model.bert.encoder.layer[0].attention.self

    class Adapter(torch.nn.Module):  # what PEFT puts in place of a Linear: Python state read at every call
        def __init__(self, base):
            super().__init__()
            self.base, self.scale = base, 1.0

        def forward(self, x):
            return self.base(x) * self.scale

    layer.Wqkv = Adapter(layer.Wqkv)
    assert graphs_unsupported_reason(model.bert.encoder, states) == (
        "the layers hold a Adapter, which may read Python state at every call")


gpu = pytest.mark.gpu  # skipped without CUDA (tests/conftest.py)


@gpu
def test_replayed_training_steps_match_eager_steps_loss_and_every_gradient():
    graphed, eager = make_model("cuda"), make_model("cuda", cuda_graphs=False)
    for seed in range(6):
        assert_same_step(graphed, eager, packed_batch(seed, "cuda"))
    state = graph_state(graphed)
    assert state is not None and state.failed is None, state and state.failed
    # batch 1 is checked, 2 the first guess (its key noted), 3 captures and replays, 4-6 replay
    assert state.graphs.generation == 4


@gpu
def test_replays_follow_parameter_updates_and_gradient_accumulation():
    graphed, eager = make_model("cuda"), make_model("cuda", cuda_graphs=False)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True) for m in (graphed, eager)]
    for step in range(5):
        losses = []
        for model, optimizer in zip((graphed, eager), optimizers):
            total = 0.0
            for micro in range(2):  # two micro-batches accumulate into .grad
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = model(**packed_batch(10 * step + micro, "cuda")).loss
                loss.backward()
                total += loss.detach()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(total)
        assert rel_err(losses[0], losses[1]) < 1e-2, (step, losses)
    for (name, p), q in zip(graphed.named_parameters(), eager.parameters()):
        assert rel_err(p, q) < 1e-2, name
    assert graph_state(graphed).graphs.generation == 8  # 10 forwards: checked, key noted, then captured


@gpu
def test_a_second_forward_before_the_backward_runs_eagerly_and_both_gradients_are_right():
    graphed, eager = make_model("cuda"), make_model("cuda", cuda_graphs=False)
    train_until_replaying(graphed)
    generation = graph_state(graphed).graphs.generation
    first, second = packed_batch(7, "cuda"), packed_batch(8, "cuda")
    results = []
    for model in (graphed, eager):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**first).loss + model(**second).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        model.zero_grad(set_to_none=True)
    assert graph_state(graphed).graphs.generation == generation + 1  # the first replayed, the second did not
    assert rel_err(results[0][0], results[1][0]) < 1e-3
    for name, grad in results[0][1].items():
        assert rel_err(grad, results[1][1][name]) < 2e-2, name


@gpu
def test_a_padded_batch_runs_eagerly_and_the_replays_resume_after_it():
    graphed, eager = make_model("cuda"), make_model("cuda", cuda_graphs=False)
    train_until_replaying(graphed)
    generation = graph_state(graphed).graphs.generation
    # guessed and replayed, then found padded: dropped and computed again, eagerly, on the checked path
    assert_same_step(graphed, eager, packed_batch(20, "cuda", padded_row=3))
    for seed in (21, 22, 23):  # checked (learns the batches are full again), then guessed and replayed
        assert_same_step(graphed, eager, packed_batch(seed, "cuda"))
    assert graph_state(graphed).graphs.generation == generation + 3


@gpu
def test_dropout_draws_a_new_mask_on_every_replay():
    model = make_model("cuda", hidden_dropout_prob=0.1)
    batch = packed_batch(0, "cuda")
    losses = [loss_and_grads(model, batch)[0].item() for _ in range(6)]
    assert graph_state(model).graphs.generation == 4
    assert len(set(losses[2:])) == 4, losses  # the replays: four different masks
    with torch.no_grad():
        model.eval()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            clean = model(**batch).loss.item()
    assert all(abs(loss - clean) < 0.5 for loss in losses), (losses, clean)


def replay_kept_for_a_second_backward(model):
    """Warms `model` up to replaying, then runs one replayed step whose backward keeps its graph: returns its loss."""
    train_until_replaying(model)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(**packed_batch(5, "cuda")).loss
    loss.backward(retain_graph=True)
    return loss


@gpu
def test_a_backward_through_an_older_forward_raises_rather_than_using_newer_activations():
    model = make_model("cuda")
    old = replay_kept_for_a_second_backward(model)
    loss_and_grads(model, packed_batch(6, "cuda"))
    with pytest.raises(RuntimeError, match="cuda_graphs=False"):
        old.backward()


@gpu
def test_moved_parameters_are_captured_again_not_read_from_their_old_place():
    graphed, eager = make_model("cuda"), make_model("cuda", cuda_graphs=False)
    train_until_replaying(graphed)
    with torch.no_grad():
        for model in (graphed, eager):
            for p in model.bert.encoder.parameters():
                p.data = p.data * 1.5  # new storage
    for seed in (30, 31, 32, 33):
        assert_same_step(graphed, eager, packed_batch(seed, "cuda"))
    # the first batch on the new storage notes its key, the second captures again: three replays
    assert graph_state(graphed).graphs.generation == 3


@gpu
def test_an_evaluation_frees_the_graphs_and_training_captures_them_again():
    graphed, eager = make_model("cuda"), make_model("cuda", cuda_graphs=False)
    train_until_replaying(graphed)
    assert graph_state(graphed).graphs is not None
    batch = packed_batch(40, "cuda")
    for model in (graphed, eager):
        model.eval()
    assert graph_state(graphed) is None
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        assert rel_err(graphed(**batch).logits, eager(**batch).logits) < 2e-2
    for model in (graphed, eager):
        model.train()
    for seed in (41, 42, 43):  # notes the key, then captures and replays
        assert_same_step(graphed, eager, packed_batch(seed, "cuda"))
    assert graph_state(graphed).graphs.generation == 2
    assert copy.deepcopy(graphed).config.cuda_graphs  # the graphs live beside the model: deepcopy works


@gpu
def test_a_second_backward_of_one_step_raises():
    model = make_model("cuda")
    loss = replay_kept_for_a_second_backward(model)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


@gpu
def test_a_new_dropout_probability_is_captured_again_not_ignored():
    model = make_model("cuda")
    train_until_replaying(model)
    key = graph_state(model).graphs.key
    for module in model.bert.encoder.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.3
        if hasattr(module, "dropout_prob"):
            module.dropout_prob = 0.3
    for seed in (50, 51):  # notes the new key, then captures
        loss_and_grads(model, packed_batch(seed, "cuda"))
    assert graph_state(model).graphs.key != key and graph_state(model).graphs.generation == 1


class FakeGraphs:
    """`LayerGraphs`' interface on the CPU: "replaying" the forward doubles the static input, the backward doubles the
    static output gradient, as graphs of y = 2x would. Lets the autograd side of `ReplayedLayers` run in CI."""

    class Replay:
        def __init__(self, run):
            self.replay = run

    def __init__(self):
        self.static_input = torch.zeros(3)
        self.static_output = torch.zeros(3)
        self.static_grad_output = torch.zeros(3)
        self.static_grads = (torch.zeros(3),)
        self.params, self.generation, self.awaiting_backward = [], 0, None
        self.forward_graph = self.Replay(lambda: self.static_output.copy_(2 * self.static_input))
        self.backward_graph = self.Replay(lambda: self.static_grads[0].copy_(2 * self.static_grad_output))

    busy = modeling_mosaic_bert.LayerGraphs.busy


def test_a_replay_returns_copies_and_allows_one_backward_per_forward():
    graphs = FakeGraphs()
    x = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    y = modeling_mosaic_bert.ReplayedLayers.apply(graphs, x)
    assert graphs.busy()  # its backward is due: another batch must run eagerly
    torch.testing.assert_close(y, 2 * x.detach())
    assert y.data_ptr() != graphs.static_output.data_ptr()
    (y * torch.tensor([1.0, 10.0, 100.0])).sum().backward(retain_graph=True)
    torch.testing.assert_close(x.grad, torch.tensor([2.0, 20.0, 200.0]))
    assert x.grad.data_ptr() != graphs.static_grads[0].data_ptr()  # accumulation must not alias the static buffer
    assert not graphs.busy()
    with pytest.raises(RuntimeError, match="second backward"):
        y.sum().backward()
    older = modeling_mosaic_bert.ReplayedLayers.apply(graphs, x)
    newer = modeling_mosaic_bert.ReplayedLayers.apply(graphs, x.detach() + 1)  # (eager in the model: busy)
    with pytest.raises(RuntimeError, match="older than their last"):
        older.sum().backward()
    del newer
    z = modeling_mosaic_bert.ReplayedLayers.apply(graphs, x)
    w = torch.tensor(2.0, requires_grad=True)  # a weight after the layers: a gradient penalty differentiates twice
    (g,) = torch.autograd.grad((z * w).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.sum().backward()  # refused, rather than second-order terms silently missing
