"""``adaptprune plan``: every recipe plans offline on the meta device, with exact parameter counts; the
activation formula equals what autograd saves; the memory arithmetic and recipe claims hold."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from adaptprune import cli
from adaptprune.checkpoint import load_model, meta_model, read_model_config, shipped_config_dir
from adaptprune.config import ConfigError, ModelConfig, load_config
from adaptprune.plan import PlanOptions, format_plan, make_plan
from adaptprune.plan.memory import (
    GIB,
    LayerGeometry,
    Precision,
    StageSizes,
    footprint,
    head_activation_bytes,
    layer_activation_bytes,
)
from adaptprune.pruning.surgery import count_parameters
from adaptprune.run.schedule import stage_targets

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT / "configs").glob("*.yaml") if p.name != "compare.yaml")
PUBLISHED = {  # parameters of each recipe's dense model (tied embeddings counted once)
    "llama-3.2-3b-to-1b.yaml": 3_212_749_824,
    "qwen2.5-0.5b-to-350m.yaml": 494_032_768,
    "smollm2-360m-to-135m.yaml": 361_821_120,
    "default.yaml": 134_515_008,
}


def _plan_json(capsys, *args: str) -> dict:
    assert cli.main(["plan", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_the_recipes_are_the_expected_ones():
    names = {p.name for p in RECIPES}
    assert {*PUBLISHED, "smoke.yaml"} <= names
    assert not list((ROOT / "configs").glob("*mobilellm*"))  # custom-code model no adapter accepts


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_plan_counts_equal_the_meta_model(recipe, capsys):
    plan = _plan_json(capsys, "--config", str(recipe))
    cfg = load_config(recipe)
    hf_config, _ = read_model_config(cfg.model)
    model, _ = meta_model(hf_config)
    assert next(model.parameters()).device.type == "meta"
    dense = count_parameters(model)
    assert plan["original_params"] == dense
    if recipe.name in PUBLISHED:
        assert dense == PUBLISHED[recipe.name]
    targets = stage_targets(dense, plan["target_params"], max(1, round(cfg.prune.step_fraction * dense)))
    assert [row["params"] for row in plan["stages"]] == [*targets, targets[-1]]
    assert plan["stages"][-1]["stage"] == "recovery"
    assert plan["target_params"] - 0.01 * dense < plan["uniform_params"] <= plan["target_params"]


@pytest.mark.parametrize("recipe", ["smoke.yaml", "default.yaml"])
def test_plan_count_equals_the_real_embedded_model(recipe, capsys):
    plan = _plan_json(capsys, "--config", str(ROOT / "configs" / recipe))
    assert plan["original_params"] == count_parameters(load_model(load_config(ROOT / "configs" / recipe).model.name))


def test_the_table_prints_the_counts_and_stage_tokens(capsys):
    assert cli.main(["plan", "--config", str(ROOT / "configs" / "llama-3.2-3b-to-1b.yaml"), "--gpus", "8"]) == 0
    text = capsys.readouterr().out
    # Llama-3.2-1B's count (1,235,814,400) plus mean compensation's o/down biases (16 x 2 x 2,048)
    assert "3,212,749,824 -> 1,235,879,936 parameters in 16 stages" in text
    assert "8 batch x 1 accum x 2048 seq x 8 GPUs = 131,072" in text
    assert "configs/models/meta-llama--Llama-3.2-3B/config.json, shipped copy" in text
    final = "16 layers, hidden 2,048, 5 KV groups (15 heads x 128), 8,192 MLP neurons per layer"
    assert f"final shape (prune.target_shape): {final}" in text
    assert "shape search trial" in text


def test_the_135m_recipe_ends_on_smollm2_135m_s_shape(capsys):
    plan = _plan_json(capsys, "--config", str(ROOT / "configs" / "smollm2-360m-to-135m.yaml"))
    shape = plan["final_shape"]
    assert (shape["layers"], shape["hidden"], shape["kv_groups"], shape["heads"], shape["head_dim"]) == (
        30, 576, [3, 3], [9, 9], 64
    )  # fmt: skip
    assert shape["neurons"] == [1536, 1536]
    assert plan["target_params"] == 134_515_008 + 30 * 2 * 576  # SmolLM2-135M + the o/down bias slots
    walk = plan["walk"]
    assert walk[-1] == {"stage": len(walk), "params": plan["target_params"], "layers": 30, "hidden": 576,
                        "groups": 3, "neurons": 1536}  # fmt: skip
    for before, after in zip(walk, walk[1:]):  # every dimension only shrinks, on its multiples
        assert all(after[k] <= before[k] for k in ("layers", "hidden", "groups", "neurons"))
        assert after["hidden"] % 64 == 0 and after["neurons"] % 32 == 0


def test_a_units_only_plan_prints_its_final_shape(capsys):
    assert cli.main(["plan", "--config", str(ROOT / "configs" / "default.yaml")]) == 0
    text = capsys.readouterr().out
    assert "final shape (uniform allocation on neutral scores (units only)): 30 layers, hidden 576" in text


def test_stage_tokens_follow_the_split_and_wall_time_the_throughput():
    cfg = load_config(ROOT / "configs" / "qwen2.5-0.5b-to-350m.yaml")
    plan = make_plan(cfg, PlanOptions(gpus=8, tokens_per_s=100_000.0))
    per_step = 4 * 4 * 2048 * 8
    assert plan.tokens_per_step == per_step
    assert sum(row["steps"] for row in plan.stages) == cfg.schedule.train_tokens // per_step
    assert all(row["tokens"] == row["steps"] * per_step for row in plan.stages)
    assert all(row["wall_s"] == row["tokens"] / 100_000.0 for row in plan.stages)
    steps = [row["steps"] for row in plan.stages[:-1]]
    assert steps == sorted(steps)  # Adapt-Accel: later, smaller models train longer
    assert "wall" in format_plan(plan)


def test_recipe_memory_claims():
    """What the recipes' comments say about fitting an 80 GB GPU (the usable 90%)."""
    recipe = ROOT / "configs" / "llama-3.2-3b-to-1b.yaml"
    llama = load_config(recipe)
    assert (llama.prune.compensation, llama.prune.calibration) == ("least_squares", "sequential")
    assert llama.train.optim.after_surgery == "carry" and llama.train.batch_size == 8
    one = make_plan(llama).memory["single"]
    assert one["checkpointing"]["fits"] and not one["no_checkpointing"]["fits"]
    assert one["checkpointing"]["peak"] < 67 * GIB
    assert make_plan(load_config(recipe, ["train.batch_size=12"])).memory["single"]["checkpointing"]["fits"]
    assert not make_plan(load_config(recipe, ["train.batch_size=16"])).memory["single"]["checkpointing"]["fits"]
    eight = make_plan(llama, PlanOptions(gpus=8)).memory
    assert not eight["ddp"]["checkpointing"]["fits"] and eight["fsdp"]["checkpointing"]["fits"]
    assert eight["fsdp"]["checkpointing"]["peak"] < 34 * GIB  # the surgery, moments sharded (trainers/sharding)
    assert make_plan(llama, PlanOptions(gpus=8, gpu_memory_gib=140)).memory["ddp"]["checkpointing"]["fits"]
    for name in ("qwen2.5-0.5b-to-350m.yaml", "smollm2-360m-to-135m.yaml"):
        memory = make_plan(load_config(ROOT / "configs" / name), PlanOptions(gpus=8)).memory
        assert memory["ddp"]["no_checkpointing"]["fits"], name  # micro-batch 16 x 2048: the fused loss
        assert memory["ddp"]["no_checkpointing"]["peak"] < 61 * GIB, name


