"""The chunked form of the decay-gated recurrence S_t = Diag(a_t) S_{t−1} + g_t k_tᵀ v_t,
o_t = q_t S_t (prefill, training; see `attnbench.variants.recurrent.decay`), and its models.

Chunks of L positions (L a power of two), b_t = Σ log a_u over the chunk up to t (inclusive):
    o_t = (q_t ⊙ e^{b_t}) S_prev  +  Σ_{s≤t in chunk} Σ_d q_td k_sd e^{b_td − b_sd} g_s v_s
    S_end = e^{b_L} ⊙ S_prev + Σ_s (k_s ⊙ e^{b_L − b_s})ᵀ g_s v_s
Every decay factor is ≤ 1 and built from same-sign terms (never e^{b_t} / e^{b_s}, nor a
difference of cumulative sums), so decays arbitrarily close to 0 underflow to the right answer.
The intra-chunk decays come from a halving tree: at the level of blocks of s positions, the pairs
(t in the second half, s in the first half) of each 2s-block factor through the boundary r
between the halves, e^{b_t − b_s} = e^{b_t − b_r} · e^{b_r − b_s}, and the next level's two
factors are the current ones times the other half's total (doubling), log2(L) levels:
- scalar decays (mamba2): the scores Q Kᵀ are one matmul per chunk; each level scales its blocks
  in place by the outer product of its two factors (sums in log space, exponentiated per
  position: no exponential over the L×L scores, no cumulative sum over the chunk);
- fixed decays (retnet: the same a_h at every step) need no tree: the L×L decay matrix
  γ^{t−s} is formed once per head;
- per-key-dimension decays (gla): the factors differ per key dimension, so each level's blocks
  are one matmul of q ⊙ e^{b_t − b_r} and k ⊙ e^{b_r − b_s} (GLA's secondary chunking taken down
  to single positions); q and k are carried already scaled, each level multiplying half of each
  by the other half's product of gates (one exponential per gate in all, one multiply per
  element and level); L(L−1)/2·d multiply-adds per chunk and row, the strict triangle.
After the tree the factors are e^{b_t} and e^{b_L − b_s}: the inter-chunk terms' decays.
The state is passed from chunk to chunk by one fused op per chunk (n/L: the only sequential part;
everything else is batched over batch, heads and chunks). On the CPU the variants run it
segment by segment (`segments`), the state carried across. Decays per query head (retnet,
mamba2) give each query head its own state (k and v repeated to the query heads); decays per k/v
head (gla) share one state between the G query heads of a group, folded into the rows of its
matmuls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnbench.variants.base import Shape, gpu_path
from attnbench.variants.recurrent.decays import segsum, suffix_sums


def chunk_length(chunk: int, n: int) -> int:
    """The chunk length used for n positions: `chunk` (at most n) rounded up to a power of two."""
    length = max(1, min(chunk, n))
    return 1 << (length - 1).bit_length()


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
            head), Dd ∈ {1, Dk} (scalar or per key dimension); expanded along N (stride 0: the
            same decay at every step, as retnet's) it is taken as fixed in time.
        chunk: chunk length L (rounded up to a power of two).
        gain: optional (B, Ha, N) input gain g_t (1 when None).
        state: optional initial state (B, Ha, Dk, Dv).
    Returns:
        out (B, H, N, Dv) and the final state (B, Ha, Dk, Dv).
    """
    out, last = _run(q, k, v, log_a, chunk, gain, state)
    assert out is not None
    return out, last


def chunk_state(
    k: torch.Tensor,
    v: torch.Tensor,
    log_a: torch.Tensor,
    chunk: int,
    gain: torch.Tensor | None = None,
    state: torch.Tensor | None = None,
) -> torch.Tensor:
    """The state after k, v (no outputs), by the chunked form; shapes as `chunk_decay`."""
    return _run(None, k, v, log_a, chunk, gain, state)[1]


