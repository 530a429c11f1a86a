"""The delta rule chunked with the WY/UT representation (prefill; the rule and its variants'
base: `attnbench.variants.recurrent.delta`), and its FLOP count.

Chunked form, chunks of C tokens, γ_i = Σ_{j≤i} log α_j inside the chunk, Γ_ij = e^(γ_i − γ_j)
for i ≥ j (0 above the diagonal), β = diag(β_i); γ_i − γ_j and γ_C − γ_i are formed as segment
sums (`decays`), not as differences:
    UT transform  (I + tril(β (K Kᵀ ⊙ Γ), −1)) [U | W] = β [V | e^γ K]    (a triangular solve)
    state         S' = e^(γ_C) S + K̃ᵀ (U − W S),  K̃ = e^(γ_C − γ) K      (the chunk loop)
    output        O = e^γ Q S + (Q Kᵀ ⊙ Γ ⊙ M)(U − W S),  M causal (diagonal included)
Everything but the state passing is batched over B·H·chunks. The triangular solve is blocked
forward substitution (`unit_lower_solve`: the 16×16 diagonal blocks inverted by doubling, on
the CPU without autograd by one batched LAPACK call (`_block_inverses`), then C/16 block rows);
it beat forming T by doubling and one matmul T·[βV | βe^γK] (1.6 against 2.3 ms for 64 chunks
of 64 on one core: fewer FLOPs) and LAPACK's per-matrix triangular solve of the whole C×C
system (2.9 ms; with 2 threads on a busy CPU it spun for seconds). The chunk loop is
sequential by nature (n/C steps), in one of two forms:
- the values' form (FLA's; the CPU): per chunk V' = U − W S and S' = e^(γ_C) S + K̃ᵀ V', two
  matmuls (and the decay) per chunk; the output e^γ Q S + P V', P = Q Kᵀ ⊙ Γ ⊙ M, in two batched
  matmuls after the loop. 14.5 C·D² FLOPs per chunk at C = D against 18.5 for the carry form:
  0.69× the time of its part of a segment (64 chunks of 64, one core);
- the carry form (the GPU path: one launch per chunk): S' = (e^(γ_C) I − K̃ᵀW) S + K̃ᵀU, both
  factors formed for all chunks at once, one fused matmul per chunk; the output rearranged as
  P U − (P W − e^γ Q) S.

On the CPU without autograd (`_chunk_cpu`) every intermediate is written into buffers that the
segments of one call share (`workspace`), reused within a segment once dead, and every batched
matmul writes a contiguous result: CPU bmm/baddbmm run one batched gemm only into those (into a
strided result, one addmm per matrix: the chunk loop's states were 1920 of them at n=8192).

The state depends only on k, v and the gates (drawn from k), so grouped-query heads share it:
the engine runs per k/v head and folds the query heads of a group into the rows of the chunk.
The variants run it segment by segment on the CPU (`segments`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from attnbench.variants.base import gpu_path
from attnbench.variants.recurrent.decays import decay_matrix, decay_matrix_into, suffix_sums

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
    work: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The chunked delta rule (module docstring) over one segment.

    Args:
        q: (B, Hkv, G, N, D) L2-normalised queries, G per k/v head; None: states only.
        k: (B, Hkv, N, D) L2-normalised; v: (B, Hkv, N, Dv); beta: (B, Hkv, N) in (0, 1).
        g: (B, Hkv, N) log α_t <= 0, or None (DeltaNet).
        state: (B, Hkv, D, Dv) before the segment (None: zeros). final: also return the state
            after the segment.
        work: the call's buffers (CPU, no autograd; `workspace`), shared by its segments: the
            outputs are then a view into them, valid until the next segment.
    Returns:
        (B, Hkv, G, N, Dv) or None, and the final state or None.
    """
    tracked = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, beta, g, state))
    b, hkv, n, d = k.shape
    dv = v.shape[-1]
    c = max(1, min(chunk, n))
    pad = -n % c  # zero keys (β = 0, no decay) leave the state as it is; padded queries dropped
    if pad:
        k, v, beta = F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad)), F.pad(beta, (0, pad))
        g = None if g is None else F.pad(g, (0, pad))
        q = None if q is None else F.pad(q, (0, 0, 0, pad))
    if not gpu_path(k.device) and not tracked:
        return _chunk_cpu(q, k, v, beta, g, state, c, n, final, {} if work is None else work)
    nc, bh = (n + pad) // c, b * hkv
    x = bh * nc  # every chunk of every k/v head: the batch of all but the chunk loop
    kc, vc = k.reshape(x, c, d), v.reshape(x, c, dv)  # (BHkv·nc, C, D)
    bc = beta.reshape(x, c, 1)  # (BHkv·nc, C, 1)
    kb = kc * bc  # β K
    a = torch.bmm(kb, kc.transpose(1, 2))  # (BHkv·nc, C, C): β_i k_i·k_j; the strict lower part
    if g is None:
        decay, kt = None, kc
        rhs = torch.cat([vc * bc, kb], -1)  # β [V | K], (BHkv·nc, C, Dv + D)
    else:
        gc = g.reshape(x, c)  # log α, (BHkv·nc, C)
        gam = gc.cumsum(-1)  # γ_i: a same-sign sum from the chunk start
        decay = decay_matrix(gc)  # Γ_ij from exact segment sums, 0 above the diagonal
        eg, last = gam.exp()[..., None], gam[:, -1:].exp()  # e^γ_i (.., C, 1), e^γ_C (.., 1)
        a = a.mul_(decay)
        rhs = torch.cat([vc * bc, kb * eg], -1)  # β [V | e^γ K]
        kt = kc * suffix_sums(gc)[..., None].exp()  # K̃ = e^(γ_C − γ) K
    xw = unit_lower_solve(a, rhs)  # [U | W], (BHkv·nc, C, Dv + D)
    s = k.new_zeros(bh, d, dv) if state is None else state.reshape(bh, d, dv)  # (BHkv, D, Dv)
    tot = None if g is None else last.view(bh, nc, 1, 1)  # e^(γ_C)
    if gpu_path(k.device):  # the carry form: one launch per chunk
        y = torch.bmm(kt.transpose(1, 2), xw).view(bh, nc, d, dv + d)  # [K̃ᵀU | K̃ᵀW]
        carry = y[..., dv:].neg_()  # −K̃ᵀW, (BHkv, nc, D, D), then + e^(γ_C) I on its diagonal
        carry.diagonal(0, -2, -1).add_(1.0 if g is None else last.view(bh, nc, 1))
        states, last = _pass_states(y[..., :dv], carry, s, q is not None, final)  # before each
        values = None
    else:  # the values' form: fewer FLOPs, 2 or 3 ops per chunk
        states, values, last = _pass_values(xw.view(bh, nc, c, dv + d), kt.view(bh, nc, c, d),
                                            tot, s, q is not None, final)
    s_out = None if last is None else last.reshape(b, hkv, d, dv)  # (B, Hkv, D, Dv)
    if q is None:
        return None, s_out
    grp = q.shape[2]
    qc = q.reshape(b, hkv, grp, nc, c, d).transpose(2, 3).reshape(x, grp * c, d)  # (.., G·C, D)
    p = torch.bmm(qc, kc.transpose(1, 2)).view(x, grp, c, c)  # (BHkv·nc, G, C, C)
    p = p.tril_() if decay is None else p.mul_(decay[:, None])  # ⊙ Γ ⊙ M
    qe = qc if g is None else (qc.view(x, grp, c, d) * eg[:, None]).view(x, grp * c, d)
    empty = state is None and nc == 1  # S = 0: the intra-chunk term alone
    if values is not None:  # e^γ Q S + P (U − W S)
        vals = values.view(x, c, dv)
        out = torch.bmm(p.view(x, grp * c, c), vals)
        if not empty:
            out = out.baddbmm_(qe, states.view(x, d, dv))
    else:  # P U − (P W − e^γ Q) S
        z = torch.bmm(p.view(x, grp * c, c), xw)  # (BHkv·nc, G·C, Dv + D): [P U | P W]
        zw = z[..., dv:].sub_(qe)  # P W − e^γ Q, in place
        out = z[..., :dv] if empty else torch.baddbmm(z[..., :dv], zw, states.view(x, d, dv),
                                                      alpha=-1)
    # (BHkv·nc, G·C, Dv) → (B, Hkv, nc, G, C, Dv) → (B, Hkv, G, nc·C, Dv)
    out = out.reshape(b, hkv, nc, grp, c, dv).transpose(2, 3).reshape(b, hkv, grp, nc * c, dv)
    return out[..., :n, :], s_out


