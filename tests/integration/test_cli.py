"""Command line: argument parsing, profile overrides, and bad input answered in one line (no heavy computation)."""

import json

import pytest

from rcp_lib.__main__ import CliError, build_parser, main
from rcp_lib.profiles import get_profile, parse_set_items


def test_set_overrides_parse_json_values():
    o = parse_set_items(["qat_steps=160", 'methods=["RCP", "RCP w/o Clip"]', "corpus=wiki-excerpt"])
    assert o == {"qat_steps": 160, "methods": ["RCP", "RCP w/o Clip"], "corpus": "wiki-excerpt"}
    P = get_profile("cpu", **o)
    assert P.qat_steps == 160 and P.methods == ["RCP", "RCP w/o Clip"] and P.name == "cpu"


def test_set_null_sets_a_field_to_none():
    """``--set zero_shot_limit=null`` (every document): JSON null reaches the profile as None, across papermill's JSON
    too; a plain None keyword changes nothing; a field that cannot be None says so."""
    from rcp_lib.experiments.notebook import parse_overrides  # the notebooks' side: a dict or its JSON

    P = get_profile("cpu", **parse_set_items(["zero_shot_limit=null", "methods=null"]))
    assert P.zero_shot_limit is None and P.methods is None and P.run_name != "cpu"
    # reproduce hands P.overrides to the notebooks as JSON; there they rebuild the same profile
    for sent in (json.dumps(P.overrides), json.dumps({"zero_shot_limit": None, "methods": None})):
        Q = get_profile("cpu", **parse_overrides(sent))
        assert Q == P and Q.run_name == P.run_name
    assert get_profile("cpu", zero_shot_limit=None).zero_shot_limit == get_profile("cpu").zero_shot_limit
    with pytest.raises(ValueError, match="'qat_steps' cannot be null"):
        get_profile("cpu", **parse_set_items(["qat_steps=null"]))


def test_set_overrides_reject_malformed_and_unknown_fields():
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_set_items(["qat_steps"])
    with pytest.raises(ValueError, match="unknown profile fields"):
        get_profile("cpu", **parse_set_items(["qat_stepz=3"]))


def test_profile_overrides_coerce_numeric_strings_and_name_a_wrong_type():
    assert get_profile("cpu", qat_steps="1e2").qat_steps == 100  # YAML/strings: "1e2" is a number
    with pytest.raises(ValueError, match=r"Profile\.qat_steps expects a number, got 'many'"):
        get_profile("cpu", qat_steps="many")
    with pytest.raises(ValueError, match=r"Profile\.seqlen expects an integer, got 2\.5"):
        get_profile("cpu", seqlen=2.5)


def test_run_config_yaml_reads_2e_5_as_a_float(tmp_path):
    from rcp_lib.run_config import RunConfig

    cfg = tmp_path / "run.yaml"
    cfg.write_text("qat: {steps: 2, lr_weights: 2e-5}\n")  # YAML 1.1 reads 2e-5 (no dot) as a string
    r = RunConfig.load(cfg)
    assert r.recipe.qat.lr_weights == 2e-5 and isinstance(r.recipe.qat.lr_weights, float)


def test_table_and_reproduce_parsers_accept_repeated_set():
    a = build_parser().parse_args(["table", "--families", "qat", "--set", "qat_steps=8", "--set", 'settings=["W2A4KV4"]'])
    assert a.families == ["qat"] and a.set == ["qat_steps=8", 'settings=["W2A4KV4"]']
    r = build_parser().parse_args(["reproduce", "--profile", "smoke", "--set", "qat_steps=3"])
    assert r.set == ["qat_steps=3"] and parse_set_items(r.set) == {"qat_steps": 3}


def test_table_command_resolves_registered_tables():
    from rcp_lib.__main__ import _table_for

    def resolve(*argv):
        t, stem = _table_for(build_parser().parse_args(["table", *argv]))
        return t.name, stem

    assert resolve() == ("perplexity_ptq", "perplexity_ptq")  # the default: the PTQ rows
    assert resolve("--families", "qat", "--name", "perplexity_qat_160") == ("perplexity_qat", "perplexity_qat_160")
    assert resolve("--table", "memory") == ("memory", "memory")
    with pytest.raises(CliError, match="family of files"):
        resolve("--table", "perplexity_qat")
    with pytest.raises(CliError, match="no registered table"):
        resolve("--name", "my_table")
    with pytest.raises(CliError, match="not a file of table"):
        resolve("--table", "memory", "--name", "perplexity")
    with pytest.raises(CliError, match="perplexity tables"):
        resolve("--table", "memory", "--families", "qat")
    with pytest.raises(SystemExit):  # argparse: not a table the command can compute
        resolve("--table", "quickstart")


