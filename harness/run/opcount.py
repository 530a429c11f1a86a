"""What one call dispatches, counted at the ATen level: ops, matmul FLOPs, host syncs, SDPA kernel.

A `TorchDispatchMode` sees every ATen op after autograd and composite decomposition, so it also
counts what ``torch.utils.flop_counter.FlopCounterMode`` misses: in-place and ``out=`` matmuls
(``addmm_``, ``bmm.out``, ``baddbmm``) and the fused SDPA kernels (the CPU flash op and its
backward). Run once per point, outside the timed region (the mode slows every op down).

FLOPs are matmul FLOPs (multiply-add = 2), the convention of every variant's `flops` model; a
C×C triangular solve against m columns (``linalg_solve_triangular``, ``triangular_solve``)
counts C²·m, a multiply-add per entry of the triangle and column. A fused attention op counts
its QKᵀ and PV (its causal form only the triangle it needs: the queries aligned to the last
keys, except aten's CPU kernel, which aligns them to the first; the score blocks on the
diagonal that a tiled kernel computes in full are not counted); its backward counts 2.5× that
(flash-style: QKᵀ recomputed, then dP, dV, dQ, dK).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Fused attention ops → the kernel name recorded in `Record.kernel`.
SDPA_KERNELS = {
    "_scaled_dot_product_flash_attention_for_cpu": "flash_cpu",
    "_scaled_dot_product_flash_attention": "flash",
    "_scaled_dot_product_efficient_attention": "efficient",
    "_scaled_dot_product_cudnn_attention": "cudnn",
    "_flash_attention_forward": "flash",
    "_efficient_attention_forward": "efficient",
    "_scaled_dot_product_fused_attention_overrideable": "overrideable",
}
_SDPA_BACKWARD = {f"{name}_backward" for name in SDPA_KERNELS} | {
    "_flash_attention_backward", "_efficient_attention_backward",
}
# Ops whose result the host must wait for: scalars read back, data-dependent output shapes.
SYNC_OPS = {
    "_local_scalar_dense", "nonzero", "unique", "_unique", "_unique2", "unique_consecutive",
    "unique_dim", "masked_select", "equal", "allclose",
}
# repeat_interleave with a tensor of repeats and no output_size also syncs: handled below.


@dataclass
class DispatchCount:
    """Counts of one call: every ATen op, matmul FLOPs, host syncs, fused SDPA kernels seen,
    and FLOPs by input dtype (the compute dtype of the matmuls)."""

    ops: int = 0
    flops: float = 0.0
    host_syncs: int = 0
    by_op: Counter = field(default_factory=Counter)
    sdpa: list[str] = field(default_factory=list)
    flops_by_dtype: Counter = field(default_factory=Counter)

    @property
    def compute_dtype(self) -> str:
        """The dtype that carried most matmul FLOPs ("" when there were none)."""
        if not self.flops_by_dtype:
            return ""
        return str(self.flops_by_dtype.most_common(1)[0][0]).removeprefix("torch.")


class DispatchCounter(TorchDispatchMode):
    """``with DispatchCounter() as c: fn()`` → ``c.count``."""

    def __init__(self) -> None:
        super().__init__()
        self.count = DispatchCount()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._overloadpacket.__name__
        c = self.count
        c.ops += 1
        c.by_op[name] += 1
        if _is_sync(name, func, args, kwargs, out):
            c.host_syncs += 1
        flops, dtype = _flops(func, name, args, kwargs)
        if flops:
            c.flops += flops
            c.flops_by_dtype[dtype] += flops
        if name in SDPA_KERNELS:
            c.sdpa.append(SDPA_KERNELS[name])
        return out


def count_call(fn: Callable[[], object]) -> DispatchCount:
    """Run `fn()` once under a `DispatchCounter` and return its counts (the result is dropped)."""
    with DispatchCounter() as counter:
        fn()
    return counter.count


def _is_sync(name: str, func, args, kwargs, out) -> bool:
    if name in SYNC_OPS:
        return True
    if name == "repeat_interleave" and isinstance(args[0] if args else None, torch.Tensor):
        return kwargs.get("output_size") is None
    if name in ("_to_copy", "copy_", "to"):  # a device → host copy
        src = args[1] if name == "copy_" else args[0]
        dst = args[0] if name == "copy_" else out
        if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor):
            return src.device.type != "cpu" and dst.device.type == "cpu"
    return False


def _shape(t) -> tuple[int, ...]:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else ()


def _flops(func, name: str, args, kwargs) -> tuple[float, torch.dtype | None]:
    if name in ("mm", "bmm", "matmul"):
        a, b = args[0], args[1]
    elif name in ("addmm", "addmm_", "baddbmm", "baddbmm_", "addbmm", "addbmm_"):
        a, b = args[1], args[2]
    elif name in ("mv", "addmv", "addmv_", "dot", "vdot"):
        a, b = (args[1], args[2]) if name.startswith("add") else (args[0], args[1])
        return 2.0 * math.prod(_shape(a)), a.dtype
    elif name in SDPA_KERNELS or name in _SDPA_BACKWARD:
        return _attention_flops(func, name, args, kwargs), args[0].dtype
    elif name in ("linalg_solve_triangular", "triangular_solve"):
        return _solve_flops(func, name, args, kwargs)
    else:
        return 0.0, None
    sa, sb = _shape(a), _shape(b)
    if len(sa) < 2 or len(sb) < 2:
        return 0.0, None
    batch = math.prod(sa[:-2]) if name != "addbmm" else sa[0]
    return 2.0 * batch * sa[-2] * sa[-1] * sb[-1], a.dtype


def _solve_flops(func, name: str, args, kwargs) -> tuple[float, torch.dtype | None]:
    """A C×C triangular solve against m right-hand columns: C²·m (half a matmul's 2·C²·m)."""
    if name == "triangular_solve":  # triangular_solve(B, A, ...)
        b, a, left = args[0], args[1], True
    else:  # linalg_solve_triangular(A, B, *, upper, left, unitriangular)
        a, b, left = args[0], args[1], bool(_arg(func, args, kwargs, "left"))
    sa, sb = _shape(a), _shape(b)
    if len(sa) < 2 or len(sb) < 2:
        return 0.0, None
    batch = math.prod(torch.broadcast_shapes(sa[:-2], sb[:-2]))
    m = sb[-1] if left else sb[-2]
    return float(batch * sa[-1] * sa[-1] * m), a.dtype


def _attention_flops(func, name: str, args, kwargs) -> float:
    """QKᵀ and PV of a fused attention op, forward (backward: 2.5×)."""
    backward = name in _SDPA_BACKWARD
    q, k, v = (_arg(func, args, kwargs, n) for n in ("query", "key", "value"))
    if name.startswith(("_flash_attention", "_efficient_attention")):  # (B, N, H, D) layout
        b, nq, h, d = q.shape
        nk = k.shape[1]
    else:  # (B, H, N, D)
        b, h, nq, d = q.shape
        nk = k.shape[-2]
    dv = v.shape[-1]
    causal = bool(_arg(func, args, kwargs, "is_causal") or
                  _arg(func, args, kwargs, "causal"))
    pairs = nq * nk
    if causal and name.endswith(("_for_cpu", "_for_cpu_backward")):
        # aten's CPU kernel aligns the mask top-left: row i sees keys 0 … i
        pairs = min(nq, nk) * (min(nq, nk) + 1) // 2 + max(0, nq - nk) * nk
    elif causal:  # queries aligned to the last nq keys: row i sees nk − nq + i + 1 keys
        nq = min(nq, nk)
        pairs = nq * (nk - nq) + nq * (nq + 1) // 2
    f = 2.0 * b * h * pairs * (d + dv)
    return 2.5 * f if backward else f


def _arg(func, args, kwargs, name: str):
    """Argument `name` of an ATen call, positional or keyword (None when the op has none)."""
    for i, a in enumerate(func._schema.arguments):
        if a.name == name:
            return args[i] if i < len(args) else kwargs.get(name, a.default_value)
    return None
