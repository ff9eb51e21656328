"""Command line: argument parsing and profile overrides (no computation)."""

import pytest

from rcp_lib.__main__ import _parse_overrides, build_parser
from rcp_lib.profiles import get_profile


def test_set_overrides_parse_json_values():
    o = _parse_overrides(["qat_steps=160", 'methods=["RCP", "RCP w/o Clip"]', "corpus=wiki-excerpt"])
    assert o == {"qat_steps": 160, "methods": ["RCP", "RCP w/o Clip"], "corpus": "wiki-excerpt"}
    P = get_profile("cpu", **o)
    assert P.qat_steps == 160 and P.methods == ["RCP", "RCP w/o Clip"] and P.name == "cpu"


def test_set_overrides_reject_malformed_and_unknown_fields():
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        _parse_overrides(["qat_steps"])
    with pytest.raises(ValueError, match="unknown profile fields"):
        get_profile("cpu", **_parse_overrides(["qat_stepz=3"]))


def test_table_parser_accepts_repeated_set():
    a = build_parser().parse_args(["table", "--families", "qat", "--set", "qat_steps=8", "--set", 'settings=["W2A4KV4"]'])
    assert a.families == ["qat"] and a.set == ["qat_steps=8", 'settings=["W2A4KV4"]']


def test_table_command_resolves_registered_tables():
    from rcp_lib.__main__ import _table_for

    def resolve(*argv):
        t, stem = _table_for(build_parser().parse_args(["table", *argv]))
        return t.name, stem

    assert resolve() == ("perplexity_ptq", "perplexity_ptq")  # the default: the PTQ rows
    assert resolve("--families", "qat", "--name", "perplexity_qat_160") == ("perplexity_qat", "perplexity_qat_160")
    assert resolve("--table", "memory") == ("memory", "memory")
    with pytest.raises(SystemExit, match="family of files"):
        resolve("--table", "perplexity_qat")
    with pytest.raises(SystemExit, match="no registered table"):
        resolve("--name", "my_table")
    with pytest.raises(SystemExit, match="not a file of table"):
        resolve("--table", "memory", "--name", "perplexity")
    with pytest.raises(SystemExit, match="perplexity tables"):
        resolve("--table", "memory", "--families", "qat")
    with pytest.raises(SystemExit):  # argparse: not a table the command can compute
        resolve("--table", "quickstart")
