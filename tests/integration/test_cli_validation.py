"""Every input of the command line is checked before a model is loaded (issue 5): each case runs ``python -m rcp_lib``
in a fresh process and must end in one line on stderr and exit status 2 (Ctrl-C: one line and 130) within seconds.

An empty ``RCP_CACHE`` proves that no model was touched: loading the embedded model writes its dequantized copy there.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SMOKE = (ROOT / "configs" / "smoke.yaml").read_text()


def _env(tmp_path: Path) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "RCP_CACHE": str(tmp_path / "cache"),
            "RCP_RESULTS_DIR": str(tmp_path / "results"), "RCP_FIGURES_DIR": str(tmp_path / "figures"),
            "RCP_RUNS_DIR": str(tmp_path / "runs"), "PYTHONPATH": str(ROOT)}


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rcp_lib", *args], cwd=ROOT, env=_env(tmp_path), capture_output=True,
                          text=True, timeout=300)


def _assert_one_line(p: subprocess.CompletedProcess, needle: str, tmp_path: Path, rc: int = 2) -> str:
    err = p.stderr.strip()
    assert p.returncode == rc, (p.returncode, err[-2000:])
    assert "\n" not in err and "Traceback" not in err, err[-2000:]
    assert needle in err, err
    cache = tmp_path / "cache"
    assert not cache.exists() or not any(cache.glob("smollm2-135m-dequant-*")), "a model was loaded"
    return err


def _config(tmp_path: Path, old: str, new: str, extra: str = "") -> str:
    assert old in SMOKE
    p = tmp_path / "run.yaml"
    p.write_text(SMOKE.replace(old, new) + extra)
    return str(p)


def test_qat_refuses_an_unexportable_weight_width_before_training(tmp_path):
    """3-bit weights (and 5-bit KV, which is fine) with an export: refused at once, not after training."""
    cfg = _config(tmp_path, "weight: {bits: 2,", "weight: {bits: 3,")
    text = Path(cfg).read_text().replace("kv: {bits: 4}", "kv: {bits: 5}")
    Path(cfg).write_text(text.replace("export_dir: null", f"export_dir: {tmp_path / 'out'}"))
    err = _assert_one_line(_cli(tmp_path, "qat", "--config", cfg), "weight bits 3 cannot be exported", tmp_path)
    assert "1, 2, 4, 8" in err and "export_dir: null" in err  # the allowed widths and the research opt-out


_BATCH = """
import contextlib, io, json, runpy, sys, traceback
out = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    sys.argv = ["python -m rcp_lib", *argv]
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            runpy.run_module("rcp_lib", run_name="__main__", alter_sys=True)
            rc = 0
        except SystemExit as e:
            rc = e.code
        except BaseException:
            traceback.print_exc()
            rc = "uncaught"
    out.append([rc, err.getvalue()])
