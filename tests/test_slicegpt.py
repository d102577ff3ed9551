"""SliceGPT baseline: rotation is exact, slicing sizes are exact, sliced checkpoints reload two ways."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig

from adaptprune.arch import ATTENTION, MLP
from adaptprune.baselines.slicegpt import (
    count_sliced_params,
    pca_basis,
    ratio_for_params,
    slice_to_params,
    slicegpt_prune,
)
from adaptprune.checkpoint import save_checkpoint
from adaptprune.pruning.surgery import apply_plan

from .conftest import tiny_llama

GEOMETRIES = [(4, 4, False), (6, 2, True), (6, 3, False)]  # (heads, kv heads, tied embedding)


@pytest.fixture
def calibration():
    torch.manual_seed(7)
    return torch.randint(0, 128, (6, 16))


def _logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits


@pytest.mark.parametrize("heads,kv,tied", GEOMETRIES, ids=["mha", "gqa3-tied", "gqa2"])
def test_rotation_without_slicing_keeps_logits(heads, kv, tied, calibration, input_ids):
    dense = tiny_llama(num_heads=heads, num_kv_heads=kv, tie_word_embeddings=tied)
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    rotated = slicegpt_prune(dense, calibration, 0.0, progress=False)
    assert (_logits(rotated, input_ids) - _logits(dense, input_ids)).abs().max() <= 1e-4
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items())  # input untouched


@pytest.mark.parametrize("slice_head", [False, True])
@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.4])
def test_parameter_formula_equals_built_model(sparsity, slice_head, calibration):
    dense = tiny_llama(num_heads=6, num_kv_heads=2, tie_word_embeddings=True)
    sliced = slicegpt_prune(dense, calibration, sparsity, slice_head=slice_head, progress=False)
    assert sliced.num_parameters() == count_sliced_params(dense.config, sparsity, slice_head=slice_head)
    width = sliced.config.slice_dims[0]
    assert width % 8 == 0 and sliced.model.layers[1].mlp.down_proj.out_features == width
    assert sliced.lm_head.in_features == (width if slice_head else dense.config.hidden_size)


def test_as_published_counts_of_smollm2_match_the_original_code():
    """ASSETS.md: Microsoft's SliceGPT on SmolLM2-135M gives 140,652,288 (0.25) and 131,641,088 (0.30)."""
    smollm2 = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        tie_word_embeddings=True,
    )
    assert count_sliced_params(smollm2, 0.25) == 140_652_288
    assert count_sliced_params(smollm2, 0.30) == 131_641_088


def test_pca_basis_orders_directions_by_energy():
    rotation, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))
    gram = rotation @ torch.diag(torch.tensor([1.0, 9.0, 4.0, 0.5], dtype=torch.float64)) @ rotation.T
    basis = pca_basis(gram, damping=0.01)
    assert torch.allclose(basis.T @ basis, torch.eye(4, dtype=torch.float64), atol=1e-10)
    expected = rotation[:, [1, 2, 0, 3]]
    assert torch.allclose((basis * expected).sum(0).abs(), torch.ones(4, dtype=torch.float64), atol=1e-10)


def test_slice_to_params_lands_within_half_a_percent(calibration):
    dense = tiny_llama(num_heads=8, num_kv_heads=4, intermediate_size=256, layers=4, tie_word_embeddings=True)
    embedding = dense.config.vocab_size * dense.config.hidden_size
    target = round(dense.num_parameters() - 0.3 * (dense.num_parameters() - embedding))
    sliced = slice_to_params(dense, calibration, target, slice_head=True, progress=False)
    assert abs(sliced.num_parameters() - target) <= 0.005 * target
    with pytest.raises(ValueError, match="outside"):
        ratio_for_params(dense.config, 10 * dense.num_parameters())


def test_pruned_models_are_refused(calibration):
    pruned = tiny_llama(num_heads=6, num_kv_heads=3)
    apply_plan(pruned, {0: {MLP: list(range(40)), ATTENTION: [0, 2]}})
    with pytest.raises(NotImplementedError):
        slicegpt_prune(pruned, calibration, 0.25, progress=False)


@pytest.fixture
def sliced_model(calibration):
    dense = tiny_llama(num_heads=6, num_kv_heads=2, tie_word_embeddings=True)
    return slicegpt_prune(dense, calibration, 0.25, progress=False)


def test_sliced_model_generates(sliced_model, input_ids):
    out = sliced_model.generate(input_ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, input_ids.shape[1] + 4)


def test_sliced_checkpoint_reloads_exactly_both_ways(sliced_model, tmp_path, input_ids):
    save_checkpoint(sliced_model, tmp_path / "ckpt")
    expected = _logits(sliced_model, input_ids)

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert type(reloaded) is type(sliced_model)
    assert reloaded.config.slice_dims == sliced_model.config.slice_dims
    assert torch.equal(_logits(reloaded, input_ids), expected)

    assert torch.equal(_reload_without_adaptprune(tmp_path, input_ids), expected)


def _reload_without_adaptprune(tmp_path, input_ids) -> torch.Tensor:
    """Logits of the checkpoint loaded with ``trust_remote_code`` in an interpreter that cannot
    import adaptprune (tensors travel as safetensors files)."""
    save_file({"input_ids": input_ids}, str(tmp_path / "inputs.safetensors"))
    script = textwrap.dedent(f"""
        import sys
        class BlockAdaptprune:
            def find_spec(self, name, path=None, target=None):
                if name == "adaptprune" or name.startswith("adaptprune."):
                    raise ImportError("adaptprune is blocked in this interpreter")
        sys.meta_path.insert(0, BlockAdaptprune())
        import torch
        from safetensors.torch import load_file, save_file
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "ckpt")!r}, trust_remote_code=True).eval()
        assert "adaptprune" not in sys.modules and type(model).__name__ == "AdaptSlicedLlamaForCausalLM"
        ids = load_file({str(tmp_path / "inputs.safetensors")!r})["input_ids"]
        with torch.no_grad():
            save_file({{"logits": model(ids).logits.contiguous()}}, {str(tmp_path / "out.safetensors")!r})
    """)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=tmp_path)
    return load_file(str(tmp_path / "out.safetensors"))["logits"]
