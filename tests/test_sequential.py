"""The sequential pass (``pruning.sequential``) rebuilds each layer on the inputs the pruned layers before it
give it: exactly what recalibrating after every (layer, kind) would do, on every family, in one pass."""

from __future__ import annotations

import logging

import pytest
import torch

from adaptprune.arch import ATTENTION, MLP, get_adapter
from adaptprune.calibration.activations import ChannelAccumulator, CrossAccumulator, calibrate
from adaptprune.calibration.layerwise import LayerCalls
from adaptprune.checkpoint import to_heterogeneous
from adaptprune.config import PruneConfig
from adaptprune.pruning.compensation import apply_compensated_plan, compensate
from adaptprune.pruning.sequential import sequential_rebuild
from adaptprune.pruning.step import prune_step
from adaptprune.pruning.surgery import count_parameters

from .family_table import FAMILIES, hf_model


def _model(model_type: str):
    return to_heterogeneous(hf_model(model_type)).eval()


RIDGE = 0.1


def _sequences(vocab: int = 128) -> torch.Tensor:
    torch.manual_seed(5)
    return torch.randint(3, vocab, (6, 12))


def _keep_plan(model, removed: dict) -> dict:
    adapter = get_adapter(model)
    return {
        layer: {kind: [u for u in range(adapter.count_units(model, layer, kind)) if u not in ids]}
        for layer, kinds in removed.items()
        for kind, ids in kinds.items()
    }


def _recalibrating_after_every_removal(model, plan: dict, seqs: torch.Tensor) -> None:
    """The slow definition: a full calibration of the model as it now is before each (layer, kind)."""
    for layer in sorted(plan):
        for kind in (ATTENTION, MLP):
            if kind in plan[layer]:
                calib = calibrate(model, seqs, batch_size=4, collect_cov=True, progress=False)
                apply_compensated_plan(model, {layer: {kind: plan[layer][kind]}}, calib, "least_squares", RIDGE)


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_sequential_self_equals_recalibrating_after_every_removal(model_type):
    seqs = _sequences()
    slow, fast = _model(model_type), _model(model_type)
    plan = _keep_plan(slow, FAMILIES[model_type].removed)
    _recalibrating_after_every_removal(slow, plan, seqs)
    sequential_rebuild(fast, plan, seqs, "least_squares", RIDGE, get_adapter(fast), "self", progress=False)
    expected, got = _weights(slow), _weights(fast)
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        assert got[name].shape == tensor.shape, name
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_parallel_differs_from_sequential_when_earlier_layers_lose_units():
    """The point of the pass: with layer 0 pruned, layer 1's rebuild sees other inputs than the parallel one."""
    seqs = _sequences()
    parallel, sequential = _model("llama"), _model("llama")
    plan = _keep_plan(parallel, FAMILIES["llama"].removed)
    calib = calibrate(parallel, seqs, batch_size=4, collect_cov=True, progress=False)
    apply_compensated_plan(parallel, plan, calib, "least_squares", RIDGE)
    sequential_rebuild(sequential, plan, seqs, "least_squares", RIDGE, get_adapter(sequential), progress=False)
    layer0 = "model.layers.0.mlp.down_proj.weight"
    torch.testing.assert_close(sequential.state_dict()[layer0], parallel.state_dict()[layer0], rtol=1e-5, atol=1e-6)
    layer1 = "model.layers.1.mlp.down_proj.weight"
    assert (sequential.state_dict()[layer1] - parallel.state_dict()[layer1]).abs().max() > 1e-4


def test_dense_target_equals_self_when_nothing_upstream_changed():
    """One MLP losing neurons, nothing before it: the inputs before and after the step are the same."""
    seqs = _sequences()
    own, dense = _model("llama"), _model("llama")
    plan = _keep_plan(own, {1: {MLP: list(range(0, 96, 3))}})
    sequential_rebuild(own, plan, seqs, "least_squares", RIDGE, get_adapter(own), "self", progress=False)
    sequential_rebuild(dense, plan, seqs, "least_squares", RIDGE, get_adapter(dense), "dense", progress=False)
    for name, tensor in _weights(own).items():
        torch.testing.assert_close(_weights(dense)[name], tensor, rtol=1e-4, atol=1e-6, msg=name)


