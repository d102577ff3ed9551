"""FLAP and LLM-Pruner baselines: hand-computed scores, exact targets, compensation, reload."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from adaptprune.allocation import LayerBudget
from adaptprune.arch import ATTENTION, MLP, Coupling, get_adapter
from adaptprune.baselines.flap import attention_scores, emptied_attention, flap_prune, mlp_scores, wifv
from adaptprune.baselines.llm_pruner import (
    CALIB_SAMPLES,
    CALIB_TOKENS,
    LORA_EPOCHS,
    default_skips,
    llm_pruner_calibration,
    llm_pruner_lora_config,
    llm_pruner_prune,
    llm_pruner_scores,
    pruned_layers,
    salience,
    uniform_removal,
    unit_scores,
)
from adaptprune.checkpoint import save_checkpoint
from adaptprune.pruning.surgery import count_non_embedding_parameters, count_parameters

from .conftest import tiny_llama


def _sequences(n: int = 8, length: int = 16, seed: int = 7) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randint(0, 128, (n, length))


def _target(model, fraction: float = 0.3) -> int:
    return count_parameters(model) - int(fraction * count_non_embedding_parameters(model))


def _largest_unit(model) -> int:
    adapter = get_adapter(model)
    return max(
        adapter.params_per_unit(model, i, k)
        for i in range(len(adapter.decoder_layers(model)))
        for k in (ATTENTION, MLP)
    )


# ---- FLAP: pure math ------------------------------------------------------------------------
def test_wifv_is_variance_times_column_energy():
    weight = torch.tensor([[1.0, 2.0, 0.0], [3.0, -1.0, 2.0]])
    var = torch.tensor([0.5, 2.0, 0.25])
    # column energies 1+9=10, 4+1=5, 0+4=4
    assert torch.equal(wifv(weight, var), torch.tensor([5.0, 10.0, 1.0], dtype=torch.float64))


def test_flap_standardises_squared_channels_then_averages_per_group():
    weight = torch.tensor([[1.0, 0.0, 1.0, 2.0], [0.0, 1.0, 1.0, 0.0]])  # column energies 1, 1, 2, 4
    var = torch.tensor([1.0, 2.0, 1.0, 0.5])  # WIFV 1, 2, 2, 2 -> squared 1, 4, 4, 4
    # mean 3.25, unbiased std sqrt((2.25² + 3·0.75²)/3) = 1.5 -> z = -1.5, 0.5, 0.5, 0.5
    scores = attention_scores(weight, var, torch.tensor([0, 0, 1, 1]), groups=2)
    assert torch.allclose(scores, torch.tensor([-0.5, 0.5], dtype=torch.float64), atol=1e-12, rtol=0)


def test_flap_mlp_scores_are_zscored_wifv():
    weight = torch.tensor([[1.0, 2.0, 0.0], [3.0, -1.0, 2.0]])
    var = torch.tensor([0.5, 2.0, 0.25])  # WIFV 5, 10, 1
    mean = 16 / 3
    std = math.sqrt(((5 - mean) ** 2 + (10 - mean) ** 2 + (1 - mean) ** 2) / 2)
    expected = torch.tensor([(5 - mean) / std, (10 - mean) / std, (1 - mean) / std], dtype=torch.float64)
    assert torch.allclose(mlp_scores(weight, var), expected, atol=1e-12, rtol=0)


def test_flap_wifv_matches_activations_captured_by_hand():
    model, seqs = tiny_llama(layers=2), _sequences()
    captured = []
    down = model.model.layers[1].mlp.down_proj
    handle = down.register_forward_pre_hook(
        lambda _m, args: captured.append(args[0].detach().reshape(-1, args[0].shape[-1]))
    )
    with torch.no_grad():
        model(input_ids=seqs)
    handle.remove()
    x = torch.cat(captured).double()  # (tokens, C)
    var = x.var(dim=0, unbiased=False)
    by_hand = var * down.weight.detach().double().square().sum(0)
    from adaptprune.calibration.activations import calibrate

    calib = calibrate(model, seqs, progress=False)
    assert torch.allclose(wifv(down.weight, calib.layers[1].mlp.var), by_hand, rtol=1e-9, atol=0)


# ---- FLAP: end to end ------------------------------------------------------------------------
def _output_inputs(model) -> dict[tuple[int, str], torch.Tensor]:
    """Inputs of every layer's o/down projection on the calibration text, (tokens, C) float64."""
    adapter = get_adapter(model)
    seen: dict[tuple[int, str], list[torch.Tensor]] = {}
    handles = []
    for i, layer in enumerate(adapter.decoder_layers(model)):
        for path in (adapter.attention_output, adapter.mlp_output):
            store = seen.setdefault((i, path), [])
            handles.append(
                layer.get_submodule(path).register_forward_pre_hook(
                    lambda _m, args, store=store: store.append(args[0].detach().reshape(-1, args[0].shape[-1]).double())
                )
            )
    with torch.no_grad():
        model(input_ids=_sequences())
    for h in handles:
        h.remove()
    return {k: torch.cat(v) for k, v in seen.items()}


