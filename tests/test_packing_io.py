"""save_quantized / load_quantized: packed tensors round-trip to the fake-quant model; bad folders are refused.
(The Hugging Face side of the same folder, from_pretrained / lm_eval / sharding, is tested in test_hf.py.)"""

import copy
import json
import os
from dataclasses import replace

import pytest
import torch

from rcp_lib import models as M
from rcp_lib.deploy import PackedFormatError, PackedLinear, load_quantized, packed_model_bytes, save_quantized
from rcp_lib.quant.apply import ActQuantConfig, QuantConfig, preset, quantize_model
from rcp_lib.quant.calibrate import gptq_model
from rcp_lib.quant.quantizers import WeightQuantConfig
from rcp_lib.rotation.fuse import RotationConfig, rotate_model


def _model(q: QuantConfig, r1="gsr"):
    m = M.tiny_llama(hidden=96, intermediate=160, heads=3, kv_heads=1, layers=2, vocab=128)
    rotate_model(m, RotationConfig(r1=r1, r1_block=32 if r1 == "gsr" else None))
    return quantize_model(m, q)


def _rel(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("q", [preset("W2A4KV4", w_group_size=32), preset("W2A16KV16", w_group_size=32),
                               preset("W4A4KV4", w_group_size=32)], ids=lambda q: q.label)
def test_round_trip_logits_and_generation(tmp_path, q):
    m = _model(q)
    with torch.no_grad():
        ref = m(IDS).logits
        gen = m.generate(IDS[:1, :5], max_new_tokens=8, do_sample=False)
    save_quantized(m, tmp_path / "f32", dtype=torch.float32)
    loaded, _ = load_quantized(tmp_path / "f32")
    assert sum(isinstance(x, PackedLinear) for x in loaded.modules()) == 14
    with torch.no_grad():
        assert _rel(ref, loaded(IDS).logits) < 1e-5
        assert torch.equal(gen, loaded.generate(IDS[:1, :5], max_new_tokens=8, do_sample=False))
    if q.act.bits == 16:  # fp16 storage: within fp16 rounding (with A4, rounding flips of the 4-bit grid amplify it)
        save_quantized(m, tmp_path / "f16", dtype=torch.float16)
        l16, _ = load_quantized(tmp_path / "f16")
        with torch.no_grad():
            assert _rel(ref, l16(IDS).logits) < 3e-3


def test_gptq_model_round_trip(tmp_path):
    m = _model(preset("W2A4KV4", w_group_size=32).with_weight(method="rtn", lwc=False))
    gptq_model(m, torch.randint(0, 128, (16, 32)), progress=False)
    with torch.no_grad():
        ref = m(IDS).logits
    save_quantized(m, tmp_path / "g", dtype=torch.float32)
    loaded, _ = load_quantized(tmp_path / "g")
    with torch.no_grad():
        assert _rel(ref, loaded(IDS).logits) < 1e-5


def test_three_bits_cannot_be_packed(tmp_path):
    with pytest.raises(NotImplementedError, match="3 bits"):
        save_quantized(_model(preset("W3A4KV4", w_group_size=32)), tmp_path / "x")


def test_unquantized_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match="quantize_model"):
        save_quantized(M.tiny_llama(), tmp_path / "x")


@pytest.fixture()
def saved(tmp_path):
    save_quantized(_model(preset("W2A4KV4", w_group_size=32)), tmp_path / "m")
    return tmp_path / "m"


def test_wrong_format_version(saved):
    mp = saved / "quant_map.json"
    d = json.loads(mp.read_text())
    d["format_version"] = 99
    mp.write_text(json.dumps(d))
    with pytest.raises(PackedFormatError, match="version 99"):
        load_quantized(saved)


def test_truncated_file(saved):
    w = saved / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(PackedFormatError, match="checksum"):
        load_quantized(saved)


def test_map_names_a_missing_tensor(saved):
    mp = saved / "quant_map.json"
    d = json.loads(mp.read_text())
    d["tensors"]["model.layers.0.mlp.extra.qweight"] = {"shape": [1], "dtype": "int32"}
    mp.write_text(json.dumps(d))
    with pytest.raises(PackedFormatError, match="extra.qweight"):
        load_quantized(saved)


