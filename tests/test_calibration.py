"""Streaming calibration equals statistics of the stacked activations; hooks never leak."""

from __future__ import annotations

import pytest
import torch

from adaptprune.arch import ATTENTION, MLP, UNIT_KINDS, Coupling, get_adapter
from adaptprune.calibration import activations as calibration
from adaptprune.calibration.activations import ChannelAccumulator, calibrate, first_order_terms

from .conftest import tiny_llama


def _sequences(n: int = 5, length: int = 12, seed: int = 7) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randint(0, 128, (n, length))


def _record(model, sequences):
    """Stacked inputs of every o/down projection and every layer's (h_in, h_out), one forward."""
    adapter = get_adapter(model)
    inputs = {(i, k): [] for i in range(len(adapter.decoder_layers(model))) for k in UNIT_KINDS}
    streams = {i: [] for i in range(len(adapter.decoder_layers(model)))}
    handles = []
    for i, layer in enumerate(adapter.decoder_layers(model)):
        for kind, path in ((MLP, adapter.mlp_output), (ATTENTION, adapter.attention_output)):
            handles.append(
                layer.get_submodule(path).register_forward_pre_hook(
                    lambda _m, a, key=(i, kind): inputs[key].append(a[0].detach().reshape(-1, a[0].shape[-1]))
                )
            )
        handles.append(
            layer.register_forward_hook(
                lambda _m, a, kw, out, i=i: streams[i].append((kw.get("hidden_states", a[0] if a else None), out)),
                with_kwargs=True,
            )
        )
    with torch.no_grad():
        model(input_ids=sequences, use_cache=False)
    for h in handles:
        h.remove()
    return {k: torch.cat(v).double() for k, v in inputs.items()}, streams


def _no_hooks(model) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_streamed_stats_equal_stacked_activations():
    model = tiny_llama(num_heads=4, num_kv_heads=2)
    seqs = _sequences()
    calib = calibrate(model, seqs, batch_size=2, collect_cov=True, progress=False)  # batches of 2, 2, 1
    stacked, streams = _record(model, seqs)
    assert calib.tokens == seqs.numel() and len(calib.layers) == 3
    for (layer, kind), x in stacked.items():
        stats = calib.layers[layer].channels(kind)
        assert stats.count == x.shape[0] == seqs.numel()
        assert stats.mean.dtype == torch.float64
        torch.testing.assert_close(stats.mean, x.mean(0), rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(stats.var, x.var(0, unbiased=False), rtol=1e-9, atol=1e-14)
        torch.testing.assert_close(stats.sq_mean, x.square().mean(0), rtol=1e-10, atol=1e-14)
        cov = x.T @ x / x.shape[0]  # Σ's chunk products are taken in fp32 (the activations' precision)
        torch.testing.assert_close(stats.cov, cov, rtol=1e-5, atol=1e-6 * float(cov.abs().max()))
    for layer, [(h_in, h_out)] in streams.items():
        cos = torch.nn.functional.cosine_similarity(h_in.double(), h_out.double(), dim=-1)
        assert calib.layers[layer].influence == pytest.approx(1.0 - cos.mean().item(), abs=1e-6)


def test_row_chunking_gives_the_statistics_of_the_whole_batch(monkeypatch):
    """Large batches are folded in row chunks (memory); every statistic equals the unchunked one."""
    torch.manual_seed(0)
    x = 3.0 + torch.randn(4, 50, 6)  # (B, T, C): 200 rows
    whole = ChannelAccumulator(collect_cov=True)
    whole.update(x)
    monkeypatch.setattr(calibration, "CHUNK_BYTES", 8 * 6 * 7)  # 7 rows per chunk: 29 chunks
    chunked = ChannelAccumulator(collect_cov=True)
    chunked.update(x)
    a, b = whole.result(), chunked.result()
    assert a.count == b.count == 200
    for name in ("mean", "var", "sq_mean"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), rtol=1e-12, atol=1e-12)
    # Σ sums fp32 chunk products (the activations' precision) in float64
    torch.testing.assert_close(b.cov, a.cov, rtol=1e-6, atol=1e-6 * float(a.cov.abs().max()))


def test_large_mean_small_variance_channel_keeps_its_variance():
    """Chan's merge is exact where E[x²] − μ² would cancel catastrophically."""
    torch.manual_seed(0)
    x = 1e6 + 1e-3 * torch.randn(300, 3, dtype=torch.float64)
    acc = ChannelAccumulator()
    for chunk in x.split(7):
        acc.update(chunk)
    stats = acc.result()
    torch.testing.assert_close(stats.var, x.var(0, unbiased=False), rtol=1e-6, atol=0)