def test_dense_target_reproduces_a_layer_whose_old_inputs_are_linear_in_the_kept_new_ones():
    """Δ = (W C_xK − W_K C̃_KK)(C̃_KK + λI)⁻¹ with λ = 0 fits W x + b exactly when x = G x̃_K + c."""
    torch.manual_seed(0)
    n, channels, out = 400, 6, 5
    now = torch.randn(n, channels, dtype=torch.float64)
    kept_channels = torch.tensor([True, False, True, True, False, True])
    g, c = torch.randn(channels, 4, dtype=torch.float64), torch.randn(channels, dtype=torch.float64)
    before = now[:, kept_channels] @ g.T + c  # (n, C): old inputs, a function of the kept new ones
    weight, bias = torch.randn(out, channels, dtype=torch.float64), torch.randn(out, dtype=torch.float64)
    own, cross = ChannelAccumulator(collect_cov=True), CrossAccumulator()
    own.update(now)
    cross.update(before, now)
    comp = compensate(weight, cross.into(own.result()), kept_channels, "least_squares", ridge=0.0)
    rebuilt = (weight[:, kept_channels] + comp.weight_delta) @ now[:, kept_channels].T + (bias + comp.bias_delta)[
        :, None
    ]
    torch.testing.assert_close(rebuilt.T, before @ weight.T + bias, rtol=1e-8, atol=1e-8)


def test_cross_accumulator_is_the_mean_outer_product():
    torch.manual_seed(1)
    a, b = torch.randn(3, 50, 7), torch.randn(3, 50, 7)
    acc = CrossAccumulator()
    acc.update(a[:2], b[:2])
    acc.update(a[2:], b[2:])
    flat_a, flat_b = a.reshape(-1, 7).double(), b.reshape(-1, 7).double()
    torch.testing.assert_close(acc.outer / acc.count, flat_a.T @ flat_b / 150, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(acc.sum / acc.count, flat_a.mean(0))


@pytest.mark.parametrize("model_type", ["llama", "phi3", "opt", "gemma3_text"])
def test_layer_calls_run_the_model_layer_by_layer(model_type):
    """Layers applied one by one to the cached stream give the stream the whole model computes."""
    model, seqs = _model(model_type), _sequences()
    adapter = get_adapter(model)
    calls = LayerCalls.capture(model, seqs, adapter, batch_size=4)
    hidden = calls.first
    for idx, layer in enumerate(adapter.decoder_layers(model)):
        hidden = calls.run(idx, layer, hidden)
    with torch.no_grad():
        reference = [model(input_ids=b, output_hidden_states=True).hidden_states[-1] for b in seqs.split(4)]
    final_norm = model.model.decoder.final_layer_norm if model_type == "opt" else model.model.norm
    for got, want in zip(hidden, reference):
        torch.testing.assert_close(final_norm(got), want, rtol=1e-5, atol=1e-5)
    assert calls.tokens() == seqs.numel()


# every family with the self target; the dense one (a second stream, layer copies) on two layouts
STEPS = [(family, "self") for family in sorted(FAMILIES)] + [("llama", "dense"), ("gemma3_text", "dense")]


@pytest.mark.parametrize("model_type, target", STEPS)
def test_a_sequential_step_keeps_the_parallel_plan_and_lands_on_the_target(model_type, target):
    seqs = _sequences()
    parallel, sequential = _model(model_type), _model(model_type)
    goal = count_parameters(parallel) - 6_000
    base = dict(compensation="least_squares", allocation="adaptive", neuron_multiple=1)
    cfg = PruneConfig(**base, calibration="sequential", rebuild_target=target)
    expected = prune_step(parallel, seqs, goal, PruneConfig(**base, calibration="parallel"), progress=False)
    report = prune_step(sequential, seqs, goal, cfg, progress=False)
    assert report.plan == expected.plan
    assert count_parameters(sequential) == count_parameters(parallel) <= goal
    with torch.no_grad():
        assert torch.isfinite(sequential(input_ids=seqs).logits).all()


def test_sequential_calibration_holds_no_covariance_in_the_first_pass():
    assert PruneConfig(compensation="least_squares", calibration="sequential").needs_cov is False
    assert PruneConfig(compensation="least_squares", calibration="parallel").needs_cov is True
    assert PruneConfig(compensation="none", calibration="sequential").sequential is False


def test_statistics_that_are_not_finite_fall_back_in_one_line_naming_the_layer(caplog):
    model = _model("llama")
    seqs = _sequences()
    calib = calibrate(model, seqs, batch_size=4, collect_cov=True, progress=False)
    stats = calib.layers[1].channels(MLP)
    stats.cov[0, 0] = float("nan")
    plan = _keep_plan(model, {1: {MLP: [0, 1, 2]}})
    with caplog.at_level(logging.WARNING):
        apply_compensated_plan(model, plan, {(1, MLP): stats}, "least_squares", RIDGE)
    assert [r.getMessage() for r in caplog.records] == [
        "layer 1 mlp: calibration statistics are not finite; units removed without compensation"
    ]
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=seqs).logits).all()


