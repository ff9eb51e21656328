import pytest
import torch

from rcp_lib.rotation.hadamard import (BASE_ORDERS, apply_hadamard, hadamard, hadamard_int, is_hadamard_order,
                                       random_hadamard, random_orthogonal)
from rcp_lib.rotation.walsh import block_hadamard, gsr, largest_pow2_divisor, sequency, walsh

BUILDABLE_BASES = [b for b in BASE_ORDERS if is_hadamard_order(b)]


@pytest.mark.parametrize("n", [1, 2, 4, 64, 576] + [pytest.param(n, marks=pytest.mark.heavy) for n in (1536, 3072, 4096)]
                         + BUILDABLE_BASES)
def test_hadamard_exact(n):
    H = hadamard_int(n)
    assert set(H.unique().tolist()) <= {-1, 1}
    # exact: ±1 entries and |dot products| <= n are integers that float64 represents exactly
    Hf = H.double()
    assert torch.equal(Hf @ Hf.T, n * torch.eye(n, dtype=torch.float64))
    Hn = hadamard(n)
    assert torch.allclose(Hn @ Hn.T, torch.eye(n, dtype=torch.float64), atol=1e-12)


def test_paper_sizes_and_failures():
    for n in (12, 20, 28, 36, 40, 44, 52, 60, 108, 140, 148, 18944):
        assert is_hadamard_order(n), n
    for n in (10944, 13696, 6, 7, 100):
        with pytest.raises(ValueError, match=str(n)):
            hadamard(n)


@pytest.mark.parametrize("n", [1, 2, 12, 20, 28, 36, 40, 44, 52, 60, 108, 140, 148, 576, 1536, 4096])
def test_fast_transform_matches_dense(n):
    x = torch.randn(5, 3, n, dtype=torch.float64)
    assert torch.allclose(apply_hadamard(x), x @ hadamard(n), atol=1e-10, rtol=0)
    x32 = x.float()
    ref = (x @ hadamard(n)).float()
    assert ((apply_hadamard(x32) - ref).norm() / ref.norm()) < 1e-5


def test_fast_transform_autograd():
    x = torch.randn(2, 24, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: apply_hadamard(t), (x,))


def test_random_rotations_orthogonal_and_seeded():
    for f in (random_hadamard, random_orthogonal):
        R = f(96, 3)
        assert torch.allclose(R @ R.T, torch.eye(96, dtype=torch.float64), atol=1e-12)
        assert torch.equal(R, f(96, 3)) and not torch.equal(R, f(96, 4))
    # QuaRot's definition diag(s)·H: the signs act on the input before the mixing, so R Hᵀ = diag(±1)
    D = random_hadamard(96, 1) @ hadamard(96).T
    assert torch.allclose(D, torch.diag(torch.diagonal(D)), atol=1e-12)
    assert torch.allclose(torch.diagonal(D).abs(), torch.ones(96, dtype=torch.float64), atol=1e-12)
    assert not torch.allclose(D, torch.eye(96, dtype=torch.float64))  # some signs are flipped
    # and not H·diag(s): Hᵀ R is not diagonal
    E = hadamard(96).T @ random_hadamard(96, 1)
    assert (E - torch.diag(torch.diagonal(E))).abs().max() > 0.1