def test_shape_mismatch(saved):
    mp = saved / "quant_map.json"
    d = json.loads(mp.read_text())
    d["tensors"]["model.layers.0.mlp.up_proj.lut"]["shape"][0] += 1
    mp.write_text(json.dumps(d))
    with pytest.raises(PackedFormatError, match="up_proj.lut"):
        load_quantized(saved)


def test_accountant_matches_bytes_on_disk_for_embedded_model(embedded, tmp_path):
    from rcp_lib.memory import W2A4KV4, footprint

    model = copy.deepcopy(embedded[0])
    quantize_model(model, preset("W2A4KV4", w_group_size=64).with_weight(method="rtn", lwc=False))
    save_quantized(model, tmp_path / "packed", dtype=torch.float16)  # the accountant counts the fp16 format
    disk = packed_model_bytes(tmp_path / "packed")
    f = footprint(model.config, replace(W2A4KV4, group_size=64, kv_group_size=64))
    block = sum(v for k, v in f.per_kind.items() if k.startswith(("attn_", "mlp_")))
    assert abs(disk["block_linears"] - block) / block < 0.01
    assert abs(disk["total"] - f.weights) / f.weights < 0.01
    assert abs(disk["file_bytes"] - f.weights) / f.weights < 0.01
    assert model.config.tie_word_embeddings is False  # quantize_model unties: lm_head is counted and stored


def _structure(model):
    """What the surgery decides, module by module: types (a deployed PackedLinear counts as the QuantLinear it
    replaces), online rotations, KV quantizers, activation settings, and the configs it records."""
    from rcp_lib.quant.linear import QuantLinear

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (PackedLinear, QuantLinear)):
            wq = getattr(mod, "weight_quantizer", None)
            bits = mod.bits if isinstance(mod, PackedLinear) else (None if wq is None else wq.config.bits)
            out[name] = ("quantized", bits, mod.act_bits, mod.act_clip_ratio, repr(mod.input_transform))
        elif "." not in name or not name.rsplit(".", 1)[-1].startswith(("weight_quantizer", "input_transform")):
            # a loaded folder's top class is the packed model type's subclass (RcpLlamaForCausalLM of rcp_lib.deploy.hf)
            cls = type(mod).__name__
            out[name] = (cls[3:] if name == "" and cls.startswith("Rcp") else cls, mod.extra_repr())
    return out, model.config._attn_implementation, model.config.rcp_rotation, model.config.rcp_quant


@pytest.mark.heavy
def test_frozen_round_trip_re_runs_the_surgery(tmp_path):
    """A frozen, rotated W2A4KV4 model: the loaded model is the same surgery (module for module) as a freshly
    rotated + quantized one, and its logits equal the in-memory frozen model's."""
    from rcp_lib.quant.linear import freeze_model

    # lm_head's input quantizer is part of the surgery too
    q = QuantConfig(weight=WeightQuantConfig(group_size=32), act=ActQuantConfig(lm_head_bits=8))
    m = freeze_model(_model(q))
    with torch.no_grad():
        ref = m(IDS).logits
    save_quantized(m, tmp_path / "p", dtype=torch.float32)
    loaded, _ = load_quantized(tmp_path / "p")
    fresh = _model(q)
    assert _structure(loaded) == _structure(fresh)
    assert sum(isinstance(x, PackedLinear) for x in loaded.modules()) == 14
    with torch.no_grad():
        assert _rel(ref, loaded(IDS).logits) < 1e-5