def workspace(work: dict[str, torch.Tensor], name: str, shape: tuple[int, ...],
              like: torch.Tensor) -> torch.Tensor:
    """A `shape` view of the call's buffer `name`, allocated on its first use and grown when a
    larger one is asked for: the segments of one call write into the same memory. A fresh
    tensor costs its pages on first touch (~0.3 ms per MiB on the 2-core VM): allocated per
    segment, the engine's intermediates cost more than its matmuls."""
    size = math.prod(shape)
    buf = work.get(name)
    if buf is None or buf.numel() < size or buf.dtype != like.dtype:
        buf = work[name] = like.new_empty(size)
    return buf[:size].view(shape)


def _chunk_cpu(q, k, v, beta, g, state, c: int, n: int, final: bool,
               work: dict[str, torch.Tensor]):
    """`chunk_delta` on the CPU without autograd, its inputs padded to whole chunks of c (n:
    the real positions): the values' form, every intermediate written into the call's buffers
    (`workspace`), the chunk loop in two ops per chunk."""
    b, hkv, padded, d = k.shape
    dv = v.shape[-1]
    nc, bh = padded // c, b * hkv
    x, m = bh * nc, dv + d  # every chunk of every k/v head; the width of [U | W]
    kc = k.reshape(x, c, d)  # (BHkv·nc, C, D)
    bc = beta.reshape(x, c, 1)
    rhs = workspace(work, "rhs", (x, c, m), k)  # β [V | e^γ K]
    kb = rhs[..., dv:]
    # v as (BHkv, nc, C, Dv): a view of a segment's slice, where (X, C, Dv) would copy it
    torch.mul(v.reshape(bh, nc, c, dv), bc.view(bh, nc, c, 1),
              out=rhs.view(bh, nc, c, m)[..., :dv])
    torch.mul(kc, bc, out=kb)  # β K
    a = torch.bmm(kb, kc.transpose(1, 2), out=workspace(work, "a", (x, c, c), k))  # β_i k_i·k_j
    if g is None:
        decay, kt, tot = None, kc, None
    else:
        gc = g.reshape(x, c)  # log α
        decay = decay_matrix_into(gc, workspace(work, "decay", (x, c, c), k),
                                  workspace(work, "xw", (x, c, c), k))  # Γ; [U | W] not yet
        a.mul_(decay)
        eg = gc.cumsum(-1).exp_()  # e^γ_i, (BHkv·nc, C): a same-sign sum from the chunk start
        kb.mul_(eg[..., None])  # β e^γ K
        kt = torch.mul(kc, suffix_sums(gc).exp_()[..., None],
                       out=workspace(work, "kt", (x, c, d), k))  # K̃ = e^(γ_C − γ) K
        tot = eg[:, -1].reshape(bh, nc, 1, 1)  # e^(γ_C)
    xw = _solve_cpu(a, rhs, workspace(work, "xw", (x, c, m), k), work)  # [U | W]
    s = k.new_zeros(bh, d, dv) if state is None else state.reshape(bh, d, dv)
    keep = q is not None  # chunk-major: each chunk's slice is contiguous (a batched gemm)
    loop = workspace(work, "rhs", (x * (c + d) * dv,), k)  # β [V | e^γ K] is dead: reused
    values = loop[: x * c * dv].view(nc, bh, c, dv)
    states = loop[x * c * dv:].view(nc, bh, d, dv) if keep else None
    last = _loop_cpu(xw.view(bh, nc, c, m), kt.view(bh, nc, c, d), tot, s, states, values,
                     final)
    s_out = None if last is None else last.reshape(b, hkv, d, dv)
    if q is None:
        return None, s_out
    grp = q.shape[2]
    qc = q.reshape(b, hkv, grp, nc, c, d).transpose(2, 3).reshape(x, grp * c, d)  # (.., G·C, D)
    # buffers reused once dead (a smaller working set, 7 MiB at 512 positions, H=8, D=64):
    # A for P, [U | W] for the values and states in head-major order, K̃ for e^γ Q, the loop's
    # buffer for the outputs
    p = torch.bmm(qc, kc.transpose(1, 2), out=workspace(work, "a", (x, grp * c, c), k))
    pg = p.view(x, grp, c, c)
    if decay is None:
        pg.tril_()
    else:
        pg.mul_(decay[:, None])  # ⊙ Γ ⊙ M
    both = workspace(work, "xw", (x * (c + d) * dv,), k)
    vals = both[: x * c * dv].view(bh, nc, c, dv)  # head-major as the chunks' rows
    vals.copy_(values.transpose(0, 1))
    if state is not None or nc > 1:
        sts = both[x * c * dv:].view(bh, nc, d, dv)
        sts.copy_(states.transpose(0, 1))
    out = torch.bmm(p, vals.view(x, c, dv), out=workspace(work, "rhs", (x, grp * c, dv), k))
    if state is not None or nc > 1:  # + e^γ Q S (S = 0 for a lone first chunk)
        qe = qc if g is None else torch.mul(
            qc.view(x, grp, c, d), eg[:, None, :, None],
            out=workspace(work, "kt", (x, grp, c, d), k)).view(x, grp * c, d)
        out.baddbmm_(qe, sts.view(x, d, dv))
    # (BHkv·nc, G·C, Dv) → (B, Hkv, nc, G, C, Dv) → (B, Hkv, G, nc·C, Dv)
    out = out.view(b, hkv, nc, grp, c, dv).transpose(2, 3).reshape(b, hkv, grp, nc * c, dv)
    return out[..., :n, :], s_out


