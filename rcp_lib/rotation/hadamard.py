"""Hadamard matrices of many orders, random Hadamard / orthogonal rotations, and a fast transform.

Constructions (all built here from their definitions, checked by ``H Hᵀ = n I`` in exact integers):

* Sylvester: ``H_{2m} = [[H_m, H_m], [H_m, -H_m]]`` (natural order), every power of two.
* Paley I: for a prime power ``q ≡ 3 (mod 4)``, ``H = I + S`` with ``S = [[0, 1ᵀ], [-1, Q]]`` and the
  Jacobsthal matrix ``Q_ij = χ(a_j - a_i)`` (χ the quadratic character of GF(q)): order ``q + 1``
  (12, 20, 44, 60, 108, 140).
* Paley II: for ``q ≡ 1 (mod 4)``, the symmetric conference matrix ``C = [[0, 1ᵀ], [1, Q]]`` gives
  ``H = C ⊗ [[1, 1], [1, -1]] + I ⊗ [[1, -1], [-1, -1]]`` of order ``2(q + 1)`` (28 from q = 13, 36 from
  q = 17, 52 from GF(25), 148 from q = 73: 18944 = 148 · 128 is Qwen2.5-7B's MLP width).
* Sylvester doubling of a base: 40 = 2 · 20.
* Williamson: order ``4m`` from four symmetric circulant ±1 matrices ``A, B, C, D`` of order m with
  ``A² + B² + C² + D² = 4m I`` in the array ``[[A, B, C, D], [-B, A, -D, C], [-C, D, A, -B], [-D, -C, B, A]]``:
  156 = 4·39 and 172 = 4·43 (172 · 64 = 11008, LLaMA-2-7B's MLP width), from the quadruples in
  :data:`WILLIAMSON`, which were found by our own search (``benchmarks/williamson_search.py``).

Order ``n = b · 2^k`` is built as ``kron(H_b, H_{2^k})`` with the smallest base ``b`` that is available.
:func:`apply_hadamard` computes ``x @ hadamard(n)`` in ``O(n log n)`` (butterflies over the power-of-two
factor, a small dense product over the base factor).
"""

from __future__ import annotations

import functools
import math

import torch

__all__ = [
    "hadamard",
    "hadamard_int",
    "random_hadamard",
    "random_signs",
    "random_orthogonal",
    "apply_hadamard",
    "is_hadamard_order",
    "BASE_ORDERS",
    "WILLIAMSON",
]

# Williamson quadruples: m -> first rows (±1 lists of length m) of the symmetric circulants A, B, C, D with
# A² + B² + C² + D² = 4m I. Stored as half-rows a_0 .. a_{(m-1)/2} ('+' = 1, '-' = -1; a_j = a_{m-j} gives the
# rest). Both were found by our own search, benchmarks/williamson_search.py (PSD filter + meet in the middle on
# periodic autocorrelations, exact integer check), on a shared 2-core CPU:
# * m = 43: `python benchmarks/williamson_search.py 43` -- found in 0.03 s among sequences invariant under the
#   multiplier subgroup H = {1, 6, 7, 36, 37, 42} of Z_43^* (row sums 7, 7, 7, 5);
# * m = 39: `python benchmarks/williamson_search.py 39` -- the H = {±1} (plain symmetric) search, found in 125 s
#   (row sums 9, 5, 5, 5; the larger subgroups, tried first, have no solution).
_WILLIAMSON_HALF_ROWS: dict[int, tuple[str, str, str, str]] = {
    39: ("++------+--+-+--++-+", "+-+-----+-+++--+++--", "++---+--++----+-+-++", "++-++-++---+-----+-+"),
    43: ("+-+-+----++++-++++-++-", "+--+++--+-+--+-+++++-+", "++-+--++-+++----+++-++", "+--++----+-+---+--++++"),
}


def _from_half_row(h: str) -> list[int]:
    v = [1 if c == "+" else -1 for c in h]
    return v + v[1:][::-1]


WILLIAMSON: dict[int, tuple[list[int], list[int], list[int], list[int]]] = {
    m: tuple(_from_half_row(h) for h in rows) for m, rows in _WILLIAMSON_HALF_ROWS.items()
}


# ------------------------------------------------------------------------------------------- finite fields
def _is_prime(p: int) -> bool:
    return p >= 2 and all(p % d for d in range(2, int(math.isqrt(p)) + 1))


def _prime_power(q: int) -> tuple[int, int] | None:
    for p in range(2, q + 1):
        if q % p == 0:
            k, r = 0, q
            while r % p == 0:
                r //= p
                k += 1
            return (p, k) if r == 1 and _is_prime(p) else None
    return None