@pytest.mark.parametrize("target", ["self", "dense"])
def test_an_accumulating_walk_rebuilds_in_order_at_every_inner_step(target):
    """A target shape's walk (``reach_shape``) with accumulating inner steps reaches the shape exactly with either
    rebuild; later inner steps score the rebuilt weights, so their units may differ from the parallel walk's."""
    from adaptprune.pruning.shape.reach import reach_shape
    from adaptprune.pruning.shape.target import ModelShape

    from .conftest import tiny_llama

    shape = ModelShape(layers=3, hidden=64, groups=1, neurons=32)
    base = dict(allocation="accumulating", inner_step_fraction=0.2, amplitude=0.3, neuron_multiple=8)
    texts = [torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    parallel, sequential = tiny_llama(), tiny_llama()
    expected = reach_shape(
        parallel, list(texts), shape, PruneConfig(**base, calibration="parallel"), get_adapter(parallel), False
    )
    cfg = PruneConfig(**base, calibration="sequential", rebuild_target=target)
    report = reach_shape(sequential, list(texts), shape, cfg, get_adapter(sequential), False)
    assert report.inner_steps == expected.inner_steps == 3
    adapter = get_adapter(sequential)
    sizes = [adapter.layer_shape(sequential, i) for i in range(3)]
    assert sum(s.groups for s in sizes) == 3 and sum(s.neurons for s in sizes) == 96
    assert count_parameters(sequential) == count_parameters(parallel)
    down = "model.layers.2.mlp.down_proj.weight"
    assert not torch.equal(sequential.state_dict()[down], parallel.state_dict()[down])


@pytest.mark.parametrize("target", ["self", "dense"])
def test_least_squares_without_bias_fits_raw_moments_and_writes_no_bias(target):
    """With nowhere to put a constant the best rebuild solves on raw moments: λ = 0 reproduces a projection
    whose old inputs are a linear function (no constant) of the kept new ones, and no bias is created."""
    torch.manual_seed(2)
    n, out = 300, 4
    now = torch.randn(n, 5, dtype=torch.float64) + 0.7  # a mean: centring would matter
    kept_channels = torch.tensor([True, True, False, True, False])
    g = torch.randn(5, 3, dtype=torch.float64)
    before = now[:, kept_channels] @ g.T if target == "dense" else now
    if target == "self":  # removed channels linear in the kept ones: exact on the new inputs too
        now[:, ~kept_channels] = now[:, kept_channels] @ torch.randn(3, 2, dtype=torch.float64)
        before = now
    weight = torch.randn(out, 5, dtype=torch.float64)
    own = ChannelAccumulator(collect_cov=True)
    own.update(now)
    stats = own.result()
    if target == "dense":
        cross = CrossAccumulator()
        cross.update(before, now)
        stats = cross.into(stats)
    comp = compensate(weight, stats, kept_channels, "least_squares_no_bias", ridge=0.0)
    assert comp.bias_delta is None
    rebuilt = (weight[:, kept_channels] + comp.weight_delta) @ now[:, kept_channels].T
    torch.testing.assert_close(rebuilt.T, before @ weight.T, rtol=1e-8, atol=1e-8)
    model = _model("llama")
    plan = _keep_plan(model, {0: {MLP: [1, 2]}, 1: {MLP: [3]}})
    sequential_rebuild(model, plan, _sequences(), "least_squares_no_bias", RIDGE, get_adapter(model), target, False)
    assert all(layer.mlp.down_proj.bias is None for layer in model.model.layers)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_look_ahead_collects_what_calibrating_the_pruned_model_gives(model_type):
    """The next inner step's statistics, gathered as the pass runs each pruned layer on that text's stream,
    equal a calibration of the pruned model on that text: moments of every o/down input and influence."""
    from adaptprune.calibration.activations import LayerwiseStats

    model = _model(model_type)
    adapter = get_adapter(model)
    plan = _keep_plan(model, FAMILIES[model_type].removed)
    following = torch.randint(3, 128, (6, 12), generator=torch.Generator().manual_seed(9))
    ahead = LayerwiseStats(model, adapter, following)
    sequential_rebuild(model, plan, _sequences(), "least_squares", RIDGE, adapter, "self", False, lookahead=ahead)
    got, want = ahead.result(), calibrate(model, following, batch_size=4, progress=False)
    assert got.tokens == want.tokens == following.numel()
    for layer_got, layer_want in zip(got.layers, want.layers, strict=True):
        assert layer_got.influence == pytest.approx(layer_want.influence, rel=1e-6, abs=1e-9)
        for kind in (ATTENTION, MLP):
            a, b = layer_got.channels(kind), layer_want.channels(kind)
            assert a.count == b.count
            for field in ("mean", "var", "sq_mean"):
                torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=1e-6, atol=1e-9)