def _run(q, k, v, log_a, chunk, gain, state) -> tuple[torch.Tensor | None, torch.Tensor]:
    b, hkv, n, dk = k.shape
    dv, ha, dd = v.shape[-1], log_a.shape[1], log_a.shape[-1]
    h = ha if q is None else q.shape[1]
    if ha != hkv:  # a state per query head: k, v repeated to the query heads
        k, v = k.repeat_interleave(ha // hkv, 1), v.repeat_interleave(ha // hkv, 1)
    rows, z = h // ha, b * ha  # query heads reading one state; states
    fixed = dd == 1 and n > 1 and log_a.stride(-2) == 0
    track = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, log_a, gain, state))
    out, s = _segment(None if q is None else q.reshape(z, rows, n, dk), k.reshape(z, n, dk),
                      v.reshape(z, n, dv),
                      log_a[:, :, 0].reshape(z, 1) if fixed else log_a.reshape(z, n, dd),
                      None if gain is None else gain.reshape(z, n),
                      None if state is None else state.reshape(z, dk, dv).to(k.dtype),
                      chunk_length(chunk, n), fixed, track)
    last = s.reshape(b, ha, dk, dv)  # (B, Ha, Dk, Dv)
    return (None if out is None else out.reshape(b, h, n, dv)), last


def _segment(q, k, v, la, g, s, L: int, fixed: bool, track: bool):
    """m positions: q (Z, G, m, Dk) or None, k (Z, m, Dk), v (Z, m, Dv), la
    (Z, m, Dd) (fixed: (Z, 1)), g (Z, m) or None, s the state before (Z, Dk, Dv) or None.
    Returns the outputs (Z, G, m, Dv) (None without q) and the state after."""
    z, m, dk = k.shape
    dv, rows = v.shape[-1], 1 if q is None else q.shape[1]
    c = -(-m // L)
    pad = c * L - m  # zero rows: no key, no decay (log a = 0), no output kept
    if pad:
        if fixed:  # the padding must not decay: the decays as a sequence, with zeros
            la, fixed = la[:, None, :].expand(z, m, 1), False
        k, v = F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad))
        q = None if q is None else F.pad(q, (0, 0, 0, pad))
        la = F.pad(la, (0, 0, 0, pad))
        g = None if g is None else F.pad(g, (0, pad))
    x = z * c  # every chunk of every state: the batch of the matmuls
    kc = k.reshape(x, L, dk)  # a copy when the segment is part of a longer sequence
    vc = (v if g is None else v * g[..., None]).reshape(x, L, dv)  # g_s folded into v_s
    if q is not None:  # (Z, G, c·L, Dk) → (Z·c, G, L, Dk): the G query heads as rows
        qc = q.reshape(z, rows, c, L, dk).transpose(1, 2).reshape(x, rows, L, dk)
    if fixed:
        ea, eb, tot, decay = _fixed_factors(la, L)  # (Z, 1, L), (Z, 1, L), (Z, 1), (Z, 1, L, L)
        kend = (k.reshape(z, c, L, dk) * eb[..., None]).view(x, L, dk)  # k_s ⊙ e^{b_L − b_s}
        tot = tot.expand(z, c)
        if q is not None:
            qe = qc.view(z, c, rows, L, dk) * ea.view(z, 1, 1, L, 1)  # q_t ⊙ e^{b_t}
            scores = torch.bmm(qc.view(x, rows * L, dk), kc.transpose(1, 2))  # (Z·c, G·L, L)
            scores = scores.view(z, c, rows, L, L) * decay.view(z, 1, 1, L, L)
    elif la.shape[-1] == 1:
        lc = la.reshape(x, L)  # (Z·c, L)
        scores = None
        if q is not None:
            scores = torch.bmm(qc.view(x, rows * L, dk), kc.transpose(1, 2)).view(x, rows, L, L)
        if scores is not None and gpu_path(k.device):  # few launches: L×L from segment sums
            scores = scores * segsum(lc).exp()[:, None]
            ea, eb = lc.cumsum(-1).exp(), suffix_sums(lc).exp()
        else:  # no exponential, no cumulative sum over the L×L scores
            ea, eb = _tree_sums(lc, scores, track)
        kend = kc * eb[..., None]  # k_s ⊙ e^{b_L − b_s}
        tot = ea[:, -1]  # e^{b_L}
        if q is not None:
            qe = qc * ea[:, None, :, None]  # q_t ⊙ e^{b_t}
    else:  # per key dimension: q ⊙ e^{b_t} and k ⊙ e^{b_L − b_s} come out of the tree
        scores, qe, kend, tot = _tree_products(None if q is None else qc, kc,
                                               la.reshape(x, L, dk).exp(), track)
    upd = (kend.transpose(1, 2) @ vc).view(z, c, dk, dv)  # each chunk's own (k ⊙ e)ᵀ (g v)
    prev, s = _pass_states(upd, tot.reshape(z, c, -1, 1), s, q is not None, track)
    if q is None:
        return None, s
    out = torch.bmm(qe.reshape(x, rows * L, dk), prev.view(x, dk, dv))  # (Z·c, G·L, Dv)
    out = out.baddbmm_(scores.reshape(x, rows * L, L), vc)  # + intra-chunk, in place
    out = out.view(z, c, rows, L, dv).transpose(1, 2).reshape(z, rows, c * L, dv)
    return out[:, :, :m], s  # (Z, G, m, Dv)