def _field(q: int) -> tuple[list, callable, callable]:
    """Elements of GF(q) (q = p or p²) with subtraction and the quadratic character."""
    pk = _prime_power(q)
    if pk is None or pk[1] > 2:
        raise ValueError(f"GF({q}) not supported (need a prime or the square of a prime)")
    p, k = pk
    if k == 1:
        elems = list(range(p))
        sub = lambda a, b: (a - b) % p  # noqa: E731
        squares = {(x * x) % p for x in range(1, p)}
    else:  # GF(p²) = GF(p)[t] / (t² - r), r a quadratic non-residue mod p
        res = {(x * x) % p for x in range(1, p)}
        r = next(x for x in range(2, p) if x not in res)
        elems = [(a, b) for a in range(p) for b in range(p)]
        sub = lambda u, v: ((u[0] - v[0]) % p, (u[1] - v[1]) % p)  # noqa: E731

        def mul(u, v):
            return ((u[0] * v[0] + r * u[1] * v[1]) % p, (u[0] * v[1] + u[1] * v[0]) % p)

        squares = {mul(e, e) for e in elems if e != (0, 0)}
    zero = elems[0]

    def chi(a) -> int:
        return 0 if a == zero else (1 if a in squares else -1)

    return elems, sub, chi


def _jacobsthal(q: int) -> torch.Tensor:
    elems, sub, chi = _field(q)
    return torch.tensor([[chi(sub(b, a)) for b in elems] for a in elems], dtype=torch.int64)


def _paley1(q: int) -> torch.Tensor:
    Q = _jacobsthal(q)
    n = q + 1
    S = torch.zeros(n, n, dtype=torch.int64)
    S[0, 1:] = 1
    S[1:, 0] = -1
    S[1:, 1:] = Q
    return torch.eye(n, dtype=torch.int64) + S


def _paley2(q: int) -> torch.Tensor:
    Q = _jacobsthal(q)
    n = q + 1
    C = torch.zeros(n, n, dtype=torch.int64)
    C[0, 1:] = 1
    C[1:, 0] = 1
    C[1:, 1:] = Q
    A = torch.tensor([[1, 1], [1, -1]], dtype=torch.int64)
    B = torch.tensor([[1, -1], [-1, -1]], dtype=torch.int64)
    return torch.kron(C, A) + torch.kron(torch.eye(n, dtype=torch.int64), B)


def _circulant(row: list[int]) -> torch.Tensor:
    r = torch.tensor(row, dtype=torch.int64)
    return torch.stack([torch.roll(r, i) for i in range(len(row))])


def _williamson(m: int) -> torch.Tensor:
    A, B, C, D = (_circulant(r) for r in WILLIAMSON[m])
    return torch.cat([
        torch.cat([A, B, C, D], 1),
        torch.cat([-B, A, -D, C], 1),
        torch.cat([-C, D, A, -B], 1),
        torch.cat([-D, -C, B, A], 1),
    ], 0)


def _sylvester(n: int) -> torch.Tensor:
    H = torch.ones(1, 1, dtype=torch.int64)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


def _base_constructions() -> dict[int, callable]:
    c: dict[int, callable] = {}
    for q in (11, 19, 43, 59, 107, 139):  # Paley I, q ≡ 3 mod 4
        c[q + 1] = functools.partial(_paley1, q)
    for q in (13, 17, 25, 73):  # Paley II, q ≡ 1 mod 4
        c[2 * (q + 1)] = functools.partial(_paley2, q)
    c[40] = lambda: torch.kron(_sylvester(2), _paley1(19))
    for m in WILLIAMSON:
        c[4 * m] = functools.partial(_williamson, m)
    return c


BASE_ORDERS: tuple[int, ...] = tuple(sorted(_base_constructions()))
"""The non-power-of-two base orders ``b`` built here; order ``n`` is available when ``n = b · 2^k`` or ``n = 2^k``."""