def test_what_the_3b_recipe_saves_term_by_term():
    """The issue's four terms, each switched back to what it was: unfused logits, an fp32 teacher; the fused
    AdamW has no step temporary and the carry holds the old moments plus one layer's slice, not both states."""
    recipe = ROOT / "configs" / "llama-3.2-3b-to-1b.yaml"
    new = make_plan(load_config(recipe)).memory["single"]["checkpointing"]
    old = make_plan(load_config(recipe, ["train.loss_chunk_tokens=0", "train.distill.teacher_dtype=float32"]))
    old = old.memory["single"]["checkpointing"]
    tokens, vocab = 8 * 2048, 128_256
    assert 0.9 * 26 * vocab * tokens < old["activations"] - new["activations"] < 26 * vocab * tokens  # the logits
    assert old["teacher"] == 2 * new["teacher"] == 4 * 3_212_749_824
    assert new["optimizer_step"] == 0
    sizes = StageSizes(trained=10, trainable=10, before=12, carried=True, teacher=0, gathered=0, layer=3)
    assert footprint(sizes, 0, Precision.of("float32", "no"), "single", 1).transition == (12 + 2 * (12 + 3)) * 4


def test_footprint_by_hand():
    """One billion fp32 parameters trained under bf16 autocast with DDP, the teacher twice that."""
    sizes = StageSizes(trained=10**9, trainable=10**9, before=0, carried=True, teacher=2 * 10**9, gathered=10**8)
    fp = footprint(sizes, activations=5 * 10**9, p=Precision.of("float32", "bf16"), mode="ddp", gpus=8)
    assert (fp.weights, fp.gradients, fp.adamw) == (4 * 10**9, 4 * 10**9, 8 * 10**9)
    assert (fp.autocast_copies, fp.ddp_buckets, fp.teacher) == (2 * 10**9, 4 * 10**9, 8 * 10**9)
    assert fp.training == (4 + 4 + 8 + 4 + 8) * 10**9 + max(2 * 10**9 + 5 * 10**9, 4 * 10**9)
    fsdp = footprint(sizes, activations=5 * 10**9, p=Precision.of("float32", "bf16"), mode="fsdp", gpus=8)
    assert (fsdp.weights, fsdp.adamw, fsdp.autocast_copies) == (5 * 10**8, 10**9, 0)
    assert fsdp.fsdp_gathered == 10**8 * (2 + 4)
    assert fsdp.teacher == 8 * 10**9 // 8 + 10**8 * 4  # sharded like the student, plus its gathered units