def _loop_cpu(uw, kt, tot, s, states, values, final: bool):
    """The values' form of the chunk loop into `states` (BHkv, nc, D, Dv; None: not kept) and
    `values` (BHkv, nc, C, Dv): per chunk V' = U − W S, then S' = e^(γ_C) S + K̃ᵀ V' (the decay
    written into S' first, then K̃ᵀ V' added in place: no tensor allocated per chunk). Returns
    the last state when `final`."""
    dv, nc = s.shape[-1], uw.shape[1]
    us, ws, ks = uw[..., :dv].unbind(1), uw[..., dv:].unbind(1), kt.transpose(-1, -2).unbind(1)
    vvs = values.unbind(0)
    decays = [None] * nc if tot is None else tot.unbind(1)
    if states is not None:
        svs = states.unbind(0)
        svs[0].copy_(s)
    else:  # two states, alternating
        pair = s.new_empty(2, *s.shape)
        pair[0].copy_(s)
        svs = [pair[i % 2] for i in range(nc + 1)]
    last = None
    for i in range(nc):
        torch.baddbmm(us[i], ws[i], svs[i], alpha=-1, out=vvs[i])
        if i + 1 < nc or final:
            nxt = svs[i + 1] if i + 1 < len(svs) else s.new_empty(s.shape)
            if decays[i] is None:
                torch.baddbmm(svs[i], ks[i], vvs[i], out=nxt)
            else:
                torch.mul(svs[i], decays[i], out=nxt).baddbmm_(ks[i], vvs[i])
            last = nxt
    if not final:
        return None
    # out of the alternating pair: a decode state must not keep the other half's storage alive
    return last.clone() if states is None else last


