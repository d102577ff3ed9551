"""The supported version ranges, and the library behaviours adaptprune relies on.

If an upgrade breaks one of these, the failure names the behaviour rather than surfacing as a
shape error deep inside a pruning run.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from adaptprune import compat

ROOT = Path(__file__).resolve().parents[1]


def _pins() -> dict[str, str]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {m.group(1): m.group(2) for m in (re.match(r"([A-Za-z0-9_.-]+)\s*(.*)", d) for d in deps)}


def test_supported_ranges_are_the_pyproject_pins():
    pins = _pins()
    for package, spec in compat.SUPPORTED.items():
        assert pins[package] == spec, package


def test_the_installed_versions_are_supported():
    assert compat.version_problems() == []


def test_an_out_of_range_version_names_package_version_and_range(capsys):
    fake = {"transformers": "4.46.0", "peft": "0.21.0"}
    problems = compat.version_problems({"transformers": ">=5.23,<5.24", "peft": ">=0.17,<0.22"}, fake.__getitem__)
    assert problems == [
        "transformers 4.46.0 is installed; adaptprune supports transformers>=5.23,<5.24 "
        "(pip install 'transformers>=5.23,<5.24')"
    ]

    def missing(name: str) -> str:
        raise compat.metadata.PackageNotFoundError(name)

    assert compat.version_problems({"lm-eval": ">=0.4.9,<0.5"}, missing) == [
        "lm-eval is not installed; adaptprune supports lm-eval>=0.4.9,<0.5"
    ]


def test_check_versions_warns_once_or_raises_when_strict(monkeypatch, capsys):
    monkeypatch.setattr(compat, "version_problems", lambda: ["peft 0.9.0 is installed; adaptprune supports peft>=0.17"])
    assert compat.check_versions(strict=False, force=True) == [
        "peft 0.9.0 is installed; adaptprune supports peft>=0.17"
    ]
    assert capsys.readouterr().err == "adaptprune: warning: peft 0.9.0 is installed; adaptprune supports peft>=0.17\n"
    assert compat.check_versions() == []  # once per process
    with pytest.raises(compat.IncompatibleVersionError, match="peft 0.9.0"):
        compat.check_versions(strict=True, force=True)


def test_strict_mode_is_a_one_line_cli_error(monkeypatch, capsys):
    from adaptprune import cli

    monkeypatch.setattr(compat, "_checked", False)
    monkeypatch.setattr(compat, "version_problems", lambda: ["torch 1.0 is installed; adaptprune supports torch>=2.4"])
    monkeypatch.setenv(compat.STRICT_ENV, "1")
    assert cli.main(["inspect", "smollm2-135m"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


# ---- transformers ----------------------------------------------------------------------------
def _llama_config(**kw):
    from transformers import LlamaConfig

    values = dict(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
    )
    return LlamaConfig(**{**values, **kw})


def test_per_layer_config_resolves_per_layer_attributes():
    config = _llama_config(per_layer_config={1: {"intermediate_size": 48}})
    assert config.is_heterogeneous
    assert config.per_layer_config[1].intermediate_size == 48
    assert config.per_layer_config[0].intermediate_size == 96  # layers without overrides see the global value
    assert config._getattr_without_heterogeneous_validation("intermediate_size") == 96  # hf_compat.global_value
    again = type(config).from_dict(config.to_dict())  # survives a save/load round trip
    assert again.per_layer_config[1].intermediate_size == 48


def test_per_layer_heads_need_our_validation():
    """HF's Llama validator reads head counts globally, which a heterogeneous config forbids; our
    config class validates through ``hf_compat.validate_heterogeneous`` instead."""
    from transformers.integrations.heterogeneity.configuration_utils import AmbiguousGlobalPerLayerAttributeError

    from adaptprune.arch.hetero_llama import AdaptLlamaConfig

    heads = {1: {"num_attention_heads": 2, "num_key_value_heads": 1}}
    with pytest.raises(AmbiguousGlobalPerLayerAttributeError):
        _llama_config(per_layer_config=heads)
    ours = AdaptLlamaConfig(**{**_llama_config().to_dict(), "per_layer_config": heads})
    assert ours.per_layer_config[1].num_key_value_heads == 1
    assert ours.per_layer_config[0].num_attention_heads == 4


def test_llama_attention_reshapes_with_minus_one_heads():
    """Pruned q/k/v/o with fewer heads than the config says must still run: HF views (B, T, -1, D)."""
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    config = _llama_config()
    attn = LlamaAttention(config, layer_idx=0).eval()
    d = config.head_dim
    attn.q_proj, attn.k_proj, attn.v_proj = (
        nn.Linear(64, 2 * d, bias=False),
        nn.Linear(64, d, bias=False),
        nn.Linear(64, d, bias=False),
    )  # one KV group (of 2) left: 2 query heads, 1 KV head
    attn.o_proj = nn.Linear(2 * d, 64, bias=False)
    hidden = torch.randn(2, 5, 64)
    position_ids = torch.arange(5)[None].expand(2, -1)
    cos_sin = LlamaRotaryEmbedding(config)(hidden, position_ids)
    out, _ = attn(hidden, position_embeddings=cos_sin, attention_mask=None)
    assert out.shape == (2, 5, 64)
    assert attn.num_key_value_groups == 2  # query heads per KV head: constant under group pruning


# ---- peft ------------------------------------------------------------------------------------
def test_peft_lora_wraps_plain_linear_and_merges_exactly():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(8, 6))
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["proj"], init_lora_weights=False))
    x = torch.randn(3, 8)
    with torch.no_grad():
        adapted = peft_model(x)
        merged = peft_model.merge_and_unload()
        assert isinstance(merged.proj, nn.Linear)
        torch.testing.assert_close(merged(x), adapted)


# ---- lm-eval ---------------------------------------------------------------------------------
def test_lm_eval_simple_evaluate_accepts_task_manager_and_a_model_object():
    import lm_eval
    from lm_eval.tasks import TaskManager

    params = inspect.signature(lm_eval.simple_evaluate).parameters
    for name in ("model", "tasks", "limit", "task_manager", "num_fewshot", "batch_size"):
        assert name in params, name
    assert inspect.isclass(TaskManager)
    from lm_eval.models.huggingface import HFLM

    assert "pretrained" in inspect.signature(HFLM.__init__).parameters


def test_bf16_on_a_cpu_without_native_bf16_warns():
    import torch

    from adaptprune.compat import cpu_has_native_bf16
    from adaptprune.run.controller import precision_warning

    assert cpu_has_native_bf16() == (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    assert "no native bf16" in precision_warning("bf16", on_cpu=True, native_bf16=False)
    assert precision_warning("bf16", on_cpu=True, native_bf16=True) is None
    assert precision_warning("bf16", on_cpu=False, native_bf16=False) is None
    assert "fp16 has no effect" in precision_warning("fp16", on_cpu=True, native_bf16=True)
    assert precision_warning("no", on_cpu=True, native_bf16=False) is None


def _write_tiny_llama_gguf(path) -> None:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(8)
    writer.add_embedding_length(4)
    writer.add_feed_forward_length(8)
    writer.add_head_count(1)
    writer.add_tensor("token_embd.weight", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_one_gguf_parse_reaches_transformers_and_restores_the_reader(tmp_path, monkeypatch):
    """transformers' GGUF loader builds one reader per file inside the block, a new one per load outside."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from adaptprune.compat import one_gguf_parse

    paths = [tmp_path / "a.gguf", tmp_path / "b.gguf"]
    for path in paths:
        _write_tiny_llama_gguf(path)
    opened = []

    class CountingReader(gguf.GGUFReader):
        def __init__(self, path, mode="r"):
            opened.append(str(path))
            super().__init__(path, mode)

    monkeypatch.setattr(gguf, "GGUFReader", CountingReader)
    with one_gguf_parse():
        configs = [load_gguf_checkpoint(str(p))["config"] for p in (paths[0], paths[0], paths[1])]
    assert opened == [str(paths[0]), str(paths[1])]
    assert configs[0] == configs[1] == configs[2] and configs[0]["hidden_size"] == 4
    assert gguf.GGUFReader is CountingReader
    load_gguf_checkpoint(str(paths[0]))
    assert len(opened) == 3
