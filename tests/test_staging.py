"""Pruning a host copy with each decoder layer's forward staged onto the accelerator (``pruning.staging``).

On CPU the host is the accelerator, so ``RecordingStaging`` keeps both on the CPU and records the moves instead:
every projection runs inside its layer's stay on the accelerator, one layer is there at a time, none is left
there, and the step prunes exactly as without staging. The ``gpu`` test moves the layers for real.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from adaptprune.arch import get_adapter
from adaptprune.calibration.text import fresh_windows
from adaptprune.config import PruneConfig
from adaptprune.pruning.staging import LayerStaging, prunes_on_host, staged_forwards
from adaptprune.pruning.step import prune_step
from adaptprune.pruning.surgery import count_parameters

from .conftest import tiny_llama
from .family_table import FAMILIES
from .test_sequential import _model


class RecordingStaging(LayerStaging):
    """Host and accelerator are both the CPU; which layer is "on the accelerator" is recorded."""

    def __init__(self) -> None:
        super().__init__("cpu")
        self.resident: list[nn.Module] = []
        self.stays = 0

    def enter(self, layer: nn.Module) -> None:
        assert not self.resident, "a second decoder layer entered the accelerator"
        self.resident.append(layer)
        self.stays += 1

    def leave(self, layer: nn.Module) -> None:
        assert self.resident == [layer]
        self.resident.clear()


def _projections_run_inside_their_layer(staging: RecordingStaging, lm_head: nn.Module):
    """A global pre-hook: every linear layer but the LM head runs while the decoder layer holding it is resident."""

    def hook(module, _args):
        if isinstance(module, nn.Linear) and module is not lm_head:
            assert staging.resident and any(m is module for m in staging.resident[0].modules())

    return torch.nn.modules.module.register_module_forward_pre_hook(hook)


def _staged_step(model, cfg: PruneConfig, target: int, texts) -> RecordingStaging:
    staging = RecordingStaging()
    adapter = get_adapter(model)
    handle = _projections_run_inside_their_layer(staging, model.get_output_embeddings())
    try:
        with staged_forwards(model, adapter, staging):
            prune_step(model, texts, target, cfg, adapter, progress=False)
    finally:
        handle.remove()
    return staging


def _texts(vocab: int = 128):
    return fresh_windows(torch.randint(3, vocab, (4000,), generator=torch.Generator().manual_seed(3)), 6, 12, seed=0)


def _assert_same_weights(got: nn.Module, want: nn.Module) -> None:
    expected, actual = want.state_dict(), got.state_dict()
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_a_staged_sequential_step_prunes_as_on_one_device_one_layer_at_a_time(model_type):
    """Accumulating inner steps, least squares, the sequential pass and its look-ahead: the default path."""
    cfg = PruneConfig(allocation="accumulating", calibration="sequential", compensation="least_squares")
    plain, staged = _model(model_type), _model(model_type)
    target = int(count_parameters(plain) * 0.8)
    prune_step(plain, _texts(), target, cfg, get_adapter(plain), progress=False)
    staging = _staged_step(staged, cfg, target, _texts())
    _assert_same_weights(staged, plain)
    assert staging.stays > 0 and not staging.resident
    assert all("forward" not in module.__dict__ for module in staged.modules())  # the layers' own forwards again


@pytest.mark.parametrize(
    "settings",
    [dict(calibration="parallel"), dict(calibration="sequential", rebuild_target="dense")],
    ids=["parallel", "dense-target"],
)
def test_parallel_calibration_and_the_dense_target_stage_too(settings):
    """The parallel pass (statistics of every layer, then surgery on the host) and the dense target's copies of
    the layers as they were (each copy runs staged as itself)."""
    cfg = PruneConfig(metric="wanda", compensation="least_squares", **settings)
    plain, staged = tiny_llama(), tiny_llama()
    target = int(count_parameters(plain) * 0.8)
    prune_step(plain, _texts(), target, cfg, get_adapter(plain), progress=False)
    staging = _staged_step(staged, cfg, target, _texts())
    _assert_same_weights(staged, plain)
    assert staging.stays > 0 and not staging.resident


def test_a_staged_walk_to_a_target_shape_removes_layers_and_channels_as_unstaged():
    """The 3B recipe's path: a target shape's walk (``reach_shape``) removing a layer, hidden channels, KV groups
    and neurons, rebuilt by the sequential pass; the hidden channels are scored from the host's statistics."""
    from adaptprune.pruning.shape.reach import reach_shape
    from adaptprune.pruning.shape.target import ModelShape

    shape = ModelShape(layers=3, hidden=48, groups=1, neurons=64)
    cfg = PruneConfig(calibration="sequential", compensation="least_squares", hidden_multiple=8, neuron_multiple=8)
    plain, staged = tiny_llama(layers=4), tiny_llama(layers=4)
    reach_shape(plain, _texts(), shape, cfg, get_adapter(plain), False)
    staging = RecordingStaging()
    with staged_forwards(staged, get_adapter(staged), staging):
        reach_shape(staged, _texts(), shape, cfg, get_adapter(staged), False)
    assert (len(staged.model.layers), staged.config.hidden_size) == (3, 48)
    _assert_same_weights(staged, plain)
    assert staging.stays > 0 and not staging.resident


