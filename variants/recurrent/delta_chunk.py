"""The delta rule chunked with the WY/UT representation (prefill; the rule and its variants'
base: `attnbench.variants.recurrent.delta`), and its FLOP count.

Chunked form, chunks of C tokens, γ_i = Σ_{j≤i} log α_j inside the chunk, Γ_ij = e^(γ_i − γ_j)
for i ≥ j (0 above the diagonal), β = diag(β_i); γ_i − γ_j and γ_C − γ_i are formed as segment
sums (`decays`), not as differences:
    UT transform  (I + tril(β (K Kᵀ ⊙ Γ), −1)) [U | W] = β [V | e^γ K]    (a triangular solve)
    state         S' = e^(γ_C) S + K̃ᵀ (U − W S),  K̃ = e^(γ_C − γ) K      (the chunk loop)
    output        O = e^γ Q S + (Q Kᵀ ⊙ Γ ⊙ M)(U − W S),  M causal (diagonal included)
Everything but the state passing is batched over B·H·chunks. The triangular solve is blocked
forward substitution (`unit_lower_solve`: the 16×16 diagonal blocks inverted by doubling, then
C/16 block rows), matmuls only. The chunk loop (sequential by nature: n/C steps) is one fused
matmul per chunk, S' = (e^(γ_C) I − K̃ᵀW) S + K̃ᵀU, both factors formed for all chunks at once.
The output is rearranged as (e^γ Q − P W) S + P U, P = Q Kᵀ ⊙ Γ ⊙ M: it needs the states in one
batched matmul after the loop. (torch.linalg.solve_triangular makes one small LAPACK call per
matrix; with 2 threads on a busy CPU it spun for seconds at n = 8192, 1024 matrices.)

The state depends only on k, v and the gates (drawn from k), so grouped-query heads share it:
the engine runs per k/v head and folds the query heads of a group into the rows of the chunk.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from attnbench.variants.recurrent.decays import segsum, suffix_sums

SOLVE_BLOCK = 16  # rows of the diagonal blocks `unit_lower_solve` inverts by doubling


def chunk_delta(
    q: torch.Tensor | None,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None,
    state: torch.Tensor | None = None,
    chunk: int = 64,
    final: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The chunked delta rule (module docstring) over one segment.

    Args:
        q: (B, Hkv, G, N, D) L2-normalised queries, G per k/v head; None: states only.
        k: (B, Hkv, N, D) L2-normalised; v: (B, Hkv, N, Dv); beta: (B, Hkv, N) in (0, 1).
        g: (B, Hkv, N) log α_t <= 0, or None (DeltaNet).
        state: (B, Hkv, D, Dv) before the segment (None: zeros). final: also return the state
            after the segment.
    Returns:
        (B, Hkv, G, N, Dv) or None, and the final state or None.
    """
    b, hkv, n, d = k.shape
    dv = v.shape[-1]
    c = max(1, min(chunk, n))
    pad = -n % c  # zero keys (β = 0, no decay) leave the state as it is; padded queries dropped
    if pad:
        k, v, beta = F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad)), F.pad(beta, (0, pad))
        g = None if g is None else F.pad(g, (0, pad))
        q = None if q is None else F.pad(q, (0, 0, 0, pad))
    nc, bh = (n + pad) // c, b * hkv
    bn = bh * nc  # every chunk of every k/v head: the batch of all but the chunk loop
    kc, vc = k.reshape(bn, c, d), v.reshape(bn, c, dv)  # (BHkv·nc, C, D)
    bc = beta.reshape(bn, c, 1)  # (BHkv·nc, C, 1)
    kb = kc * bc  # β K
    a = kb @ kc.transpose(1, 2)  # (BHkv·nc, C, C): β_i k_i·k_j; the strict lower part is read
    if g is None:
        rhs = torch.cat([vc * bc, kb], -1)  # β [V | K], (BHkv·nc, C, Dv + D)
    else:
        gc = g.reshape(bn, c)  # log α, (BHkv·nc, C)
        gam = gc.cumsum(-1)  # γ_i, (BHkv·nc, C): a same-sign sum from the chunk start
        decay = segsum(gc).exp()  # Γ_ij = e^(γ_i − γ_j) from exact segment sums, 0 above
        eg, last = gam.exp()[..., None], gam[:, -1:, None]  # e^γ_i (.., C, 1); γ_C (.., 1, 1)
        a = a * decay
        rhs = torch.cat([vc * bc, kb * eg], -1)  # β [V | e^γ K]
    x = unit_lower_solve(a, rhs)  # [U | W], (BHkv·nc, C, Dv + D)
    kt = kc if g is None else kc * suffix_sums(gc)[..., None].exp()  # K̃ = e^(γ_C − γ) K
    y = (kt.transpose(1, 2) @ x).view(bh, nc, d, dv + d)  # [K̃ᵀU | K̃ᵀW], (BHkv, nc, D, Dv + D)
    eye = torch.eye(d, dtype=k.dtype, device=k.device)
    carry = (eye if g is None else eye * last.exp().view(bh, nc, 1, 1)) - y[..., dv:]  # (.., D, D)
    s = k.new_zeros(bh, d, dv) if state is None else state.reshape(bh, d, dv)  # (BHkv, D, Dv)
    states = [s]  # the state before each chunk; one fused matmul per chunk (sequential)
    steps = zip(y[..., :dv].unbind(1), carry.unbind(1), strict=True)  # views, in two ops
    for add_i, carry_i in itertools.islice(steps, nc if final else nc - 1):
        s = torch.baddbmm(add_i, carry_i, s)  # S' = (e^(γ_C) I − K̃ᵀW) S + K̃ᵀU
        states.append(s)
    s_out = states[-1].reshape(b, hkv, d, dv) if final else None  # (B, Hkv, D, Dv)
    if q is None:
        return None, s_out
    grp = q.shape[2]
    qc = q.reshape(b, hkv, grp, nc, c, d).transpose(2, 3).reshape(bn, grp * c, d)  # (.., G·C, D)
    p = (qc @ kc.transpose(1, 2)).view(bn, grp, c, c)  # (BHkv·nc, G, C, C)
    p = (p.tril() if g is None else p * decay[:, None]).view(bn, grp * c, c)  # (BHkv·nc, G·C, C)
    z = p @ x  # (BHkv·nc, G·C, Dv + D): [P U | P W]
    qe = qc if g is None else (qc.view(bn, grp, c, d) * eg[:, None]).view_as(qc)  # e^γ Q
    if state is None and nc == 1:  # S = 0: the intra-chunk term alone
        out = z[..., :dv]
    else:
        st = torch.stack(states[:nc], 1).view(bn, d, dv)  # the state before each chunk
        out = torch.baddbmm(z[..., :dv], qe - z[..., dv:], st)  # (e^γ Q − P W) S + P U
    # (BHkv·nc, G·C, Dv) → (B, Hkv, nc, G, C, Dv) → (B, Hkv, G, nc·C, Dv)
    out = out.reshape(b, hkv, nc, grp, c, dv).transpose(2, 3).reshape(b, hkv, grp, nc * c, dv)
    return out[..., :n, :], s_out