def _solve_cpu(a: torch.Tensor, r: torch.Tensor, out: torch.Tensor,
               work: dict[str, torch.Tensor]) -> torch.Tensor:
    """`unit_lower_solve` into `out`: the inverses of the diagonal blocks (`_block_inverses`),
    then forward substitution over the block rows, each written into its rows of `out`."""
    c, mcols = a.shape[-1], r.shape[-1]
    blk = min(SOLVE_BLOCK, c)
    if c % blk or blk & (blk - 1):
        return out.copy_(unit_lower_solve(a, r))
    t = _block_inverses(a, blk, work)  # (X, nb, b, b)
    tmp = workspace(work, "solve_rows", (2, a.shape[0], blk, mcols), a)
    for j in range(c // blk):  # results contiguous: CPU bmm batches its gemms only into those
        rows = slice(j * blk, (j + 1) * blk)
        rj = r[:, rows]
        if j:  # r_j − L_{j,<j} X_{<j}
            rj = torch.baddbmm(rj, a[:, rows, : j * blk], out[:, : j * blk], alpha=-1,
                               out=tmp[0])
        out[:, rows] = torch.bmm(t[:, j], rj, out=tmp[1])
    return out


def _block_inverses(a: torch.Tensor, blk: int, work: dict[str, torch.Tensor]) -> torch.Tensor:
    """(I + tril(a_jj, −1))⁻¹ of the blk × blk diagonal blocks of a (X, C, C) (blk a power of
    two dividing C), (X, C / blk, blk, blk): one batched LAPACK triangular solve against the
    identity (float32/float64), else by doubling as `unit_lower_inverse`, each level written in
    place into one buffer.

    Why LAPACK here, where it lost for the whole C×C solve (module docstring): the doubling's
    levels are batched matmuls of 2×2 to 8×8 blocks behind permuted copies, ~2 µs per 16×16
    block in all; trsm, one call for all the blocks, ~1.1 µs per block. Per segment of 64
    chunks of 64 (H=8, D=64, 2 threads, AMD EPYC VM), `_solve_cpu` took 906 against 1249 µs
    (the inverses ~290 against ~530 µs), equal to float32 rounding; with two busy processes
    beside it, the inverses' median did not move (291 against 293 µs)."""
    x, c, _ = a.shape
    nb = c // blk
    low = workspace(work, "inv_low", (x, nb, blk, blk), a)
    low.copy_(a.view(x, nb, blk, nb, blk).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2))
    low = low.view(-1, blk, blk)
    if a.dtype in (torch.float32, torch.float64):  # trsm reads the strict lower part only
        eye = torch.eye(blk, dtype=a.dtype, device=a.device).expand(x * nb, blk, blk)
        t = torch.linalg.solve_triangular(low, eye, upper=False, unitriangular=True)
        return t.view(x, nb, blk, blk)
    t = workspace(work, "inv", (x * nb, blk, blk), a).zero_()
    t.diagonal(0, -2, -1).fill_(1)
    s = 1
    while s < blk:
        m = blk // (2 * s)
        tv = t.view(-1, m, 2 * s, m, 2 * s).diagonal(dim1=1, dim2=3)  # (Y, 2s, 2s, m)
        lv = low.view(-1, m, 2 * s, m, 2 * s).diagonal(dim1=1, dim2=3)
        if s == 1:  # T21 = −L21
            torch.neg(lv[:, 1, 0], out=tv[:, 1, 0])
        else:  # T21 = −T22 L21 T11, (Y, m, s, s)
            t11, t22 = tv[:, :s, :s].permute(0, 3, 1, 2), tv[:, s:, s:].permute(0, 3, 1, 2)
            t21 = torch.matmul(torch.matmul(t22, lv[:, s:, :s].permute(0, 3, 1, 2)), t11)
            tv[:, s:, :s].copy_(t21.permute(0, 2, 3, 1)).neg_()
        s *= 2
    return t.view(x, nb, blk, blk)


