"""A point's error on sampled query rows against float64 attention, never inside latency: the
variant's own definition (an implementation check) and, for approximations, full softmax."""

from __future__ import annotations

import inspect
import math

import torch

from attnbench.harness.run.config import RunConfig
from attnbench.variants.base import Variant
from attnbench.variants.reference import (
    REFERENCE_BYTES,
    attention_reference,
    max_abs_error,
    rel_error,
)


def error(att: Variant, q, k, v, out, run: RunConfig, rows: torch.Tensor | None = None,
           softmax: bool = False) -> tuple[float, float, str]:
    """Error on sampled query rows against float64 attention, never inside latency: the
    variant's own definition where it replaces softmax (`Variant.reference`), its masked
    definition for exact families, full softmax attention for approximations. Returns
    (rel_error, max_abs_error, what it is against). `rows`: the query rows (default: a seeded
    sample of `error.rows`)."""
    if not run.error.rows:
        return math.nan, math.nan, ""
    nq, nk = q.shape[-2], k.shape[-2]
    if rows is None:
        g = torch.Generator(device="cpu").manual_seed(run.seed + 7)
        rows = torch.randperm(nq, generator=g)[: min(run.error.rows, nq)].sort().values
        rows = rows.to(q.device)
    q, k, v = q.detach(), k.detach(), v.detach()
    got = out.detach()[..., rows, :]
    ref = None if softmax else own_reference(att, q, k, v, run.causal, rows)
    if ref is not None:
        return rel_error(got, ref), max_abs_error(got, ref), "own definition"
    mask = att.key_mask(rows + (nk - nq), nk, run.causal) if att.exact and not softmax else None
    # Bound the float64 score block to REFERENCE_BYTES by walking over batch and k/v heads.
    b, h, hkv = q.shape[0], q.shape[1], k.shape[1]
    grp = h // hkv
    qf, gf = (t.reshape(b * hkv, grp, *t.shape[-2:]) for t in (q, got))  # heads of one group
    kf, vf = (t.reshape(b * hkv, 1, *t.shape[-2:]) for t in (k, v))
    step = max(1, REFERENCE_BYTES // (grp * len(rows) * nk * 8 * 2))
    refs = [
        attention_reference(qf[i : i + step], kf[i : i + step], vf[i : i + step], run.causal,
                            mask, rows)
        for i in range(0, b * hkv, step)
    ]
    ref = torch.cat(refs)
    what = "masked softmax" if att.exact else "softmax"
    return rel_error(gf, ref), max_abs_error(gf, ref), what


def own_reference(att: Variant, q, k, v, causal: bool, rows: torch.Tensor):
    """The variant's own float64 definition on the sampled `rows` (None where it has none). A
    `reference` that takes `rows` computes only those, tiled (the built-ins); one that does not
    (an older plugin's) computes every row, then the sampled ones are kept."""
    if "rows" in inspect.signature(att.reference).parameters:
        return att.reference(q, k, v, causal, rows=rows)
    own = att.reference(q, k, v, causal)
    return None if own is None else own[..., rows, :]


def softmax_error(att: Variant, q, k, v, out, run: RunConfig, error_ref: str,
                   rows: torch.Tensor | None = None) -> float:
    """For variants measured against their own definition that approximate softmax (MoBA's
    and NSA's selections), also the error against full softmax; the recurrent family replaces
    softmax, where that number would mean nothing (NaN)."""
    if error_ref != "own definition" or att.family == "recurrent":
        return math.nan
    return error(att, q, k, v, out, run, rows, softmax=True)[0]