def test_load_calls_rotate_and_quantize(tmp_path, monkeypatch):
    """load_quantized rebuilds through rotate_model (structural part only) and quantize_model, not its own copy."""
    from rcp_lib.quant import apply
    from rcp_lib.rotation import fuse

    save_quantized(_model(preset("W2A4KV4", w_group_size=32)), tmp_path / "p")
    calls = []
    rot, quant = fuse.rotate_model, apply.quantize_model
    monkeypatch.setattr(fuse, "rotate_model", lambda m, c, **kw: calls.append(("rotate", kw)) or rot(m, c, **kw))
    monkeypatch.setattr(apply, "quantize_model",
                        lambda m, c, **kw: calls.append(("quantize", c.label, sorted(kw))) or quant(m, c, **kw))
    load_quantized(tmp_path / "p")
    assert calls == [("rotate", {"fuse_weights": False}), ("quantize", "W2A4KV4", ["layer_factory"])]


def test_rotate_without_weights_installs_the_same_modules():
    a = M.tiny_llama(hidden=96, intermediate=160, heads=3, kv_heads=1, layers=2, vocab=128)
    b = M.tiny_llama(hidden=96, intermediate=160, heads=3, kv_heads=1, layers=2, vocab=128)
    w = {k: v.clone() for k, v in b.state_dict().items()}
    cfg = RotationConfig(r1="gsr", r1_block=32, r4_block=32)
    rotate_model(a, cfg)
    rotate_model(b, cfg, fuse_weights=False)
    assert [(n, type(x).__name__, x.extra_repr()) for n, x in a.named_modules()] == \
           [(n, type(x).__name__, x.extra_repr()) for n, x in b.named_modules()]
    assert a.config.rcp_rotation == b.config.rcp_rotation and a.config._attn_implementation == b.config._attn_implementation
    assert all(torch.equal(w[k], v) for k, v in b.state_dict().items() if k != "lm_head.weight")


def test_map_that_the_surgery_does_not_rebuild(saved):
    mp = saved / "quant_map.json"
    d = json.loads(mp.read_text())
    d["layers"]["model.layers.1.mlp.down_proj"]["r4"] = None
    mp.write_text(json.dumps(d))
    with pytest.raises(PackedFormatError, match="down_proj: the surgery rebuilds"):
        load_quantized(saved)


def test_unknown_stored_config_field(saved):
    """A field this version does not know (a folder from another writer, its checksum consistent): re-export."""
    from rcp_lib.deploy.format import _config_digest

    mp = saved / "config.json"
    d = json.loads(mp.read_text())
    d["quantization_config"]["quant"]["w_future_option"] = 1
    mp.write_text(json.dumps(d))
    qm = json.loads((saved / "quant_map.json").read_text())
    (saved / "quant_map.json").write_text(json.dumps({**qm, "quantization_config_sha256":
                                                      _config_digest(d["quantization_config"])}))
    with pytest.raises(PackedFormatError, match="cannot be rebuilt by this rcp_lib .*re-export"):
        load_quantized(saved)


def test_edited_quantization_config_is_refused(saved):
    """The quantization_config the folder was written with is checksummed in quant_map.json: an edit (here the KV
    cache's bits, which no tensor records) would rebuild another model from the same tensors, so it is refused."""
    mp = saved / "config.json"
    d = json.loads(mp.read_text())
    d["quantization_config"]["quant"]["kv"]["bits"] = 8
    mp.write_text(json.dumps(d))
    with pytest.raises(PackedFormatError, match="quantization_config differs from the one the folder was written with"):
        load_quantized(saved)


@pytest.mark.heavy
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_quantized_state_file_round_trip(tmp_path, bits):
    """The PTQ cache's file (the projection part of the same tensor format) restores the frozen layers bit for bit,
    3-bit codes included (stored in 4-bit slots)."""
    from rcp_lib.deploy import load_quantized_state, save_quantized_state
    from rcp_lib.quant.apply import quantized_linears

    m = _model(preset(f"W{bits}A4KV4", w_group_size=32).with_weight(method="rtn", lwc=False, clip_search="mse"))
    ref = {n: q.quantized_weight().clone() for n, q in quantized_linears(m)}
    save_quantized_state(m, tmp_path / "s.safetensors")
    fresh = _model(preset(f"W{bits}A4KV4", w_group_size=32).with_weight(method="rtn", lwc=False, clip_search="mse"))
    load_quantized_state(fresh, tmp_path / "s.safetensors")
    assert all(q.frozen and torch.equal(q.quantized_weight(), ref[n]) for n, q in quantized_linears(fresh))


