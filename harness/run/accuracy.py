"""A point's quality on sampled query rows, in float64, never inside latency.

Two questions, two references:
- how far from exact attention (`softmax_rel_error`): against float64 full softmax attention on
  the same q, k, v (causal, grouped heads and q_len as the point), for every variant that
  replaces or restricts softmax attention, full's backends included (their rounding); per head
  too (`head_error_median`, `head_error_max`: the error of each (batch, head) over its rows);
  and the attention-mass recall (`recall_mean`, `recall_p10`): the share of each query's
  float64 softmax mass that falls on the keys the variant attends (`Variant.attended_keys`);
- whether the implementation computes its own definition (`impl_error`, `impl_ok`): against
  its masked softmax (exact-by-mask variants, full's plain softmax) or its own float64
  definition (`Variant.reference`: MoBA's, NSA's selections, the recurrent family), within its
  tolerance for the dtype (`Variant.impl_tol`).
The recurrent family replaces softmax: no softmax error, no recall (`quality_note` says why).
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import torch

from attnbench.harness.run.config import RunConfig
from attnbench.variants import reference as _reference
from attnbench.variants.base import Variant
from attnbench.variants.reference import max_abs_error, rel_error

# The float64 scores and probabilities of one block of (batch·k/v head, query rows) stay under
# `reference.REFERENCE_BYTES` (the bound every float64 reference keeps, read when called); a
# single query row of one k/v group above it (a vast n) is not computed, and said so.
NOT_SOFTMAX = ("recurrent",)  # families that replace softmax: nothing to be close to


def quality(att: Variant, q, k, v, out, run: RunConfig,
            rows: torch.Tensor | None = None) -> dict:
    """The point's quality fields (see the module docstring): impl_error, max_abs_error,
    error_ref, impl_ok, softmax_rel_error, head_error_median, head_error_max, recall_mean,
    recall_p10, quality_note. `rows`: the query rows (default: a seeded sample of `error.rows`);
    `out` is the variant's output (B, H, Nq, D) on every row in `rows`."""
    f = dict(impl_error=math.nan, max_abs_error=math.nan, error_ref="", impl_ok=True,
             softmax_rel_error=math.nan, head_error_median=math.nan, head_error_max=math.nan,
             recall_mean=math.nan, recall_p10=math.nan, quality_note="")
    notes = []
    if att.family in NOT_SOFTMAX:
        notes.append(f"{att.family}: replaces softmax, no softmax attention to be close to")
    if not run.error.rows:
        f["quality_note"] = "; ".join([*notes, "error.rows=0: no float64 reference computed"])
        return f
    nq, nk = q.shape[-2], k.shape[-2]
    if rows is None:
        g = torch.Generator(device="cpu").manual_seed(run.seed + 7)
        rows = torch.randperm(nq, generator=g)[: min(run.error.rows, nq)].sort().values
    rows = rows.to(q.device)
    q, k, v = q.detach(), k.detach(), v.detach()
    got = out.detach()[..., rows, :]  # (B, H, R, D)
    own = own_reference(att, q, k, v, run.causal, rows)  # (B, H, R, D): the sampled rows
    if own is not None:
        ref = own
        f.update(impl_error=rel_error(got, ref), max_abs_error=max_abs_error(got, ref),
                 error_ref="own definition")
    if att.family in NOT_SOFTMAX:
        return _judged(att, run, f, notes)
    mask = att.key_mask(rows + (nk - nq), nk, run.causal) if att.exact else None
    if att.exact:  # its definition is softmax, under its mask where it has one
        f["error_ref"] = "softmax" if mask is None else "masked softmax"
    elif own is None:
        notes.append("no float64 definition of its own: no implementation check")
    scan = softmax_scan(att, q, k, v, got, rows, run.causal, mask, masked=att.exact)
    if scan is None:
        notes.append(f"no softmax reference: one query row of one k/v group and "
                     f"{KEY_TILE_MIN} keys need over {_reference.REFERENCE_BYTES >> 20} MB of "
                     f"float64 scores")
        return _judged(att, run, f, notes)
    head, recall = scan["head_error"], scan["recall"]
    f.update(softmax_rel_error=scan["softmax_rel_error"],
             head_error_median=float(np.median(head.cpu().numpy())),
             head_error_max=float(head.max()))
    if recall is not None:
        f.update(recall_mean=float(recall.mean()),
                 recall_p10=float(np.percentile(recall.cpu().numpy(), 10)))
    else:
        notes.append("no key set (every key enters, reweighted): no recall")
    if att.exact:
        f.update(impl_error=scan["masked_rel_error"], max_abs_error=scan["masked_max_abs"])
    return _judged(att, run, f, notes)


def _judged(att: Variant, run: RunConfig, f: dict, notes: list[str]) -> dict:
    """impl_ok: the implementation check passed (True where none ran: impl_error NaN)."""
    e = f["impl_error"]
    f["impl_ok"] = not (e > att.impl_tol(run.dtype)) if not math.isnan(e) else True
    f["quality_note"] = "; ".join(notes)
    return f