def test_accumulating_inner_steps_with_look_ahead_prune_as_recalibrating_does(monkeypatch):
    """A stage of accumulating inner steps: the look-ahead (the default) keeps the same units and weights as
    calibrating before every inner step, with one calibration forward instead of one per step."""
    from adaptprune.calibration.text import fresh_windows
    from adaptprune.pruning import step

    cfg = PruneConfig(
        allocation="accumulating", calibration="sequential", compensation="least_squares", inner_step_fraction=0.05
    )
    stream = torch.randint(3, 128, (4000,), generator=torch.Generator().manual_seed(3))
    results, forwards, calibrate_for = [], [], step.calibrate_for
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(step, "lookahead_stats", lambda *args: None)
        calls = []
        monkeypatch.setattr(step, "calibrate_for", _counting(calibrate_for, calls))
        model = _model("llama")
        target = count_parameters(model) * 3 // 4
        report = prune_step(model, fresh_windows(stream, 6, 12, seed=0), target, cfg, progress=False)
        results.append((report.plan, _weights(model)))
        forwards.append((len(calls), report.inner_steps))
    (fused_plan, fused_weights), (plain_plan, plain_weights) = results
    assert fused_plan == plain_plan and forwards[0][1] == forwards[1][1] > 2
    assert forwards[0][0] == 1 and forwards[1][0] > 2  # one calibration forward, against one per inner step
    for name, tensor in plain_weights.items():
        torch.testing.assert_close(fused_weights[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def _counting(fn, calls: list):
    def counted(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)

    return counted