# -- the output folder: never delete what a user keeps there, never change its mode (issue item 2) ---------------------

def _tree(root):
    """Every path under ``root`` with its bytes (files) and permission bits."""
    out = {".": root.stat().st_mode & 0o7777}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = (p.read_bytes() if p.is_file() else None, p.stat().st_mode & 0o7777)
    return out


def _user_folder(tmp_path):
    d = tmp_path / "mine"
    (d / "sub").mkdir(parents=True)
    (d / "notes.txt").write_text("keep me")
    (d / "sub" / "y").write_text("and me")
    d.chmod(0o751)
    return d


@pytest.mark.parametrize("overwrite", [False, True])
def test_save_refuses_a_folder_holding_other_files(tmp_path, overwrite):
    from rcp_lib.deploy import check_output_folder

    d = _user_folder(tmp_path)
    before = _tree(d)
    m = _model(preset("W2A4KV4", w_group_size=32))
    with pytest.raises(FileExistsError, match="holds files other than a packed model.*nothing was changed"):
        save_quantized(m, d, overwrite=overwrite)
    with pytest.raises(FileExistsError, match="nothing was changed"):
        check_output_folder(d, overwrite)
    assert _tree(d) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temporary folder left behind
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        save_quantized(m, tmp_path / "a_file", overwrite=overwrite)
    assert (tmp_path / "a_file").read_text() == "x"


def test_save_writes_an_empty_or_new_folder_and_replaces_a_packed_one_only_with_overwrite(tmp_path):
    m = _model(preset("W2A4KV4", w_group_size=32))
    mask = os.umask(0o022)
    os.umask(mask)
    new = save_quantized(m, tmp_path / "new")
    assert new.stat().st_mode & 0o7777 == 0o777 & ~mask  # what mkdir gives, not mkdtemp's 0o700
    empty = tmp_path / "empty"
    empty.mkdir()
    empty.chmod(0o750)
    save_quantized(m, empty)
    assert (empty / "quant_map.json").is_file() and empty.stat().st_mode & 0o7777 == 0o750
    before = _tree(empty)
    with pytest.raises(FileExistsError, match="holds a packed model already.*overwrite"):
        save_quantized(m, empty)
    assert _tree(empty) == before
    save_quantized(m, empty, overwrite=True)
    assert (empty / "quant_map.json").is_file() and empty.stat().st_mode & 0o7777 == 0o750
    load_quantized(empty)


def test_overwrite_never_deletes_what_the_export_did_not_write(tmp_path, monkeypatch):
    """A packed folder that also holds a clone's ``.git`` or a user's results is refused even with overwrite (the
    entries named, nothing changed); ``"."`` inside a packed folder is that folder by its name (replaced beside, not
    inside, and nothing of it deleted before the new one is in place)."""
    from rcp_lib.deploy import check_output_folder

    m = _model(preset("W2A4KV4", w_group_size=32))
    d = save_quantized(m, tmp_path / "packed")
    (d / ".git").mkdir()
    (d / ".git" / "HEAD").write_text("ref: refs/heads/main")
    (d / "lm_eval_results.json").write_text("{}")
    before = _tree(d)
    with pytest.raises(FileExistsError, match=r"entries the export does not write \(\.git, lm_eval_results\.json\)"):
        save_quantized(m, d, overwrite=True)
    assert _tree(d) == before and sorted(p.name for p in tmp_path.iterdir()) == ["packed"]
    import shutil

    shutil.rmtree(d / ".git")
    (d / "lm_eval_results.json").unlink()
    (d / "additional_chat_templates").mkdir()  # what a tokenizer's save_pretrained may write: not foreign
    monkeypatch.chdir(d)
    assert check_output_folder(".", overwrite=True) == d
    with pytest.warns(UserWarning, match="working directory: a shell that sat in it.*cd into"):
        assert save_quantized(m, ".", overwrite=True) == d
    assert os.getcwd() == str(d) and (d / "quant_map.json").is_file()  # the process itself is in the new folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["packed"]  # no temporary or old folder left
    load_quantized(d)