def _pass_values(uw: torch.Tensor, kt: torch.Tensor, tot: torch.Tensor | None, s: torch.Tensor,
                 keep: bool, final: bool):
    """The values' form of the chunk loop (FLA's): per chunk V' = U − W S, then
    S' = e^(γ_C) S + K̃ᵀ V'. uw: [U | W] (BHkv, nc, C, Dv + D), kt: K̃ (BHkv, nc, C, D), tot:
    e^(γ_C) (BHkv, nc, 1, 1) or None. Returns the states before each chunk (BHkv, nc, D, Dv)
    and the values V' (BHkv, nc, C, Dv) when `keep`, and the last state when `final`."""
    dv = s.shape[-1]
    us, ws, ks = uw[..., :dv].unbind(1), uw[..., dv:].unbind(1), kt.transpose(-1, -2).unbind(1)
    nc = len(us)
    decays = [None] * nc if tot is None else tot.unbind(1)
    track = torch.is_grad_enabled() and (uw.requires_grad or s.requires_grad)
    if keep and not track:  # written in place
        states = s.new_empty(s.shape[0], nc, *s.shape[1:])  # (BHkv, nc, D, Dv)
        values = s.new_empty(s.shape[0], nc, *us[0].shape[1:])  # (BHkv, nc, C, Dv)
        states[:, 0] = s
        svs, vvs = states.unbind(1), values.unbind(1)
        for i in range(nc):
            torch.baddbmm(us[i], ws[i], svs[i], alpha=-1, out=vvs[i])
            if i + 1 < nc:
                prev = svs[i] if decays[i] is None else svs[i] * decays[i]
                torch.baddbmm(prev, ks[i], vvs[i], out=svs[i + 1])
        last = None
        if final:
            prev = svs[-1] if decays[-1] is None else svs[-1] * decays[-1]
            last = torch.baddbmm(prev, ks[-1], vvs[-1])
        return states, values, last
    sl, vl = [], []
    for i in range(nc):  # a list (autograd), or the last state only
        v = torch.baddbmm(us[i], ws[i], s, alpha=-1)
        if keep:
            sl.append(s)
            vl.append(v)
        if i + 1 < nc or final:
            s = torch.baddbmm(s if decays[i] is None else s * decays[i], ks[i], v)
    if not keep:
        return None, None, s
    return torch.stack(sl, 1), torch.stack(vl, 1), (s if final else None)


