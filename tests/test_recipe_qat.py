"""QAT recipe paths on a tiny random LLaMA: "GPTQ on the LDP grid, then QAT" starts exactly at the GPTQ model, and
train_student reports the step-0 perplexity and the movement columns of a real run."""

import copy
import math

import pytest
import torch

from rcp_lib import models as M
from rcp_lib.experiments.build import train_student
from rcp_lib.profiles import get_profile
from rcp_lib.qat import QATConfig
from rcp_lib.quant.apply import preset, quantize_model
from rcp_lib.quant.calibrate import gptq_model, thaw_to_static
from rcp_lib.quant.quantizers import WeightQuantizer
from rcp_lib.recipe import Recipe
from rcp_lib.rotation.fuse import RotationConfig, rotate_model


def _student(seed=0, **w):
    fp = M.tiny_llama(hidden=64, intermediate=128, heads=2, kv_heads=1, layers=2, vocab=128, seed=seed)
    st = copy.deepcopy(fp)
    rotate_model(st, RotationConfig(r1="random_hadamard"))
    qc = preset("W2A4KV4", w_group_size=32).with_weight(**w)
    quantize_model(st, qc)
    return fp, st, qc


@pytest.mark.parametrize("w", [dict(ldp_init="lloyd", range_mode="static", clip_init="mse"),
                               dict(method="rtn", lwc=True, range_mode="static", clip_init="mse")],
                         ids=["ldp", "uniform"])
@pytest.mark.heavy
def test_gptq_then_qat_starts_at_the_gptq_model(w):
    fp, st, _ = _student(**w)
    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    gptq_model(st, calib, progress=False)
    x = torch.randint(0, 128, (1, 24))
    with torch.no_grad():
        y_frozen = st(input_ids=x).logits
    thaw_to_static(st)
    assert all(isinstance(q.weight_quantizer, WeightQuantizer) for _, q in M.named_block_linears(st))
    with torch.no_grad():
        y = st(input_ids=x).logits
    torch.testing.assert_close(y, y_frozen, rtol=1e-5, atol=1e-5)
    data = torch.randint(0, 128, (1, 2000), generator=torch.Generator().manual_seed(1))
    stats = train_student(st, fp, None, QATConfig(steps=3, seqlen=32, warmup_steps=0, val_every=100, val_windows=1,
                                                  lr_quant=1e-2), data=data, progress=False)
    assert math.isfinite(stats["weight_shift"]) and stats["tokens"] == 3 * 32


def test_thaw_needs_static_range():
    fp, st, _ = _student()
    gptq_model(st, torch.randint(0, 128, (2, 16)), progress=False)
    with pytest.raises(ValueError, match="static"):
        thaw_to_static(st)


def test_gptq_start_recipe_needs_static_range():
    qc = preset("W2A4KV4", w_group_size=32)
    with pytest.raises(ValueError, match="static"):
        Recipe(quant=qc, qat=QATConfig(gptq_start=True)).validate()
    Recipe(quant=qc.with_weight(range_mode="static"), qat=QATConfig(gptq_start=True)).validate()


@pytest.mark.heavy
def test_train_student_reports_step0_and_movement():
    fp, st, _ = _student(seed=1, ldp_init="lloyd", clip_init="mse")
    data = torch.randint(0, 128, (1, 2000), generator=torch.Generator().manual_seed(2))
    calls = []
    stats = train_student(st, fp, None, QATConfig(steps=4, seqlen=32, warmup_steps=0, val_every=100, val_windows=1,
                                                  lr_quant=5e-2, lr_weights=1e-3),
                          data=data, progress=False, step0_eval=lambda m: calls.append(1) or 123.0)
    assert calls == [1] and stats["step0_ppl"] == 123.0
    assert stats["clip_ratio_init"] < 0.99  # the searched clip start
    assert stats["clip_ratio_final"] != stats["clip_ratio_init"] and stats["level_shift"] > 0
    assert stats["clip_shift"] >= abs(stats["clip_ratio_final"] - stats["clip_ratio_init"]) and stats["clip_shift"] > 0
    assert 0 < stats["weight_shift"] < 1 and stats["tokens"] == 4 * 32 and stats["seconds"] >= 0


