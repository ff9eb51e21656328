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
