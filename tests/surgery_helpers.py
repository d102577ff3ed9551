"""Property checks shared by the per-family architecture tests.

Each takes a tiny heterogeneous model and asserts one property exactly: removing units equals
zeroing their activations, a saved checkpoint reloads to identical logits (with adaptprune, and
with ``trust_remote_code`` where adaptprune cannot be imported), and ``generate`` runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

from adaptprune.arch import MLP, get_adapter
from adaptprune.checkpoint import save_checkpoint, to_heterogeneous
from adaptprune.pruning.surgery import apply_plan

# {layer_idx: {kind: unit ids to remove}}
Removal = Mapping[int, Mapping[str, Sequence[int]]]


def keep_plan(model: nn.Module, removed: Removal) -> dict[int, dict[str, list[int]]]:
    """The surgery plan (kept ids) that removes ``removed``."""
    adapter = get_adapter(model)
    return {
        layer_idx: {
            kind: [u for u in range(adapter.count_units(model, layer_idx, kind)) if u not in gone]
            for kind, gone in kinds.items()
        }
        for layer_idx, kinds in removed.items()
    }


def masked_logits(model: nn.Module, removed: Removal, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits with the removed units' activations zeroed by pre-hooks on the output projections."""
    adapter = get_adapter(model)
    handles = []
    for layer_idx, kinds in removed.items():
        layer = adapter.decoder_layers(model)[layer_idx]
        for kind, units in kinds.items():
            coupling = adapter.output_coupling(model, layer_idx, kind)
            mask = torch.isin(coupling.unit_ids, torch.tensor(list(units)))  # (in_features,)
            path = adapter.mlp_output if kind == MLP else adapter.attention_output
            hook = lambda m, args, mask=mask: (args[0].masked_fill(mask, 0.0),)  # noqa: E731
            handles.append(layer.get_submodule(path).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            return model(input_ids).logits
    finally:
        for handle in handles:
            handle.remove()


def logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids).logits


def assert_hetero_matches_hf(hf_model: nn.Module, input_ids: torch.Tensor) -> nn.Module:
    """Our heterogeneous class, before any pruning, loads every HF weight and gives HF's logits."""
    hetero = to_heterogeneous(hf_model.eval()).eval()
    assert type(hetero) is not type(hf_model)
    assert torch.equal(logits(hetero, input_ids), logits(hf_model, input_ids))
    return hetero


def assert_removal_equals_masking(model: nn.Module, removed: Removal, input_ids: torch.Tensor) -> None:
    """Physically removing units gives the logits of masking them (the model is pruned in place)."""
    masked = masked_logits(model, removed, input_ids)
    apply_plan(model, keep_plan(model, removed))
    assert (logits(model, input_ids) - masked).abs().max().item() <= 1e-5


def assert_reload_is_exact(model: nn.Module, folder: Path, input_ids: torch.Tensor) -> None:
    """``save_checkpoint`` then ``AutoModelForCausalLM.from_pretrained`` (adaptprune imported)."""
    save_checkpoint(model, folder)
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(reloaded) is type(model)
    assert torch.equal(logits(reloaded, input_ids), logits(model, input_ids))


REMOTE_SCRIPT = """
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

folders, inputs, output = sys.argv[1:-2], sys.argv[-2], sys.argv[-1]
ids = load_file(inputs)["input_ids"]
results = {}
for i, folder in enumerate(folders):
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        results[f"logits{i}"] = model(ids).logits.contiguous()
assert not any(name.split(".")[0] == "adaptprune" for name in sys.modules)
save_file(results, output)
"""


def remote_logits(folders: Sequence[Path], input_ids: torch.Tensor, work: Path) -> list[torch.Tensor]:
    """Logits of saved checkpoints loaded with ``trust_remote_code=True`` in a fresh interpreter
    where importing adaptprune fails (one interpreter for all folders: start-up is the cost)."""
    save_file({"input_ids": input_ids.contiguous()}, str(work / "inputs.safetensors"))
    env = {**os.environ, "HF_HOME": str(work / "hf_home"), "HF_HUB_OFFLINE": "1"}
    args = [str(f) for f in folders] + [str(work / "inputs.safetensors"), str(work / "remote.safetensors")]
    subprocess.run([sys.executable, "-c", textwrap.dedent(REMOTE_SCRIPT), *args], check=True, env=env, cwd=work)
    out = load_file(str(work / "remote.safetensors"))
    return [out[f"logits{i}"] for i in range(len(folders))]


def assert_generates(model: nn.Module, input_ids: torch.Tensor) -> None:
    out = model.generate(input_ids[:1], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, input_ids.shape[1] + 5)