def unit_lower_solve(a: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """X = (I + tril(a, −1))⁻¹ r for a (B, C, C), r (B, C, m): the inverses of the diagonal blocks
    of `SOLVE_BLOCK` rows (`unit_lower_inverse`), then forward substitution over the C / 16
    blocks. Batched matmuls only: on the CPU torch.linalg.solve_triangular makes one small
    LAPACK call per matrix, ~10× slower at these sizes.
    """
    c = a.shape[-1]
    blk = min(SOLVE_BLOCK, c)
    pad = -c % blk  # identity rows: exact
    if pad:
        a, r = F.pad(a, (0, pad, 0, pad)), F.pad(r, (0, 0, 0, pad))
    nb = (c + pad) // blk
    diag = a.view(-1, nb, blk, nb, blk).diagonal(dim1=1, dim2=3).movedim(-1, 1)  # (B, nb, b, b)
    t = unit_lower_inverse(diag)
    xs: list[torch.Tensor] = []
    for j in range(nb):
        rows = slice(j * blk, (j + 1) * blk)
        rj = r[:, rows]
        if j:  # r_j − L_{j,<j} X_{<j}
            rj = torch.baddbmm(rj, a[:, rows, : j * blk], torch.cat(xs, 1), alpha=-1)
        xs.append(t[:, j] @ rj)
    return torch.cat(xs, 1)[:, :c]


def unit_lower_inverse(a: torch.Tensor) -> torch.Tensor:
    """(I + tril(a, −1))⁻¹ for a (..., b, b) by doubling: the inverses of the diagonal blocks of
    size s give those of size 2s (T21 = −T22 L21 T11); log2(b) levels of batched matmuls."""
    c = a.shape[-1]
    size = 1 << (c - 1).bit_length()  # a power of two; padding with identity rows is exact
    lower = F.pad(a, (0, size - c, 0, size - c)) if size != c else a.contiguous()
    batch = lower.shape[:-2]
    t = lower.new_ones(*batch, size, 1, 1)  # the inverse's diagonal blocks, (..., m, s, s)
    s = 1
    while s < size:
        m = size // (2 * s)
        diag = lower.view(*batch, m, 2 * s, m, 2 * s).diagonal(dim1=-4, dim2=-2)  # (.., 2s, 2s, m)
        l21 = diag[..., s:, :s, :].movedim(-1, -3)  # (..., m, s, s): strictly below the diagonal
        t11, t22 = t.view(*batch, m, 2, s, s).unbind(-3)  # each (..., m, s, s)
        t21 = -(t22 @ l21 @ t11)
        t = torch.cat([torch.cat([t11, torch.zeros_like(t11)], -1), torch.cat([t21, t22], -1)], -2)
        s *= 2
    return t[..., 0, :c, :c]


def delta_flops(bh: int, groups: int, n: int, d: int, chunk: int, final: bool,
                queries: bool, initial: bool) -> float:
    """Matmul FLOPs of `chunk_delta` over bh = B·Hkv (Dv = D); `initial`: a state enters."""
    c = max(1, min(chunk, n))
    nc, e = -(-n // c), 2 * d  # e: the width of [U | W]
    f = nc * (2 * c * c * d + solve_flops(c, e) + 2 * d * c * e)  # β K Kᵀ, solve, K̃ᵀ[U | W]
    f += (nc if final else nc - 1) * 2 * d * d * d  # the chunk loop
    if queries:  # P, P [U | W], (e^γ Q − P W) S
        f += nc * groups * (2 * c * c * d + 2 * c * c * e)
        f += 0 if nc == 1 and not initial else nc * groups * 2 * c * d * d
    return float(bh * f)


def solve_flops(c: int, m: int) -> float:
    """Matmul FLOPs of `unit_lower_solve` for one C×C system with m columns."""
    blk = min(SOLVE_BLOCK, c)
    nb, size = -(-c // blk), 1 << (blk - 1).bit_length()
    inverse = nb * sum(2 * size * s * s for s in (1 << i for i in range(size.bit_length() - 1)))
    return inverse + sum(2 * blk * (j * blk + blk) * m for j in range(nb))  # L_{j,<j} X, T_jj r
