"""Packed folders in the Hugging Face ecosystem: ``AutoModelForCausalLM.from_pretrained`` after ``import rcp_lib``
(the "rcp" quantizer), sharding, the loader shim for processes without rcp_lib (``lm_eval`` command line), no
full-precision copy while loading, bad folders, the ``export`` / ``eval`` commands."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import rcp_lib  # noqa: F401  (registers the "rcp" quantizer)
from rcp_lib import models as M
from rcp_lib.deploy import (FORMAT_VERSION, PackedFormatError, PackedLinear, check_folder, load_quantized,
                            packed_model_bytes, save_quantized)
from rcp_lib.quant.apply import preset, quantize_model
from rcp_lib.rotation.fuse import RotationConfig, rotate_model

ROOT = Path(__file__).resolve().parents[2]
IDS = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(1))


def _byte_tokenizer():
    """A byte-level BPE tokenizer without merges (256 byte tokens + <eos>): a real tokenizer for a tiny model, built
    in memory (no data)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<eos>"] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", bos_token="<eos>", pad_token="<eos>")


def _model(q=None, hidden=96, intermediate=160, layers=2, vocab=260, rot=True):
    m = M.tiny_llama(hidden=hidden, intermediate=intermediate, heads=3, kv_heads=1, layers=layers, vocab=vocab)
    if rot:
        rotate_model(m, RotationConfig(r1="gsr", r1_block=32))
    return quantize_model(m, q or preset("W2A4KV4", w_group_size=32))