def test_flap_bias_compensation_keeps_every_pruned_projections_mean(llama_model):
    dense = tiny_llama(
        num_heads=llama_model.config.num_attention_heads, num_kv_heads=llama_model.config.num_key_value_heads
    )
    inputs = _output_inputs(dense)
    records = flap_prune(llama_model, _sequences(), _target(llama_model), progress=False)
    assert records
    adapter = get_adapter(llama_model)
    for rec in records:
        path = adapter.attention_output if rec.kind == ATTENTION else adapter.mlp_output
        kept_columns = next(s.positions for s in rec.slices if s.path == path and s.dim == 1)
        x = inputs[(rec.layer, path)]
        dense_linear = adapter.decoder_layers(dense)[rec.layer].get_submodule(path)
        pruned = adapter.decoder_layers(llama_model)[rec.layer].get_submodule(path)
        dense_mean = (x @ dense_linear.weight.double().T).mean(0)
        pruned_mean = (x[:, kept_columns] @ pruned.weight.double().T).mean(0) + pruned.bias.double()
        assert (pruned_mean - dense_mean).norm() <= 1e-5 * dense_mean.norm()


def test_flap_lands_on_the_target_within_one_unit(llama_model):
    target = _target(llama_model)
    flap_prune(llama_model, _sequences(), target, progress=False)
    assert target - _largest_unit(llama_model) < count_parameters(llama_model) <= target


def test_flap_without_a_floor_empties_attention_and_keeps_its_mean_output():
    """FLAP's own rule (no group floor) at 70% removal empties layers 1 and 2 of this model: their
    q/k/v/o become zero-size, the forward runs, and o now outputs its bias, the dense mean output."""
    dense, model = tiny_llama(), tiny_llama()
    inputs = _output_inputs(dense)
    target = _target(model, 0.7)
    records = flap_prune(model, _sequences(), target, min_groups=0, progress=False)
    adapter = get_adapter(model)
    emptied = [i for i in range(3) if adapter.layer_shape(model, i).groups == 0]
    assert emptied == [1, 2]
    assert target - _largest_unit(dense) < count_parameters(model) <= target
    assert sum(r.removed for r in records if r.kind == ATTENTION and r.layer in emptied) == 4  # 2 groups each
    for i in emptied:
        o_dense = adapter.decoder_layers(dense)[i].get_submodule(adapter.attention_output)
        o = adapter.decoder_layers(model)[i].get_submodule(adapter.attention_output)
        assert o.weight.shape == (64, 0)
        dense_mean = (inputs[(i, adapter.attention_output)] @ o_dense.weight.double().T).mean(0)
        torch.testing.assert_close(o.bias.double(), dense_mean, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=_sequences()).logits).all()
    floored = tiny_llama()
    flap_prune(floored, _sequences(), target, progress=False)  # default: every layer keeps a group
    assert all(get_adapter(floored).layer_shape(floored, i).groups >= 1 for i in range(3))
    assert emptied_attention({0: {ATTENTION: []}, 1: {ATTENTION: [0]}, 2: {MLP: []}}) == [0]


def test_llm_pruner_calibration_draws_seeded_random_windows():
    stream = torch.arange(10_000)
    samples = llm_pruner_calibration(stream, seed=42)
    assert samples.shape == (CALIB_SAMPLES, CALIB_TOKENS) == (10, 64)
    assert torch.equal(samples, samples[:, :1] + torch.arange(64))  # each a contiguous window
    assert not torch.equal(samples.flatten(), stream[:640])  # not the first 640 tokens
    assert torch.equal(samples, llm_pruner_calibration(stream, seed=42))
    assert not torch.equal(samples, llm_pruner_calibration(stream, seed=0))


