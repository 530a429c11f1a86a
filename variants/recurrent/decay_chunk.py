"""The chunked form of the decay-gated recurrence S_t = Diag(a_t) S_{t−1} + g_t k_tᵀ v_t,
o_t = q_t S_t (prefill, training; see `attnbench.variants.recurrent.decay`), and its models.

Chunked form, chunks of L positions, b_t = Σ log a_u over the chunk up to t (inclusive):
    o_t = (q_t ⊙ e^{b_t}) S_prev  +  Σ_{s≤t in chunk} Σ_d q_td k_sd e^{b_td − b_sd} g_s v_s
    S_end = e^{b_L} ⊙ S_prev + Σ_s (k_s ⊙ e^{b_L − b_s})ᵀ g_s v_s
Every exponent is ≤ 0 and is a sum of same-sign log-decays (never a difference of two cumulative
sums, which loses the small segment sums next to a large one), so decays arbitrarily close to 0
underflow to the right answer instead of overflowing:
- scalar decays (retnet, mamba2): the L×L decay matrix from exact segment sums (SSD's `segsum`);
- per-key-dimension decays (gla): e^{b_t − b_s} does not factor through one matmul with bounded
  factors, so the intra-chunk scores are built by a halving tree (GLA's secondary chunking taken
  down to single positions): at the level of blocks of s positions, the scores of the second half
  of each 2s-block against its first half are one matmul of q ⊙ e^{(b_t − b_r)} and
  k ⊙ e^{(b_r − b_s)} with r the boundary between the halves, both factors ≤ 1; the diagonal is
  q_t·k_t. log2(L) levels, L(L−1)·d multiply-adds per chunk (the causal triangle), so the chunk
  length of a per-dimension decay is rounded up to a power of two.
The state is passed from chunk to chunk by a Python loop of two element-wise ops per chunk (n/L
iterations: the only sequential part; everything else is batched over batch, heads and chunks).
Grouped-query heads: q heads h = j·G + i read k/v head j; matmuls broadcast k/v through einsum,
which folds the G query heads into the matmul rows (k and v are never repeated).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from attnbench.variants.base import Shape


def chunk_length(chunk: int, n: int, per_dim: bool) -> int:
    """The chunk length used for n positions (a power of two for per-dimension decays)."""
    length = max(1, min(chunk, n))
    return 1 << (length - 1).bit_length() if per_dim else length


def chunk_decay(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_a: torch.Tensor,
    chunk: int,
    gain: torch.Tensor | None = None,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked form of S_t = Diag(a_t) S_{t−1} + g_t k_tᵀ v_t, o_t = q_t S_t.

    Args:
        q: (B, H, N, Dk); k: (B, Hkv, N, Dk); v: (B, Hkv, N, Dv), Hkv dividing H.
        log_a: (B, Ha, N, Dd) log-decays (≤ 0), Ha ∈ {Hkv, H} (decay per k/v head or per query
            head), Dd ∈ {1, Dk} (scalar or per key dimension).
        chunk: chunk length L.
        gain: optional (B, Ha, N) input gain g_t (1 when None).
        state: optional initial state (B, Ha, Dk, Dv).
    Returns:
        out (B, H, N, Dv) and the final state (B, Ha, Dk, Dv).
    """
    b, h, n, dk = q.shape
    hkv, dv, ha, dd = k.shape[1], v.shape[-1], log_a.shape[1], log_a.shape[-1]
    g, ga = h // hkv, ha // hkv
    L = chunk_length(chunk, n, dd > 1)
    c = -(-n // L)
    q, k, v, log_a, gain = _pad(c * L - n, q, k, v, log_a, gain)
    qc = q.view(b, hkv, g, c, L, dk).transpose(2, 3)  # (B, Hkv, C, G, L, Dk)
    kc, vc = k.view(b, hkv, c, L, dk), v.view(b, hkv, c, L, dv)  # (B, Hkv, C, L, D)
    la = log_a.view(b, hkv, ga, c, L, dd).transpose(2, 3)  # (B, Hkv, C, Ga, L, Dd)
    # gains (B, Hkv, C, Ga, L, 1)
    gc = None if gain is None else gain.view(b, hkv, ga, c, L, 1).transpose(2, 3)

    to_end, total, cum = _decay_sums(la)  # Σ_{u>s} log a, Σ over the chunk, Σ_{u≤t}
    kend = kc.unsqueeze(3) * to_end.exp()  # (B, Hkv, C, Ga, L, Dk): decayed to the chunk end
    if gc is not None:
        kend = kend * gc
    upd = torch.einsum("zkcgld,zkcle->zkcgde", kend, vc)  # (B, Hkv, C, Ga, Dk, Dv)
    prev, last = _pass_states(upd, total.exp(), state, (b, hkv, ga, dk, dv))

    inter = _read(qc * cum.exp(), prev)  # (B, Hkv, C, G, L, Dv)
    if dd == 1:
        scores = torch.einsum("zkcgld,zkcsd->zkcgls", qc, kc)  # (B, Hkv, C, G, L, L)
        decay = _segsum(la[..., 0]).exp()  # (B, Hkv, C, Ga, L, L), 0 above the diagonal
    else:
        # (B, Hkv, C, G, L, L), k as (B, Hkv, C, 1, L, Dk)
        scores = _tree_scores(qc.contiguous(), kc.unsqueeze(3), la.contiguous())
        decay = None
    if gc is not None:
        gs = gc.transpose(-2, -1)  # (B, Hkv, C, Ga, 1, L): gain of each key
        decay = gs if decay is None else decay * gs
    if decay is not None:
        scores = scores * decay
    intra = torch.einsum("zkcgls,zkcse->zkcgle", scores, vc)  # (B, Hkv, C, G, L, Dv)
    out = (intra + inter).transpose(2, 3).reshape(b, h, c * L, dv)  # (B, H, C·L, Dv)
    return out[:, :, :n], last.reshape(b, ha, dk, dv)  # state (B, Ha, Dk, Dv)


def chunk_state(
    k: torch.Tensor,
    v: torch.Tensor,
    log_a: torch.Tensor,
    chunk: int,
    gain: torch.Tensor | None = None,
    state: torch.Tensor | None = None,
) -> torch.Tensor:
    """The state after k, v (no outputs), by the chunked form; shapes as `chunk_decay`."""
    b, hkv, n, dk = k.shape
    dv, ha, dd = v.shape[-1], log_a.shape[1], log_a.shape[-1]
    ga = ha // hkv
    L = chunk_length(chunk, n, False)  # no intra-chunk scores: any length works
    c = -(-n // L)
    _, k, v, log_a, gain = _pad(c * L - n, None, k, v, log_a, gain)
    kc, vc = k.view(b, hkv, c, L, dk), v.view(b, hkv, c, L, dv)  # (B, Hkv, C, L, D)
    la = log_a.view(b, hkv, ga, c, L, dd).transpose(2, 3)  # (B, Hkv, C, Ga, L, Dd)
    to_end, total, _ = _decay_sums(la)
    kend = kc.unsqueeze(3) * to_end.exp()  # (B, Hkv, C, Ga, L, Dk)
    if gain is not None:  # gains (B, Hkv, C, Ga, L, 1)
        kend = kend * gain.view(b, hkv, ga, c, L, 1).transpose(2, 3)
    upd = torch.einsum("zkcgld,zkcle->zkcgde", kend, vc)  # (B, Hkv, C, Ga, Dk, Dv)
    _, last = _pass_states(upd, total.exp(), state, (b, hkv, ga, dk, dv))
    return last.reshape(b, ha, dk, dv)  # (B, Ha, Dk, Dv)


def _pad(pad: int, *ts: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Zero rows at the end of the sequence: no key, no decay (log a = 0), no output kept."""
    if not pad:
        return list(ts)
    return [None if t is None else F.pad(t, (0, 0, 0, pad) if t.dim() == 4 else (0, pad))
            for t in ts]


def _decay_sums(la: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per chunk (la: (..., L, Dd)): Σ_{u>s} (to the chunk end, exclusive), Σ over the chunk
    (..., Dd), Σ_{u≤t} (inclusive); each a sum of same-sign terms, never a difference."""
    cum = la.cumsum(-2)
    after = F.pad(la[..., 1:, :], (0, 0, 0, 1))  # log a_{s+1}, 0 past the end
    to_end = after.flip(-2).cumsum(-2).flip(-2)
    return to_end, cum[..., -1, :], cum


def _pass_states(
    upd: torch.Tensor, decay: torch.Tensor, state: torch.Tensor | None, shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The state before each chunk (B, Hkv, C, Ga, Dk, Dv) and after the last. upd: each chunk's
    own contribution; decay: (B, Hkv, C, Ga, Dd), the chunk's total decay."""
    # the running state (B, Hkv, Ga, Dk, Dv)
    s = upd.new_zeros(shape) if state is None else state.view(shape).to(upd.dtype)
    prev = []
    for i in range(upd.shape[2]):  # sequential over chunks: n/L short iterations
        prev.append(s)
        s = decay[:, :, i, :, :, None] * s + upd[:, :, i]
    return torch.stack(prev, dim=2), s


def _read(qx: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """qx (B, Hkv, [C,] G, L, Dk) against states (B, Hkv, [C,] Ga, Dk, Dv), Ga ∈ {1, G}."""
    if s.shape[-3] == 1 and qx.shape[-3] > 1:  # one state per k/v head: fold G into rows
        return torch.einsum("...gld,...de->...gle", qx, s.squeeze(-3))  # s: (.., Dk, Dv)
    return qx @ s


def _segsum(x: torch.Tensor) -> torch.Tensor:
    """(..., L) → (..., L, L): Σ_{s<u≤t} x_u for t ≥ s, −inf above the diagonal (exact segment
    sums, not differences of cumulative sums; as SSD's reference `segsum`)."""
    L = x.shape[-1]
    xx = x.unsqueeze(-1).expand(*x.shape, L)  # (..., L(t), L(s)) = x_t
    keep = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()  # s ≤ t
    seg = xx.masked_fill(~keep.tril(-1), 0).cumsum(-2)  # x_t summed over s < t ≤ row
    return seg.masked_fill(~keep, -math.inf)


def _tree_scores(q: torch.Tensor, k: torch.Tensor, la: torch.Tensor) -> torch.Tensor:
    """Σ_d q_td k_sd e^{b_td − b_sd} for s ≤ t inside each chunk (0 above the diagonal).

    q (..., G, L, D), k (..., 1, L, D), la (..., Ga, L, D) with L a power of two; returns
    (..., G, L, L), assembled from the diagonal up by the halving tree described above.
    """
    *lead, g, L, d = q.shape
    ga = la.shape[-3]
    scores = (q * k).sum(-1)[..., None, None]  # (..., G, L, 1, 1): the diagonal, e^0 = 1
    s = 1
    while s < L:
        nb = L // (2 * s)
        qv = q.reshape(*lead, g, nb, 2, s, d)[..., 1, :, :]  # second halves (..., G, nb, s, D)
        kv = k.reshape(*lead, 1, nb, 2, s, d)[..., 0, :, :]  # first halves (..., 1, nb, s, D)
        lv = la.reshape(*lead, ga, nb, 2, s, d)  # (..., Ga, nb, 2, s, D): both halves
        into = lv[..., 1, :, :].cumsum(-2)  # Σ_{r<u≤t}: from the boundary r into the 2nd half
        after = F.pad(lv[..., 0, 1:, :], (0, 0, 0, 1))
        out = after.flip(-2).cumsum(-2).flip(-2)  # Σ_{s<u≤r}: from s out of the 1st half
        kt = kv * out.exp()  # (..., Ga, nb, s, D), factors ≤ 1
        qt = qv * into.exp()
        if ga == 1 and g > 1:  # one decay per k/v head: fold the G query heads into the rows
            low = torch.einsum("...gbmd,...bnd->...gbmn", qt, kt.squeeze(-4))  # (.., G, nb, s, s)
        else:
            low = qt @ kt.transpose(-2, -1)  # (..., G, nb, s, s)
        diag = scores.reshape(*lead, g, nb, 2, s, s)  # (..., G, nb, 2, s, s): the two halves
        top = torch.cat([diag[..., 0, :, :], torch.zeros_like(low)], dim=-1)  # (.., s, 2s)
        bottom = torch.cat([low, diag[..., 1, :, :]], dim=-1)
        scores = torch.cat([top, bottom], dim=-2)  # (..., G, nb, 2s, 2s)
        s *= 2
    return scores.reshape(*lead, g, L, L)  # (..., G, L, L)


def decay_flops(shape: Shape, ha: int, per_dim: bool, chunk: int) -> float:
    """Matmul FLOPs of `chunk_decay` on the last nq positions after `chunk_state` on the rest."""
    b, h, dk = shape.batch, shape.heads, shape.head_dim
    dv, nq, pre = dk, shape.nq, shape.seq_len - shape.nq
    L = chunk_length(chunk, nq, per_dim)
    c = -(-nq // L)
    scores = h * c * L * (L - 1) * dk if per_dim else 2 * h * c * L * L * dk
    f = scores + 2 * h * c * L * L * dv + 2 * (ha + h) * c * L * dk * dv  # A·V, states, reads
    if pre:
        lp = chunk_length(chunk, pre, False)
        f += 2 * ha * -(-pre // lp) * lp * dk * dv
    return float(b * f)


def decay_memory(shape: Shape, ha: int, per_dim: bool, chunk: int, el: int, cast: bool) -> int:
    """Upper estimate of the bytes one forward allocates (el bytes per element): gates and the
    context's state over all n positions, the chunked form over the last nq."""
    b, h, hkv, d, n, nq = (shape.batch, shape.heads, shape.hkv, shape.head_dim, shape.seq_len,
                           shape.nq)
    L = chunk_length(chunk, nq, per_dim)
    c = -(-nq // L)
    npad, dd, hk = c * L, d if per_dim else 1, max(ha, hkv)
    words = (h * nq + 2 * hkv * n) * d if cast else 0  # q, k, v in the compute dtype
    words += hkv * n * d + 6 * ha * n * dd + 2 * ha * n  # scaled k; log-decays, sums, gains
    words += (h + 2 * hkv) * (npad - nq + L) * d  # padded copies (none when L divides nq)
    words += 2 * hk * (npad + L) * d  # keys decayed to their chunk end
    words += 4 * ha * (c + 2) * d * d  # chunk updates, states before each chunk, list and stack
    words += 4 * h * npad * d  # decayed queries, inter, intra, their sum
    if per_dim:
        words += 4 * h * c * L * L + 3 * max(h, ha) * npad * d  # tree levels: blocks, cats
    else:
        words += (3 * h + 4 * ha) * c * L * L  # scores, segment sums, mask, decay matrix
    words += h * nq * d  # the output
    return int(b * words * el)
