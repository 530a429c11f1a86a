"""FlexAttention helpers shared by the variants that offer a flex impl (full, local, sparse).

One compiled `flex_attention` for the whole process, so each shape and mask compiles once,
whichever variant asks (https://pytorch.org/blog/flexattention/). It runs compiled or raises:
uncompiled, flex_attention silently takes an unfused path that materialises all n×n scores.
"""

from __future__ import annotations

import collections
import functools

import torch

# Calls that ran the compiled kernel, calls refused because they would have run uncompiled, and
# times the compiled cache was emptied to make room (tests read it; eager calls never run).
COUNTS: collections.Counter[str] = collections.Counter()


class FlexNotCompiled(RuntimeError):
    """flex_attention would run uncompiled: unfused, with all n×n scores materialised."""


def _flex_compiled_only(q, k, v, block_mask, enable_gqa=False):
    # Under dynamo this test is the constant True and leaves no trace in the graph. Run as plain
    # Python (dynamo disabled, a force_eager stance, suppress_errors, a cache limit) it stops the
    # call before flex_attention's eager fallback can materialise the scores.
    if not torch.compiler.is_compiling():
        COUNTS["refused"] += 1
        raise FlexNotCompiled(
            "flex_attention would run uncompiled (unfused, all n×n scores materialised); "
            "torch.compile is disabled or failed for this call"
        )
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


@functools.cache
def _compiled():
    # fullgraph: a graph break or a hit recompile limit raises instead of running eagerly;
    # dynamic=False: every shape gets its own static kernel, the one a user would get.
    return torch.compile(_flex_compiled_only, dynamic=False, fullgraph=True)


def flex_attention_compiled(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask=None
) -> torch.Tensor:
    """Compiled `flex_attention(q, k, v, block_mask=block_mask)`; q (B, H, Nq, D), k and v
    (B, Hkv, Nk, D) (grouped-query heads natively: enable_gqa), out (B, H, Nq, D). No mask
    (None) runs with `every_key_mask`, never maskless.

    Its first call per shape and mask compiles (seconds to tens of seconds on CPU), which the
    runner reports as setup time. Dynamo keeps at most ``recompile_limit`` (8) compiled versions
    of a function; a sweep visits more shapes, so when the limit is hit this function's cache
    (and only its: ``torch._dynamo.reset()`` would drop every compiled function in the process)
    is emptied and the shape compiles again. Raises FlexNotCompiled rather than run uncompiled.
    """
    from torch._dynamo.exc import FailOnRecompileLimitHit

    if block_mask is None:  # maskless, compiled flex on a CPU stores all n×n scores
        block_mask = every_key_mask(q.shape[-2], k.shape[-2], str(q.device))
    fn = _compiled()
    gqa = k.shape[1] != q.shape[1]
    try:
        out = fn(q, k, v, block_mask, gqa)
    except FailOnRecompileLimitHit:
        from torch._dynamo.eval_frame import remove_from_cache

        remove_from_cache(_flex_compiled_only)
        COUNTS["cache_resets"] += 1
        try:
            out = fn(q, k, v, block_mask, gqa)
        except FailOnRecompileLimitHit as exc:
            COUNTS["refused"] += 1
            raise FlexNotCompiled(
                f"flex_attention: dynamo's recompile limit hit even on an emptied cache ({exc})"
            ) from exc
    COUNTS["compiled"] += 1
    return out


@functools.lru_cache(maxsize=32)
def every_key_mask(nq: int, nk: int, device: str):
    """An explicit block mask in which every query sees every key: what a call without a mask
    means. Passed instead of None, as flex's compiled CPU kernel given no mask materialises the
    (B, H, Nq, Nk) scores (10 / 37 / 137 MiB at n = 1K / 2K / 4K, B1 H2 d64, measured) where
    this mask, all full blocks, keeps it O(n)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def every_key(b, h, q_idx, kv_idx):
        return kv_idx >= 0

    return create_block_mask(every_key, None, None, nq, nk, device=device)


def flex_reasons(device: torch.device | str, mode: str) -> list[str]:
    """Why a flex impl can't run this point: FlexAttention has no backward on CPU."""
    if mode == "fwd_bwd" and torch.device(device).type != "cuda":
        return ["flex: FlexAttention has no backward on CPU"]
    return []
