"""Shared fixtures: tiny random models built from a config, offline hub."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

import adaptprune  # noqa: E402,F401  (registers the auto classes)
from adaptprune.checkpoint import to_heterogeneous  # noqa: E402


def tiny_llama(num_heads: int = 4, num_kv_heads: int = 2, layers: int = 3, seed: int = 0, **overrides):
    """A randomly initialised Llama-family model as our heterogeneous class (fp32, eval mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    values = dict(
        vocab_size=128,
        hidden_size=16 * num_heads,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=16,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    values.update(overrides)
    model = to_heterogeneous(LlamaForCausalLM(LlamaConfig(**values)))
    return model.eval()


@pytest.fixture(params=[(4, 4), (4, 2), (6, 2)], ids=["mha", "gqa2", "gqa3"])
def llama_model(request):
    heads, kv = request.param
    return tiny_llama(num_heads=heads, num_kv_heads=kv)


@pytest.fixture
def input_ids():
    torch.manual_seed(123)
    return torch.randint(0, 128, (2, 12))


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M (converted once into the cache), shared read-only."""
    from adaptprune.checkpoint import load_model

    return load_model("smollm2-135m")


@pytest.fixture
def smollm2_fresh():
    """A private copy for tests that modify the model."""
    from adaptprune.checkpoint import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from adaptprune.checkpoint import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="session")
def bpe_tokenizer():
    """A 300-token byte-level BPE trained in milliseconds (GPT-2's pre-tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(["to be or not to be, that is the question"] * 20, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", bos_token="<eos>")
