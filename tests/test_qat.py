import copy
import dataclasses
import json
import math
import os

import pytest
import torch

from rcp_lib import models as M
from rcp_lib.io import config_hash
from rcp_lib.qat import NonFiniteLossError, QATConfig, train
from rcp_lib.quant.apply import preset, quantize_model
from rcp_lib.rotation.fuse import RotationConfig, rotate_model


def _pair(seed=0, r1="random_hadamard", **weight):
    fp = M.tiny_llama(hidden=64, intermediate=128, heads=2, kv_heads=1, layers=2, vocab=128, seed=seed)
    student = copy.deepcopy(fp)
    rotate_model(student, RotationConfig(r1=r1))
    quantize_model(student, preset("W2A4KV4", w_group_size=32).with_weight(**weight))
    return fp, student


def _data(n=6000, vocab=128, seed=0):
    # a learnable stream: a noisy repeating pattern, so distillation has structure to fit
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, vocab, (97,), generator=g)
    ids = base.repeat(n // 97 + 1)[:n]
    noise = torch.rand(n, generator=g) < 0.1
    ids[noise] = torch.randint(0, vocab, (int(noise.sum()),), generator=g)
    return ids.unsqueeze(0)


def _cfg(**kw):
    base = dict(steps=30, seqlen=64, lr_weights=1e-3, lr_quant=1e-2, warmup_steps=2, val_every=1000,
                checkpoint_every=1000, val_windows=2)
    base.update(kw)
    return QATConfig(**base)


@pytest.mark.heavy
def test_few_steps_lower_the_loss_and_levels_stay_ordered():
    fp, student = _pair()
    res = train(student, fp, _data(), _cfg(), progress=False)
    losses = [h["loss"] for h in res.history]
    assert len(losses) == 30 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    from rcp_lib.quant.apply import quantized_linears

    for _, q in quantized_linears(student):
        lv = q.weight_quantizer.levels(q.weight)
        assert torch.all(lv[..., 1:] >= lv[..., :-1])
    assert "val_ppl" in res.history[-1]


@pytest.mark.heavy
@pytest.mark.parametrize("loss", ["ce", "mix"])
def test_other_losses_run(loss):
    fp, student = _pair()
    res = train(student, fp, _data(), _cfg(steps=3, loss=loss), progress=False)
    assert res.steps == 3 and math.isfinite(res.final_loss)


@pytest.mark.heavy
def test_resume_equals_uninterrupted(tmp_path):
    cfg = _cfg(steps=6, checkpoint_every=2, val_every=3)
    fp, a = _pair()
    train(a, fp, _data(), cfg, out_dir=tmp_path / "a", progress=False)

    fp_b, b = _pair()
    train(b, fp_b, _data(), cfg, out_dir=tmp_path / "b", progress=False, stop_after=3)  # "killed" after step 3
    assert (tmp_path / "b" / "checkpoint" / "rcp_step.json").exists()
    step_file = tmp_path / "b" / "checkpoint" / "rcp_step.json"
    meta = json.loads(step_file.read_text())
    assert meta["seconds"] > 0
    step_file.write_text(json.dumps({**meta, "seconds": 1000.0}))  # as if the killed process had run 1000 s
    fp_c, c = _pair(seed=0)  # a fresh process would rebuild the same student, then resume
    res = train(c, fp_c, _data(), cfg, out_dir=tmp_path / "b", resume=True, progress=False)
    assert res.steps == 6
    # the resumed run's time includes the killed process's (it counted only its own before)
    assert 1000.0 < res.seconds < 1000.0 + 600
    sa, sc = a.state_dict(), c.state_dict()
    for k in sa:
        assert torch.allclose(sa[k], sc[k], atol=1e-6, rtol=0), k
    hist_a = [l for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    hist_c = [l for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert len(hist_a) == len(hist_c) == 6


def test_nan_guard_names_step_and_keeps_checkpoint(tmp_path):
    cfg = _cfg(steps=6, checkpoint_every=2)
    fp, student = _pair()
    calls = {"n": 0}

    def poison(module, inputs, output):  # the 3rd training forward (step index 2) returns NaN logits
        calls["n"] += 1
        return output * float("nan") if calls["n"] == 3 else output

    handle = student.lm_head.register_forward_hook(poison)
    with pytest.raises(NonFiniteLossError, match="at step 2"):
        train(student, fp, _data(), cfg, out_dir=tmp_path, progress=False)
    handle.remove()
    import json

    meta = json.loads((tmp_path / "checkpoint" / "rcp_step.json").read_text())
    assert meta["step"] == 2  # the last good checkpoint is kept
    # and a resumed run continues from it to the end
    fp2, s2 = _pair()
    assert train(s2, fp2, _data(), cfg, out_dir=tmp_path, resume=True, progress=False).steps == 6


def test_resume_with_other_config_is_refused(tmp_path):
    fp, student = _pair()
    train(student, fp, _data(), _cfg(steps=2, checkpoint_every=1), out_dir=tmp_path, progress=False)
    fp2, s2 = _pair()
    with pytest.raises(ValueError, match="lr_weights"):
        train(s2, fp2, _data(), _cfg(steps=4, checkpoint_every=1, lr_weights=5e-4), out_dir=tmp_path, resume=True,
              progress=False)


def test_config_hash_changes_with_every_field():
    base = QATConfig()
    h0 = config_hash(base.to_dict())
    for f in dataclasses.fields(QATConfig):
        v = getattr(base, f.name)
        if isinstance(v, bool):
            nv = not v
        elif isinstance(v, (int, float)):
            nv = v + 1
        else:
            nv = "mix" if v != "mix" else "ce"
        changed = dataclasses.replace(base, **{f.name: nv})
        assert config_hash(changed.to_dict()) != h0, f.name
    assert config_hash(QATConfig().to_dict()) == h0


@pytest.mark.parametrize("kw,match", [
    (dict(steps=0), "steps"),
    (dict(lr_weights=0.0), "lr_weights"),
    (dict(lr_quant=-1.0), "lr_quant"),
    (dict(loss="mse"), "loss"),
    (dict(batch_size=0), "batch_size"),
])
def test_bad_configs_fail_before_work(kw, match):
    fp, student = _pair()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        train(student, fp, _data(), QATConfig(**kw), progress=False)
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())


def test_unknown_rotation_is_rejected():
    with pytest.raises(ValueError, match="r1"):
        RotationConfig(r1="spin").validate()


def test_kl_needs_teacher():
    _, student = _pair()
    with pytest.raises(ValueError, match="teacher"):
        train(student, None, _data(), _cfg(steps=1), progress=False)


def test_two_trainings_with_different_precision_in_one_process():
    """Accelerate keeps one mixed-precision state per process: train() drops a previous single-process state, so a
    bf16 run after an fp32 one (a sweep, the benchmarks, a notebook) uses its own recipe."""
    teacher = M.tiny_llama(hidden=64, intermediate=128, heads=2, kv_heads=1, layers=2, vocab=128, seed=0)
    ids = torch.randint(0, 128, (4096,))
    for mp in ("no", "bf16"):
        student = copy.deepcopy(teacher)
        quantize_model(student, preset("W2A4KV4", w_group_size=32))
        res = train(student, teacher, ids, QATConfig(steps=1, seqlen=32, val_every=1, mixed_precision=mp), progress=False)
        assert res.tokens == 32


@pytest.mark.heavy
def test_resume_after_a_crash_between_the_checkpoint_renames(tmp_path):
    """_atomic_save_state moves checkpoint -> .checkpoint-old, then the new one in: a crash in between leaves only
    .checkpoint-old. A resume puts it back and ends where an uninterrupted run ends."""
    from rcp_lib.qat import _recover_checkpoint

    cfg = _cfg(steps=4, checkpoint_every=2)
    fp, a = _pair()
    train(a, fp, _data(), cfg, out_dir=tmp_path / "a", progress=False)
    fp_b, b = _pair()
    train(b, fp_b, _data(), cfg, out_dir=tmp_path / "b", progress=False, stop_after=3)
    os.replace(tmp_path / "b" / "checkpoint", tmp_path / "b" / ".checkpoint-old")  # the crash window
    step_file = tmp_path / "b" / ".checkpoint-old" / "rcp_step.json"
    meta = json.loads(step_file.read_text())
    assert meta["step"] == 3  # the stop saved its step
    step_file.write_text(json.dumps({**meta, "seconds": 1000.0}))  # marks that the resume used this checkpoint
    assert not _recover_checkpoint(tmp_path / "a")  # a complete folder is left alone
    fp_c, c = _pair(seed=0)
    res = train(c, fp_c, _data(), cfg, out_dir=tmp_path / "b", resume=True, progress=False)
    assert res.steps == 4 and not (tmp_path / "b" / ".checkpoint-old").exists()
    assert res.seconds > 1000.0  # resumed from the recovered checkpoint, not from step 0
    sa, sc = a.state_dict(), c.state_dict()
    for k in sa:
        assert torch.allclose(sa[k], sc[k], atol=1e-6, rtol=0), k


def test_a_finished_student_drops_every_checkpoint_folder(tmp_path):
    from rcp_lib.experiments.build import drop_checkpoints

    for d in ("checkpoint", ".checkpoint-old", ".checkpoint-tmp-6", "keep"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "x.bin").write_bytes(b"0")
    (tmp_path / "student.pt").write_bytes(b"0")
    drop_checkpoints(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep", "student.pt"]


@pytest.mark.heavy
@pytest.mark.parametrize("freeze", [["levels"], ["clip"], ["levels", "weights"]])
def test_frozen_parts_stay_at_their_start_and_the_rest_moves(freeze):
    """QATConfig.freeze: the named parts keep their start bit for bit; the others move (static log range, LDP)."""
    from rcp_lib.quant.apply import quantized_linears

    fp = M.tiny_llama(hidden=64, intermediate=128, heads=2, kv_heads=1, layers=2, vocab=128, seed=0)
    quantize_log = preset("W2A4KV4", w_group_size=32)
    student = copy.deepcopy(fp)
    rotate_model(student, RotationConfig(r1="random_hadamard"))
    quantize_model(student, quantize_log.with_weight(method="ldp", lwc=True, range_mode="static", range_param="log",
                                                     ldp_init="lloyd"))
    parts = {"levels": lambda wq: [wq.theta], "clip": lambda wq: [wq.log_lo, wq.log_hi],
             "weights": lambda q: [q.weight]}
    qs = [q for _, q in quantized_linears(student)]
    before = {k: [t.detach().clone() for q in qs for t in (f(q) if k == "weights" else f(q.weight_quantizer))]
              for k, f in parts.items()}
    train(student, fp, _data(), _cfg(steps=5, freeze=freeze), progress=False)
    after = {k: [t.detach() for q in qs for t in (f(q) if k == "weights" else f(q.weight_quantizer))]
             for k, f in parts.items()}
    for k in parts:
        same = all(torch.equal(a, b) for a, b in zip(before[k], after[k]))
        assert same == (k in freeze), k
    with pytest.raises(ValueError, match="freeze"):
        QATConfig(freeze=["theta"]).validate()