def _fixed_factors(lg: torch.Tensor, L: int):
    """Decays fixed in time (lg (Z, 1), log a per state): e^{b_t} = a^{t+1}, e^{b_L − b_s} =
    a^{L−1−s}, e^{b_L} = a^L and the decay matrix a^{t−s} (0 above the diagonal)."""
    pos = torch.arange(L, device=lg.device, dtype=lg.dtype)
    ea, eb = ((pos + 1) * lg).exp(), ((L - 1 - pos) * lg).exp()  # (Z, L)
    dist = (pos[:, None] - pos[None, :]).tril_()  # t − s (0 above the diagonal, masked below)
    decay = (dist * lg[..., None]).exp().tril_()  # (Z, L, L)
    return ea[:, None], eb[:, None], (L * lg).exp(), decay[:, None]


def _blocks(scores: torch.Tensor, s: int) -> torch.Tensor:
    """The level-s blocks of scores (X, G, L, L): rows in the second half, columns in the first
    half of each 2s-block, as a view (X, G, s, s, nb)."""
    x, g, L, _ = scores.shape
    nb = L // (2 * s)
    return scores.view(x, g, nb, 2, s, nb, 2, s).diagonal(0, 2, 5)[:, :, 1, :, 0]


def _tree_sums(la: torch.Tensor, scores: torch.Tensor | None, track: bool):
    """Scalar decays: scale the strict lower triangle of scores (X, G, L, L) by e^{b_t − b_s}
    in place (the upper one zeroed); returns e^{b_t} and e^{b_L − b_s}, each (X, L).

    a (X, L): Σ from the start of t's aligned s-block to t; e: Σ after t to the end of it. Both
    grow by whole halves (sums of same-sign terms), their exponentials are per position."""
    x, L = la.shape
    a, e = la.clone(), torch.zeros_like(la)
    s = 1
    while s < L:
        nb = L // (2 * s)
        a4, e4 = a.view(x, nb, 2, s), e.view(x, nb, 2, s)
        if scores is not None:
            blk = _blocks(scores, s)  # (X, G, s, s, nb)
            blk.mul_(a4[:, :, 1].exp().transpose(1, 2)[:, None, :, None])  # e^{b_t − b_r}
            blk.mul_(e4[:, :, 0].exp().transpose(1, 2)[:, None, None])  # e^{b_r − b_s}
        tot = a4[:, :, :, s - 1:]  # (X, nb, 2, 1): each half's total
        if track:  # the next level's sums, out of place (autograd)
            e = torch.stack((e4[:, :, 0] + tot[:, :, 1], e4[:, :, 1]), 2).view(x, L)
            a = torch.stack((a4[:, :, 0], a4[:, :, 1] + tot[:, :, 0]), 2).view(x, L)
        else:
            e4[:, :, 0] += tot[:, :, 1]  # first half: + the second half's total
            a4[:, :, 1] += tot[:, :, 0]  # second half: + the first half's total
        s *= 2
    if scores is not None:
        scores.tril_()
    return a.exp(), e.exp()


