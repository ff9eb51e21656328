import itertools
import math

import pytest
import torch

from rcp_lib import models as M
from rcp_lib.experiments import rotation_stats as A

# ---------------------------------------------------------------------------------------------------
# independent references (brute force, written without the prefix-sum machinery of the module)
# ---------------------------------------------------------------------------------------------------


def _rtn_sse(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int = 2) -> torch.Tensor:
    """Per-row SSE of elementwise asymmetric RTN of ``x [G, g]`` on ``[lo, hi]`` (``[G, 1]``); clamps outside."""
    n = 2**bits - 1
    s = ((hi - lo) / n).clamp_min(1e-300)
    q = lo + s * torch.round((x - lo) / s).clamp(0, n)
    return ((x - q) ** 2).sum(1)


def _brute_uniform_clip(x: torch.Tensor, ratios) -> torch.Tensor:
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    return torch.stack([_rtn_sse(x, r * lo, r * hi) for r in ratios], 1).min(1).values


def _partitions(g: int, L: int = 4):
    """All ways to cut ``g`` sorted values into ``L`` contiguous (possibly empty) cells: tuples of L-1 cut indices."""
    return list(itertools.combinations_with_replacement(range(g + 1), L - 1))


def _cell_sse(v: list[float], level: float | None) -> float:
    if not v:
        return 0.0
    c = sum(v) / len(v) if level is None else level
    return sum((a - c) ** 2 for a in v)


def _exact_lloyd_max(x: torch.Tensor) -> float:
    """Global optimum of the 4-level quantizer of one small group (enumerate contiguous partitions)."""
    v = sorted(x.tolist())
    best = math.inf
    for i, j, k in _partitions(len(v)):
        best = min(best, sum(_cell_sse(c, None) for c in (v[:i], v[i:j], v[j:k], v[k:])))
    return best


def _exact_pinned(x: torch.Tensor, ratios) -> float:
    """Global optimum over ``ratios`` of 4 levels with ends pinned at ``r·min``, ``r·max`` (interior free)."""
    v = sorted(x.tolist())
    best = math.inf
    parts = _partitions(len(v))
    for r in ratios:
        lo, hi = r * v[0], r * v[-1]
        for i, j, k in parts:
            best = min(best, _cell_sse(v[:i], lo) + _cell_sse(v[i:j], None) + _cell_sse(v[j:k], None)
                       + _cell_sse(v[k:], hi))
    return best