@pytest.mark.parametrize("cmd", ["ppl", "qat", "reproduce", "table", "readme"])
def test_help_of_every_subcommand_shows_defaults_and_an_example(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert "(default:" in out and "example:\n  python -m rcp_lib " + cmd in out


def _bad_inputs(tmp_path):
    """(case name, argv) of inputs that must fail with one line and exit status 2."""
    broken = tmp_path / "broken.yaml"
    broken.write_text("qat: {steps: 2\nquant: [\n")
    mistyped = tmp_path / "mistyped.yaml"
    mistyped.write_text("qat: {steps: two}\n")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("qat: {stepz: 2}\n")
    packed = tmp_path / "packed"
    packed.mkdir()
    (packed / "quant_map.json").write_text("{}")
    return [
        ("malformed YAML", ["qat", "--config", str(broken)]),
        ("wrong type in YAML", ["qat", "--config", str(mistyped)]),
        ("unknown field in YAML", ["qat", "--config", str(unknown)]),
        ("missing config file", ["qat", "--config", str(tmp_path / "nope.yaml")]),
        ("unknown profile", ["table", "--profile", "nope"]),
        ("unknown profile field", ["table", "--profile", "smoke", "--set", "qat_stepz=3"]),
        ("wrong type in --set", ["table", "--profile", "smoke", "--set", "qat_steps=many"]),
        ("malformed --set", ["reproduce", "--profile", "smoke", "--set", "qat_steps"]),
        ("unknown field in reproduce --set", ["reproduce", "--profile", "smoke", "--set", "qat_stepz=3"]),
        ("unknown model", ["ppl", "--model", "no-such-org/no-such-model-h21"]),
        ("WikiText-2 offline", ["ppl", "--corpus", "wikitext2"]),
        ("cuda without CUDA", ["ppl", "--device", "cuda"]),
        ("packed folder as model", ["ppl", "--model", str(packed)]),
        ("packed folder in a run config", ["qat", "--config", str(_config_with(tmp_path, f"model: {packed}"))]),
        ("README block of another profile", ["readme", "--profile", "smoke"]),
    ]


def _config_with(tmp_path, line):
    p = tmp_path / "with_model.yaml"
    p.write_text(line + "\n")
    return p


def test_bad_input_table_one_line_exit_2_no_traceback(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name, argv in _bad_inputs(tmp_path):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse usage errors
            rc = e.code
        err = capsys.readouterr().err.strip()
        assert rc == 2, (name, rc, err)
        assert err and "\n" not in err, (name, err)
        assert "Traceback" not in err and "error:" in err, (name, err)


def test_messages_name_the_problem(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cases = dict(_bad_inputs(tmp_path))
    expect = {"malformed YAML": "malformed YAML", "wrong type in YAML": "QATConfig.steps expects",
              "unknown profile": "invalid choice: 'nope'", "wrong type in --set": "Profile.qat_steps expects",
              "packed folder as model": "packed quantized folder", "README block of another profile": "--print"}
    for name, needle in expect.items():
        try:
            main(cases[name])
        except SystemExit:
            pass
        assert needle in capsys.readouterr().err, name


def test_debug_shows_the_traceback(tmp_path):
    bad = tmp_path / "mistyped.yaml"
    bad.write_text("qat: {steps: two}\n")
    with pytest.raises(CliError, match="QATConfig.steps"):
        main(["qat", "--config", str(bad), "--debug"])


def test_readme_print_leaves_the_readme_alone(tmp_path, capsys, monkeypatch):
    from rcp_lib.paths import readme_path

    before = readme_path().read_bytes()
    monkeypatch.setenv("RCP_RESULTS_DIR", str(tmp_path))
    assert main(["readme", "--profile", "smoke"]) == 2
    assert readme_path().read_bytes() == before
    capsys.readouterr()
    # --print formats the profile's results (here none: one line naming the missing file) and never writes the README
    assert main(["readme", "--profile", "smoke", "--print"]) == 2
    assert "perplexity.csv not found" in capsys.readouterr().err
    assert readme_path().read_bytes() == before


def _export_cli(*argv, cache, timeout=120):
    """``python -m rcp_lib export ARGV`` in a fresh process from the checkout (offline, an empty cache folder
    ``cache``): (return code, stderr)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "RCP_CACHE": str(cache),
           "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = subprocess.run([sys.executable, "-m", "rcp_lib", "export", *argv], cwd=root, env=env, capture_output=True,
                       text=True, timeout=timeout)
    return r.returncode, r.stderr.strip()


def _snapshot(root):
    out = {".": root.stat().st_mode & 0o7777}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = (p.read_bytes() if p.is_file() else None, p.stat().st_mode & 0o7777)
    return out


@pytest.mark.parametrize("overwrite", [False, True])
def test_export_refuses_a_folder_holding_other_files_before_building(tmp_path, overwrite):
    """`export --out DIR` with a folder of the user's (notes.txt, sub/y): exit 2, one line on stderr, every file and
    the folder's mode as they were, even with --overwrite; refused before any model is built or loaded (the
    profile's method is not cached in this empty cache, so a build would take minutes)."""
    d = tmp_path / "mine"
    (d / "sub").mkdir(parents=True)
    (d / "notes.txt").write_text("keep me")
    (d / "sub" / "y").write_text("and me")
    d.chmod(0o755)
    before = _snapshot(d)
    argv = ["--method", "QuaRot-RTN", "--setting", "W2A4KV4", "--profile", "smoke", "--out", str(d)]
    rc, err = _export_cli(*argv, *(["--overwrite"] if overwrite else []), cache=tmp_path / "cache")
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "holds files other than a packed model" in err and "nothing was changed" in err, err
    assert _snapshot(d) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == ["mine"]


def test_export_refuses_a_packed_folder_without_overwrite(tmp_path):
    """A folder that already holds a packed model: refused (exit 2, one line naming --overwrite), left unchanged."""
    import json

    d = tmp_path / "packed"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "rcp"}}))
    (d / "quant_map.json").write_text("{}")
    before = _snapshot(d)
    rc, err = _export_cli("--method", "QuaRot-RTN", "--profile", "smoke", "--out", str(d), cache=tmp_path / "cache")
    assert rc == 2 and len(err.splitlines()) == 1 and "--overwrite" in err, err
    assert _snapshot(d) == before