def _pass_states(add: torch.Tensor, carry: torch.Tensor, s: torch.Tensor, keep: bool,
                 final: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """S_{i+1} = carry_i S_i + add_i from S_0 = s over the nc chunks (add, carry: (BHkv, nc, ...)):
    the states before each chunk (BHkv, nc, D, Dv) when `keep`, and the last when `final`. One op
    per chunk."""
    adds, carries = add.unbind(1), carry.unbind(1)  # views, in two ops
    nc = len(adds)
    if not keep:
        for i in range(nc):
            s = torch.baddbmm(adds[i], carries[i], s)
        return None, s
    if torch.is_grad_enabled() and (add.requires_grad or s.requires_grad):
        out = [s]  # a list (autograd)
        for i in range(nc - 1):
            out.append(torch.baddbmm(adds[i], carries[i], out[-1]))
        states = torch.stack(out, 1)
    else:
        states = s.new_empty(s.shape[0], nc, *s.shape[1:])
        states[:, 0] = s
        views = states.unbind(1)
        for i in range(nc - 1):  # written in place
            torch.baddbmm(adds[i], carries[i], views[i], out=views[i + 1])
    last = torch.baddbmm(adds[-1], carries[-1], states[:, -1]) if final else None
    return states, last


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
                queries: bool, initial: bool, values: bool) -> float:
    """Matmul FLOPs of `chunk_delta` over bh = B·Hkv (Dv = D); `initial`: a state enters;
    `values`: the values' form (the CPU's), else the carry form (the GPU path's)."""
    c = max(1, min(chunk, n))
    nc, e = -(-n // c), 2 * d  # e: the width of [U | W]
    steps = nc if final else nc - 1  # the states passed on
    f = nc * (2 * c * c * d + solve_flops(c, e, lapack=values))  # β K Kᵀ, the solve
    if values:  # V' = U − W S per chunk, S' = e^(γ_C) S + K̃ᵀ V'
        f += nc * 2 * c * d * d + steps * 2 * d * c * d
    else:  # K̃ᵀ[U | W], then the carry times the state
        f += nc * 2 * d * c * e + steps * 2 * d * d * d
    if queries:  # P, then P V' or P [U | W], and (e^γ Q) S or (P W − e^γ Q) S
        f += nc * groups * (2 * c * c * d + 2 * c * c * (d if values else e))
        f += 0 if nc == 1 and not initial else nc * groups * 2 * c * d * d
    return float(bh * f)


def solve_flops(c: int, m: int, lapack: bool = False) -> float:
    """Matmul FLOPs of `unit_lower_solve` for one C×C system with m columns; `lapack`: the
    CPU's (`_solve_cpu`), its diagonal blocks inverted by a triangular solve against the
    identity (blk²·blk, the dispatch count's convention for a solve), not by doubling."""
    blk = min(SOLVE_BLOCK, c)
    nb, size = -(-c // blk), 1 << (blk - 1).bit_length()
    if lapack and blk == size and c % blk == 0:
        inverse = nb * blk ** 3
    else:
        levels = (1 << i for i in range(size.bit_length() - 1))
        inverse = nb * sum(2 * size * s * s for s in levels)
    return inverse + sum(2 * blk * (j * blk + blk) * m for j in range(nb))  # L_{j,<j} X, T_jj r


def delta_algorithm_flops(bh: int, groups: int, n: int, d: int, chunk: int,
                          queries: bool, values: bool) -> float:
    """The least matmul work of the chunked delta rule over n positions (Dv = D), per chunk of
    m: β K Kᵀ and the triangular solve on their strict triangles; the values' form: U − W S per
    chunk and K̃ᵀ V' for each state passed on, with queries P and P V' on the causal triangle
    (diagonal included) and (e^γ Q) S; the carry form: K̃ᵀ[U | W], the carry times each state
    passed on, P and P [U | W] on the causal triangle and (P W − e^γ Q) S; no padding."""
    c = max(1, min(chunk, n))
    lengths = [c] * (n // c) + ([n % c] if n % c else [])
    e = 2 * d  # the width of [U | W]
    passed = lengths[:-1] if queries else lengths  # the context's last state is passed on
    f = sum(m * (m - 1) * (d + e) for m in lengths)  # A, solve
    if values:
        f += sum(2 * m * d * d for m in lengths) + sum(2 * d * m * d for m in passed)
    else:
        f += sum(2 * d * m * e for m in lengths) + len(passed) * 2 * d * d * d
    if queries:
        f += groups * sum(m * (m + 1) * (2 * d if values else d + e) + 2 * m * d * d
                          for m in lengths)
    return float(bh * f)