def _tree_products(q: torch.Tensor | None, k: torch.Tensor, gates: torch.Tensor, track: bool):
    """Per-dimension decays, gates a (X, L, D), q (X, G, L, D) or None, k (X, L, D). Returns
    the scores Σ_d q_td k_sd e^{b_td − b_sd} for s ≤ t (X, G, L, L) (0 above the diagonal),
    q ⊙ e^{b_t}, k ⊙ e^{b_L − b_s} and e^{b_L} (X, 1, D) (scores and q's None without q).

    q and k are carried already scaled: at level s, qs = q ⊙ Π (start of t's aligned s-block, t]
    and ks = k ⊙ Π (s, end of its block]; each level multiplies qs's second halves by the first
    half's product and ks's first halves by the second's (t: those products, (X, L/s, D)), so
    an element costs one multiply per level, the gates one exponential in all."""
    x, L, d = gates.shape
    scores = qs = None
    if q is not None:
        g = q.shape[1]
        scores = q.new_zeros(x, g, L, L)
        scores.diagonal(0, -2, -1).copy_((q * k[:, None]).sum(-1))  # e^0 = 1
        qs = q * gates[:, None]  # a_t: the product over t's own 1-block
    ks, t = k, gates
    s = 1
    while s < L:
        nb = L // (2 * s)
        t2 = t.view(x, nb, 2, 1, d)  # each half's product
        kv = ks.view(x, nb, 2, s, d)
        if q is not None:
            qv = qs.view(x, g, nb, 2, s, d)
            q2, k1 = qv[:, :, :, 1], kv[:, None, :, 0]  # (X, G, nb, s, D), (X, 1, nb, s, D)
            low = (q2 * k1).sum(-1, keepdim=True) if s == 1 else q2 @ k1.transpose(-1, -2)
            _blocks(scores, s).copy_(low.permute(0, 1, 3, 4, 2))  # (X, G, nb, s, s)
        if track or s == 1:  # out of place (autograd; and ks is still the caller's k)
            ks = torch.stack((kv[:, :, 0] * t2[:, :, 1], kv[:, :, 1]), 2).view(x, L, d)
            if q is not None and track:
                qs = torch.stack((qv[:, :, :, 0], qv[:, :, :, 1] * t2[:, None, :, 0]), 3)
                qs = qs.view(x, g, L, d)
            elif q is not None:
                qv[:, :, :, 1] *= t2[:, None, :, 0]
        else:
            kv[:, :, 0] *= t2[:, :, 1]
            if q is not None:
                qv[:, :, :, 1] *= t2[:, None, :, 0]
        t = (t2[:, :, 0] * t2[:, :, 1]).view(x, nb, d)  # the products over blocks of 2s
        s *= 2
    return scores, qs, ks, t