def _decompose(n: int) -> tuple[int, int]:
    """``n = base · 2^k`` with base 1 or an available base order."""
    if n < 1:
        raise ValueError(f"Hadamard order must be positive, got {n}")
    if n & (n - 1) == 0:
        return 1, n
    avail = _base_constructions()
    for b in sorted(avail):
        if n % b == 0 and (n // b) & (n // b - 1) == 0:
            return b, n // b
    raise ValueError(
        f"no Hadamard matrix of order {n} can be built here: supported orders are 2^k and b·2^k for "
        f"b in {sorted(avail)}. For such sizes use a "
        f"block-diagonal rotation instead (r1='gsr' with a power-of-two block, e.g. {n & -n}).")


def hadamard_factors(n: int) -> tuple[int, int]:
    """``(base, power)`` with ``n = base · power``, ``power`` a power of two and :func:`hadamard_int` ``(n) =
    kron(H_base, H_power)`` (base 1 for a power of two; e.g. 11008 -> (172, 64), 1536 -> (12, 128)).

    Raises:
        ValueError: no Hadamard matrix of order ``n`` is built here (the message names the supported orders).
    """
    return _decompose(n)


def is_hadamard_order(n: int) -> bool:
    try:
        _decompose(n)
        return True
    except ValueError:
        return False


@functools.lru_cache(maxsize=64)
def _base_int(b: int) -> torch.Tensor:
    if b == 1:
        return torch.ones(1, 1, dtype=torch.int64)
    H = _base_constructions()[b]()
    if not torch.equal(H @ H.T, b * torch.eye(b, dtype=torch.int64)):  # pragma: no cover - construction bug
        raise AssertionError(f"base Hadamard matrix of order {b} failed H Hᵀ = n I")
    return H


@functools.lru_cache(maxsize=32)
def hadamard_int(n: int) -> torch.Tensor:
    """The ±1 Hadamard matrix of order ``n`` (int64 ``[n, n]``), ``kron(H_base, H_{2^k})``."""
    b, m = _decompose(n)
    return torch.kron(_base_int(b), _sylvester(m))


def hadamard(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Orthonormal Hadamard matrix ``[n, n]`` (entries ±1/√n). Raises ValueError if it cannot be built."""
    return (hadamard_int(n).to(torch.float64) / math.sqrt(n)).to(dtype)


def random_signs(n: int, seed: int) -> torch.Tensor:
    """Seeded random signs ``s ∈ {±1}^n`` (float64 ``[n]``) from ``torch.Generator().manual_seed(seed)``."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (n,), generator=g, dtype=torch.int64) * 2 - 1).to(torch.float64)


def random_hadamard(n: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """QuaRot's randomised Hadamard ``diag(s) @ hadamard(n)`` ``[n, n]``, signs ``s`` from :func:`random_signs`.

    The signs act on the *input* before the mixing (``x R = (x ⊙ s) H``), as in QuaRot and QuIP#, so two
    seeds give different rotated weights and group statistics. (``H diag(s)`` would only flip output signs
    after mixing, which no per-group quantizer statistic sees.)
    """
    return (random_signs(n, seed)[:, None] * hadamard(n)).to(dtype)


def random_orthogonal(n: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Haar-random orthogonal ``[n, n]``: QR of a Gaussian matrix with the signs of ``diag(R)`` fixed."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    Q, R = torch.linalg.qr(A)
    return (Q * torch.sign(torch.diagonal(R))[None, :]).to(dtype)


_MAX_FACTOR = 64


def _factors(n: int) -> list[int]:
    """``n = b · 2^k`` as a list of Kronecker factor orders: the base ``b`` then powers of two ``<= 64``."""
    b, m = _decompose(n)
    fs = [b] if b > 1 else []
    k = m.bit_length() - 1
    if k:
        parts = -(-k // (_MAX_FACTOR.bit_length() - 1))  # number of power-of-two factors
        for i in range(parts):
            fs.append(1 << (k // parts + (1 if i < k % parts else 0)))
    return fs or [1]


@functools.lru_cache(maxsize=64)
def _factor_matrix(f: int) -> torch.Tensor:
    return _base_int(f) if f in _base_constructions() else _sylvester(f)


@functools.lru_cache(maxsize=256)
def _factor_matrix_on(f: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """:func:`_factor_matrix` converted to ``device`` / ``dtype`` once (not a host-to-device copy per call, which
    also breaks CUDA-graph capture). Entries are ±1: exact in every float dtype. Treat as read-only."""
    return _factor_matrix(f).to(device=device, dtype=dtype)


def apply_hadamard(x: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """``x @ hadamard(n)`` over the last dim of ``x [..., n]`` in O(n · Σ factors); any float dtype and device.

    ``H_n = kron(H_b, H_{2^{k1}}, H_{2^{k2}}, ...) / √n`` (Sylvester's natural order is itself a Kronecker
    product), so the last dim is viewed as ``[b, 2^{k1}, ...]`` and each small factor (≤ 64, or the base ``b``)
    is applied along its own axis with a batched matmul: ``O(n log n)`` work for a power of two, with dense
    kernels doing the arithmetic. Differentiable.
    """
    n = x.shape[-1] if n is None else n
    if x.shape[-1] != n:
        raise ValueError(f"apply_hadamard: last dim {x.shape[-1]} != n={n}")
    lead = x.shape[:-1]
    y = x.reshape(-1, n)
    left = 1
    for f in _factors(n):
        right = n // (left * f)
        H = _factor_matrix_on(f, x.device, x.dtype)  # cached per device / dtype
        # contract the factor axis: y[r, l, i, q] -> sum_i H[i, j] y[r, l, i, q]
        y = torch.matmul(H.T, y.reshape(-1, f, right)).reshape(-1, n) if right > 1 else (y.reshape(-1, f) @ H).reshape(-1, n)
        left *= f
    return y.reshape(*lead, n) / math.sqrt(n)