print(json.dumps(out))
"""


def test_bad_inputs_fail_in_one_line_before_any_model(tmp_path):
    """More cases in one fresh process: each enters the CLI as ``python -m rcp_lib`` does (runpy), so one interpreter
    start-up serves them all."""
    import json

    group = _config(tmp_path, "group_size: 64", "group_size: 100")
    run = tmp_path / "run"
    run.mkdir()
    cases = [
        (["qat", "--config", group], "does not divide the input size 576 of smollm2-135m's hidden size"),
        (["table", "--profile", "smoke", "--set", "w_group_size=100"], "Profile.w_group_size: group_size=100"),
        (["train-rows", "--profile", "smoke", "--set", 'methods=["rcp"]'], "unknown method 'rcp'; did you mean 'RCP'"),
        (["reproduce", "--profile", "smoke", "--set", 'full_eval_methods=["FP", "quarot"]'], "unknown method 'quarot'"),
        (["table", "--profile", "smoke", "--set", 'settings=["W2A4"]'], "'W2A4' is not a setting name"),
        (["export", "--run", str(run), "--out", str(tmp_path / "o"), "--max-shard-size", "banana"],
         "argument --max-shard-size: max shard size must be a positive number"),
        (["export", "--run", str(run), "--out", str(tmp_path / "o"), "--max-shard-size", "0"], "got '0'"),
        (["qat", "--config", "configs/"], "run config configs is a folder"),
        (["compare", str(tmp_path / "nope"), str(tmp_path)], "does not exist"),
    ]
    p = subprocess.run([sys.executable, "-c", _BATCH, json.dumps([a for a, _ in cases])], cwd=ROOT,
                       env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    results = json.loads(p.stdout.strip().splitlines()[-1])
    for (argv, needle), (rc, err) in zip(cases, results):
        err = err.strip()
        assert rc == 2 and "\n" not in err and "Traceback" not in err, (argv, rc, err[-2000:])
        assert needle in err, (argv, err)
    cache = tmp_path / "cache"
    assert not cache.exists() or not any(cache.glob("smollm2-135m-dequant-*")), "a model was loaded"
    assert not (tmp_path / "results").exists()


def test_unknown_method_name_in_set_is_refused(tmp_path):
    """`--set 'methods=["quarot-gptq"]'` used to write an empty CSV and exit 0."""
    err = _assert_one_line(_cli(tmp_path, "table", "--profile", "smoke", "--set", 'methods=["quarot-gptq"]'),
                           "unknown method 'quarot-gptq'", tmp_path)
    assert "did you mean 'QuaRot-GPTQ'" in err and "RCP w/o Clip" in err  # the known names are listed
    assert not (tmp_path / "results").exists()  # no (empty) CSV written


_SLEEP = """
import sys, time
import rcp_lib.__main__ as M
def fake(args):
    print("ready", flush=True)
    time.sleep(60)