def test_hooks_removed_after_success_and_failure():
    model = tiny_llama()
    calibrate(model, _sequences(), batch_size=2, taylor_batches=1, progress=False)
    assert _no_hooks(model)
    bad = _sequences()
    bad[3, 0] = 10_000  # out of the vocabulary: the embedding lookup raises mid-pass
    model.train()
    with pytest.raises(IndexError):
        calibrate(model, bad, batch_size=2, taylor_batches=3, progress=False)
    assert _no_hooks(model) and model.training
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_identity_layer_has_zero_influence():
    model = tiny_llama()
    adapter = get_adapter(model)
    layer = adapter.decoder_layers(model)[1]
    with torch.no_grad():
        layer.get_submodule(adapter.mlp_output).weight.zero_()
        layer.get_submodule(adapter.attention_output).weight.zero_()
    calib = calibrate(model, _sequences(), progress=False)
    assert calib.layers[1].influence == pytest.approx(0.0, abs=1e-12)
    assert calib.layers[0].influence > 1e-3


def test_taylor_terms_match_autograd_and_leave_no_grads():
    model = tiny_llama(num_heads=6, num_kv_heads=2)
    adapter = get_adapter(model)
    seqs = _sequences(4)
    # two Taylor batches of 2 = the mean of the two batch losses
    calib = calibrate(model, seqs, batch_size=2, taylor_batches=2, progress=False)
    assert calib.taylor_tokens == seqs.numel()
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    loss = sum(model(input_ids=b, labels=b, use_cache=False).loss for b in seqs.split(2)) / 2
    loss.backward()
    for layer_idx in range(3):
        layer = adapter.decoder_layers(model)[layer_idx]
        for kind in UNIT_KINDS:
            units = adapter.count_units(model, layer_idx, kind)
            expected = torch.zeros(units, dtype=torch.float64)
            for c in adapter.couplings(model, layer_idx, kind):
                w = layer.get_submodule(c.path).weight
                expected += first_order_terms(w, w.grad, c, units)
            torch.testing.assert_close(calib.taylor[layer_idx][kind], expected, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("elementwise", [False, True], ids=["signed", "elementwise"])
def test_taylor_gradient_is_the_mean_token_loss_over_unequal_batches(elementwise):
    """Mini-batches of 2 and 1 sequences: each batch loss weighs by its share, so the terms are those
    of one backward over all three sequences; the element-wise mode keeps Σ|w·g| as well."""
    model = tiny_llama(num_heads=4, num_kv_heads=2, layers=2)
    adapter = get_adapter(model)
    seqs = _sequences(3, length=10)
    calib = calibrate(model, seqs, batch_size=2, taylor_batches=2, taylor_elementwise=elementwise, progress=False)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert (calib.taylor_abs is not None) == elementwise
    model(input_ids=seqs, labels=seqs, use_cache=False).loss.backward()
    for layer_idx in range(2):
        layer = adapter.decoder_layers(model)[layer_idx]
        for kind in UNIT_KINDS:
            units = adapter.count_units(model, layer_idx, kind)
            for absolute, got in ((False, calib.taylor), (True, calib.taylor_abs)):
                if got is None:
                    continue
                expected = torch.zeros(units, dtype=torch.float64)
                for c in adapter.couplings(model, layer_idx, kind):
                    w = layer.get_submodule(c.path).weight
                    expected += first_order_terms(w, w.grad, c, units, absolute=absolute)
                torch.testing.assert_close(got[layer_idx][kind], expected, rtol=1e-4, atol=1e-9)


def test_first_order_terms_by_hand():
    w = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    g = torch.tensor([[0.5, -1.0, 0.0], [1.0, 0.0, -2.0]])
    # columns (dim 1) 0 and 2 belong to unit 1, column 1 to unit 0
    cols = first_order_terms(w, g, Coupling("x", 1, torch.tensor([1, 0, 1])), 2)
    assert cols.tolist() == [-2.0 + 0.0, (0.5 + 4.0) + (0.0 - 12.0)]
    rows = first_order_terms(w, g, Coupling("x", 0, torch.tensor([0, 0])), 1)
    assert rows.tolist() == [0.5 - 2.0 + 4.0 - 12.0]
    assert first_order_terms(w, g, Coupling("x", 0, torch.tensor([0, 0])), 1, absolute=True).tolist() == [18.5]


def test_bad_sequences_fail_clearly():
    model = tiny_llama(layers=1)
    with pytest.raises(ValueError, match="LongTensor"):
        calibrate(model, torch.zeros(2, 4), progress=False)
    with pytest.raises(ValueError, match="at least one"):
        calibrate(model, torch.zeros(0, 4, dtype=torch.long), progress=False)
