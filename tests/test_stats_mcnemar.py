"""The exact McNemar test against scipy's exact binomial test (an independent implementation), and the phrase."""

import random

import pytest
from scipy.stats import binomtest

from rcp_lib.stats import NOT_SEPARABLE, accuracy_order, mcnemar


@pytest.mark.parametrize("seed", range(6))
def test_mcnemar_matches_scipy_binomial(seed):
    rng = random.Random(seed)
    n = rng.randint(20, 300)
    a = [rng.random() < 0.4 for _ in range(n)]
    b = [x if rng.random() < 0.8 else rng.random() < 0.3 for x in a]
    r = mcnemar(a, b)
    assert r.only_a == sum(x and not y for x, y in zip(a, b)) and r.only_b == sum(y and not x for x, y in zip(a, b))
    m = r.only_a + r.only_b
    want = binomtest(r.only_a, m, 0.5).pvalue if m else 1.0
    assert r.p == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_accuracy_order_phrase():
    a = [1] * 20 + [0] * 80
    b = [0] * 20 + [0] * 80
    assert accuracy_order("RCP", a, "QuaRot-GPTQ", b).startswith("RCP > QuaRot-GPTQ (McNemar p = ")
    assert accuracy_order("QuaRot-GPTQ", b, "RCP", a).startswith("RCP > QuaRot-GPTQ (McNemar p = ")
    assert accuracy_order("RCP", a, "FP", a).startswith(NOT_SEPARABLE)  # no discordant pair: p = 1
    with pytest.raises(ValueError, match="same documents"):
        mcnemar([1, 0], [1])


def test_mcnemar_has_no_overflow_at_many_discordant_pairs():
    r = mcnemar([1] * 700 + [0] * 600, [0] * 700 + [1] * 600)  # 1300 discordant pairs (a float 2.0 ** m overflows)
    assert r.only_a + r.only_b == 1300 and r.p == pytest.approx(binomtest(600, 1300, 0.5).pvalue, rel=1e-9)


def test_zero_shot_tests_markdown_pairs_same_documents_only(tmp_path):
    """Through a CSV, as the report reads it: outcome strings keep their length (letters, never parsed as numbers)."""
    import pandas as pd

    from rcp_lib.report import zero_shot_tests_markdown

    rows = []
    for m, st, outcome, sha in (("FP", "FP", "c" * 60 + "w" * 40, "d"), ("RCP", "W2A4KV4", "w" + "c" * 30 + "w" * 69, "d"),
                                ("QuaRot-GPTQ", "W2A4KV4", "c" * 5 + "w" * 95, "d"), ("RTN", "W2A4KV4", "w" * 100, "x")):
        for metric, avg in (("acc", False), ("acc_norm", True)):
            rows.append({"method": m, "setting": st, "task": "t", "metric": metric, "used_in_average": avg,
                         "value": outcome.count("c") / 100, "per_doc": outcome, "docs_sha256": sha})
    pd.DataFrame(rows).to_csv(tmp_path / "zs.csv", index=False)
    zs = pd.read_csv(tmp_path / "zs.csv", dtype={"per_doc": str, "docs_sha256": str})
    assert zs["per_doc"].str.len().eq(100).all()
    md = zero_shot_tests_markdown(zs, pd.DataFrame([{"method": "RTN", "setting": "W2A4KV4", "ppl": 8e5},
                                                    {"method": "RCP", "setting": "W2A4KV4", "ppl": 90.},
                                                    {"method": "RTN", "setting": "W2A16KV16", "ppl": 9e5}]))
    assert "RCP > QuaRot-GPTQ (McNemar p = " in md and "FP > RCP (McNemar p = " in md
    assert "| t (acc_norm) |" in md and "| t (acc) |" not in md  # the metric the task averages
    assert "vs RTN" not in md  # other documents (docs_sha256): no pairing
    # the floor: the highest perplexity among rows that have zero-shot scores (RTN W2A16KV16 has none)
    assert "Measured floor: the zero-shot row with the highest perplexity (RTN W2A4KV4" in md and "t acc_norm 0.000" in md