def test_export_says_when_the_committed_row_came_from_other_code_or_cpu(tmp_path, monkeypatch):
    """``committed_row_mismatch``: the committed row of the same method, setting and seed, computed by another code
    fingerprint or on a CPU with other vector flags, is named with what differs; the same code and CPU, another
    seed, or no results file: nothing to say."""
    import pandas as pd

    from rcp_lib.export import committed_row_mismatch

    monkeypatch.setenv("RCP_RESULTS_DIR", str(tmp_path))
    built = {"code_fingerprint": "new", "cpu_flags": "avx avx2", "device": "cpu x2"}
    assert committed_row_mismatch("RCP", "W2A4KV4", "cpu", 0, built) is None  # no file
    (tmp_path / "cpu").mkdir()
    pd.DataFrame([{"method": "RCP", "setting": "W2A4KV4", "seed": 0, "ppl": 89.95, "code_fingerprint": "old",
                   "git_commit": "113e65b8abc", "cpu_flags": "avx avx2 avx512f", "device": "cpu x2"}]
                 ).to_csv(tmp_path / "cpu" / "perplexity.csv", index=False)
    why = committed_row_mismatch("RCP", "W2A4KV4", "cpu", 0, built)
    assert "its code old (git 113e65b8), this code new" in why and "'avx avx2 avx512f'" in why and "89.95" in why
    assert "export at its commit" in why
    assert committed_row_mismatch("RCP", "W2A4KV4", "cpu", 1, built) is None  # no row of that seed
    assert "vector flags" not in committed_row_mismatch("RCP", "W2A4KV4", "cpu", 0, built, on_cpu=False)
    pd.DataFrame([{"method": "RCP", "setting": "W2A4KV4", "seed": 0, "ppl": 89.95, "code_fingerprint": None,
                   "cpu_flags": None}]).to_csv(tmp_path / "cpu" / "perplexity.csv", index=False)
    assert committed_row_mismatch("RCP", "W2A4KV4", "cpu", 0, built) is None  # unrecorded columns: nothing to say
    same = {**built, "code_fingerprint": "old", "cpu_flags": "avx avx2 avx512f"}
    assert committed_row_mismatch("RCP", "W2A4KV4", "cpu", 0, same) is None


def test_a_run_replaces_only_its_own_export_even_when_another_wrote_meanwhile(tmp_path):
    """``replaces_run``: a folder whose source names another run (written, say, while this run trained) is refused
    with its source named; this run's own export is replaced."""
    m = _model(preset("W2A4KV4", w_group_size=32))
    d = save_quantized(m, tmp_path / "packed", source={"run": "/runs/b"})
    before = _tree(d)
    with pytest.raises(FileExistsError, match=r"this run did not write \(its source: /runs/b\)"):
        save_quantized(m, d, overwrite=True, source={"run": "/runs/a"}, replaces_run="/runs/a")
    assert _tree(d) == before
    save_quantized(m, d, overwrite=True, source={"run": "/runs/b"}, replaces_run="/runs/b")
    assert json.loads((d / "quant_map.json").read_text())["source"] == {"run": "/runs/b"}


def test_replacing_a_folder_keeps_the_old_one_when_the_new_cannot_be_moved_in(tmp_path, monkeypatch):
    """The old packed folder is renamed aside, not deleted, until the new one is in place: a failure of that last
    rename puts the old one back, bytes and all."""
    import rcp_lib.deploy.format as F

    m = _model(preset("W2A4KV4", w_group_size=32))
    d = save_quantized(m, tmp_path / "packed")
    before = _tree(d)
    real = os.replace

    def failing(src, dst):
        if ".tmp-" in str(src):
            raise KeyboardInterrupt  # e.g. Ctrl-C between the two renames
        return real(src, dst)

    monkeypatch.setattr(F.os, "replace", failing)
    with pytest.raises(KeyboardInterrupt):
        save_quantized(m, d, overwrite=True)
    assert _tree(d) == before and sorted(p.name for p in tmp_path.iterdir()) == ["packed"]