def _rel(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


def test_from_pretrained_round_trip_and_layout(tmp_path):
    """save_quantized writes a Hugging Face folder; from_pretrained (after import rcp_lib) rebuilds the deployed model
    whose logits equal the in-memory quantized model's and whose greedy generation is identical; the folder is
    sharded above max_shard_size with an index; config.json carries the Recipe's rotation and quant dicts."""
    m = _model()
    with torch.no_grad():
        ref = m(IDS).logits
        gen = m.generate(IDS[:1, :6], max_new_tokens=8, do_sample=False)
    path = save_quantized(m, tmp_path / "p", tokenizer=_byte_tokenizer(), dtype=torch.float32, max_shard_size=20_000)
    names = sorted(p.name for p in path.iterdir())
    shards = [n for n in names if n.startswith("model-") and n.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors.index.json" in names and "model.safetensors" not in names
    assert {"config.json", "generation_config.json", "quant_map.json", "modeling_rcp.py", "tokenizer.json"} <= set(names)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "rcp" and qc["format_version"] == FORMAT_VERSION
    assert qc["rotation"] == RotationConfig(r1="gsr", r1_block=32).to_dict()
    assert qc["quant"] == preset("W2A4KV4", w_group_size=32).to_dict()

    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert sum(isinstance(x, PackedLinear) for x in loaded.modules()) == 14
    assert not any(p.is_meta for p in list(loaded.parameters()) + list(loaded.buffers()))
    with torch.no_grad():
        assert _rel(ref, loaded(IDS).logits) < 1e-5
        assert torch.equal(gen, loaded.generate(IDS[:1, :6], max_new_tokens=8, do_sample=False))

    # a loaded model saves again (its packed tensors as they are) and loads to the same logits
    again = save_quantized(loaded, tmp_path / "again", dtype=torch.float32)
    reloaded, _ = load_quantized(again)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, reloaded(IDS).logits)
    with pytest.raises(ValueError, match="not serializable"):
        loaded.save_pretrained(tmp_path / "hf")


def test_from_pretrained_without_quantized_weights_and_fp16(tmp_path):
    """W16A4 (projections stay QuantLinear with full-precision weights) and fp16 storage (LUTs kept in fp16, the rest
    cast to the requested dtype) load through the same quantizer."""
    m = _model(preset("W16A4KV16"), rot=False)
    with torch.no_grad():
        ref = m(IDS).logits
    loaded = AutoModelForCausalLM.from_pretrained(save_quantized(m, tmp_path / "w16", dtype=torch.float32))
    assert not any(isinstance(x, PackedLinear) for x in loaded.modules())
    with torch.no_grad():
        assert _rel(ref, loaded(IDS).logits) < 1e-6
    m = _model(preset("W2A16KV16", w_group_size=32))
    with torch.no_grad():
        ref = m(IDS).logits
    loaded = AutoModelForCausalLM.from_pretrained(save_quantized(m, tmp_path / "f16", dtype=torch.float16),
                                                  dtype=torch.float32)
    assert {x.lut.dtype for x in loaded.modules() if isinstance(x, PackedLinear)} == {torch.float16}
    with torch.no_grad():
        assert _rel(ref, loaded(IDS).logits) < 3e-3  # fp16 rounding of the levels and the other tensors


_PEAK = r"""
import gc, json, sys, torch
import rcp_lib
from transformers import AutoModelForCausalLM
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
AutoModelForCausalLM.from_pretrained(sys.argv[1])  # warm-up: imports and lazy initialisation
gc.collect()
before = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
m = AutoModelForCausalLM.from_pretrained(sys.argv[2])
peak = status("VmHWM:")
model_bytes = sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))
print(json.dumps({"peak_increase": peak - before, "model_bytes": model_bytes}))
"""


def test_loading_builds_no_full_precision_copy(tmp_path):
    """Peak memory of from_pretrained (fresh process, /proc VmHWM) stays far below the float32 bytes of the quantized
    projections: the model is built on the meta device and the packed tensors are loaded into packed buffers."""
    small = save_quantized(_model(), tmp_path / "small")
    q = preset("W2A16KV16", w_group_size=128).with_weight(method="rtn", lwc=False)
    big = _model(q, hidden=768, intermediate=2304, layers=2, vocab=260, rot=False)
    fp32_proj = sum(p.numel() * 4 for n, p in big.named_parameters() if ".layers." in n and p.dim() == 2)
    path = save_quantized(big, tmp_path / "big")
    del big
    packed = packed_model_bytes(path)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = subprocess.run([sys.executable, "-c", _PEAK, str(small), str(path)], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"fp32 projections {fp32_proj} B, packed projections {packed['block_linears']} B, loaded model "
          f"{out['model_bytes']} B, peak RSS increase while loading {out['peak_increase']} B")
    assert fp32_proj > 50e6 and packed["block_linears"] < fp32_proj / 10
    assert out["model_bytes"] < fp32_proj / 4  # the loaded model holds packed projections
    # a float32 copy of the projections alone would raise the peak by fp32_proj
    assert out["peak_increase"] < fp32_proj / 2, (out, fp32_proj, packed)


@pytest.fixture()
def saved(tmp_path):
    return save_quantized(_model(), tmp_path / "m", max_shard_size=20_000)


def _edit_json(path, fn):
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


def test_load_quantized_merges_projections_on_request(saved):
    """``load_quantized(..., merge_projections=True)``: q / k / v and gate / up merged per block (a deploy-time
    layout), the same logits as the folder loaded as stored; ``fuse_mlps=True`` then makes each MLP a GatedMLP of
    the merged gate / up group and down_proj: the merged model's logits, bit for bit."""
    from rcp_lib.kernels.packed_linear import GatedMLP, SharedInputSlice

    plain, _ = load_quantized(saved)
    merged, _ = load_quantized(saved, merge_projections=True)
    assert sum(isinstance(m, SharedInputSlice) for m in merged.modules()) == 2 * 5
    assert sum(isinstance(m, PackedLinear) for m in merged.modules()) == 2 * 4
    with torch.no_grad():
        assert _rel(plain(IDS).logits, merged(IDS).logits) < 1e-6
    fused, _ = load_quantized(saved, merge_projections=True, fuse_mlps=True)  # MLPs: the merged gate / up group reused
    assert sum(isinstance(m, GatedMLP) for m in fused.modules()) == 2
    with torch.no_grad():
        assert torch.equal(fused(IDS).logits, merged(IDS).logits)


def _refused(path, match):
    """One clear PackedFormatError from both loaders, before any model is built or loaded."""
    with pytest.raises(PackedFormatError, match=match):
        load_quantized(path)
    with pytest.raises(PackedFormatError, match=match):
        AutoModelForCausalLM.from_pretrained(path)


def test_modified_shard_is_refused(saved):
    shard = sorted(saved.glob("model-*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    _refused(saved, "checksum mismatch")


def test_missing_shard_is_refused(saved):
    shard = sorted(saved.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(PackedFormatError, match=f"missing shard {shard.name}"):
        load_quantized(saved)
    # from_pretrained: the quantizer's check, or transformers' own if it resolves the shards first; both name the file
    with pytest.raises((PackedFormatError, OSError), match=shard.name):
        AutoModelForCausalLM.from_pretrained(saved)


def test_folder_that_is_not_ours(tmp_path, saved):
    M.tiny_llama().save_pretrained(tmp_path / "plain")
    with pytest.raises(PackedFormatError, match="not an rcp_lib packed model folder"):
        load_quantized(tmp_path / "plain")
    (saved / "quant_map.json").unlink()
    with pytest.raises(PackedFormatError, match="not an rcp_lib packed model folder"):
        check_folder(saved)
    with pytest.raises(PackedFormatError, match="not an rcp_lib packed model folder"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_manifest_that_the_skeleton_does_not_take(saved):
    """A tensor the rebuilt model has no place for would be dropped by transformers (or a missing one left
    uninitialised): the quantizer refuses it before loading."""
    def drop(d):
        t = d["tensors"].pop("model.norm.weight")
        d["tensors"]["model.norm.scale"] = t
    _edit_json(saved / "quant_map.json", drop)
    with pytest.raises(PackedFormatError):
        AutoModelForCausalLM.from_pretrained(saved)


def test_lm_eval_command_line_on_a_packed_folder(tmp_path):
    """`lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True` in a fresh process that has not
    imported rcp_lib (the folder's modeling_rcp.py shim imports it) runs our offline tasks and writes results."""
    from rcp_lib.evaluation.zero_shot import offline_include_dir

    include = offline_include_dir()
    path = save_quantized(_model(), tmp_path / "packed", tokenizer=_byte_tokenizer())
    lm_eval = Path(sys.executable).parent / "lm_eval"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "mods"),
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [str(lm_eval), "--model", "hf", "--model_args", f"pretrained={path},trust_remote_code=True,dtype=float32",
           "--tasks", "wiki_lastword,wiki_nextsent", "--include_path", str(include), "--limit", "1",
           "--batch_size", "8", "--device", "cpu", "--output_path", str(tmp_path / "out")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    results = list((tmp_path / "out").rglob("results*.json"))
    assert results, r.stdout[-2000:]
    res = json.loads(results[0].read_text())["results"]
    assert 0 <= res["wiki_nextsent"]["acc,none"] <= 1 and 0 <= res["wiki_lastword"]["acc,none"] <= 1
    assert res["wiki_lastword"]["perplexity,none"] > 1


@pytest.mark.slow  # minutes on 2 shared cores: 135M weights saved in float32, checksummed, loaded, run W2A4 on CPU
def test_embedded_model_round_trip_smoke(embedded, tmp_path):
    """The embedded SmolLM2-135M, rotated + W2A4KV4 RTN, saved and reloaded with from_pretrained: logits equal the
    in-memory quantized model's (float32 storage) and greedy generation is identical."""
    model, tok = copy.deepcopy(embedded[0]), embedded[1]
    rotate_model(model, RotationConfig(r1="gsr", r1_block=64))
    quantize_model(model, preset("W2A4KV4", w_group_size=64).with_weight(method="rtn", lwc=False))
    ids = tok("The history of the city begins", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model(ids).logits
        gen = model.generate(ids, max_new_tokens=4, do_sample=False)
    path = save_quantized(model, tmp_path / "smol", tokenizer=tok, dtype=torch.float32, max_shard_size="200MB")
    assert json.loads((path / "config.json").read_text())["dtype"] == "float32"
    loaded = AutoModelForCausalLM.from_pretrained(path)  # dtype "auto": the config's, the saved model's float32
    with torch.no_grad():
        assert _rel(ref, loaded(ids).logits) < 1e-4
        assert torch.equal(gen, loaded.generate(ids, max_new_tokens=4, do_sample=False))


def test_export_run_and_eval_commands(tmp_path, monkeypatch, capsys):
    """`export --run` rebuilds a finished QAT run's student from its summary.json + checkpoint; `eval --model`
    reports the perplexity of the folder (equal to the in-memory student's)."""
    from rcp_lib.__main__ import main
    from rcp_lib.evaluation import perplexity
    from rcp_lib.qat import QATConfig
    from rcp_lib.recipe import Recipe
    from rcp_lib.run_config import RunConfig

    base = tmp_path / "base"
    M.tiny_llama(hidden=96, intermediate=160, heads=3, kv_heads=1, layers=2, vocab=260).save_pretrained(base)
    _byte_tokenizer().save_pretrained(base)
    recipe = Recipe(rotation=RotationConfig(r1="gsr", r1_block=32),
                    quant=preset("W2A4KV4", w_group_size=32).with_weight(method="rtn", lwc=False), qat=QATConfig())
    student, tok = M.load(str(base))
    rotate_model(student, recipe.rotation)
    quantize_model(student, recipe.quant)
    with torch.no_grad():  # stands in for training: any change of the trainable state must reach the export
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    run = tmp_path / "run"
    (run / "checkpoint").mkdir(parents=True)
    torch.save(student.state_dict(), run / "checkpoint" / "pytorch_model.bin")
    cfg = RunConfig(model=str(base), recipe=recipe)
    (run / "summary.json").write_text(json.dumps({"config": cfg.to_dict()}))

    assert main(["export", "--run", str(run), "--out", str(tmp_path / "packed"), "--dtype", "float32"]) == 0
    loaded, _ = load_quantized(tmp_path / "packed")
    with torch.no_grad():
        assert _rel(student(IDS).logits, loaded(IDS).logits) < 1e-5
    capsys.readouterr()
    assert main(["eval", "--model", str(tmp_path / "packed"), "--seqlen", "64", "--max-windows", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    from rcp_lib.data import corpus_tokens

    ref = perplexity(loaded, corpus_tokens(tok, "wiki-excerpt", "test"), seqlen=64, max_windows=2, progress=False,
                     spread=True)  # eval scores the tables' windows (evenly spread) by default
    assert out["windows"] == 2 and out["ppl"] == pytest.approx(ref, rel=1e-6)
    assert out["source"]["run"] == str(run.resolve()) and out["source"]["code_fingerprint"]  # what it was built from
    assert main(["eval", "--model", str(tmp_path / "packed"), "--seqlen", "64", "--max-windows", "2"]) == 0
    assert f"built from the run {run.resolve()} by code " in capsys.readouterr().out


def _cold(code: str, tmp_path, *args: str, module: bool = False) -> subprocess.CompletedProcess:
    """Run Python code (or ``-m rcp_lib ...`` with ``module``) in a fresh interpreter outside the checkout: nothing of
    transformers or rcp_lib is imported before the code runs."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "mods")}
    cmd = [sys.executable, "-m", "rcp_lib", *args] if module else [sys.executable, "-c", code]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          stdin=subprocess.DEVNULL)  # transformers asks on stdin before refusing remote code


def test_documented_load_paths_work_in_a_cold_process(tmp_path):
    """The two load paths of docs/library.md in a fresh interpreter (the tests' own process has imported transformers
    already, which hid an import cycle): ``import rcp_lib; rcp_lib.load_quantized(DIR)`` and ``python -m rcp_lib eval
    --model DIR``; and plain ``import rcp_lib`` then ``AutoModelForCausalLM.from_pretrained(DIR)``."""
    m = _model()
    with torch.no_grad():
        ref = m(IDS).logits
    path = save_quantized(m, tmp_path / "p", tokenizer=_byte_tokenizer(), dtype=torch.float32)
    torch.save(IDS, tmp_path / "ids.pt")
    code = ("import sys, torch, rcp_lib; from transformers import AutoModelForCausalLM; "
            f"model, tok = rcp_lib.load_quantized({str(path)!r}); "
            f"hf = AutoModelForCausalLM.from_pretrained({str(path)!r}, dtype=torch.float32); "
            f"ids = torch.load({str(tmp_path / 'ids.pt')!r}); "
            f"torch.save((model(ids).logits.detach(), hf(ids).logits.detach()), {str(tmp_path / 'out.pt')!r}); "
            "print(type(model).__name__, type(tok).__name__)")
    r = _cold(code, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split()[0] == "RcpLlamaForCausalLM" and r.stdout.split()[1] != "NoneType"
    a, b = torch.load(tmp_path / "out.pt")
    assert _rel(ref, a) < 1e-5 and torch.equal(a, b)
    r = _cold("", tmp_path, "eval", "--model", str(path), "--seqlen", "32", "--max-windows", "1", "--json",
              module=True)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["windows"] == 1 and out["ppl"] > 1


def test_plain_transformers_refuses_a_packed_folder(tmp_path):
    """Without rcp_lib (and without trust_remote_code) transformers refuses a packed folder instead of loading random
    weights: config.json's model_type is ``rcp_<family>``, a type only rcp_lib registers. The same holds for a folder
    of another format version or without its manifest; lm_eval's HFLM reads the config the same way."""
    path = save_quantized(_model(), tmp_path / "p", tokenizer=_byte_tokenizer())
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "rcp_llama" and cfg["architectures"] == ["RcpLlamaForCausalLM"]
    code = ("from transformers import AutoModelForCausalLM\n"
            "try:\n"
            f"    AutoModelForCausalLM.from_pretrained({str(path)!r})\n"
            "except ValueError as e:\n"
            "    print('REFUSED', ' '.join(str(e).split()))\n"
            "else:\n"
            "    print('LOADED')\n")
    r = _cold(code, tmp_path)
    assert r.returncode == 0 and "REFUSED" in r.stdout and "LOADED" not in r.stdout, (r.stdout[-2000:], r.stderr[-2000:])
    assert "trust_remote_code=True" in r.stdout.split("REFUSED")[1]
    _edit_json(path / "config.json", lambda d: d["quantization_config"].update(format_version=99))
    (path / "quant_map.json").unlink()
    r = _cold(code, tmp_path)
    assert "REFUSED" in r.stdout and "LOADED" not in r.stdout, (r.stdout[-2000:], r.stderr[-2000:])


def test_newer_and_older_format_versions_say_what_to_do(saved):
    """A folder from a newer writer asks for a newer rcp_lib; one from an older writer asks for a re-export."""
    _edit_json(saved / "config.json", lambda d: d["quantization_config"].update(format_version=99))
    _refused(saved, "newer rcp_lib: upgrade rcp_lib")
    _edit_json(saved / "config.json", lambda d: d["quantization_config"].update(format_version=1))
    _refused(saved, "re-export the model")
    (saved / "config.json").unlink()  # a real version-1 folder: quant_map.json only, no config.json (which
    _edit_json(saved / "quant_map.json", lambda d: d.update(format_version=1))  # transformers itself asks for)
    with pytest.raises(PackedFormatError, match="version 1 .*re-export the model"):
        load_quantized(saved)


def test_format_version_2_folders_still_load(tmp_path):
    """Version 2 differs from 3 only in config.json's model_type (the family's own): such folders still load."""
    m = _model()
    with torch.no_grad():
        ref = m(IDS).logits
    path = save_quantized(m, tmp_path / "v2", dtype=torch.float32)

    def v2(d):
        d.update(model_type="llama", architectures=["LlamaForCausalLM"])
        d["quantization_config"]["format_version"] = 2

    _edit_json(path / "config.json", v2)
    _edit_json(path / "quant_map.json", lambda d: d.update(format_version=2))  # and no config checksum, as version 2
    _edit_json(path / "quant_map.json", lambda d: d.pop("quantization_config_sha256"))
    with pytest.warns(UserWarning, match="plain transformers .* random weights; re-export it"):
        loaded, _ = load_quantized(path)
    with torch.no_grad():
        assert _rel(ref, loaded(IDS).logits) < 1e-5


def test_the_shim_imports_the_quantizer_classes_by_their_stable_name():
    """Every folder's ``modeling_rcp.py`` imports ``from rcp_lib.hf import Rcp<...>`` (folders written before
    ``rcp_lib.deploy`` existed did too): that name gives the registered classes of :mod:`rcp_lib.deploy.hf`."""
    import rcp_lib.deploy.hf as new
    import rcp_lib.hf as stable
    from rcp_lib.deploy.format import _SHIM_TEXT

    assert stable.__all__ and all(getattr(stable, n) is getattr(new, n) for n in stable.__all__)
    cfg, lm = new.PACKED_CLASSES["rcp_llama"]
    line = next(l for l in _SHIM_TEXT.splitlines() if l.startswith("from "))
    ns: dict = {}
    exec(line.split("#")[0].format(config=cfg.__name__[3:], base=lm.__name__[3:]), ns)
    assert ns[cfg.__name__] is cfg and ns[lm.__name__] is lm