def _interval_sse(xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``V[G, i, j]``: SSE of the sorted values ``xs[:, i:j]`` around their mean (inf for ``j < i``), prefix sums."""
    G, g = xs.shape
    z = xs.new_zeros(G, 1)
    p1, p2 = torch.cat([z, xs.cumsum(1)], 1), torch.cat([z, (xs * xs).cumsum(1)], 1)
    i = torch.arange(g + 1)
    n = (i[None, :] - i[:, None]).double()
    s1, s2 = p1[:, None, :] - p1[:, :, None], p2[:, None, :] - p2[:, :, None]
    v = (s2 - s1 * s1 / n.clamp_min(1)).clamp_min(0)
    return torch.where(n[None] >= 0, v, torch.full_like(v, math.inf)), p1, p2


def _dp_lloyd_max(x: torch.Tensor) -> torch.Tensor:
    """Exact optimum SSE ``[G]`` of 4 free levels (dynamic programming over contiguous cells of the sorted group)."""
    xs = x.sort(1).values
    v, _, _ = _interval_sse(xs)
    d = v[:, 0, :]
    for _ in range(3):
        d = (d[:, :, None] + v).min(1).values
    return d[:, -1]


def _dp_pinned(x: torch.Tensor, ratios) -> torch.Tensor:
    """Exact optimum SSE ``[G]`` over ``ratios`` of 4 levels with ends pinned at ``r·min``, ``r·max``."""
    xs = x.sort(1).values
    v, p1, p2 = _interval_sse(xs)
    G, g = xs.shape
    k = torch.arange(g + 1)[None].double()
    best = torch.full((G,), math.inf, dtype=torch.float64)
    for r in ratios:
        lo, hi = r * xs[:, :1], r * xs[:, -1:]
        e0 = p2 - 2 * lo * p1 + lo * lo * k  # Σ_{x < i} (x - lo)²
        e3 = (p2[:, -1:] - p2) - 2 * hi * (p1[:, -1:] - p1) + hi * hi * (g - k)  # Σ_{x >= k} (x - hi)²
        f = (e0[:, :, None] + v).min(1).values
        h = (v + e3[:, None, :]).min(2).values
        best = torch.minimum(best, (f + h).min(1).values)
    return best


def _onehot_lloyd(x: torch.Tensor, iters: int = 25) -> torch.Tensor:
    """The earlier one-hot k-means implementation (quantile start), as an independent reference."""
    L = 4
    qs = (torch.arange(L, dtype=torch.float64) + 0.5) / L
    c = torch.quantile(x, qs, dim=1).T.contiguous()
    for _ in range(iters):
        idx = (x[:, :, None] - c[:, None, :]).abs().argmin(-1)
        oh = torch.nn.functional.one_hot(idx, L).to(x.dtype)
        cnt = oh.sum(1)
        c = torch.where(cnt > 0, (oh * x[:, :, None]).sum(1) / cnt.clamp_min(1), c)
    q = torch.gather(c, 1, (x[:, :, None] - c[:, None, :]).abs().argmin(-1))
    return ((x - q) ** 2).sum(1)


# ---------------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------------


def test_kurtosis_reference_values():
    g = torch.Generator().manual_seed(0)
    assert A.kurtosis(torch.randn(200_000, generator=g)) == pytest.approx(3.0, abs=0.05)
    assert A.kurtosis(torch.rand(200_000, generator=g)) == pytest.approx(1.8, abs=0.02)


def test_lloyd_never_worse_than_uniform_and_recovers_clusters():
    g = torch.Generator().manual_seed(1)
    for dist in (torch.randn(64, 256, generator=g), torch.rand(64, 256, generator=g), torch.randn(64, 256, generator=g) ** 3):
        assert A.nonuniform_quant_error(dist, 2, 64) <= A.uniform_quant_error(dist, 2, 64) + 1e-12
    centres = torch.tensor([-3.0, -1.0, 0.5, 4.0], dtype=torch.float64)
    x = centres[torch.randint(0, 4, (1, 400), generator=g)] + 0.01 * torch.randn(1, 400, generator=g, dtype=torch.float64)
    lv = A.lloyd_max_levels(x, 2)
    assert torch.allclose(lv[0], centres, atol=0.01)


def test_lloyd_max_matches_the_one_hot_reference():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(300, 64, generator=g, dtype=torch.float64)
    ref = float(_onehot_lloyd(x).sum() / (x**2).sum())
    assert A.nonuniform_quant_error(x, 2, 64) == pytest.approx(ref, rel=1e-9)


def test_prefix_sum_sse_matches_elementwise_rtn():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, 64, generator=g, dtype=torch.float64) * torch.rand(50, 1, generator=g, dtype=torch.float64)
    sg = A._Sorted(x)
    r = torch.tensor([0.3, 0.55, 1.0], dtype=torch.float64)
    got = sg.sse(A._uniform_levels(sg.xs, r, 2))
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    ref = torch.stack([_rtn_sse(x, rr * lo, rr * hi) for rr in r], 1)
    assert torch.allclose(got, ref, rtol=1e-10, atol=1e-12)
    assert A.quant_errors(x, 2, 64)["err_uniform"] == pytest.approx(A.uniform_quant_error(x, 2, 64), rel=1e-10)


def test_uniform_clip_equals_brute_force_grid_search():
    g = torch.Generator().manual_seed(4)
    for x in (torch.randn(200, 16, generator=g, dtype=torch.float64),
              torch.distributions.StudentT(3.0).sample((200, 64)).double()):
        ref = _brute_uniform_clip(x, A.CLIP_RATIOS)
        e, r = A.uniform_clip_group_errors(x, 2, stride=1)
        assert torch.allclose(e, ref, rtol=1e-9, atol=1e-12)
        assert ((r >= 0.3 - 1e-12) & (r <= 1.0 + 1e-12)).all()
        # coarse-to-fine search: never below the exhaustive minimum and equal to it on nearly all groups
        e5, _ = A.uniform_clip_group_errors(x, 2, stride=5)
        assert (e5 >= e - 1e-12).all() and (e5 <= e * (1 + 1e-9) + 1e-15).float().mean() > 0.95
        assert float(e5.sum()) <= float(e.sum()) * 1.002


def test_dynamic_programming_references_match_enumeration():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(6, 7, generator=g, dtype=torch.float64)
    ratios = [0.3, 0.62, 1.0]
    assert torch.allclose(_dp_lloyd_max(x), torch.tensor([_exact_lloyd_max(r) for r in x], dtype=torch.float64))
    assert torch.allclose(_dp_pinned(x, ratios), torch.tensor([_exact_pinned(r, ratios) for r in x], dtype=torch.float64))


@pytest.mark.parametrize("group", [16, 64])
def test_pinned_and_lloyd_close_to_the_exact_optimum(group):
    """Lloyd iterations stop in local optima: measured against the exact optimum (dynamic programming) the
    nested search is a few percent above it on Gaussian groups (and never below: each is a real quantizer)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn({16: 200, 64: 60}[group], group, generator=g, dtype=torch.float64)
    fine = [k / 500 for k in range(150, 501)]  # the candidates method uses a continuous ratio in [0.3, 1]
    exact_pin, exact_lm = _dp_pinned(x, fine), _dp_lloyd_max(x)
    d = A._nested(A._Sorted(x), 2, A._ratios(None), 15, 5, 8, "candidates")
    pin, lm = d["pinned"][0], d["lloyd"][0]
    assert (pin >= exact_pin * (1 - 1e-4) - 1e-12).all() and (lm >= exact_lm * (1 - 1e-9) - 1e-12).all()
    slack = {16: 1.06, 64: 1.015}[group]
    assert float(pin.sum()) <= float(exact_pin.sum()) * slack
    assert float(lm.sum()) <= float(exact_lm.sum()) * (slack + 0.02)
    assert (exact_pin >= exact_lm - 1e-12).all()  # pinned ends are a constraint


@pytest.mark.heavy
def test_gaussian_reference_values():
    """MSE / E[w²] of 2-bit quantizers of Gaussian weights. Groups of 64: min-max RTN 0.203 (known value). Very
    large groups approach the population optima: uniform grid with the MSE-optimal range 0.1188 (Max 1960: step
    0.9957σ), Lloyd-Max 0.1175. Groups of 64 fitted per group are lower (in-sample fit)."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(512, 576, generator=g, dtype=torch.float64)
    d = A.quant_errors(x, 2, 64, stride=5)
    assert d["err_uniform"] == pytest.approx(0.203, abs=0.003)
    assert d["err_uniform"] > d["err_uniform_clip"] >= d["err_nonuniform_pinned"] >= d["err_nonuniform"]
    assert 0.095 < d["err_nonuniform"] < d["err_uniform_clip"] < 0.119
    big = torch.randn(4, 1 << 16, generator=g, dtype=torch.float64)
    assert A.uniform_clip_quant_error(big, 2, -1, stride=1) == pytest.approx(0.1188, abs=0.002)
    assert A.nonuniform_quant_error(big, 2, -1) == pytest.approx(0.1175, abs=0.002)
    pin = A.nonuniform_pinned_quant_error(big, 2, -1)
    assert 0.1175 - 0.002 < pin <= A.uniform_clip_quant_error(big, 2, -1, stride=1) + 1e-12


@pytest.mark.heavy
def test_quantizers_are_nested_per_group():
    g = torch.Generator().manual_seed(7)
    for x in (torch.randn(256, 64, generator=g, dtype=torch.float64),
              torch.distributions.StudentT(3.0).sample((256, 64)).double(),
              torch.rand(256, 64, generator=g, dtype=torch.float64) ** 3):
        sg = A._Sorted(x)
        d = A._nested(sg, 2, A._ratios(None), 15, 5, 8, "candidates")
        u, c, p, lm = (d[k][0] for k in ("uniform", "uniform_clip", "pinned", "lloyd"))
        tol = 1e-12 * (x**2).sum(1)
        assert (c <= u + tol).all() and (p <= c + tol).all() and (lm <= p + tol).all()
        # each quantizer's levels reproduce its error; pinned levels sit on [r·min, r·max]
        for k in ("uniform", "uniform_clip", "pinned", "lloyd"):
            assert torch.allclose(sg.sse(d[k][1][:, None, :])[:, 0], d[k][0], rtol=1e-9, atol=1e-12)
        q = d["pinned"][1]
        assert torch.allclose(q[:, 0], d["ratio_pinned"] * sg.xs[:, 0]) and torch.allclose(q[:, -1], d["ratio_pinned"] * sg.xs[:, -1])
        # the grid method (the exhaustive reference) is a valid pinned quantizer too: never below Lloyd-Max's
        # exact optimum, and never above the uniform clip
        e_grid, _ = A.pinned_group_errors(x, 2, iters=30, stride=1, method="grid")
        assert (e_grid <= c + tol).all()


def test_rotation_gaussianises_outlier_weights():
    g = torch.Generator().manual_seed(2)
    W = torch.randn(128, 256, generator=g, dtype=torch.float64)
    W[:, 7] *= 40  # an outlier input channel
    from rcp_lib.rotation.hadamard import hadamard

    Wr = A.rotated_weight(W, rot_in=hadamard(256))
    assert A.kurtosis(Wr) < A.kurtosis(W) and A.max_over_std(Wr) < A.max_over_std(W)
    assert torch.allclose((Wr**2).sum(), (W**2).sum())


def test_group_size_must_divide():
    with pytest.raises(ValueError, match="does not divide"):
        A.uniform_quant_error(torch.randn(4, 96), 2, 64)


# ---------------------------------------------------------------------------------------------------
# rotations of a model
# ---------------------------------------------------------------------------------------------------


def test_analysis_uses_the_fuse_builder():
    from rcp_lib.rotation.fuse import r1_matrix

    R, b = A.analysis_r1("gsr", 576, None, 64)
    assert b == 64 and torch.equal(R, r1_matrix("gsr", 576, 64))
    R, b = A.analysis_r1("block_hadamard", 576, 16, 64)
    assert b == 16 and torch.equal(R, r1_matrix("block_hadamard", 576, 16))
    R, b = A.analysis_r1("random_hadamard", 576, None, 64, seed=3)
    assert b is None and torch.equal(R, r1_matrix("random_hadamard", 576, seed=3))
    with pytest.raises(ValueError, match="takes no block"):
        A.analysis_r1("hadamard", 576, 64, 64)


def test_layer_statistics_tiny_model():
    model = M.tiny_llama(hidden=96, intermediate=160, heads=3, kv_heads=1, layers=2)
    none = A.layer_statistics(model, "none", group_size=32)
    assert len(none) == 2 * 7 and set(none.proj) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    # "none" rows are the statistics of the norm-folded weights as they are
    lin = model.model.layers[1].self_attn.o_proj.weight
    row = none[(none.layer == 1) & (none.proj == "o_proj")].iloc[0]
    assert row["kurtosis"] == pytest.approx(A.kurtosis(lin)) and row["err_uniform"] == pytest.approx(A.uniform_quant_error(lin, 2, 32))
    q = A.quant_errors(lin.detach(), 2, 32, iters=A.SEARCH["lloyd_iters"], stride=A.SEARCH["stride"],
                       pinned_iters=A.SEARCH["pinned_iters"])
    assert all(row[k] == pytest.approx(q[k], rel=1e-12) for k in A.ERROR_COLUMNS)
    gsr = A.layer_statistics(model, "gsr", group_size=32, layers=[0])
    assert len(gsr) == 7 and (gsr.block == 32).all() and (gsr.group_size == 32).all()
    s = A.summarize(none)
    assert list(s.columns)[:1] == ["rotation"] and (s.nonuniform_gain >= 1).all()
    assert (s.range_gain >= 1).all() and (s.shape_gain >= 1).all() and (s.pin_cost >= 1).all()
    assert s.range_gain.iloc[0] == pytest.approx(s.err_uniform.iloc[0] / s.err_uniform_clip.iloc[0])
    by = A.summarize(none, by=("rotation", "proj"))
    assert len(by) == 7 and {"range_gain", "shape_gain"} <= set(by.columns)


_STATS = ["kurtosis", "max_std", *A.ERROR_COLUMNS]


def test_gsr_equals_block_hadamard_when_block_divides_the_group_and_can_differ_above():
    """Walsh = the natural-order Hadamard with its columns permuted inside each block (it is symmetric), so with
    the block <= the quantization group every group holds the same values in another order: all per-group
    statistics agree. With the block larger than the group the groups hold different values (input side only:
    on the output side, o/down, the permutation moves whole rows)."""
    model = M.tiny_llama(hidden=128, intermediate=256, heads=4, kv_heads=2, layers=1, seed=1)
    with torch.no_grad():  # an outlier input channel and a smooth component, as real layers have
        for lin in M.layer_linears(model.model.layers[0]).values():
            if lin.weight.shape[1] == 128:
                lin.weight[:, 5] *= 20
                lin.weight += 0.05 * torch.linspace(-1, 1, 128)[None, :]
    for block, group in ((32, 32), (16, 64)):
        a = A.layer_statistics(model, "gsr", block=block, group_size=group)
        b = A.layer_statistics(model, "block_hadamard", block=block, group_size=group)
        assert torch.allclose(torch.tensor(a[_STATS].values), torch.tensor(b[_STATS].values), rtol=1e-9, atol=1e-12)
    a = A.layer_statistics(model, "gsr", block=64, group_size=16)
    b = A.layer_statistics(model, "block_hadamard", block=64, group_size=16)
    inp = a.proj.isin(["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]).values
    diff = (torch.tensor(a[list(A.ERROR_COLUMNS)].values) - torch.tensor(b[list(A.ERROR_COLUMNS)].values)).abs()
    assert (diff[torch.tensor(inp)] > 1e-6).any()
    assert torch.allclose(diff[torch.tensor(~inp)], torch.zeros_like(diff[torch.tensor(~inp)]), atol=1e-12)


def test_rotation_specs():
    from rcp_lib.experiments import _parse_rotation, _rotation_setting
    from rcp_lib.profiles import get_profile

    assert _parse_rotation("hadamard") == ("hadamard", None, None)
    assert _parse_rotation("gsr:16") == ("gsr", 16, None)
    assert _parse_rotation("gsr:64/g16") == ("gsr", 64, 16)
    assert _parse_rotation("none/g32") == ("none", None, 32)
    for bad in ("gsr:x", "gsr:64/16", "gsr/gx"):
        with pytest.raises(ValueError, match="bad rotation spec"):
            _parse_rotation(bad)
    p = get_profile("cpu")
    assert _rotation_setting("gsr", p) == ("gsr", p.w_group_size, p.w_group_size)
    assert _rotation_setting("block_hadamard:64/g32", p) == ("block_hadamard", 64, 32)
    assert _rotation_setting("random_hadamard", p) == ("random_hadamard", None, p.w_group_size)
    for prof in ("smoke", "cpu"):
        names = get_profile(prof).analysis_rotations
        for n in names:  # every gsr setting has its block-Hadamard control
            if n.startswith("gsr"):
                assert "block_hadamard" + n[3:] in names
    names = get_profile("cpu").analysis_rotations
    assert any(_rotation_setting(n, p)[0] == "gsr" and _rotation_setting(n, p)[1] > _rotation_setting(n, p)[2]
               for n in names)  # one setting with the block larger than the group
