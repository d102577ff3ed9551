"""Each metric gives a known ranking on hand-built weights and statistics."""

from __future__ import annotations

import math

import pytest
import torch

from adaptprune.arch import ATTENTION, MLP, UNIT_KINDS, get_adapter
from adaptprune.calibration.activations import CalibrationResult, ChannelStats, LayerStats, calibrate
from adaptprune.importance import METRICS, Importance, get_metric, pool_columns
from adaptprune.importance.taylor import taylor_scores

from .conftest import tiny_llama


def _stats(mean, std) -> ChannelStats:
    mean = torch.tensor(mean, dtype=torch.float64)
    var = torch.tensor(std, dtype=torch.float64).square()
    return ChannelStats(count=100, mean=mean, var=var, sq_mean=var + mean.square())


def _ranking(scores: torch.Tensor) -> list[int]:
    """Unit ids from least to most important."""
    return scores.argsort().tolist()


# Column norms 1, 2, 3, 4 (each column is a scaled unit vector).
W = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0]))


def test_registry_names_and_errors():
    assert set(METRICS) == {"magnitude", "wanda", "stade", "cvr", "taylor", "taylor_param_first"}
    assert all(issubclass(cls, Importance) and cls.name == name for name, cls in METRICS.items())
    assert get_metric("taylor").needs_grads and not get_metric("stade").needs_grads
    assert get_metric("taylor_param_first").needs_elementwise_grads and not get_metric("taylor").needs_elementwise_grads
    assert get_metric("cvr", alpha=0.25).alpha == 0.25
    with pytest.raises(ValueError, match="did you mean 'stade'"):
        get_metric("stad")
    with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\]"):
        get_metric("cvr", alpha=1.5)


def test_column_metrics_known_rankings():
    stats = _stats(mean=[0.0, 5.0, 0.0, 0.0], std=[4.0, 1.0, 0.5, 0.1])
    # magnitude: 1, 2, 3, 4
    assert _ranking(get_metric("magnitude").column_scores(W, stats)) == [0, 1, 2, 3]
    # wanda: ‖W_k‖·sqrt(μ²+σ²) = 4, 2·sqrt(26)≈10.2, 1.5, 0.4
    wanda = get_metric("wanda").column_scores(W, stats)
    torch.testing.assert_close(wanda, torch.tensor([4.0, 2 * math.sqrt(26), 1.5, 0.4], dtype=torch.float64))
    assert _ranking(wanda) == [3, 2, 0, 1]
    # stade: ‖W_k‖·σ = 4, 2, 1.5, 0.4
    stade = get_metric("stade").column_scores(W, stats)
    torch.testing.assert_close(stade, torch.tensor([4.0, 2.0, 1.5, 0.4], dtype=torch.float64))
    assert _ranking(stade) == [3, 2, 1, 0]


def test_stade_and_wanda_agree_on_zero_mean_and_disagree_on_a_biased_channel():
    torch.manual_seed(0)
    w = torch.randn(6, 8)
    std = torch.rand(8).double() + 0.1
    zero_mean = ChannelStats(100, torch.zeros(8, dtype=torch.float64), std.square(), std.square())
    wanda, stade = get_metric("wanda"), get_metric("stade")
    assert _ranking(wanda.column_scores(w, zero_mean)) == _ranking(stade.column_scores(w, zero_mean))
    # channel 0: large constant mean, tiny variance -> Wanda keeps it, STADE drops it first
    mean = torch.zeros(8, dtype=torch.float64)
    mean[0] = 50.0
    var = std.square().clone()
    var[0] = 1e-6
    biased = ChannelStats(100, mean, var, var + mean.square())
    assert _ranking(wanda.column_scores(w, biased))[-1] == 0
    assert _ranking(stade.column_scores(w, biased))[0] == 0