M._cmd_readme = fake
sys.exit(M.main(["readme", "--profile", "cpu"]))
"""


def test_ctrl_c_is_one_line_and_exit_130(tmp_path):
    # a suite started in the background (`make test &`, nohup) inherits SIGINT ignored, and Python keeps an ignored
    # SIGINT ignored: the child gets the default disposition back, as an interactive command line has it
    p = subprocess.Popen([sys.executable, "-c", _SLEEP], cwd=ROOT, env=_env(tmp_path),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert p.stdout.readline().strip() == "ready"
        time.sleep(0.2)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    _assert_one_line(subprocess.CompletedProcess(p.args, p.returncode, out, err),
                     "interrupted; finished rows are cached", tmp_path, rc=130)


@pytest.mark.parametrize("exc,needle", [(PermissionError(13, "Permission denied", "/root/x.yaml"),
                                         "Permission denied: '/root/x.yaml'"),
                                        (IsADirectoryError(21, "Is a directory", "configs"),
                                         "Is a directory: 'configs'"),
                                        (NotImplementedError("3 bits cannot be packed"), "3 bits cannot be packed")])
def test_os_and_not_implemented_errors_are_one_line(exc, needle, monkeypatch, capsys):
    import rcp_lib.__main__ as M

    def fail(args):
        raise exc

    monkeypatch.setattr(M, "_cmd_readme", fail)
    assert M.main(["readme", "--profile", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and needle in err and "error:" in err, err


def test_warnings_of_a_command_print_as_one_line(monkeypatch, capsys):
    """A library warning during a command prints as ``python -m rcp_lib CMD: warning: MESSAGE`` (no file, line or
    source of the call); ``--debug`` leaves the warning machinery alone; either way it is as it was afterwards."""
    import warnings

    import rcp_lib.__main__ as M

    def warn(args):
        warnings.warn("the committed row was computed by other code:\n  export at its commit", UserWarning)
        return 0

    monkeypatch.setattr(M, "_cmd_readme", warn)
    before = warnings.showwarning
    assert M.main(["readme", "--profile", "cpu"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0] == ("python -m rcp_lib readme: warning: the committed row was computed by other code: export at its "
                      "commit") and "UserWarning" not in "".join(err) and warnings.showwarning is before
    with pytest.warns(UserWarning, match="computed by other code"):
        assert M.main(["readme", "--profile", "cpu", "--debug"]) == 0
    assert warnings.showwarning is before


# ---- the checks themselves (in process) ------------------------------------------------------------------------


def test_check_packable_refuses_only_what_cannot_be_packed():
    from rcp_lib.quant.apply import check_packable, packable_weight_bits, preset

    assert packable_weight_bits() == (1, 2, 4, 8)
    for name in ("W2A4KV4", "W4A4KV4", "W2A5KV5", "W8A8KV8", "W16A4KV4", "W1A16KV16"):
        check_packable(preset(name))
    with pytest.raises(ValueError, match="weight bits 3 cannot be exported"):
        check_packable(preset("W3A4KV4"))


def test_run_config_refuses_three_bit_weights_only_when_it_exports(tmp_path):
    from rcp_lib.run_config import RunConfig

    d = {"quant": {"weight": {"bits": 3, "group_size": 64}, "kv": {"bits": 5}}, "qat": {"steps": 1}}
    assert RunConfig.from_dict(d).recipe.quant.w_bits == 3  # a research run (fake quantization only) is allowed
    with pytest.raises(ValueError, match="weight bits 3"):
        RunConfig.from_dict({**d, "export_dir": str(tmp_path / "out")})


def test_model_sizes_without_loading(tmp_path):
    from rcp_lib.models import EMBEDDED_DIMS, model_dims, tiny_llama
    from rcp_lib.quant.apply import check_model_sizes, preset

    assert model_dims("smollm2-135m") is EMBEDDED_DIMS
    m = tiny_llama(vocab=64, hidden=48, intermediate=80, heads=2, kv_heads=1, layers=1)
    m.save_pretrained(tmp_path / "tiny")
    d = model_dims(str(tmp_path / "tiny"))
    assert (d.hidden, d.intermediate, d.head_dim) == (48, 80, 24)
    check_model_sizes(preset("W2A4KV4", w_group_size=16), d)
    with pytest.raises(ValueError, match="does not divide the input size 80 of the model's intermediate size"):
        check_model_sizes(preset("W2A4KV4", w_group_size=24), d)
    with pytest.raises(ValueError, match="KV cache"):
        check_model_sizes(preset("W2A4KV4", w_group_size=8, kv_group_size=16), d)


def test_qat_export_dir_replaces_only_its_own_run_export(tmp_path, monkeypatch):
    """``qat`` with ``export_dir``: a packed folder written by another run (or by ``export --method``) is refused
    before any model is loaded, naming its source; the folder is left as it was."""
    import json

    from rcp_lib import models as M
    from rcp_lib.deploy import save_quantized
    from rcp_lib.quant.apply import preset, quantize_model
    from rcp_lib.run_config import RunConfig, run_qat

    monkeypatch.setenv("RCP_CACHE", str(tmp_path / "cache"))
    m = quantize_model(M.tiny_llama(vocab=64, hidden=64, intermediate=96, heads=2, kv_heads=1, layers=1),
                       preset("W2A4KV4", w_group_size=32))
    dest = save_quantized(m, tmp_path / "packed", source={"method": "RCP", "setting": "W2A4KV4"})
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    cfg = RunConfig.from_dict({"model": str(tmp_path / "no-such-model"), "export_dir": str(dest),
                               "out_dir": str(tmp_path / "run")})
    with pytest.raises(FileExistsError, match=r"holds a packed model this run did not write \(its source: RCP\)"):
        run_qat(cfg, progress=False)
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    assert json.loads((dest / "quant_map.json").read_text())["source"] == {"method": "RCP", "setting": "W2A4KV4"}
    save_quantized(m, dest, overwrite=True, source={"run": str((tmp_path / "run").resolve())})  # this run's export
    with pytest.raises(Exception) as e:  # past the check: the (missing) model is what fails now
        run_qat(cfg, progress=False)
    assert not isinstance(e.value, FileExistsError) and "no-such-model" in str(e.value)
