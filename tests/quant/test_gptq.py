"""GPTQ: Hessian accumulation, agreement with a naive float64 OBQ-style reference, identities, held-out error."""

import pytest
import torch

from rcp_lib.quant import (
    HessianAccumulator,
    WeightQuantConfig,
    WeightQuantizer,
    fake_quant_uniform,
    gptq_quantize,
)


def correlated_inputs(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100)
    mix = torch.randn(d, d, generator=g) / d**0.5 + 0.3 * torch.eye(d)
    scale = torch.rand(d, generator=g) * 2 + 0.2
    return (torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) @ mix) * scale


def out_err(W, Q, X):
    return ((X.double() @ (W.double() - Q.double()).T) ** 2).sum().item()


def ref_gptq(W, H, gs, bits=None, levels=None, percdamp=0.01, order=None):
    """Naive sequential OBQ-style GPTQ in float64 with the explicit inverse Hessian (no Cholesky, no blocks):
    quantize column j, spread (w_j - q_j) / Hinv_jj * Hinv_j,rest over the remaining columns, then remove j from
    Hinv. A uniform group's range is the min-max of its current (updated) columns when its first column comes up."""
    W = W.double().clone()
    H = H.double().clone()
    d = W.shape[1]
    H += percdamp * torch.diag(H).mean() * torch.eye(d, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    order = list(range(d)) if order is None else [int(i) for i in order]
    Q = torch.zeros_like(W)
    params = {}
    for n, j in enumerate(order):
        g = j // gs
        w = W[:, j]
        if bits is not None:
            L = 2**bits
            if g not in params:
                cols = W[:, g * gs:(g + 1) * gs]
                lo, hi = cols.min(1).values, cols.max(1).values
                params[g] = (lo, (hi - lo) / (L - 1))
            lo, s = params[g]
            q = lo + s * torch.clamp(torch.round((w - lo) / s), 0, L - 1)
        else:
            lv = levels[:, g].double()
            q = lv.gather(1, (w[:, None] - lv).abs().argmin(1, keepdim=True)).squeeze(1)
        rest = order[n + 1:]
        err = (w - q) / Hinv[j, j]
        W[:, rest] -= err[:, None] * Hinv[j, rest][None, :]
        Q[:, j] = q
        Hinv = Hinv - torch.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
    return Q


def test_hessian_accumulator_matches_float64_reference():
    x = torch.randn(3, 50, 24)
    acc = HessianAccumulator(24)
    for b in x:
        acc.add_batch(b)
    acc.add_batch(torch.randn(0, 24))
    X = x.reshape(-1, 24).double()
    ref = 2 / X.shape[0] * X.T @ X
    assert acc.H.dtype == torch.float32  # the reference GPTQ's accumulation precision (the default)
    torch.testing.assert_close(acc.H.double(), ref, rtol=1e-5, atol=1e-5)
    acc64 = HessianAccumulator(24, dtype=torch.float64)
    for b in x:
        acc64.add_batch(b)
    torch.testing.assert_close(acc64.H, ref)
    assert acc.nsamples == 150
    with pytest.raises(ValueError):
        acc.add_batch(torch.randn(2, 23))
    with pytest.raises(ValueError):
        HessianAccumulator(5).H


@pytest.mark.parametrize("block_size", [5, 16, 128])
@pytest.mark.parametrize("act_order", [False, True])
def test_matches_naive_reference_uniform(block_size, act_order):
    W = torch.randn(12, 32, dtype=torch.float64)
    X = correlated_inputs(400, 32, seed=1).double()
    H = 2 / 400 * X.T @ X
    res = gptq_quantize(W, H, bits=3, group_size=8, block_size=block_size, act_order=act_order, dtype=torch.float64)
    order = torch.argsort(torch.diag(H), descending=True) if act_order else None
    ref = ref_gptq(W, H, 8, bits=3, order=order)
    torch.testing.assert_close(res.weight, ref, atol=1e-9, rtol=0)
    if act_order:
        assert torch.equal(res.perm, order)


@pytest.mark.parametrize("act_order", [False, True])
def test_matches_naive_reference_fixed_levels(act_order):
    W = torch.randn(10, 24, dtype=torch.float64)
    X = correlated_inputs(300, 24, seed=2).double()
    H = 2 / 300 * X.T @ X
    levels = torch.sort(torch.randn(10, 3, 4, dtype=torch.float64) * 1.5, dim=-1).values
    res = gptq_quantize(W, H, levels=levels, group_size=8, block_size=7, act_order=act_order, dtype=torch.float64)
    order = torch.argsort(torch.diag(H), descending=True) if act_order else None
    torch.testing.assert_close(res.weight, ref_gptq(W, H, 8, levels=levels, order=order), atol=1e-9, rtol=0)
    assert torch.equal(levels.float().gather(-1, res.codes.view(10, 3, 8).long()).view(10, 24), res.weight.float())


def test_diagonal_hessian_is_rtn():
    W = torch.randn(16, 64)
    for H in (torch.eye(64), torch.diag(torch.rand(64) + 0.1)):
        res = gptq_quantize(W, H, bits=2, group_size=16)
        assert torch.equal(res.weight, fake_quant_uniform(W, 2, 16))


def test_argument_validation():
    W, H = torch.randn(4, 16), torch.eye(16)
    with pytest.raises(ValueError, match="exactly one"):
        gptq_quantize(W, H, group_size=8)
    with pytest.raises(ValueError, match="divide"):
        gptq_quantize(W, H, bits=2, group_size=6)
    with pytest.raises(ValueError, match="sorted"):
        gptq_quantize(W, H, levels=torch.tensor([3.0, 2.0, 1.0, 0.0]).expand(4, 2, 4), group_size=8)
    Wn = W.clone()
    Wn[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        gptq_quantize(Wn, H, bits=2, group_size=8)


def test_dead_inputs_zeroed():
    """An input that never fires (H_jj = 0) gets a zero weight column before quantization, and no error update."""
    W = torch.randn(4, 16) + 3
    X = torch.randn(100, 16)
    X[:, 3] = 0
    lv = torch.tensor([-1.0, -0.4, 0.2, 0.8])
    res = gptq_quantize(W, 2 / 100 * X.T @ X, levels=lv.expand(4, 2, 4), group_size=8)
    assert torch.all(res.weight[:, 3] == lv[2])  # nearest level to 0


def test_synthetic_heldout_error_below_rtn_both_grids():
    torch.manual_seed(0)
    W = torch.randn(64, 256)
    Xc, Xt = correlated_inputs(2048, 256, seed=3), correlated_inputs(1024, 256, seed=4)
    acc = HessianAccumulator(256)
    acc.add_batch(Xc)
    # uniform grid (3 bits), with and without act-order
    rtn = out_err(W, fake_quant_uniform(W, 3, 64), Xt)
    for ao in (False, True):
        res = gptq_quantize(W, acc.H, bits=3, group_size=64, act_order=ao)
        assert out_err(W, res.weight, Xt) < 0.8 * rtn
        assert torch.equal(res.levels.gather(-1, res.codes.view(64, 4, 64).long()).view(64, 256), res.weight)
    # fixed non-uniform per-group table (pinned-end Lloyd-Max / LDP levels), 2 bits
    q = WeightQuantizer(W.shape, WeightQuantConfig(bits=2, group_size=64, method="ldp", lwc=False, ldp_init="lloyd")).init_from(W)
    levels = q.levels(W)
    base = out_err(W, q(W), Xt)
    for ao in (False, True):
        res = gptq_quantize(W, acc.H, levels=levels, group_size=64, act_order=ao)
        assert out_err(W, res.weight, Xt) < 0.8 * base
        assert torch.equal(levels.gather(-1, res.codes.view(64, 4, 64).long()).view(64, 256), res.weight)


class _Stop(Exception):
    pass


def _capture_inputs(model, module, ids):
    """Inputs of ``module`` for a forward of ``ids`` (the forward is stopped right after the module)."""
    got = []

    def hook(m, inp, out):
        got.append(inp[0].detach().reshape(-1, inp[0].shape[-1]))
        raise _Stop

    h = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(ids)
    except _Stop:
        pass
    finally:
        h.remove()
    return got[0]


def test_real_layer_gptq_beats_rtn(embedded, excerpt_test_ids):
    """Real SmolLM2 layer 3 up_proj, real text: calibration from train windows, error on test-split windows."""
    from rcp_lib.data import calibration_windows, load_corpus, tokenize

    model, tok = embedded
    train_ids = tokenize(tok, load_corpus("wiki-excerpt", "train")[:300_000])
    lin = model.model.layers[3].mlp.up_proj
    Xc = _capture_inputs(model, lin, calibration_windows(train_ids, 32, 128, seed=0))  # 4096 tokens
    Xt = _capture_inputs(model, lin, calibration_windows(excerpt_test_ids, 8, 128, seed=1))  # 1024 held-out tokens
    W = lin.weight.detach()
    acc = HessianAccumulator(W.shape[1])
    acc.add_batch(Xc)
    for bits in (2, 3):
        rtn = out_err(W, fake_quant_uniform(W, bits, 64), Xt)
        for ao in (False, True):
            g = out_err(W, gptq_quantize(W, acc.H, bits=bits, group_size=64, act_order=ao).weight, Xt)
            assert g < rtn, (bits, ao, g, rtn)


# ------------------------------------------------------------------ QuaRot's weight clip search (--w_clip)
def test_mse_clip_range_matches_brute_force():
    from rcp_lib.quant.quantizers import mse_clip_grid, mse_clip_range, quantize_uniform

    g = torch.Generator().manual_seed(0)
    wg = torch.randn(5, 3, 16, generator=g, dtype=torch.float64)
    lo, hi, r = mse_clip_range(wg, bits=2)
    for i in range(5):
        for j in range(3):
            w = wg[i, j]
            errs = []
            for rr in mse_clip_grid().tolist():
                q, _ = quantize_uniform(w.view(1, 1, -1), torch.tensor([[rr * w.min()]]), torch.tensor([[rr * w.max()]]), 2)
                errs.append(((q.flatten() - w).abs() ** 2.4).sum().item())
            best = mse_clip_grid()[int(torch.tensor(errs).argmin())].item()
            assert r[i, j].item() == pytest.approx(best)
            assert lo[i, j].item() == pytest.approx(best * w.min().item())
    # at 2 bits on Gaussian groups the search clips (r well below 1) and lowers the MSE a lot (0.20 -> ~0.12 σ²)
    x = torch.randn(4000, 64, generator=g, dtype=torch.float64)
    lo, hi, r = mse_clip_range(x, bits=2, norm=2.0)
    q_s, _ = quantize_uniform(x, lo, hi, 2)
    q_m, _ = quantize_uniform(x, x.amin(-1), x.amax(-1), 2)
    mse_s, mse_m = ((q_s - x) ** 2).mean().item(), ((q_m - x) ** 2).mean().item()
    assert 0.17 < mse_m < 0.23 and 0.10 < mse_s < 0.14 and r.mean() < 0.75


def test_weight_quantizer_clip_search_config():
    from rcp_lib.quant.quantizers import mse_clip_range

    W = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    q = WeightQuantizer(W.shape, WeightQuantConfig(bits=2, group_size=32, method="rtn", lwc=False, clip_search="mse"))
    lo, hi = q.clip_range(W)
    lo_ref, hi_ref, _ = mse_clip_range(W.reshape(8, 2, 32), 2)
    assert torch.equal(lo, lo_ref) and torch.equal(hi, hi_ref)
    plain = WeightQuantizer(W.shape, WeightQuantConfig(bits=2, group_size=32, method="rtn", lwc=False))
    assert ((q(W) - W) ** 2).sum() < ((plain(W) - W) ** 2).sum()
    with pytest.raises(ValueError, match="clip_search"):
        WeightQuantConfig(method="ldp", clip_search="mse")
    with pytest.raises(ValueError, match="clip_search"):
        WeightQuantConfig(method="rtn", lwc=False, clip_search="bogus")


def test_gptq_clip_search_lowers_heldout_error_at_2_bits():
    d, out = 128, 64
    W = torch.randn(out, d, generator=torch.Generator().manual_seed(3))
    X, Xt = correlated_inputs(2048, d, 4), correlated_inputs(2048, d, 5)
    acc = HessianAccumulator(d)
    acc.add_batch(X)
    plain = gptq_quantize(W, acc.H, bits=2, group_size=32)
    clipped = gptq_quantize(W, acc.H, bits=2, group_size=32, clip_search="mse")
    assert out_err(W, clipped.weight, Xt) < 0.8 * out_err(W, plain.weight, Xt)
    ranges = clipped.levels[..., -1] - clipped.levels[..., 0]
    assert (ranges < (plain.levels[..., -1] - plain.levels[..., 0]) - 1e-6).any()  # some groups were clipped
    with pytest.raises(ValueError, match="clip_search"):
        gptq_quantize(W, acc.H, bits=2, group_size=32, clip_search="grid")


@pytest.mark.heavy
def test_gptq_model_hessians_from_16bit_activations():
    """QuaRot runs GPTQ before its activation quantizers exist: the A4 and A16 models get the same GPTQ codes,
    and the activation/KV quantizers are back in place afterwards."""
    import copy

    from rcp_lib import models as M
    from rcp_lib.quant.apply import preset, quantize_model, quantized_linears
    from rcp_lib.quant.calibrate import gptq_model

    base = M.tiny_llama(hidden=64, intermediate=128, heads=2, kv_heads=1, layers=2, vocab=128)
    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    codes = {}
    for a in (4, 16):
        m = quantize_model(copy.deepcopy(base), preset(f"W2A{a}KV{a}", w_group_size=32).with_weight(
            method="rtn", lwc=False, clip_search="mse"))
        gptq_model(m, calib, progress=False)
        codes[a] = {n: q.weight_quantizer.codes.clone() for n, q in quantized_linears(m)}
        if a == 4:
            assert all(q.act_bits == 4 for _, q in quantized_linears(m))
            assert all(M.attention(l).rcp_kv_quantizer is not None for l in M.decoder_layers(m))
    assert codes[4].keys() == codes[16].keys()
    assert all(torch.equal(codes[4][n], codes[16][n]) for n in codes[4])
    m = quantize_model(copy.deepcopy(base), preset("W2A4KV4", w_group_size=32).with_weight(
        method="rtn", lwc=False, clip_search="mse"))
    gptq_model(m, calib, progress=False, quantized_activations=True)  # the old behaviour, still available
    assert any(not torch.equal(q.weight_quantizer.codes, codes[4][n]) for n, q in quantized_linears(m))


@pytest.mark.heavy
def test_gptq_model_shared_hessians_equal_separate(monkeypatch):
    """q/k/v and gate/up share one accumulated Hessian: the codes equal those of one accumulator per projection."""
    import copy

    from rcp_lib import models as M
    from rcp_lib.quant.apply import preset, quantize_model, quantized_linears
    from rcp_lib.quant.calibrate import gptq_model

    base = M.tiny_llama(hidden=64, intermediate=128, heads=2, kv_heads=1, layers=2, vocab=128)
    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    cfg = preset("W2A16KV16", w_group_size=32).with_weight(method="rtn", lwc=False, clip_search="mse")
    shared = gptq_model(quantize_model(copy.deepcopy(base), cfg), calib, progress=False)
    monkeypatch.setattr(M, "shared_input_groups", lambda layer: [])
    separate = gptq_model(quantize_model(copy.deepcopy(base), cfg), calib, progress=False)
    a, b = dict(quantized_linears(shared)), dict(quantized_linears(separate))
    assert all(torch.equal(a[n].weight_quantizer.codes, b[n].weight_quantizer.codes) for n in a)


def test_mse_clip_range_rejects_a_nonpositive_norm_and_searches_16_bit_weights_in_float32():
    from rcp_lib.quant.quantizers import mse_clip_range

    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 4, 64, generator=g).to(torch.bfloat16)
    with pytest.raises(ValueError, match="norm must be > 0"):
        mse_clip_range(w.float(), 2, norm=0.0)
    lo, hi, r = mse_clip_range(w, 2)
    lo32, hi32, r32 = mse_clip_range(w.float(), 2)  # the same bf16 values, searched in float32
    assert lo.dtype == hi.dtype == r.dtype == torch.bfloat16
    assert torch.equal(r.float(), r32.to(torch.bfloat16).float())
    assert torch.equal(lo, lo32.to(torch.bfloat16)) and torch.equal(hi, hi32.to(torch.bfloat16))