def softmax_scan(att: Variant, q, k, v, got, rows: torch.Tensor, causal: bool,
                 mask: torch.Tensor | None = None, masked: bool = False) -> dict | None:
    """Float64 full softmax attention on `rows`, walked in blocks of batch·k/v heads and rows
    (`reference.REFERENCE_BYTES` of scores at most), against `got` (B, H, R, D), the variant's
    output there.

    Returns softmax_rel_error (relative Frobenius over every row and head), head_error (B·H,)
    (the same per (batch, head)), recall (B·H·R,) (softmax mass on `att.attended_keys`, None
    where it has no key set) and, with `masked`, masked_rel_error and masked_max_abs against
    softmax under `mask` (R, Nk) (None: every key) — or None when a single row is too big."""
    b, h, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    grp, z, r = h // hkv, b * hkv, len(rows)
    per_row = grp * nk * 8 * (5 if masked else 3)  # scores, probabilities, temporaries
    per_head = 2 * nk * d * 8  # one k/v head's float64 k and v
    budget = _reference.REFERENCE_BYTES
    qz = q.reshape(z, grp, nq, d)  # (Z, G, Nq, D): the query heads of one k/v head
    gz = got.reshape(z, grp, r, d)
    kz, vz = k.reshape(z, 1, nk, d), v.reshape(z, 1, nk, d)
    pos = rows + (nk - nq)
    keys = torch.arange(nk, device=q.device)
    hidden = keys[None, :] > pos[:, None] if causal else None  # (R, Nk)
    # a mask from the positions alone (the default: key_mask) is built once, not per block
    per_block = type(att).attended_keys is not Variant.attended_keys
    if per_row + per_head > budget:  # one row of one k/v group is too big: tile the keys too
        return _scan_key_tiles(att, qz, gz, kz, vz, rows, hidden, mask, masked, per_block,
                               causal, budget)
    rstep = max(1, min(r, (budget - per_head) // per_row))
    zstep = max(1, budget // (per_row * rstep + per_head))
    diff2 = torch.zeros(z, grp, dtype=torch.float64, device=q.device)
    ref2 = torch.zeros_like(diff2)
    mdiff2 = mref2 = 0.0
    mabs = 0.0
    recall = []
    shared = None if per_block else att.attended_keys(q, k, rows, causal)
    for z0 in range(0, z, zstep):
        z1 = min(z, z0 + zstep)
        kk, vv = kz[z0:z1].double(), vz[z0:z1].double()  # (z, 1, Nk, D)
        part_r = []
        for r0 in range(0, r, rstep):
            r1 = min(r, r0 + rstep)
            sel = rows[r0:r1]
            s = qz[z0:z1, :, sel].double() @ kk.transpose(-1, -2) / math.sqrt(d)  # (z,G,r,Nk)
            if hidden is not None:
                s.masked_fill_(hidden[r0:r1], -math.inf)
            p = torch.softmax(s, -1)
            ref = p @ vv  # (z, G, r, D)
            mine = gz[z0:z1, :, r0:r1].double()
            diff2[z0:z1] += (mine - ref).square().sum((-2, -1))
            ref2[z0:z1] += ref.square().sum((-2, -1))
            if per_block:  # a selection that depends on q and k (MoBA, NSA)
                seen = att.attended_keys(qz[z0:z1], kz[z0:z1], sel, causal)
            else:
                seen = None if shared is None else shared[r0:r1]
            if seen is not None:
                part_r.append((p * seen.to(p.device)).sum(-1))  # (z, G, r)
            del p
            if masked:  # against softmax under its mask (none: the same reference)
                if mask is not None:
                    s.masked_fill_(~mask[r0:r1].to(s.device), -math.inf)
                    ref = torch.softmax(s, -1).nan_to_num_(0.0) @ vv  # a row with no key: 0
                    mdiff2 += float((mine - ref).square().sum())
                    mref2 += float(ref.square().sum())
                mabs = max(mabs, float((mine - ref).abs().max().nan_to_num(math.inf)))
        if part_r:
            recall.append(torch.cat(part_r, -1))
    return _scan_result(diff2, ref2, recall, masked, mask is None, mdiff2, mref2, mabs)


def _scan_result(diff2, ref2, recall: list, masked: bool, maskless: bool, mdiff2: float,
                 mref2: float, mabs: float) -> dict:
    """A scan's sums as its result: the relative errors overall and per (batch, head), the
    recall of every sampled row, and with `masked` the check against softmax under the mask
    (`maskless`: the same reference)."""
    head = (diff2 / ref2.clamp_min(1e-300)).sqrt().flatten()
    out = dict(softmax_rel_error=math.sqrt(float(diff2.sum()) / max(float(ref2.sum()), 1e-300)),
               head_error=head, recall=torch.cat(recall).flatten() if recall else None)
    if masked:
        out.update(masked_max_abs=mabs, masked_rel_error=out["softmax_rel_error"] if maskless
                   else math.sqrt(mdiff2 / max(mref2, 1e-300)))
    return out


KEY_TILE_MIN = 128  # keys: a smaller tile would take longer than the point measured


def _scan_key_tiles(att: Variant, qz, gz, kz, vz, rows, hidden, mask, masked: bool,
                    per_block: bool, causal: bool, budget: int) -> dict | None:
    """`softmax_scan` where one query row of one k/v group needs more than `budget` (a long
    context, a wide head: n = 65536 at d = 128): one k/v head and a block of rows at a time, the
    keys in tiles, softmax accumulated online in float64 (running maximum, sum and output, as
    flash attention does; the recall's mass and the masked reference likewise). The same
    numbers as the untiled walk to float64 rounding; None when not even one row and
    KEY_TILE_MIN keys fit."""
    z, grp, _, d = qz.shape
    nk, r = kz.shape[2], len(rows)
    unit = grp * 8 * (5 if masked else 3)  # per row and key: scores, probabilities, temporaries
    per_row = grp * d * 8 * (4 if masked else 2) + (grp * nk if per_block else 0)
    rstep = min(r, 64)
    tile = 0
    while True:
        tile = (budget - rstep * per_row) // (rstep * unit + 2 * d * 8)
        if tile >= min(nk, KEY_TILE_MIN) or rstep == 1:
            break
        rstep = max(1, rstep // 2)
    if tile < min(nk, KEY_TILE_MIN):
        return None
    tile = min(tile, nk)
    scale = 1 / math.sqrt(d)
    dev = qz.device
    diff2 = torch.zeros(z, grp, dtype=torch.float64, device=dev)
    ref2 = torch.zeros_like(diff2)
    mdiff2 = mref2 = mabs = 0.0
    shared = None if per_block else att.attended_keys(qz[:1], kz[:1], rows, causal)
    recall = []

    def online(state, s, vv, seen=None):
        """Fold one tile's scores into (max, sum, output, mass on `seen`)."""
        m, tot, acc, mass = state
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        base = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        alpha = torch.exp(m - base)
        p = torch.exp(s - base)
        tot = tot * alpha + p.sum(-1, keepdim=True)
        acc = acc * alpha + p @ vv
        if seen is not None:
            mass = mass * alpha + (p * seen).sum(-1, keepdim=True)
        return m_new, tot, acc, mass

    for zi in range(z):
        part_r = []
        for r0 in range(0, r, rstep):
            r1 = min(r, r0 + rstep)
            sel = rows[r0:r1]
            qq = qz[zi:zi + 1, :, sel].double()  # (1, G, rr, D)
            if per_block:  # a selection that depends on q and k (MoBA, NSA)
                seen = att.attended_keys(qz[zi:zi + 1], kz[zi:zi + 1], sel, causal)
            else:
                seen = None if shared is None else shared[r0:r1]
            shape = (1, grp, r1 - r0, 1)
            start = (torch.full(shape, -math.inf, dtype=torch.float64, device=dev),
                     torch.zeros(shape, dtype=torch.float64, device=dev),
                     torch.zeros(1, grp, r1 - r0, d, dtype=torch.float64, device=dev),
                     torch.zeros(shape, dtype=torch.float64, device=dev))
            full, under = start, start
            for k0 in range(0, nk, tile):
                k1 = min(nk, k0 + tile)
                kk = kz[zi:zi + 1, :, k0:k1].double()
                vv = vz[zi:zi + 1, :, k0:k1].double()
                s = qq @ kk.transpose(-1, -2) * scale  # (1, G, rr, T)
                if hidden is not None:
                    s.masked_fill_(hidden[r0:r1, k0:k1], -math.inf)
                full = online(full, s, vv, None if seen is None else
                              seen[..., k0:k1].to(dev, torch.float64))
                if masked and mask is not None:
                    s.masked_fill_(~mask[r0:r1, k0:k1].to(dev), -math.inf)
                    under = online(under, s, vv)
            ref = full[2] / full[1]
            mine = gz[zi:zi + 1, :, r0:r1].double()
            diff2[zi:zi + 1] += (mine - ref).square().sum((-2, -1))
            ref2[zi:zi + 1] += ref.square().sum((-2, -1))
            if seen is not None:
                part_r.append((full[3] / full[1]).squeeze(-1))  # (1, G, rr)
            if masked:
                if mask is not None:  # a row with no key: 0
                    ref = torch.where(under[1] > 0, under[2] / under[1].clamp_min(1e-300),
                                      torch.zeros_like(under[2]))
                    mdiff2 += float((mine - ref).square().sum())
                    mref2 += float(ref.square().sum())
                mabs = max(mabs, float((mine - ref).abs().max().nan_to_num(math.inf)))
        if part_r:
            recall.append(torch.cat(part_r, -1))
    return _scan_result(diff2, ref2, recall, masked, mask is None, mdiff2, mref2, mabs)


def own_reference(att: Variant, q, k, v, causal: bool, rows: torch.Tensor):
    """The variant's own float64 definition on the sampled `rows` (None where it has none). A
    `reference` that takes `rows` computes only those, tiled (the built-ins); one that does not
    (an older plugin's) computes every row, then the sampled ones are kept."""
    if "rows" in inspect.signature(att.reference).parameters:
        return att.reference(q, k, v, causal, rows=rows)
    own = att.reference(q, k, v, causal)
    return None if own is None else own[..., rows, :]