def test_fsdp_surgery_holds_the_moments_sharded():
    """Under FSDP the surgery gathers the weights (and a second model while re-sharding), never the moments:
    they stay 2·P·w/N, with one parameter's full moments (bounded by a layer) at a time."""
    sizes = StageSizes(trained=10, trainable=10, before=16, carried=True, teacher=0, gathered=0, layer=3)
    fsdp = footprint(sizes, 0, Precision.of("float32", "no"), "fsdp", 8)
    assert fsdp.transition == (2 * 16 + 2 * 16 // 8 + 2 * 3) * 4
    assert footprint(sizes, 0, Precision.of("float32", "no"), "ddp", 8).transition == (16 + 2 * (16 + 3)) * 4


def test_fsdp_surgery_on_the_host_holds_shards_and_one_unit():
    """A step pruning a host copy (``pruning.staging``): the GPU holds the new weights' and the moments' shards,
    one parameter's full moments and one unsharded unit (the layer running, or the unit being re-sharded)."""
    sizes = StageSizes(trained=10, trainable=10, before=16, carried=True, teacher=0, gathered=5, layer=3, on_host=True)
    fsdp = footprint(sizes, 0, Precision.of("float32", "no"), "fsdp", 8)
    assert fsdp.transition == math.ceil(10 * 4 / 8) + 2 * 16 * 4 // 8 + 2 * 3 * 4 + 5 * 4  # bytes, w = 4
    assert (
        fsdp.transition
        < footprint(replace(sizes, on_host=False), 0, Precision.of("float32", "no"), "fsdp", 8).transition
    )
    single = footprint(sizes, 0, Precision.of("float32", "no"), "single", 1)  # one GPU: pruned in place as before
    assert single.transition == (16 + 2 * (16 + 3)) * 4


def _saved_bytes(model, batch: int, seq: int, autocast: bool) -> int:
    """Bytes autograd saves for one forward (each storage once)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model(input_ids=ids)
    return sum(storages.values())


@pytest.mark.parametrize(
    ("dtype", "mixed", "checkpointing"),
    [("float32", "bf16", False), ("bfloat16", "bf16", False), ("float32", "no", False), ("float32", "bf16", True)],
)
def test_activation_formula_equals_what_autograd_saves(dtype, mixed, checkpointing):
    """Per token: L·A + head (the model's saved activations; the loss's buffers are not saved tensors).

    Two sequences minus one cancels everything that does not scale with tokens (the weights' casts).
    """
    geometry = LayerGeometry(hidden=128, heads=4, kv_heads=2, head_dim=32, intermediate=344)
    config = LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, tie_word_embeddings=True, attn_implementation="sdpa",
    )  # fmt: skip
    model = LlamaForCausalLM(config).to(getattr(torch, dtype)).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    seq, p = 64, Precision.of(dtype, mixed)
    measured = _saved_bytes(model, 2, seq, mixed != "no") - _saved_bytes(model, 1, seq, mixed != "no")
    per_layer = p.weight_bytes * geometry.hidden if checkpointing else layer_activation_bytes(geometry, p)
    assert measured == seq * (2 * per_layer + head_activation_bytes(geometry.hidden, p))


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_activation_formula_holds_for_the_other_llama_style_families(family):
    """Qwen2's q/k/v biases and Mistral's layer save exactly what Llama's does."""
    geometry = LayerGeometry(hidden=128, heads=4, kv_heads=2, head_dim=32, intermediate=344)
    config = AutoConfig.for_model(
        family, vocab_size=256, hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, tie_word_embeddings=True, attn_implementation="sdpa",
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config).train()
    p = Precision.of("float32", "bf16")
    measured = _saved_bytes(model, 2, 64, True) - _saved_bytes(model, 1, 64, True)
    assert measured == 64 * (2 * layer_activation_bytes(geometry, p) + head_activation_bytes(geometry.hidden, p))


def test_offline_hub_ids_use_the_shipped_configs():
    for name in ("meta-llama/Llama-3.2-3B", "Qwen/Qwen2.5-0.5B", "HuggingFaceTB/SmolLM2-360M"):
        folder = shipped_config_dir(name)
        assert folder is not None and (folder.parent / "README.md").is_file()
        config, source = read_model_config(ModelConfig(name=name))
        assert source.endswith("shipped copy (hub not reachable)")
        assert config.to_dict() == AutoConfig.from_pretrained(folder).to_dict()


def test_an_unknown_hub_id_is_one_line(capsys):
    with pytest.raises(ConfigError, match="no copy is shipped"):
        read_model_config(ModelConfig(name="nobody/no-such-model"))
    assert cli.main(["plan", "model.name=nobody/no-such-model"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("adaptprune: error: model.name='nobody/no-such-model'") and "\n" not in err


def test_plan_lists_the_depth_and_width_candidates_with_hidden_and_layers(capsys):
    from adaptprune.pruning.shape.dry_run import shape_candidates_for

    dims, deep = "prune.dims=[neurons,groups,hidden,layers]", "prune.target_params=0.5x"
    plan = _plan_json(capsys, "--config", str(ROOT / "configs" / "smoke.yaml"), dims, deep)
    cfg = load_config(ROOT / "configs" / "smoke.yaml", [dims, deep])
    hf_config, _ = read_model_config(cfg.model)
    expected = shape_candidates_for(hf_config, plan["target_params"], cfg.prune)
    assert plan["dims_shape"]["dims"] == ["hidden", "layers"]
    assert plan["dims_shape"]["candidates"] == [p.summary() for p in expected]
    assert len(expected) > 1 and (expected[0].layers, expected[0].hidden) == (hf_config.num_hidden_layers, 64)
    assert any(p.layers < hf_config.num_hidden_layers for p in expected)
    assert all(p.params <= plan["target_params"] for p in expected)
    assert cli.main(["plan", "--config", str(ROOT / "configs" / "smoke.yaml"), dims, deep]) == 0
    assert "hidden/depth candidates of a one-step cut" in capsys.readouterr().out


def test_least_squares_holds_every_layer_s_covariance_in_the_surgery_peak(capsys):
    recipe = str(ROOT / "configs" / "llama-3.2-3b-to-1b.yaml")
    mean = _plan_json(capsys, "--config", recipe, "prune.compensation=mean", "prune.calibration=parallel")
    ls = _plan_json(capsys, "--config", recipe, "prune.compensation=least_squares", "prune.calibration=parallel")
    sigma = 8 * 28 * (8192**2 + 3072**2)  # float64 Σ of every down (8,192 wide) and o (24 x 128) input
    for mode in mean["memory"]:
        for ckpt, entry in ls["memory"][mode].items():
            base = mean["memory"][mode][ckpt]
            assert base["covariance"] == 0 and entry["covariance"] == sigma
            assert entry["transition"] == base["transition"] + sigma


def test_the_search_row_of_the_plan_bounds_what_a_real_search_holds(capsys, monkeypatch):
    """``plan``'s "shape search trial" row bounds every candidate's extra peak over a plain forward pass,
    measured (torch's CPU profiler) while a real per-step search runs on the smoke model."""
    from adaptprune.importance.residual import calibration_loss
    from adaptprune.pruning.shape import search as shape_search
    from adaptprune.pruning.step import prune_step
    from tests.test_shape_trial import _peak_bytes

    dims = ["prune.dims=[neurons,groups,hidden,layers]", "prune.target_params=0.5x", "prune.min_neurons=4"]
    smoke = str(ROOT / "configs" / "smoke.yaml")
    plan = _plan_json(capsys, "--config", smoke, *dims)
    figures = {entry["shape_search"] for mode in plan["memory"].values() for entry in mode.values()}
    cfg = load_config(smoke, dims)
    model = load_model(cfg.model.name)
    extras: list[int] = []
    measured = shape_search.candidate_loss

    def measuring(model, chosen, calib, sequences, *args):
        loss = []
        peak = _peak_bytes(lambda: loss.append(measured(model, chosen, calib, sequences, *args)))
        extras.append(peak - _peak_bytes(lambda: calibration_loss(model, sequences)))
        return loss[0]

    monkeypatch.setattr(shape_search, "candidate_loss", measuring)
    sequences = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    target = round(0.5 * count_parameters(model))  # one deep step: a grid of candidates
    report = prune_step(model, sequences, target, cfg.prune, progress=False)
    assert len(report.shape.candidates) > 1 and len(extras) == len(report.shape.candidates)
    (figure,) = figures
    assert 0 < max(extras) <= figure < 4 * count_parameters(load_model(cfg.model.name))  # not a copy of the model


@pytest.mark.parametrize("target, copies", [("self", 1), ("dense", 2)])
def test_a_sequential_pass_holds_one_projection_s_sigma_at_the_3b_recipe(capsys, target, copies):
    recipe = str(ROOT / "configs" / "llama-3.2-3b-to-1b.yaml")
    overrides = ["prune.compensation=least_squares", "prune.calibration=sequential", f"prune.rebuild_target={target}"]
    plan = _plan_json(capsys, "--config", recipe, *overrides)
    calib_tokens = load_config(recipe, overrides).data.calib_tokens
    for mode in plan["memory"].values():
        for entry in mode.values():
            assert entry["covariance"] == copies * 8 * 8192**2  # the widest input (down, 8,192) alone
            assert entry["covariance"] <= 2**30  # the goal: the Σ row within 1 GiB
            assert entry["sequential"] >= copies * calib_tokens * 3072 * 4  # the cached stream(s), fp32


@pytest.mark.parametrize("target", ["self", "dense"])
def test_the_plan_s_sequential_rows_bound_what_a_real_sequential_pass_holds(target):
    """Measured with torch's CPU profiler on a model whose weights dwarf its activations: a sequential pass's
    extra peak over a plain forward holds one projection's Σ (it is more than that) and stays within plan's
    "calibration Σ" plus "sequential pass streams" rows."""
    from adaptprune.arch import MLP, get_adapter
    from adaptprune.checkpoint import to_heterogeneous
    from adaptprune.importance.residual import calibration_loss
    from adaptprune.plan.core import covariance_bytes, sequential_bytes
    from adaptprune.pruning.sequential import sequential_rebuild
    from tests.family_table import hf_model
    from tests.test_shape_trial import _peak_bytes

    model = to_heterogeneous(hf_model("llama", intermediate_size=768, hidden_size=256, vocab_size=16384)).eval()
    adapter = get_adapter(model)
    sequences = torch.randint(3, 16384, (4, 16), generator=torch.Generator().manual_seed(3))
    overrides = ["prune.calibration=sequential", f"prune.rebuild_target={target}", "data.calib_tokens=64"]
    cfg = load_config(ROOT / "configs" / "smoke.yaml", ["prune.compensation=least_squares", *overrides])
    figure = covariance_bytes(cfg, model, adapter) + sequential_bytes(cfg, model, adapter, 4)
    plan = {layer: {MLP: list(range(0, 768, 2))} for layer in range(3)}
    forward = _peak_bytes(lambda: calibration_loss(model, sequences))
    held = _peak_bytes(lambda: sequential_rebuild(model, plan, sequences, "least_squares", 0.1, adapter, target, False))
    assert 8 * 768**2 < held - forward <= figure