def test_static_range_gets_its_own_learning_rate():
    """lr_range puts every static lo / hi (and nothing else) in a group of its own; without it they stay with the
    quantizer logits (the loop as it was). One step at lr_range moves a range by about lr_range, not lr_quant."""
    from rcp_lib.qat import optimizer_groups, parameter_groups, train

    fp, st, _ = _student(ldp_init="lloyd", range_mode="static", clip_init="mse")
    wqs = [q.weight_quantizer for _, q in M.named_block_linears(st)]
    cfg = QATConfig(steps=1, seqlen=32, warmup_steps=0, val_every=100, val_windows=1, lr_quant=1e-2, lr_range=1e-4)
    latent, quant = parameter_groups(st, cfg)
    groups = {g["name"]: g for g in optimizer_groups(st, latent, quant, cfg)}
    assert set(groups) == {"weights", "quantizer", "range"} and groups["range"]["lr"] == 1e-4
    ranges = {id(p) for w in wqs for p in (w.lo, w.hi)}
    assert {id(p) for p in groups["range"]["params"]} == ranges
    assert {id(p) for p in groups["quantizer"]["params"]} == {id(w.theta) for w in wqs}
    two = optimizer_groups(st, latent, quant, QATConfig(lr_quant=1e-2))
    assert [g["name"] for g in two] == ["weights", "quantizer"] and len(two[1]["params"]) == len(quant)
    with pytest.raises(ValueError, match="lr_range"):
        QATConfig(lr_range=0.0).validate()
    lo0 = [w.lo.detach().clone() for w in wqs]
    data = torch.randint(0, 128, (1, 2000), generator=torch.Generator().manual_seed(1))
    train(st, fp, data, cfg, progress=False)
    moved = max(float((w.lo.detach() - a).abs().max()) for w, a in zip(wqs, lo0))
    assert 0 < moved <= 1.5e-4  # AdamW's first step is at most about lr (bias-corrected), far below lr_quant


def test_gptq_start_of_a_row_without_clip_keeps_its_min_max_grid():
    """A "w/o Clip" row (LDP without LWC) with range_mode="static": GPTQ on its min-max grid, thawed on that grid
    (output unchanged), then QAT trains the levels and weights while the range stays where GPTQ left it."""
    fp, st, _ = _student(lwc=False, ldp_init="lloyd", range_mode="static")
    gptq_model(st, torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0)), progress=False)
    x = torch.randint(0, 128, (1, 24))
    with torch.no_grad():
        y_frozen = st(input_ids=x).logits
    thaw_to_static(st)
    with torch.no_grad():
        torch.testing.assert_close(st(input_ids=x).logits, y_frozen, rtol=1e-5, atol=1e-5)
    wqs = [q.weight_quantizer for _, q in M.named_block_linears(st)]
    lo0, th0 = [w.lo.clone() for w in wqs], [w.theta.detach().clone() for w in wqs]
    data = torch.randint(0, 128, (1, 2000), generator=torch.Generator().manual_seed(1))
    train_student(st, fp, None, QATConfig(steps=2, seqlen=32, warmup_steps=0, val_every=100, val_windows=1,
                                          lr_quant=1e-2, lr_range=1e-4), data=data, progress=False)
    assert all(torch.equal(w.lo, a) for w, a in zip(wqs, lo0))
    assert any(not torch.equal(w.theta.detach(), a) for w, a in zip(wqs, th0))


@pytest.mark.heavy
def test_cached_gptq_start_trains_like_the_computed_one(tmp_path, monkeypatch):
    """gptq_start with a key computes the start once (cache miss), then loads it into a freshly quantized model (hit):
    the loaded start has the same state, the same recorded seconds, and QAT from it gives bit-identical weights."""
    from rcp_lib.experiments.build import gptq_start

    monkeypatch.setenv("RCP_CACHE", str(tmp_path))
    w = dict(ldp_init="lloyd", range_mode="static", clip_init="mse", range_param="log")
    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    key = {"test": "start"}
    fp, a, _ = _student(**w)
    s_a = gptq_start(a, calib, progress=False, key=key)
    assert len(list((tmp_path / "start").glob("gptq-start-*.pt"))) == 1
    _, b, _ = _student(**w)
    s_b = gptq_start(b, calib, progress=False, key=key)
    assert s_a == s_b > 0
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    other = calib.clone()
    other[0, 0] = (other[0, 0] + 1) % 128  # other calibration windows: another start
    _, c, _ = _student(**w)
    gptq_start(c, other, progress=False, key=key)
    assert len(list((tmp_path / "start").glob("gptq-start-*.pt"))) == 2
    data = torch.randint(0, 128, (1, 2000), generator=torch.Generator().manual_seed(1))
    cfg = QATConfig(steps=2, seqlen=32, warmup_steps=0, val_every=100, val_windows=1, lr_quant=1e-2, lr_weights=1e-3)
    for m in (a, b):
        train_student(m, fp, None, cfg, data=data, progress=False)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], v) for k, v in c.state_dict().items())


def test_start_key_shares_a_start_between_rows_that_only_train_differently():
    """RCP and its frozen-part rows share one GPTQ start per seed; the uniform grid, another seed or another dtype
    have their own."""
    from rcp_lib.experiments import method, start_key
    from rcp_lib.profiles import get_profile

    P = get_profile("ablation")

    def key(name, **over):
        p = P.with_overrides(**over) if over else P
        return start_key(p, method(name, "W2A4KV4").recipe(p))

    assert key("RCP") == key("RCP levels frozen") == key("RCP clip frozen")
    assert key("RCP") != key("Uniform-QAT") and key("RCP") != key("RCP", seed=1)
    assert key("RCP") != key("RCP", dtype="bfloat16") and key("RCP")["dtype"] == "torch.float32"