def test_cvr_interpolates_between_magnitude_and_stade():
    stats = _stats(mean=[0.0] * 4, std=[8.0, 1.0, 1.0, 0.25])  # median σ = 1
    cvr = lambda a: get_metric("cvr", alpha=a).column_scores(W, stats)  # noqa: E731
    torch.testing.assert_close(cvr(0.0), get_metric("magnitude").column_scores(W, stats))
    torch.testing.assert_close(
        cvr(1.0), get_metric("stade").column_scores(W, stats)
    )  # median 1: equal, not just same order
    # default α = 0.5: ‖W‖·sqrt(σ/median) = 1·√8, 2, 3, 4·0.5
    torch.testing.assert_close(cvr(0.5), torch.tensor([math.sqrt(8), 2.0, 3.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(get_metric("cvr").column_scores(W, stats), cvr(0.5))
    assert _ranking(cvr(1.0)) == [3, 1, 2, 0]  # the outlier channel 0 dominates STADE...
    assert _ranking(cvr(0.5))[-1] == 2  # ...but not the calibrated score


def test_pool_columns_is_root_of_summed_squares():
    scores = torch.tensor([3.0, 4.0, 1.0, 0.0, 2.0])
    pooled = pool_columns(scores, torch.tensor([0, 0, 1, 1, 2]), 3)
    assert pooled.tolist() == [5.0, 1.0, 2.0]


def _calib_for(model, adapter, mean, std) -> CalibrationResult:
    layers = []
    for i in range(len(adapter.decoder_layers(model))):
        by_kind = {}
        for kind in UNIT_KINDS:
            c = adapter.output_coupling(model, i, kind).unit_ids.numel()
            by_kind[kind] = _stats(mean=[mean] * c, std=[std] * c)
        layers.append(LayerStats(mlp=by_kind[MLP], attention=by_kind[ATTENTION], influence=0.0))
    return CalibrationResult(layers=layers)


def test_unit_scores_on_a_model_group_the_heads_columns():
    model = tiny_llama(num_heads=6, num_kv_heads=2)  # 2 groups of 3 heads × 16 columns of o
    adapter = get_adapter(model)
    o = adapter.decoder_layers(model)[0].get_submodule(adapter.attention_output)
    with torch.no_grad():
        o.weight.fill_(1.0)  # (96, 96): every column norm is sqrt(96)
        o.weight[:, 48:] = 0.5  # group 1 columns
    calib = _calib_for(model, adapter, mean=0.0, std=2.0)
    stade = get_metric("stade").unit_scores(model, adapter, 0, ATTENTION, calib)
    per_column = math.sqrt(96) * 2.0
    torch.testing.assert_close(
        stade, torch.tensor([per_column * math.sqrt(48), 0.5 * per_column * math.sqrt(48)], dtype=torch.float64)
    )
    mlp = get_metric("wanda").unit_scores(model, adapter, 1, MLP, calib)
    down = adapter.decoder_layers(model)[1].get_submodule(adapter.mlp_output).weight
    torch.testing.assert_close(mlp, down.double().norm(dim=0) * 2.0)
    with pytest.raises(ValueError, match="needs calibration"):
        get_metric("stade").unit_scores(model, adapter, 0, MLP, None)


def test_magnitude_coupled_sums_every_coupled_weight():
    model = tiny_llama(layers=1)
    adapter = get_adapter(model)
    mlp = adapter.decoder_layers(model)[0].mlp
    with torch.no_grad():
        for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            lin.weight.fill_(0.1)
        mlp.gate_proj.weight[5] = 1.0  # neuron 5's gate row is large, its down column is not
    plain = get_metric("magnitude").unit_scores(model, adapter, 0, MLP, None)
    coupled = get_metric("magnitude", coupled=True).unit_scores(model, adapter, 0, MLP, None)
    assert torch.allclose(plain, plain[0])  # down columns are all equal
    assert _ranking(coupled)[-1] == 5
    hidden = mlp.down_proj.out_features
    expected = math.sqrt(hidden * (1.0 + 0.01 + 0.01))
    assert coupled[5].item() == pytest.approx(expected)


def test_taylor_is_abs_of_the_hand_computed_first_order_term():
    # one MLP neuron per row/column: units' terms are Σ w·g over gate row, up row, down column
    w_gate, g_gate = torch.tensor([[1.0, -2.0], [0.5, 0.0]]), torch.tensor([[0.1, 0.1], [2.0, 3.0]])
    w_down, g_down = torch.tensor([[3.0, 1.0]]), torch.tensor([[-1.0, 0.5]])
    t = (w_gate * g_gate).sum(1) + (w_down * g_down).sum(0)  # unit 0: -0.1-3 = -3.1, unit 1: 1+0.5 = 1.5
    torch.testing.assert_close(taylor_scores(t), torch.tensor([3.1, 1.5], dtype=torch.float64))
    assert _ranking(taylor_scores(t)) == [1, 0]


def test_taylor_metric_reads_calibrated_terms():
    model = tiny_llama(layers=2)
    adapter = get_adapter(model)
    torch.manual_seed(1)
    seqs = torch.randint(0, 128, (2, 8))
    metric = get_metric("taylor")
    with pytest.raises(ValueError, match="taylor_batches"):
        metric.unit_scores(model, adapter, 0, MLP, calibrate(model, seqs, progress=False))
    calib = calibrate(model, seqs, taylor_batches=1, progress=False)
    for kind in UNIT_KINDS:
        scores = metric.unit_scores(model, adapter, 1, kind, calib)
        assert scores.shape == (adapter.count_units(model, 1, kind),)
        torch.testing.assert_close(scores, calib.taylor[1][kind].abs())


def _coupled_abs_terms(layer, n_rep: int, head_dim: int, grads: dict) -> dict[str, torch.Tensor]:
    """Σ |w·g| per neuron and per KV group, slicing the HF projections by hand (no adapter)."""
    e = {name: (w.detach() * grads[name]).abs().double() for name, w in _named_weights(layer).items()}
    neurons = e["gate"].sum(1) + e["up"].sum(1) + e["down"].sum(0)
    q, kv = n_rep * head_dim, head_dim  # rows of q (columns of o) and of k/v per group
    groups = torch.stack(
        [
            e["q"][g * q : (g + 1) * q].sum()
            + e["k"][g * kv : (g + 1) * kv].sum()
            + e["v"][g * kv : (g + 1) * kv].sum()
            + e["o"][:, g * q : (g + 1) * q].sum()
            for g in range(layer.self_attn.k_proj.out_features // head_dim)
        ]
    )
    return {MLP: neurons, ATTENTION: groups}


def _named_weights(layer) -> dict[str, torch.Tensor]:
    a, m = layer.self_attn, layer.mlp
    return {
        "gate": m.gate_proj.weight,
        "up": m.up_proj.weight,
        "down": m.down_proj.weight,
        "q": a.q_proj.weight,
        "k": a.k_proj.weight,
        "v": a.v_proj.weight,
        "o": a.o_proj.weight,
    }


def test_taylor_param_first_is_the_sum_of_abs_w_times_g_by_hand():
    """Σ over each unit's coupled weights of |w·g|, g the gradient of the mean token loss over all
    sequences (accumulated over mini-batches of 4 and 2 before the absolute value)."""
    model = tiny_llama(num_heads=4, num_kv_heads=2, layers=2)
    adapter = get_adapter(model)
    torch.manual_seed(3)
    seqs = torch.randint(0, 128, (6, 8))
    calib = calibrate(model, seqs, batch_size=4, taylor_batches=2, taylor_elementwise=True, progress=False)
    assert calib.taylor_tokens == seqs.numel()
    layer = model.model.layers[1]
    named = _named_weights(layer)
    grads = dict(zip(named, torch.autograd.grad(model(input_ids=seqs, labels=seqs).loss, list(named.values()))))
    expected = _coupled_abs_terms(layer, n_rep=2, head_dim=16, grads=grads)
    metric = get_metric("taylor_param_first")
    for kind in (MLP, ATTENTION):
        scores = metric.unit_scores(model, adapter, 1, kind, calib)
        torch.testing.assert_close(scores, expected[kind], rtol=1e-5, atol=1e-12)
        assert (scores >= get_metric("taylor").unit_scores(model, adapter, 1, kind, calib)).all()  # |Σ| <= Σ|.|
    with pytest.raises(ValueError, match="taylor_elementwise"):
        metric.unit_scores(model, adapter, 1, MLP, calibrate(model, seqs, taylor_batches=1, progress=False))


@pytest.mark.parametrize("name", ["magnitude", "wanda", "stade", "cvr", "taylor", "taylor_param_first"])
def test_every_metric_scores_every_unit_of_a_calibrated_model(name):
    model = tiny_llama(num_heads=4, num_kv_heads=2, layers=2)
    adapter = get_adapter(model)
    metric = get_metric(name)
    torch.manual_seed(2)
    calib = calibrate(
        model,
        torch.randint(0, 128, (2, 8)),
        taylor_batches=1 if metric.needs_grads else 0,
        taylor_elementwise=metric.needs_elementwise_grads,
        progress=False,
    )
    for layer in range(2):
        for kind in UNIT_KINDS:
            scores = metric.unit_scores(model, adapter, layer, kind, calib)
            assert scores.shape == (adapter.count_units(model, layer, kind),)
            assert scores.dtype == torch.float64 and torch.isfinite(scores).all() and (scores >= 0).all()
