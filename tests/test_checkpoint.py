"""Pruned heterogeneous checkpoints reload exactly, two ways, and work with generate and peft."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import torch
from transformers import AutoModelForCausalLM

from adaptprune.arch import ATTENTION, MLP
from adaptprune.checkpoint import save_checkpoint
from adaptprune.pruning.surgery import apply_plan, ensure_output_biases

from .conftest import tiny_llama

NON_UNIFORM_PLAN = {
    0: {MLP: list(range(0, 96, 2)), ATTENTION: [1]},
    1: {MLP: list(range(70))},
    2: {ATTENTION: [0, 2], MLP: [3, 4, 5, 60, 61]},
}


def _pruned_model():
    model = tiny_llama(num_heads=6, num_kv_heads=3)
    apply_plan(model, NON_UNIFORM_PLAN)
    return model


def test_reload_with_registered_auto_classes_is_exact(tmp_path, input_ids):
    model = _pruned_model()
    save_checkpoint(model, tmp_path / "ckpt")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, reloaded(input_ids).logits)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["per_layer_config"]["0"] == {
        "intermediate_size": 48,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
    }
    assert not any(p.name.startswith(".ckpt") for p in tmp_path.iterdir())  # no temp folders left


def test_output_biases_are_saved_and_reloaded(tmp_path, input_ids):
    model = _pruned_model()
    ensure_output_biases(model)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.bias.normal_()
    save_checkpoint(model, tmp_path / "ckpt")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert reloaded.model.layers[1].mlp.down_proj.bias is not None
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, reloaded(input_ids).logits)


def test_reload_with_trust_remote_code_without_adaptprune(tmp_path, input_ids):
    model = _pruned_model()
    save_checkpoint(model, tmp_path / "ckpt")
    torch.save  # noqa: B018  (nothing pickled: logits travel as a safetensors file)
    from safetensors.torch import save_file

    save_file({"input_ids": input_ids}, str(tmp_path / "inputs.safetensors"))
    script = textwrap.dedent(f"""
        import sys
        class BlockAdaptprune:
            def find_spec(self, name, path=None, target=None):
                if name == "adaptprune" or name.startswith("adaptprune."):
                    raise ImportError("adaptprune is blocked in this interpreter")
                return None
        sys.meta_path.insert(0, BlockAdaptprune())
        import torch
        from safetensors.torch import load_file, save_file
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "ckpt")!r}, trust_remote_code=True).eval()
        assert "adaptprune" not in sys.modules
        ids = load_file({str(tmp_path / "inputs.safetensors")!r})["input_ids"]
        with torch.no_grad():
            save_file({{"logits": model(ids).logits.contiguous()}}, {str(tmp_path / "out.safetensors")!r})
    """)
    env_home = {"HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    import os

    subprocess.run([sys.executable, "-c", script], check=True, env={**os.environ, **env_home}, cwd=tmp_path)
    from safetensors.torch import load_file

    remote_logits = load_file(str(tmp_path / "out.safetensors"))["logits"]
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, remote_logits)


def test_generate_on_pruned_model(input_ids):
    model = _pruned_model()
    out = model.generate(input_ids[:1], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, input_ids.shape[1] + 5)


def test_lora_attaches_to_pruned_model_and_trains_one_step(input_ids):
    from peft import LoraConfig, get_peft_model

    model = _pruned_model().train()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    loss = peft_model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(b, p) for b, p in zip(before, trainable))
    lora_a = peft_model.base_model.model.model.layers[2].mlp.down_proj.lora_A["default"].weight
    assert lora_a.shape == (4, 5)  # the adapter follows the pruned width


def test_a_registered_checkpoint_class_of_no_family_loads_as_itself(tmp_path, input_ids):
    """``load_model`` asks the checkpoint-class registry first (how SliceGPT's sliced Llama reloads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from adaptprune.arch import CHECKPOINT_CLASSES, register_auto_classes, register_checkpoint_class
    from adaptprune.arch.hetero_sliced_llama import AdaptSlicedLlamaForCausalLM
    from adaptprune.checkpoint import load_model

    assert CHECKPOINT_CLASSES["adaptprune_sliced_llama"][1] is AdaptSlicedLlamaForCausalLM

    class PlainConfig(LlamaConfig):
        model_type = "test_plain_llama"

    class PlainModel(LlamaForCausalLM):
        config_class = PlainConfig

    model = PlainModel(PlainConfig(**tiny_llama().config.to_dict())).eval()
    model.save_pretrained(tmp_path / "plain")
    register_checkpoint_class(PlainModel)
    register_auto_classes()  # as importing adaptprune does, once every arch module has registered
    try:
        reloaded = load_model(str(tmp_path / "plain")).eval()
    finally:
        del CHECKPOINT_CLASSES["test_plain_llama"]
    assert type(reloaded) is PlainModel
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, reloaded(input_ids).logits)
