"""Conformance suite: every supported family passes the same checks on a tiny random model.

Per family (``family_table.FAMILIES``): our heterogeneous class gives HF's logits; removing MLP
neurons and KV groups equals masking them; removing hidden channels and whole layers gives the
parameter count the config predicts; pruned checkpoints reload exactly both ways (adaptprune
imported; ``trust_remote_code`` without it), generate with a KV cache and train one LoRA step on
every linear; zero hidden channels change the logits only through the norm statistics; a layer
with zero residual contribution is removed without changing the logits. Last, the whole
pipeline (one-shot and a 2-stage controller run) on each family.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from adaptprune.arch import NORM, WRITE, get_adapter
from adaptprune.calibration.activations import calibrate
from adaptprune.checkpoint import load_model, load_tokenizer, save_checkpoint, to_heterogeneous
from adaptprune.config import load_config
from adaptprune.evaluation.inspection import describe
from adaptprune.pruning.compensation import apply_compensated_plan
from adaptprune.pruning.shape.reshape import (
    compensate_layer_removal,
    compensate_norm_gains,
    remove_hidden_channels,
    remove_layers,
)
from adaptprune.pruning.surgery import apply_plan, count_parameters
from adaptprune.run.controller import Controller
from adaptprune.run.oneshot import run_oneshot

from .family_table import FAMILIES, KEEP_HIDDEN, KEEP_LAYERS, expected_params, hf_model, remote_logits
from .surgery_helpers import (
    assert_generates,
    assert_hetero_matches_hf,
    assert_reload_is_exact,
    assert_removal_equals_masking,
    keep_plan,
    logits,
)

FAMILY_IDS = sorted(FAMILIES)


@pytest.fixture(params=FAMILY_IDS)
def family(request) -> str:
    return request.param


def hetero(family: str) -> nn.Module:
    return to_heterogeneous(hf_model(family)).eval()


def units_pruned(family: str) -> nn.Module:
    model = hetero(family)
    apply_plan(model, keep_plan(model, FAMILIES[family].removed))
    return model


def fully_pruned(family: str) -> nn.Module:
    """Units, then 13 of 64 hidden channels, then layer 0; the count matches the config each time."""
    model = units_pruned(family)
    assert count_parameters(model) == expected_params(family, model.config)
    remove_hidden_channels(model, KEEP_HIDDEN)
    assert model.config.hidden_size == len(KEEP_HIDDEN)
    assert count_parameters(model) == expected_params(family, model.config)
    remove_layers(model, KEEP_LAYERS)
    assert model.config.num_hidden_layers == len(KEEP_LAYERS)
    assert count_parameters(model) == expected_params(family, model.config)
    return model


# ---- units: MLP neurons and KV groups ------------------------------------------------------------
def test_hetero_class_matches_hf(family, input_ids):
    model = hf_model(family)
    assert get_adapter(model).family == FAMILIES[family].family
    assert count_parameters(model) == expected_params(family, to_heterogeneous(model).config)
    assert type(assert_hetero_matches_hf(model, input_ids)).__name__ == FAMILIES[family].hetero_class


def test_unit_removal_equals_masking(family, input_ids):
    model = hetero(family)
    assert_removal_equals_masking(model, FAMILIES[family].removed, input_ids)
    FAMILIES[family].unit_checks(model)


def test_units_pruned_checkpoint_reloads_exactly(family, tmp_path, input_ids):
    assert_reload_is_exact(units_pruned(family), tmp_path / family, input_ids)


def test_least_squares_pruned_checkpoint_reloads_exactly(family, tmp_path, input_ids):
    """Least-squares compensation on every family (Phi-3's fused projections, OPT's biases, Gemma's norms):
    it changes the kept weights beyond mean compensation, and the checkpoint reloads exactly."""
    text = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(5))
    pruned = {}
    for mode in ("mean", "least_squares"):
        model = hetero(family)
        calib = calibrate(model, text, collect_cov=True, progress=False)
        apply_compensated_plan(model, keep_plan(model, FAMILIES[family].removed), calib, mode, ridge=1e-2)
        pruned[mode] = model
    model = pruned["least_squares"]
    assert count_parameters(model) == count_parameters(pruned["mean"])
    assert not torch.equal(logits(model, input_ids), logits(pruned["mean"], input_ids))
    assert torch.isfinite(logits(model, input_ids)).all()
    assert_reload_is_exact(model, tmp_path / family, input_ids)


def test_generate_on_units_pruned_model(family, input_ids):
    assert_generates(units_pruned(family), input_ids)


# ---- hidden size and depth ------------------------------------------------------------------------
def test_reshaped_checkpoint_reloads_exactly(family, tmp_path, input_ids):
    model = fully_pruned(family)  # asserts the parameter count after each removal
    assert_reload_is_exact(model, tmp_path / family, input_ids)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / family)
    assert reloaded.config.hidden_size == 51 and reloaded.config.num_hidden_layers == 2
    assert count_parameters(reloaded) == count_parameters(model)
    if family == "gemma3_text":
        assert reloaded.config.layer_types == ["full_attention", "sliding_attention"]
        assert reloaded.model.embed_tokens.embed_scale.item() == 8.0  # sqrt(64), the dense model's
    info = describe(reloaded)
    assert (info["hidden_size"], info["num_layers"]) == (51, 2)


def test_reshaped_model_decodes_with_kv_cache(family, input_ids):
    """Token-by-token decoding through the cache (renumbered layer_idx, re-indexed layer_types,
    a sliding window shorter than the text) gives the full forward's logits."""
    model = fully_pruned(family)
    ids = input_ids[:1]  # (1, 12)
    full = logits(model, ids)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        steps = [model(ids[:, :6], past_key_values=cache, use_cache=True).logits]
        for t in range(6, ids.shape[1]):
            steps.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-5
    assert_generates(model, input_ids)


def kept_channel_norm(norm: nn.Module, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The reference: the norm's statistics over the kept channels only, zero outside them."""
    xk = x[..., keep].float()
    if isinstance(norm, nn.LayerNorm):
        centred = xk - xk.mean(-1, keepdim=True)
        y = centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + norm.eps)
        y = y * norm.weight[keep] + norm.bias[keep]
    else:
        eps = getattr(norm, "variance_epsilon", None) or norm.eps
        y = xk * torch.rsqrt(xk.pow(2).mean(-1, keepdim=True) + eps)
        y = y * (1.0 + norm.weight[keep] if type(norm).__name__ == "Gemma3RMSNorm" else norm.weight[keep])
    out = torch.zeros_like(x)
    out[..., keep] = y.to(x.dtype)
    return out


def zero_removed_channels(model: nn.Module) -> nn.Module:
    """No embedding column or writer row (or bias) feeds the channels outside KEEP_HIDDEN."""
    removed = torch.tensor([c for c in range(64) if c not in KEEP_HIDDEN])
    with torch.no_grad():
        for c in get_adapter(model).hidden_couplings(model):
            module = model.get_submodule(c.path)
            if c.role == WRITE:
                module.weight.index_fill_(c.dim, removed, 0.0)
                if c.dim == 0 and getattr(module, "bias", None) is not None:
                    module.bias[removed] = 0.0
    return model


def test_zero_hidden_channels_change_logits_only_through_norm_statistics(family, input_ids):
    model = zero_removed_channels(hetero(family))
    adapter = get_adapter(model)
    keep = torch.tensor(KEEP_HIDDEN)
    zeroed = logits(model, input_ids)
    hooks = [
        model.get_submodule(c.path).register_forward_hook(lambda m, args, out: kept_channel_norm(m, args[0], keep))
        for c in adapter.hidden_couplings(model)
        if c.role == NORM
    ]
    try:
        reference = logits(model, input_ids)
    finally:
        for hook in hooks:
            hook.remove()
    remove_hidden_channels(model, KEEP_HIDDEN)
    pruned = logits(model, input_ids)
    assert (pruned - reference).abs().max().item() <= 1e-5
    assert (pruned - zeroed).abs().max().item() > 1e-3  # the norm statistics did change


def test_norm_gain_compensation_recovers_the_dense_norms_when_removed_channels_are_zero(family, input_ids):
    """With h = 0 outside K every stream norm's factor is sqrt(D/|K|), and an RMSNorm over K with
    its gain so scaled is the dense RMSNorm with eps·|K|/D: RMSNorm families whose norms all read
    the stream give exactly that dense model's logits. LayerNorm (OPT: the mean moves too) and
    Gemma's sandwich norms (inputs not sampled) are approximate: there the gains are scaled."""
    model = zero_removed_channels(hetero(family))
    adapter = get_adapter(model)
    stats = calibrate(model, input_ids, collect_residual=True, progress=False).residual
    exact = family not in ("opt", "gemma3_text")
    norms = [model.get_submodule(c.path) for c in adapter.hidden_couplings(model) if c.role == NORM and exact]
    for norm in norms:  # the dense reference: eps scaled by |K|/D
        norm.variance_epsilon = norm.variance_epsilon * 51 / 64
    dense = logits(model, input_ids)
    for norm in norms:
        norm.variance_epsilon = norm.variance_epsilon * 64 / 51
    gain = adapter.norm_gain(model.get_submodule(f"{adapter.layers_path}.0.{adapter.input_norm}")).clone()
    remove_hidden_channels(model, KEEP_HIDDEN)
    factors = compensate_norm_gains(model, [s.sq_mean for s in stats], KEEP_HIDDEN)
    assert factors == pytest.approx([(64 / 51) ** 0.5] * 4, rel=1e-6)
    got = adapter.norm_gain(model.get_submodule(f"{adapter.layers_path}.0.{adapter.input_norm}"))
    assert torch.allclose(got, gain[KEEP_HIDDEN] * factors[0], atol=1e-6)
    if exact:
        assert (logits(model, input_ids) - dense).abs().max().item() <= 1e-5


def test_zero_contribution_layer_removal_keeps_logits(family, input_ids):
    model = units_pruned(family)
    adapter = get_adapter(model)
    layer = adapter.decoder_layers(model)[1]
    with torch.no_grad():  # the layer adds nothing to the stream
        for path in adapter.hidden_writers:
            for param in layer.get_submodule(path).parameters():
                param.zero_()
    before = logits(model, input_ids)
    record = remove_layers(model, [0, 2])
    assert record.removed == (1,) and record.rename(f"{adapter.layers_path}.2.x") == f"{adapter.layers_path}.1.x"
    assert torch.equal(logits(model, input_ids), before)
    assert count_parameters(model) == expected_params(family, model.config)


def test_mean_compensated_layer_removal_reloads_exactly(family, tmp_path, input_ids):
    """Layer 1's mean contribution goes into layer 0's stream bias (where the family has one)."""
    model = units_pruned(family)
    adapter = get_adapter(model)
    path = adapter.stream_bias_path(model.config)
    shifts = [torch.randn(64, dtype=torch.float64) for _ in range(3)]
    writer = adapter.decoder_layers(model)[0].get_submodule(path) if path else None
    before = writer.bias.detach().clone() if writer is not None and writer.bias is not None else torch.zeros(64)
    assert compensate_layer_removal(model, [0, 2], shifts) == ([] if path else [1])  # Gemma: a norm is in between
    remove_layers(model, [0, 2])
    if path:
        bias = adapter.decoder_layers(model)[0].get_submodule(path).bias
        assert torch.equal(bias.detach(), before + shifts[1].float())
    assert_reload_is_exact(model, tmp_path / family, input_ids)


def test_lora_all_linear_adapts_every_layer_linear_and_trains_one_step(family, input_ids):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    model = fully_pruned(family).train()
    adapter = get_adapter(model)
    linears = [
        [n for n, m in layer.named_modules() if isinstance(m, nn.Linear)] for layer in adapter.decoder_layers(model)
    ]
    assert set(adapter.hidden_readers + adapter.hidden_writers) <= set(linears[0])  # fc1/fc2, qkv_proj, ...
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for layer, names in zip(adapter.decoder_layers(peft_model.base_model.model), linears, strict=True):
        for name in names:
            assert isinstance(layer.get_submodule(name), LoraLayer), name
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    loss = peft_model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and any(not torch.equal(b, p) for b, p in zip(before, trainable))


# ---- without adaptprune: every family's checkpoints in one fresh interpreter -------------------------
@pytest.fixture(scope="module")
def remote_results(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("remote")
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(123))
    keys, folders, local = [], [], []
    for family in FAMILY_IDS:
        for kind, build in (("units", units_pruned), ("reshaped", fully_pruned)):
            model = build(family)
            folders.append(save_checkpoint(model, work / f"{family}-{kind}"))
            keys.append((family, kind))
            local.append(logits(model, ids))
    remote = remote_logits(folders, ids, work)
    return {key: (mine, theirs) for key, mine, theirs in zip(keys, local, remote, strict=True)}


@pytest.mark.parametrize("kind", ["units", "reshaped"])
def test_checkpoint_reloads_without_adaptprune(family, kind, remote_results):
    mine, theirs = remote_results[(family, kind)]
    assert not isinstance(theirs, str), theirs  # a traceback from the remote interpreter
    assert torch.equal(mine, theirs)


# ---- the whole pipeline (tiny models with the embedded 512-token BPE) ----------------------------------
COMMON = dict(
    vocab_size=512,
    hidden_size=64,
    num_hidden_layers=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=0,
    eos_token_id=0,
)
PIPELINE_FAMILIES = {
    "llama": dict(intermediate_size=96, num_attention_heads=4, num_key_value_heads=2),
    "qwen2": dict(intermediate_size=96, num_attention_heads=4, num_key_value_heads=2),
    "qwen3": dict(intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    "mistral": dict(intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=32),
    "opt": dict(ffn_dim=96, num_attention_heads=4, word_embed_proj_dim=64, dropout=0.0),
    "phi3": dict(
        intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, original_max_position_embeddings=256
    ),
    "gemma3_text": dict(
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=32,
    ),
}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny-random-llama")


@pytest.fixture(params=sorted(PIPELINE_FAMILIES))
def model_dir(request, tmp_path, tokenizer) -> Path:
    torch.manual_seed(0)
    config = AutoConfig.for_model(request.param, **COMMON, **PIPELINE_FAMILIES[request.param])
    model = AutoModelForCausalLM.from_config(config)
    folder = tmp_path / request.param
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _config(model_dir: Path, out: Path, extra: list[str] = ()):
    return load_config(
        None,
        [
            f"model.name={model_dir}",
            "prune.target_params=0.9x",
            "prune.step_fraction=0.06",
            "prune.min_neurons=8",
            "data.seq_len=64",
            "data.calib_tokens=512",
            "data.eval_tokens=256",
            "data.eval_context=64",
            "schedule.train_tokens=1024",
            "train.batch_size=2",
            "output.tensorboard=false",
            f"output.dir={out}",
            *extra,
        ],
    )


def test_oneshot_prune_then_inspect(model_dir, tmp_path):
    metrics = run_oneshot(_config(model_dir, tmp_path / "unused"), tmp_path / "oneshot", progress=False)
    assert metrics["params_after"] <= metrics["target_params"]
    assert metrics["ppl_after"]["ppl"] < float("inf")
    info = describe(load_model(str(tmp_path / "oneshot" / "model")))
    assert info["total_params"] == metrics["params_after"]
    for name in ("plan.json", "metrics.json", "config.yaml", "layer_sizes.png"):
        assert (tmp_path / "oneshot" / name).exists()


def test_two_stage_controller_run(model_dir, tmp_path):
    results = Controller(_config(model_dir, tmp_path / "run", ["eval.every_stage=false"])).run()
    assert results["stages"] == 2
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    assert sum(p.numel() for p in {id(p): p for p in reloaded.parameters()}.values()) == results["final_params"]