@pytest.mark.parametrize("prune", [flap_prune, llm_pruner_prune], ids=["flap", "llm_pruner"])
def test_baseline_checkpoint_reloads_with_identical_logits(tmp_path, prune):
    model, seqs = tiny_llama(), _sequences()
    prune(model, seqs, _target(model), progress=False)
    save_checkpoint(model, tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=seqs).logits, reloaded(input_ids=seqs).logits)


# ---- LLM-Pruner: pure math -------------------------------------------------------------------
W = torch.tensor([[1.0, -2.0, 3.0], [0.5, 1.0, -1.0]])
G = torch.tensor([[2.0, 1.0, 1.0], [-2.0, 4.0, 1.0]])  # W ⊙ G = [[2, -2, 3], [-1, 4, -1]]


def test_taylor_scores_by_hand_rows_and_columns():
    sal = salience(W, G)
    rows = Coupling("x", 0, torch.tensor([0, 1]))
    cols = Coupling("x", 1, torch.tensor([0, 0, 1]))
    as_f64 = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    # rows: |2-2+3| = 3, |-1+4-1| = 2 ; Σ|.| = 7, 6
    assert torch.equal(unit_scores(sal, rows, 2, vectorwise=True), as_f64(3, 2))
    assert torch.equal(unit_scores(sal, rows, 2, vectorwise=False), as_f64(7, 6))
    # columns 1, 2, 2 (signed sums) -> units |1| + |2| = 3 and |2| = 2 ; Σ|.| per column 3, 6, 4 -> 9, 4
    assert torch.equal(unit_scores(sal, cols, 2, vectorwise=True), as_f64(3, 2))
    assert torch.equal(unit_scores(sal, cols, 2, vectorwise=False), as_f64(9, 4))


def test_second_order_salience_subtracts_half_the_fisher_curvature():
    fisher = torch.full_like(W, 2.0)  # w·g − ½·w²·2 = w·g − w²
    expected = torch.tensor([[1.0, -6.0, -6.0], [-1.25, 3.0, -2.0]], dtype=torch.float64)
    assert torch.equal(salience(W, G, fisher), expected)
    rows = Coupling("x", 0, torch.tensor([0, 1]))
    assert torch.equal(
        unit_scores(salience(W, G, fisher), rows, 2, False), torch.tensor([13.0, 6.25], dtype=torch.float64)
    )


def test_default_layer_range_scales_the_published_4_to_30_of_32():
    assert default_skips(32) == (4, 2)
    assert pruned_layers(32) == range(4, 30)
    assert pruned_layers(30) == range(4, 28)
    assert pruned_layers(3) == range(0, 3)
    with pytest.raises(ValueError, match="no layer"):
        pruned_layers(4, skip_first=2, skip_last=2)


def test_uniform_removal_is_exact_to_one_neuron_and_shares_the_ratio():
    budgets = [LayerBudget(groups=4, neurons=100, params_per_group=50, params_per_neuron=3)] * 3
    for remove in (0, 1, 299, 450, 601, 1000):
        counts = uniform_removal(budgets, remove)
        removed = sum(g * 50 + n * 3 for g, n in counts)
        assert remove <= removed < remove + 3
        assert len({g for g, _ in counts}) == 1 and max(n for _, n in counts) - min(n for _, n in counts) <= 1
    # 150 per layer: ⌊4r⌋·50 + 300r = 150 at r = 1/3 -> one group, 100/3 neurons' worth each
    assert uniform_removal(budgets, 450) == [(1, 34), (1, 33), (1, 33)]
    # 333.3 per layer falls inside the jump at r = 3/4 (325 -> 375): the nearer side keeps ⌊4r⌋ = 2
    assert uniform_removal(budgets, 1000) == [(2, 78), (2, 78), (2, 78)]
    with pytest.raises(ValueError, match="at most"):
        uniform_removal(budgets, 3 * (3 * 50 + 99 * 3) + 1)


def test_param_first_name_is_rejected_as_ambiguous():
    with pytest.raises(ValueError, match="ambiguous"):
        llm_pruner_prune(tiny_llama(), _sequences(), 1, importance="param_first")


