"""Target shapes: parsing and reachability, the walk, per-layer counts, exact landing on every family,
reload with and without adaptprune, and a plain ``llama`` GGUF for a uniform result."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from adaptprune.arch import get_adapter
from adaptprune.checkpoint import load_model, save_checkpoint, to_heterogeneous
from adaptprune.config import ConfigError, PruneConfig, load_config
from adaptprune.export import export_gguf
from adaptprune.pruning.shape.reach import kept_counts, reach_shape, unit_inner_steps
from adaptprune.pruning.shape.target import (
    ModelShape,
    current_shape,
    plan_walk,
    resolve_target_shape,
    shape_between,
    shape_params,
    walk_fraction,
)
from adaptprune.pruning.surgery import count_parameters
from adaptprune.run.controller import Controller

from .conftest import tiny_llama
from .family_table import FAMILIES, hf_model, remote_logits
from .surgery_helpers import logits

SOURCE = ModelShape(layers=32, hidden=960, groups=5, neurons=2560)
TARGET = ModelShape(layers=30, hidden=576, groups=3, neurons=1536)


def _config_json(tmp_path, **values) -> str:
    base = dict(model_type="llama", vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=3, num_key_value_heads=1, head_dim=16)  # fmt: skip
    base.update(values)
    (tmp_path / "config.json").write_text(json.dumps(base))
    return str(tmp_path / "config.json")


# ---- parsing and reachability ------------------------------------------------------------------
def test_mapping_and_config_json_resolve_to_the_same_shape(tmp_path):
    model = tiny_llama(num_heads=6, num_kv_heads=2)  # 3 layers, hidden 96, 2 groups x 3 heads of 16, MLP 96
    from_mapping = resolve_target_shape({"layers": 2, "hidden": 48, "heads": 3, "neurons": 64}, model)
    assert from_mapping == ModelShape(layers=2, hidden=48, groups=1, neurons=64)
    assert resolve_target_shape(_config_json(tmp_path), model) == from_mapping
    assert resolve_target_shape({"neurons": 32}, model) == ModelShape(3, 96, 2, 32)  # missing keys stay


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"head_dim": 8, "num_attention_heads": 6, "num_key_value_heads": 2}, "head_dim 8"),
        ({"num_attention_heads": 4, "num_key_value_heads": 1}, "4 per group"),
        ({"num_hidden_layers": 5}, "layers 5"),
        ({"intermediate_size": 200}, "neurons 200"),
    ],
)
def test_an_unreachable_model_is_refused_in_one_line_naming_the_dim(tmp_path, values, named):
    model = tiny_llama(num_heads=6, num_kv_heads=2)
    with pytest.raises(ConfigError, match=named) as err:
        resolve_target_shape(_config_json(tmp_path, **values), model)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("spec", "named"),
    [({"layer": 2}, "unknown keys"), ({"heads": 4}, "multiple of 3"), ({"hidden": 0}, "positive integer")],
)
def test_a_bad_mapping_is_refused(spec, named):
    with pytest.raises(ConfigError, match=named):
        resolve_target_shape(spec, tiny_llama(num_heads=6, num_kv_heads=2))


def test_the_config_accepts_a_name_or_a_mapping_and_nothing_else():
    mapping = load_config(None, ["prune.target_shape={layers: 2, neurons: 64}"]).prune.target_shape
    assert mapping == {"layers": 2, "neurons": 64}
    assert load_config(None, ["prune.target_shape=smollm2-135m"]).prune.target_shape == "smollm2-135m"
    with pytest.raises(ConfigError, match="target_shape"):
        load_config(None, ["prune.target_shape=[1, 2]"])


# ---- the walk ---------------------------------------------------------------------------------------
def test_the_walk_starts_at_the_source_ends_on_the_target_and_only_shrinks_on_multiples():
    steps = [shape_between(SOURCE, TARGET, k / 21, hidden_multiple=64, neuron_multiple=32) for k in range(22)]
    assert steps[0] == SOURCE and steps[-1] == TARGET
    for before, after in zip(steps, steps[1:]):
        for dim in ("layers", "hidden", "groups", "neurons"):
            assert getattr(TARGET, dim) <= getattr(after, dim) <= getattr(before, dim)
        assert after.hidden % 64 == 0 and after.neurons % 32 == 0
    assert steps[11] == ModelShape(layers=31, hidden=768, groups=4, neurons=2016)  # every dim about halfway
    assert [walk_fraction(100, 60, t) for t in (100, 80, 60, 50)] == [0.0, 0.5, 1.0, 1.0]


def test_kept_counts_are_exact_uniformly_and_keep_the_total_around_the_mean():
    assert kept_counts([96, 96, 80], 3 * 64, None, 1) == [64, 64, 64]
    offsets = torch.tensor([0.05, -0.05, 0.0], dtype=torch.float64)  # layer 0 loses more, layer 1 less
    kept = kept_counts([256, 256, 256], 3 * 128, offsets, 32)
    assert sum(kept) == 3 * 128 and all(k % 32 == 0 for k in kept)
    assert kept[0] <= 128 <= kept[1]
    assert kept_counts([64, 96, 160], 320, offsets, 32) == [64, 96, 160]  # at the total already: nothing goes
    steep = torch.tensor([0.9, -0.9], dtype=torch.float64)
    assert kept_counts([64, 128], 64, steep, 32) == [32, 32]  # no layer below one multiple, the total exact


def test_an_accumulating_walk_cuts_units_in_inner_steps_each_on_fresh_text():
    model = tiny_llama()  # 3 layers of 2 groups (6,144 parameters each) and 96 neurons (192 each)
    shape = ModelShape(layers=3, hidden=64, groups=1, neurons=32)  # removes 3 x 6,144 + 192 x 192 = 55,296
    cfg = PruneConfig(allocation="accumulating", inner_step_fraction=0.2, amplitude=0.3, neuron_multiple=8)
    adapter = get_adapter(model)
    assert unit_inner_steps(model, shape, cfg, adapter) == 3  # 55,296 / (0.2 x 92,160)
    assert unit_inner_steps(model, shape, PruneConfig(allocation="adaptive"), adapter) == 1
    seen = []

    def fresh_text():  # what the model holds when each inner step asks for its text
        sizes = [adapter.layer_shape(model, i) for i in range(3)]
        seen.append((sum(s.groups for s in sizes), sum(s.neurons for s in sizes)))
        return torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(len(seen)))

    report = reach_shape(model, fresh_text, shape, cfg, adapter, progress=False)
    assert report.inner_steps == 3 and seen == [(6, 288), (5, 224), (4, 160)]  # a third of what is left each
    sizes = [adapter.layer_shape(model, i) for i in range(3)]
    assert sum(s.groups for s in sizes) == 3 and sum(s.neurons for s in sizes) == 96
    assert all(s.neurons % 8 == 0 for s in sizes) and len({s.neurons for s in sizes}) > 1


def test_shape_params_counts_the_meta_surgery_without_touching_the_model():
    model = tiny_llama(num_heads=6, num_kv_heads=2)
    before = model.config.to_dict()
    shape = ModelShape(layers=2, hidden=48, groups=1, neurons=64)
    expected = 128 * 48 * 2 + 48 + 2 * (2 * 48 + 3 * 16 * 48 * 2 + 2 * 16 * 48 + 3 * 48 * 64)  # no tie, no biases
    assert shape_params(model, shape, with_output_biases=False) == expected
    assert shape_params(model, shape, with_output_biases=True) == expected + 2 * 2 * 48
    assert model.config.to_dict() == before and current_shape(model).layers == 3


# ---- landing exactly --------------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_lands_on_the_target_shape_and_reloads_exactly(family, tmp_path, input_ids):
    model = to_heterogeneous(hf_model(family)).eval()
    adapter = get_adapter(model)
    target = ModelShape(layers=2, hidden=48, groups=1, neurons=64)
    text = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(3))
    cfg = PruneConfig(allocation="uniform", compensation="least_squares")
    reach_shape(model, text, target, cfg, adapter, progress=False)
    shapes = {(s.groups, s.neurons) for s in (adapter.layer_shape(model, i) for i in range(2))}
    assert current_shape(model) == target and shapes == {(1, 64)}
    assert count_parameters(model) == shape_params(hf_model(family), target, with_output_biases=True)
    save_checkpoint(model, tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()(input_ids).logits,
                           logits(model, input_ids))  # fmt: skip


def _tiny_run(out, *extra: str):
    return load_config(
        None,
        [
            "model.name=tiny-random-llama", "data.seq_len=64", "data.calib_tokens=256", "data.eval_tokens=256",
            "data.eval_context=64", "schedule.train_tokens=1024", "train.batch_size=2", "output.tensorboard=false",
            "eval.every_stage=false", "prune.step_fraction=0.15", "prune.neuron_multiple=8", f"output.dir={out}",
            *extra,
        ],
    )  # fmt: skip


def test_the_controller_walks_to_the_target_and_the_result_reloads_without_adaptprune(tmp_path, input_ids):
    shape = "prune.target_shape={layers: 3, hidden: 48, kv_groups: 1, neurons: 128}"
    cfg = _tiny_run(tmp_path / "run", shape, "prune.allocation=uniform")
    results = Controller(cfg).run()
    final = load_model(str(tmp_path / "run" / "final"))
    walk = plan_walk(load_model("tiny-random-llama"), cfg.prune)
    assert current_shape(final) == ModelShape(3, 48, 1, 128) == walk.target
    assert results["final_params"] == count_parameters(final) == walk.final
    assert results["stages"] >= 3
    card = (tmp_path / "run" / "final" / "README.md").read_text()
    assert "Target shape `{'layers': 3, 'hidden': 48, 'kv_groups': 1, 'neurons': 128}`: every layer has exactly" in card
    ids = input_ids % 500
    (remote,) = remote_logits([tmp_path / "run" / "final"], ids, tmp_path)
    torch.testing.assert_close(remote, logits(final, ids), rtol=0, atol=0)


@pytest.mark.parametrize("allocation", ["adaptive", "accumulating"])
def test_a_non_uniform_walk_keeps_the_totals_and_varies_layers(tmp_path, allocation):
    overrides = ("prune.target_shape={neurons: 128}", "prune.amplitude=0.3", f"prune.allocation={allocation}")
    cfg = _tiny_run(tmp_path / "run", *overrides)
    Controller(cfg).run()
    final = load_model(str(tmp_path / "run" / "final"))
    adapter = get_adapter(final)
    neurons = [adapter.layer_shape(final, i).neurons for i in range(4)]
    assert sum(neurons) == 4 * 128 and all(n % 8 == 0 for n in neurons) and len(set(neurons)) > 1
    how = {"adaptive": "once per stage", "accumulating": "at every inner step (re-scored on fresh text)"}[allocation]
    assert (
        f"per-layer sizes vary around its means (allocation `{allocation}`), by −A·Ĩ {how}"
        in (tmp_path / "run" / "final" / "README.md").read_text()
    )
    if allocation == "accumulating":  # its inner steps re-score: not adaptive's model
        Controller(_tiny_run(tmp_path / "adaptive", *overrides[:2], "prune.allocation=adaptive")).run()
        other = load_model(str(tmp_path / "adaptive" / "final")).state_dict()
        assert not all(torch.equal(t, other[name]) for name, t in final.state_dict().items())


def test_a_uniform_result_exports_as_plain_llama_with_scalar_sizes(tmp_path, bpe_tokenizer):
    from tests.test_export_gguf import fields

    model = tiny_llama(num_heads=6, num_kv_heads=2, vocab_size=300, tie_word_embeddings=True)
    text = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(1))
    reach_shape(model, text, ModelShape(2, 64, 1, 64), PruneConfig(allocation="uniform"), get_adapter(model), False)
    export_gguf(model, bpe_tokenizer, tmp_path / "m.gguf")
    meta, _ = fields(tmp_path / "m.gguf")
    assert meta["general.architecture"] == "llama"
    assert meta["llama.block_count"] == 2 and meta["llama.embedding_length"] == 64
    assert meta["llama.feed_forward_length"] == 64
    assert meta["llama.attention.head_count"] == 3 and meta["llama.attention.head_count_kv"] == 1