def _pass_states(upd, decay, state, keep: bool, track: bool):
    """States before each chunk (Z, c, Dk, Dv) (when `keep`) and after the last. upd: each
    chunk's own contribution (Z, c, Dk, Dv); decay: the chunk's total decay (Z, c, Dd, 1)."""
    z, c, dk, dv = upd.shape
    s = upd.new_zeros(z, dk, dv) if state is None else state
    if not keep or track:  # a list (autograd), or only the last state
        prev = []
        for u, a in zip(upd.unbind(1), decay.unbind(1), strict=True):  # n/L short iterations
            if keep:
                prev.append(s)
            s = torch.addcmul(u, a, s)
        return (torch.stack(prev, 1) if keep else None), s
    prev = torch.empty_like(upd)
    prev[:, 0] = s
    upds, decays, views = upd.unbind(1), decay.unbind(1), prev.unbind(1)
    for i in range(1, c):  # written in place: one op per chunk
        torch.addcmul(upds[i - 1], decays[i - 1], views[i - 1], out=views[i])
    return prev, torch.addcmul(upds[-1], decays[-1], views[-1])


def decay_flops(shape: Shape, ha: int, per_dim: bool, chunk: int) -> float:
    """Matmul FLOPs of `chunk_decay` on the last nq positions after `chunk_state` on the rest."""
    b, h, dk = shape.batch, shape.heads, shape.head_dim
    dv, nq, pre = dk, shape.nq, shape.seq_len - shape.nq
    L = chunk_length(chunk, nq)
    c = -(-nq // L)  # per-dim: the tree's matmuls from blocks of 2 up (pairs as elementwise dots)
    scores = h * c * L * max(0, L - 2) * dk if per_dim else 2 * h * c * L * L * dk
    f = scores + 2 * h * c * L * L * dv + 2 * (ha + h) * c * L * dk * dv  # A·V, states, reads
    if pre:
        lp = chunk_length(chunk, pre)
        f += 2 * ha * -(-pre // lp) * lp * dk * dv
    return float(b * f)


def decay_memory(shape: Shape, ha: int, per_dim: bool, chunk: int, el: int, cast: bool) -> int:
    """Upper estimate of the bytes one forward allocates (el bytes per element): gates and the
    context's state over all n positions, the chunked form over the last nq, all at once (the
    GPU path; and what autograd keeps). On the CPU without autograd the segments (`segments`)
    hold one segment's intermediates at a time: the peak stays far below (36 against 308 MiB
    for retnet at B1 H8 n=8192 D64)."""
    b, h, hkv, d, n, nq = (shape.batch, shape.heads, shape.hkv, shape.head_dim, shape.seq_len,
                           shape.nq)
    L = chunk_length(chunk, nq)
    c = -(-nq // L)
    npad, dd, hk = c * L, d if per_dim else 1, max(ha, hkv)
    words = (h * nq + 2 * hkv * n) * d if cast else 0  # q, k, v in the compute dtype
    words += hkv * n * d + 6 * ha * n * dd + 2 * ha * n  # scaled k; log-decays, sums, gains
    words += (h + 2 * hkv) * (npad - nq + L) * d  # padded copies (none when L divides nq)
    words += 2 * hk * (npad + L) * d  # keys decayed to their chunk end
    words += 4 * ha * (c + 2) * d * d  # chunk updates, states before each chunk, list and stack
    words += 4 * h * npad * d  # decayed queries, inter, intra, their sum
    if per_dim:
        words += 4 * h * c * L * L + 3 * max(h, ha) * npad * d  # scores, level blocks, q/k
    else:
        words += (3 * h + 4 * ha) * c * L * L  # scores; the GPU path's segment sums, mask
    words += h * nq * d  # the output
    return int(b * words * el)


def decay_algorithm_flops(shape: Shape, ha: int, chunk: int) -> float:
    """The least matmul work of the chunked form at its chunk length L: each chunk's causal
    triangle once, diagonal included (scores and A·V), no padding, the state update of each
    position once per state head and its read once per query head (the context: updates only)."""
    b, h, d, nq = shape.batch, shape.heads, shape.head_dim, shape.nq
    L = chunk_length(chunk, nq)
    full, rest = divmod(nq, L)
    pairs = full * L * (L + 1) // 2 + rest * (rest + 1) // 2
    return float(b * (h * pairs * 2 * 2 * d + 2 * (ha * shape.seq_len + h * nq) * d * d))