# -- the exported folder is the evaluated model (issue item 4) --------------------------------------------------------

@pytest.mark.heavy
def test_default_storage_reloads_the_evaluated_model_fp16_does_not(tmp_path):
    """Tiny LLaMA (hidden 128), R1 random Hadamard, W2A4KV4 with LDP levels in groups of 64: the default storage (the
    model's compute dtype) reloads to the evaluated fake-quant logits; fp16 storage (the old default) moves them by
    far more, because A4 turns the fp16 rounding of the levels into activation-code flips."""
    from rcp_lib.quant.apply import preset

    m = M.tiny_llama(hidden=128, intermediate=256, heads=4, kv_heads=2, layers=2, vocab=128)
    rotate_model(m, RotationConfig(r1="random_hadamard", seed=0))
    quantize_model(m, preset("W2A4KV4", w_group_size=64))
    assert m.config.rcp_quant["weight"]["method"] == "ldp"
    ids = torch.randint(0, 128, (4, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = m(ids).logits
    path = save_quantized(m, tmp_path / "default")
    assert json.loads((path / "config.json").read_text())["quantization_config"]["storage_dtype"] == "float32"
    loaded, _ = load_quantized(path)
    with torch.no_grad():
        got = loaded(ids).logits
    err = _rel(ref, got)
    assert err <= 1e-5, err
    loaded16, _ = load_quantized(save_quantized(m, tmp_path / "f16", dtype=torch.float16))
    with torch.no_grad():
        err16 = _rel(ref, loaded16(ids).logits)
    print(f"reloaded vs evaluated logits (max rel): default float32 storage {err:.1e}, fp16 storage {err16:.1e}")
    assert err16 > 1e-3 and err16 > 100 * max(err, 1e-8)


def test_exported_folder_scores_the_table_row(embedded, tmp_path, monkeypatch):
    """The embedded model: a PTQ row built and scored by the tables' code (``ppl_row``: RTN W2A4KV4, here without the
    clip search to keep it fast), exported by the CLI's code with the default storage, scores the row's perplexity on
    the row's windows (``evaluate_folder``, rel <= 1e-6), and the row records that storage dtype."""
    import importlib

    from rcp_lib.experiments.methods import Method
    from rcp_lib.experiments.tables import ppl_row
    from rcp_lib.export import evaluate_folder, export_method
    from rcp_lib.profiles import get_profile

    B = importlib.import_module("rcp_lib.experiments.build")  # (rcp_lib.experiments.build is also a function)
    monkeypatch.setenv("RCP_CACHE", str(tmp_path / "cache"))
    P = get_profile("smoke")  # 2 windows of 128 tokens, evenly spread over the test split
    monkeypatch.setitem(B._BASE, (P.model, P.device, B.base_dtype(P)), embedded)  # the session's model, not a reload
    m = Method("RTN (no clip search)", "W2A4KV4", "ptq", None, {"method": "rtn", "lwc": False}, "rtn")
    row = ppl_row(m, P, progress=False)
    assert row["storage_dtype"] == "float32"
    out = export_method(m, m.setting, "smoke", tmp_path / "packed", progress=False)
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["storage_dtype"] == row["storage_dtype"]
    src = json.loads((out / "quant_map.json").read_text())["source"]  # which row the folder can reproduce
    assert (src["method"], src["setting"], src["profile"], src["seed"]) == (m.name, m.setting, "smoke", P.seed)
    assert src["code_fingerprint"] == row["code_fingerprint"] and src["cpu_flags"] == row["cpu_flags"]
    r = evaluate_folder(out, corpus=P.corpus, seqlen=P.seqlen, max_windows=P.eval_windows, spread=P.eval_spread)
    assert r["window_indices"] == row["window_indices"] and r["tokens_scored"] == row["tokens_scored"]
    rel = abs(r["ppl"] - row["ppl"]) / row["ppl"]
    print(f"row ppl {row['ppl']:.6f}, exported folder {r['ppl']:.6f}: rel {rel:.1e}")
    assert rel <= 1e-6