def test_a_layer_stopped_early_still_leaves_the_accelerator():
    """The sequential pass stops a layer's forward at a projection (a raise inside it): the layer moves back."""
    model = tiny_llama()
    staging = RecordingStaging()
    layer = model.model.layers[1]
    handle = layer.mlp.down_proj.register_forward_pre_hook(lambda *_: (_ for _ in ()).throw(KeyError("stop")))
    with staged_forwards(model, get_adapter(model), staging), pytest.raises(KeyError):
        model(input_ids=torch.tensor([[3, 4, 5]]))
    handle.remove()
    assert staging.stays == 2 and not staging.resident  # layer 0, then layer 1 stopped inside


def test_a_deep_copy_of_a_staged_layer_runs_staged_as_itself():
    model = tiny_llama()
    staging = RecordingStaging()
    with staged_forwards(model, get_adapter(model), staging):
        twin = copy.deepcopy(model.model.layers[0])
        seen = []
        staging.enter = lambda layer: seen.append(layer)
        staging.leave = lambda layer: None
        hidden = torch.randn(1, 3, model.config.hidden_size)
        rotary = model.model.rotary_emb(hidden, torch.arange(3)[None])
        twin(hidden, position_embeddings=rotary, attention_mask=None)
    assert seen == [twin]
    assert "forward" in twin.__dict__  # a copy made inside the block is the caller's to drop


@pytest.mark.parametrize(
    ("settings", "on_host"),
    [
        (dict(metric="stade"), True),
        (dict(metric="wanda", calibration="sequential", compensation="least_squares"), True),
        (dict(metric="magnitude"), True),
        (dict(metric="taylor"), False),  # a backward: device gradients into host parameters
        (dict(metric="taylor_param_first"), False),
        (dict(dims=["groups", "neurons", "hidden"]), False),  # the shape search's hooks compensate on activations
        (dict(dims=["groups", "neurons", "layers"], layer_score="loss"), False),  # the LM head over every token
    ],
)
def test_prunes_on_host_only_where_a_step_needs_nothing_but_layer_forwards(settings, on_host):
    assert prunes_on_host(PruneConfig(**settings)) is on_host


@pytest.mark.gpu
def test_staged_to_a_gpu_the_step_prunes_as_on_the_gpu_and_leaves_nothing_there():
    """The real thing: a host model whose layers run on CUDA prunes like the model kept on CUDA, the statistics
    come back to the host, and the GPU holds at most about one layer's weights beside the activations."""
    cfg = PruneConfig(allocation="accumulating", calibration="sequential", compensation="least_squares")
    on_gpu, on_host = tiny_llama(layers=8).cuda(), tiny_llama(layers=8)
    target = int(count_parameters(on_host) * 0.8)
    model_bytes = sum(p.nbytes for p in on_host.parameters())
    prune_step(on_gpu, _texts(), target, cfg, get_adapter(on_gpu), progress=False)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with staged_forwards(on_host, get_adapter(on_host), LayerStaging("cuda")):
        prune_step(on_host, _texts(), target, cfg, get_adapter(on_host), progress=False)
    assert torch.cuda.memory_allocated() == before
    # one layer of eight, its Σ and a mini-batch's activations: well under half the model
    assert torch.cuda.max_memory_allocated() - before < model_bytes / 2
    assert all(p.device.type == "cpu" for p in on_host.parameters())
    for name, tensor in on_gpu.state_dict().items():
        torch.testing.assert_close(on_host.state_dict()[name], tensor.cpu(), rtol=1e-4, atol=1e-5, msg=name)