def test_random_hadamard_seed_changes_group_statistics():
    """The defect of H·diag(s): two seeds gave the same per-group statistics of a rotated weight (only output
    signs flipped after the mixing). With diag(s)·H the seed changes the rotated groups and their 2-bit error."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, 128, generator=g, dtype=torch.float64)
    W[:, :4] *= 20  # outlier input channels, as in LLMs

    def stats(R):
        Wr = (W @ R).reshape(64, -1, 32)  # groups of 32 rotated input columns
        rng = Wr.amax(-1) - Wr.amin(-1)
        return rng.mean().item(), Wr.abs().amax(-1).mean().item()

    a, b = stats(random_hadamard(128, 0)), stats(random_hadamard(128, 1))
    assert abs(a[0] - b[0]) / a[0] > 1e-3 and abs(a[1] - b[1]) / a[1] > 1e-3
    # block-diagonal Walsh / Hadamard with random signs: diag(s)·R as well
    for f in (gsr, block_hadamard):
        Rs, R = f(128, 32, random_signs=True, seed=2), f(128, 32)
        D = Rs @ R.T
        assert torch.allclose(D, torch.diag(torch.diagonal(D)), atol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 8, 64, 256])
def test_walsh_sequency_property(n):
    W = walsh(n)
    assert torch.equal(sequency(W), torch.arange(n))  # row s has exactly s sign changes
    assert torch.allclose(W, W.T)
    assert torch.allclose(W @ W.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    # same rows as the natural-order Hadamard matrix, permuted
    nat = {tuple(r.tolist()) for r in hadamard(n).sign()}
    assert {tuple(r.tolist()) for r in W.sign()} == nat


def test_gsr_block_structure():
    R = gsr(576, 64)
    assert torch.allclose(R @ R.T, torch.eye(576, dtype=torch.float64), atol=1e-12)
    for i in range(9):
        blk = R[64 * i:64 * (i + 1), 64 * i:64 * (i + 1)]
        assert torch.equal(blk, walsh(64))
    off = R.clone()
    for i in range(9):
        off[64 * i:64 * (i + 1), 64 * i:64 * (i + 1)] = 0
    assert off.abs().max() == 0
    Rs = gsr(576, 64, random_signs=True, seed=1)
    assert torch.equal(Rs.abs(), R.abs()) and torch.equal(Rs, gsr(576, 64, random_signs=True, seed=1))
    assert largest_pow2_divisor(576) == 64 and largest_pow2_divisor(11008) == 256


@pytest.mark.parametrize("n,block", [(576, 128), (576, 48), (100, 3)])
def test_gsr_bad_block(n, block):
    with pytest.raises(ValueError, match=str(block)):
        gsr(n, block)


def test_block_hadamard():
    B = block_hadamard(1376, 32)  # 1376 = 43 · 32 has no full Hadamard construction here
    assert torch.allclose(B @ B.T, torch.eye(1376, dtype=torch.float64), atol=1e-12)
    assert torch.equal(B[32:64, 32:64], hadamard(32)) and B[:32, 32:].abs().max() == 0
    # GSR's control: the same blocks as gsr(), rows in natural instead of sequency order
    G = gsr(576, 64)
    H = block_hadamard(576, 64)
    assert torch.equal(G.abs(), H.abs()) and not torch.equal(G, H)
    assert {tuple(r) for r in G[:64, :64].tolist()} == {tuple(r) for r in H[:64, :64].tolist()}
    with pytest.raises(ValueError, match="does not divide"):
        block_hadamard(576, 128)


# ------------------------------------------------------------------ Williamson orders 156 = 4·39, 172 = 4·43
def _williamson_search_module():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "williamson_search.py"
    spec = importlib.util.spec_from_file_location("williamson_search", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("n", [156, 172])
def test_williamson_orders_exact(n):
    assert n in BASE_ORDERS and is_hadamard_order(n)
    H = hadamard_int(n)
    assert H.dtype == torch.int64 and set(H.unique().tolist()) == {-1, 1}
    assert torch.equal(H @ H.T, n * torch.eye(n, dtype=torch.int64))  # exact integer arithmetic


def test_williamson_registered_rows_pass_search_verifier():
    from rcp_lib.rotation.hadamard import WILLIAMSON
    ws = _williamson_search_module()
    assert set(WILLIAMSON) >= {39, 43}
    for m, rows in WILLIAMSON.items():
        assert all(len(r) == m for r in rows)
        assert ws.verify([list(r) for r in rows]), m
        assert torch.equal(hadamard_int(4 * m), torch.from_numpy(ws.williamson_array(rows)))
    bad = [list(r) for r in WILLIAMSON[43]]
    bad[0][5] = -bad[0][5]
    assert not ws.verify(bad)


def test_williamson_search_finds_order_43():
    ws = _williamson_search_module()
    H6 = next(H for H in ws.subgroups_with_minus_one(43) if len(H) == 6)
    rows = ws.search_group(43, H6, max_pairs=10**6, canonical=True, seed=0, log=lambda *a: None)
    assert rows is not None and ws.verify(rows)


@pytest.mark.heavy
@pytest.mark.parametrize("n", [156, 172, 156 * 32, 11008])
def test_williamson_fast_transform(n):
    assert is_hadamard_order(n)
    x = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    assert torch.allclose(apply_hadamard(x), x @ hadamard(n), atol=1e-10, rtol=0)
    if n >= 4096:
        hadamard_int.cache_clear()  # do not keep the ~1 GB int64 matrix cached for the rest of the session


def test_orders_without_construction_still_raise():
    for n in (10944, 13696):
        assert not is_hadamard_order(n)
        with pytest.raises(ValueError, match=str(n)):
            apply_hadamard(torch.zeros(1, n), n)