# ---- LLM-Pruner: on a model -------------------------------------------------------------------
def _coupled_by_hand(layer, kind: str, n_rep: int, head_dim: int) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
    """(weight, dim, unit id per position) of one layer's coupled matrices, built without the adapter."""
    if kind == MLP:
        ids = torch.arange(layer.mlp.down_proj.in_features)
        return [
            (layer.mlp.gate_proj.weight, 0, ids),
            (layer.mlp.up_proj.weight, 0, ids),
            (layer.mlp.down_proj.weight, 1, ids),
        ]
    groups = layer.self_attn.k_proj.out_features // head_dim
    kv = torch.arange(groups).repeat_interleave(head_dim)
    q = torch.arange(groups).repeat_interleave(n_rep * head_dim)
    a = layer.self_attn
    return [(a.q_proj.weight, 0, q), (a.k_proj.weight, 0, kv), (a.v_proj.weight, 0, kv), (a.o_proj.weight, 1, q)]


@pytest.mark.parametrize("importance", ["element_first", "vectorwise", "element_second"])
def test_taylor_scores_equal_autograd_by_hand(importance):
    model, seqs = tiny_llama(num_heads=4, num_kv_heads=2, layers=2), _sequences(n=4, length=8)
    layer = model.model.layers[1]
    scores = llm_pruner_scores(model, seqs, [1], importance, progress=False)[1]
    for kind in (ATTENTION, MLP):
        coupled = _coupled_by_hand(layer, kind, n_rep=2, head_dim=16)
        weights = [w for w, _, _ in coupled]
        if importance == "element_second":  # per-sample gradients: g = mean g_s, F = mean g_s²
            per_sample = [torch.autograd.grad(model(input_ids=s[None], labels=s[None]).loss, weights) for s in seqs]
            grads = [torch.stack(gs).mean(0) for gs in zip(*per_sample, strict=True)]
            fisher = [torch.stack(gs).square().mean(0) for gs in zip(*per_sample, strict=True)]
        else:
            grads = torch.autograd.grad(model(input_ids=seqs, labels=seqs).loss, weights)
            fisher = [torch.zeros_like(w) for w in weights]
        units = int(coupled[-1][2].max()) + 1
        expected = torch.zeros(units, dtype=torch.float64)
        for (w, dim, ids), g, f in zip(coupled, grads, fisher, strict=True):
            e = (w.detach() * g - 0.5 * w.detach().square() * f).double()
            per_vector = e.sum(1 - dim).abs() if importance == "vectorwise" else e.abs().sum(1 - dim)
            expected.index_add_(0, ids, per_vector)
        assert torch.allclose(scores[kind], expected, rtol=1e-5, atol=1e-12), kind
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


def test_llm_pruner_leaves_skipped_layers_untouched():
    model = tiny_llama(layers=5)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    records = llm_pruner_prune(model, _sequences(), _target(model, 0.2), skip_first=1, skip_last=2, progress=False)
    assert {r.layer for r in records} == {1, 2}
    for name, tensor in model.state_dict().items():
        if not any(f"layers.{i}." in name for i in (1, 2)):
            assert torch.equal(tensor, dense[name]), name
    # one ratio for every pruned layer: the same groups, neurons within one of each other
    groups = {len(r.kept) for r in records if r.kind == ATTENTION}
    neurons = [len(r.kept) for r in records if r.kind == MLP]
    assert len(groups) <= 1 and max(neurons) - min(neurons) <= 1


@pytest.mark.parametrize("importance", ["element_first", "element_second"])
def test_llm_pruner_lands_on_the_target_within_one_neuron(llama_model, importance):
    target = _target(llama_model)
    llm_pruner_prune(llama_model, _sequences(), target, importance=importance, progress=False)
    per_neuron = get_adapter(llama_model).params_per_unit(llama_model, 0, MLP)
    assert target - per_neuron < count_parameters(llama_model) <= target


def test_lora_recipe_builds_the_published_trainer_config():
    from trainers.lora import attach_adapter

    cfg = llm_pruner_lora_config()
    assert (cfg.trainer, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == ("lora", 8, 16.0, 0.05)
    assert (cfg.lr, LORA_EPOCHS, cfg.batch_size * cfg.grad_accum_steps) == (1e-4, 2, 64)
    assert (cfg.optim.beta1, cfg.optim.beta2, cfg.optim.weight_decay) == (0.9, 0.999, 0.0)
    wrapped = attach_adapter(tiny_llama(layers=1), cfg.lora)  # every projection gets an adapter
    adapted = {
        name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in wrapped.named_parameters() if "lora_A" in name
    }
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
