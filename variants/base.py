"""The variant contract: what every attention variant answers, as plain data and methods.

A variant is a dataclass whose fields are its parameters (what `conf/variant/<name>.yaml` sets).
It takes q, k, v in (B, H, N, D) and returns (B, H, N, D). Variants never see a Hydra config.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

Family = Literal["full", "local", "sparse", "linear", "lowrank", "recurrent"]
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The implementation check's budget: the largest relative error against the variant's own
# float64 definition that still passes, per input dtype. About 10–250× the error of attention
# computed naively in that dtype (fp32 ~4e-7, fp16 ~5e-4, bf16 ~4e-3 at d=64): rounding and a
# long recurrence's accumulation pass, a wrong mask or formula (one key of a 256-key window
# missing is ~3e-3) does not. A variant may set its own (`Variant.impl_tolerance`).
IMPL_TOL = {"float64": 1e-10, "float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}


@dataclass(frozen=True)
class Shape:
    """Problem size of one attention call: q is (batch, heads, q_len, head_dim), k and v are
    (batch, kv_heads, seq_len, head_dim). kv_heads = 0 means heads (kv_heads < heads: grouped-
    query attention, 1: multi-query); q_len = 0 means seq_len (q_len < seq_len: the queries are
    the last q_len positions, causal masks aligned bottom-right)."""

    batch: int
    heads: int
    seq_len: int
    head_dim: int
    kv_heads: int = 0
    q_len: int = 0

    @classmethod
    def of(cls, q: torch.Tensor, k: torch.Tensor | None = None) -> Shape:
        b, h, nq, d = q.shape
        if k is None:
            return cls(b, h, nq, d)
        hkv, nk = k.shape[1], k.shape[2]
        return cls(b, h, nk, d, 0 if hkv == h else hkv, 0 if nq == nk else nq)

    @property
    def bh(self) -> int:
        return self.batch * self.heads

    @property
    def hkv(self) -> int:
        """Heads of k and v."""
        return self.kv_heads or self.heads

    @property
    def nq(self) -> int:
        """Query positions."""
        return self.q_len or self.seq_len

    @property
    def groups(self) -> int:
        """Query heads per k/v head."""
        return self.heads // self.hkv


@dataclass
class Variant:
    """Base class. Subclasses are dataclasses; their fields are the variant's parameters.

    Class attributes a subclass sets:
        name: registry name (also the `conf/variant/<name>.yaml` file name).
        family: one of full | local | sparse | linear | lowrank.
        time_exponent, memory_exponent: declared growth in n at fixed window/rank/features
            (2.0 for exact attention, 1.0 for linear-cost variants).
        exact: True when the variant is exact softmax attention restricted to `key_mask`
            (full, local, sparse); False for approximations (linear, low-rank) and for the
            recurrent family, which replaces softmax rather than approximating it.
        no_causal: why the variant has no causal form (empty when it has one).
        at_most_n: names of parameters (a rank, a landmark count) that may not exceed n.
        impl_tolerance: per dtype name, the largest relative error against its own float64
            definition that passes the implementation check (default IMPL_TOL).
        renamed: old parameter name -> (its new name, the unit the new name states), accepted
            for one release by `build` and the sweep, each use noted in one line.
    """

    name: ClassVar[str] = ""
    family: ClassVar[Family] = "full"
    time_exponent: ClassVar[float] = 2.0
    memory_exponent: ClassVar[float] = 2.0
    # decode: one step against a context of n tokens takes time ∝ n^k and the deployment holds
    # (cache or state + the step's peak) ∝ n^k; NaN: not declared (the report then judges none)
    decode_time_exponent: ClassVar[float] = math.nan
    decode_memory_exponent: ClassVar[float] = math.nan
    # a decode step reads its whole fixed-size state and writes it anew (a linear RNN, linear
    # attention): its least bytes are that state twice (`algorithm_decode_bytes`)
    rewrites_state: ClassVar[bool] = False
    exact: ClassVar[bool] = True
    no_causal: ClassVar[str] = ""  # why the variant has no causal form ("": it has one)
    no_noncausal: ClassVar[str] = ""  # why it has only a causal form (the recurrent family)
    # Grouped-query heads (k/v with fewer heads than q) and fewer queries than keys: a variant
    # declares what it implements; the base class reports the rest unsupported with a reason.
    # A chunked recurrence passes its state chunk by chunk: its ops per call grow with n/chunk
    # (never with batch·heads); it says so here and the launch-light test allows it.
    ops_grow_with_n: ClassVar[bool] = False
    supports_gqa: ClassVar[bool] = False
    supports_q_len: ClassVar[bool] = False
    no_q_len: ClassVar[str] = "not implemented"  # why q_len < seq_len is unsupported
    at_most_n: ClassVar[tuple[str, ...]] = ()  # parameters that may not exceed seq_len
    impl_tolerance: ClassVar[dict[str, float]] = IMPL_TOL
    # A parameter is named for its unit where it is not tokens (`window_blocks`): one name, one
    # meaning across variants. An old name keeps working for one release, with a note.
    renamed: ClassVar[dict[str, tuple[str, str]]] = {}

    # -- identity -------------------------------------------------------------------------------
    def params(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def label(self) -> str:
        """Short, stable name for tables and legends, e.g. ``full[sdpa]`` or ``local[w=256]``."""
        inner = ",".join(f"{k}={v}" for k, v in self.params().items())
        return f"{self.name}[{inner}]" if inner else self.name

    def _label(self, shown: dict[str, str | None]) -> str:
        """``name[...]`` from `shown` (parameter → its short form, None to leave it out), then
        every other parameter that differs from its default as ``param=value``: two points of
        a sweep never share a label, and the defaults keep labels short."""
        parts = [text for text in shown.values() if text]
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name not in shown and value != f.default:
                parts.append(f"{f.name}={value}")
        return f"{self.name}[{','.join(parts)}]" if parts else self.name

    @property
    def complexity(self) -> dict[str, str]:
        return {"time": _pow(self.time_exponent), "memory": _pow(self.memory_exponent)}

    # -- computation ----------------------------------------------------------------------------
    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False
    ) -> torch.Tensor:
        """q (B, H, Nq, D), k and v (B, Hkv, Nk, D) with Hkv dividing H and Nq <= Nk (causal:
        the queries are the last Nq positions); returns (B, H, Nq, D)."""
        raise NotImplementedError

    def decode_init(self, k: torch.Tensor, v: torch.Tensor, heads: int | None = None) -> Any:
        """The cache or state after a context k, v of (B, Hkv, n, D): what `decode_step`
        continues from. `heads`: the query heads H (k alone does not tell them; a state that
        differs per query head needs them); None means Hkv. Variants without a decode form
        leave this unimplemented."""
        raise NotImplementedError(f"{self.name} has no decode form")

    def decode_step(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: Any
    ) -> tuple[torch.Tensor, Any]:
        """One new token: q (B, H, 1, D), k and v (B, Hkv, 1, D) → its output (B, H, 1, D) and
        the updated state (causal: the token sees the context and itself)."""
        raise NotImplementedError(f"{self.name} has no decode form")

    @property
    def has_decode(self) -> bool:
        return type(self).decode_step is not Variant.decode_step

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False
    ) -> torch.Tensor:
        return self.forward(q, k, v, causal=causal)

    # -- what it supports, as data --------------------------------------------------------------
    def not_supported_reasons(
        self,
        shape: Shape,
        dtype: torch.dtype,
        device: torch.device | str,
        causal: bool,
        mode: str = "fwd",
    ) -> list[str]:
        """Reasons this point cannot run (mode: fwd | fwd_bwd | decode); empty: it runs."""
        reasons = []
        if dtype not in FLOAT_DTYPES:
            reasons.append(f"dtype {dtype} not supported (float32, float16, bfloat16)")
        if causal and self.no_causal:
            reasons.append(f"{self.name} has no causal form: {self.no_causal}")
        if not causal and self.no_noncausal and mode != "decode":
            reasons.append(f"{self.name} is causal only: {self.no_noncausal}")
        if shape.hkv != shape.heads and not self.supports_gqa:
            reasons.append(f"{self.name}: grouped k/v heads (kv_heads < heads) not implemented")
        if shape.nq < shape.seq_len and not self.supports_q_len:
            reasons.append(f"{self.name}: q_len < seq_len not supported: {self.no_q_len}")
        if mode == "decode" and not self.has_decode:
            why = self.no_causal or "not implemented"
            reasons.append(f"{self.name} has no decode form: {why}")
        for param in self.at_most_n:
            if getattr(self, param) > shape.seq_len:
                value = getattr(self, param)
                reasons.append(f"{self.name}: {param}={value} > seq_len={shape.seq_len}")
        return reasons

    # -- models ---------------------------------------------------------------------------------
    def flops(self, shape: Shape, causal: bool = False) -> float:
        """Forward FLOPs the engine executes (multiply-add = 2 FLOPs), padding and recomputation
        included; `algorithm_flops` is the method's own minimum."""
        raise NotImplementedError

    def algorithm_flops(self, shape: Shape, causal: bool = False) -> float:
        """Forward FLOPs the method itself needs (multiply-add = 2): its query–key pairs and
        matmuls counted once, without the engine's padding, masked halves of diagonal tiles or
        recomputation; `flops` is what the engine executes (≥ this). Default: `flops` (the
        engine executes no more than the method needs); variants whose engine does more
        override it. The method's backward is counted as 2× this (two gradient matmuls per
        forward matmul)."""
        return self.flops(shape, causal)

    def backward_flops(self, shape: Shape, causal: bool = False) -> float:
        """FLOPs of the backward pass of this variant's own algorithm. Default: twice the
        forward (each matmul C = AB has two gradient matmuls, dA = dC Bᵀ and dB = Aᵀ dC);
        variants whose backward recomputes (flash-style) or skips constant operands override."""
        return 2.0 * self.flops(shape, causal)

    def decode_memory_bytes(self, shape: Shape, dtype: torch.dtype,
                            device: torch.device | str = "cpu") -> int:
        """Predicted peak of building the decode state for a context of shape.seq_len and one
        step (beyond the context's k, v). Default: the forward's model over the context (on
        `device` where the model takes one), an upper estimate for a state built by the chunked
        form; a cache overrides it."""
        model = self.memory_bytes
        kw = {"device": device} if "device" in inspect.signature(model).parameters else {}
        return model(shape, dtype, True, **kw)

    def decode_flops(self, shape: Shape) -> float:
        """FLOPs of one decode step against a context of shape.seq_len (NaN: no model)."""
        return math.nan

    def algorithm_decode_flops(self, shape: Shape) -> float:
        """FLOPs one decode step of the method needs; default `decode_flops` (what runs)."""
        return self.decode_flops(shape)

    def algorithm_bytes(self, shape: Shape, dtype: torch.dtype) -> float:
        """Bytes one forward of the method must move at least: q, k and v read and the output
        written once, in `dtype` (Dv = D). Intermediates come on top wherever they leave the
        caches: a lower bound for every variant. The backward moves twice this (q, k, v, the
        output and its gradient read; dq, dk, dv written)."""
        el = torch.empty((), dtype=dtype).element_size()
        b, d = shape.batch, shape.head_dim
        return float(el * b * d * (2 * shape.heads * shape.nq + 2 * shape.hkv * shape.seq_len))

    def algorithm_decode_bytes(self, shape: Shape, dtype: torch.dtype,
                               state_bytes: float = math.nan) -> float:
        """Bytes one decode step must move at least: the new token's q, k, v and output, and
        the keys it attends. `algorithm_decode_flops` counts 4·D FLOPs per (query head, key):
        a k row and a v row read, shared by the G query heads of a k/v head (a lower bound
        where a group's heads attend different keys; a router's block means count the same
        way). A step that rewrites its fixed-size state (`rewrites_state`: every entry changes,
        a rank-1 update, a decay) moves that state twice instead, given `state_bytes`, its
        measured size. NaN: no model."""
        el = torch.empty((), dtype=dtype).element_size()
        if self.rewrites_state:
            return token_bytes(shape, el) + 2.0 * state_bytes
        return token_bytes(shape, el) + self.algorithm_decode_flops(shape) / 2 * el / shape.groups

    def kernel(self, shape: Shape, device: torch.device | str, causal: bool, grad: bool) -> str:
        """The kernel or engine path one call takes at this point (e.g. ``blocksparse:band``).
        The harness adds what it observes at dispatch level (the SDPA backend torch chose)."""
        return self.name

    def decode_kernel(self, shape: Shape, device: torch.device | str) -> str:
        """The kernel or path one decode step takes against a context of shape.seq_len (the
        record's `kernel` in decode). Default: `kernel` of a one-query causal forward at n + 1;
        a variant whose step runs its own path names it."""
        one = dataclasses.replace(shape, seq_len=shape.seq_len + 1, q_len=1)
        return self.kernel(one, device, True, False)

    def memory_bytes(self, shape: Shape, dtype: torch.dtype, causal: bool = False) -> int:
        """Predicted peak bytes allocated by one forward call beyond q, k, v (upper estimate)."""
        el = torch.empty((), dtype=dtype).element_size()
        n = shape.seq_len
        return int(shape.bh * (n * n * max(el, 4) + 4 * n * shape.head_dim * el))

    def density(self, n: int, causal: bool = False) -> float | None:
        """Fraction of the n×n scores this variant computes (None where that has no meaning)."""
        return causal_pairs(n, n, causal) / (n * n)

    # -- definition, for references and error ---------------------------------------------------
    def reference(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """The variant's own definition in float64, for families that replace softmax rather
        than approximate it (the recurrent family: its step-by-step recurrence; MoBA's and
        NSA's selections). None (the default): the error is measured against softmax attention
        (under `key_mask`). `rows`: the query rows (0..Nq−1) to return, (B, H, len(rows), D);
        None: all. Given rows, a reference computes what they need only, in tiles of at most
        `reference.REFERENCE_BYTES`: the harness samples rows, and a reference over all n rows
        (or all n steps at once) would outgrow the point's own predicted peak."""
        return None

    def key_mask(self, rows: torch.Tensor, n: int, causal: bool) -> torch.Tensor | None:
        """Which keys each query row in `rows` may see, as a (len(rows), n) bool tensor.

        Exact variants are softmax attention restricted to this mask; None means every key
        (and, when causal, every key j <= i). Approximations return None.
        """
        return None

    def attended_keys(
        self, q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, causal: bool
    ) -> torch.Tensor | None:
        """The keys each query row in `rows` (indices 0..Nq−1 of q; query i sits at position
        Nk − Nq + i) attends, as bool (R, Nk) shared by every head or (B, H, R, Nk); None where
        the variant has no key set (linear, low-rank, recurrent: every key enters, reweighted).

        Default: `key_mask` for exact variants (every key, causal applied, where it is None);
        variants that select keys per query (MoBA, NSA) override it. q (B, H, Nq, D), k
        (B, Hkv, Nk, D): what the attention-mass recall of a point is measured on."""
        if not self.exact:
            return None
        nq, nk = q.shape[-2], k.shape[-2]
        pos = rows.to(q.device) + (nk - nq)
        mask = self.key_mask(pos, nk, causal)
        if mask is None:
            mask = torch.ones(len(pos), nk, dtype=torch.bool, device=q.device)
            if causal:
                mask &= torch.arange(nk, device=q.device)[None, :] <= pos[:, None]
        return mask.to(q.device)

    def impl_tol(self, dtype: torch.dtype | str) -> float:
        """The implementation check's budget for `dtype` (its name or the torch dtype)."""
        name = str(dtype).removeprefix("torch.")
        return self.impl_tolerance.get(name, IMPL_TOL["float32"])


FORCE_GPU_PATHS = "ATTNBENCH_FORCE_GPU_PATHS"


def token_bytes(shape: Shape, el: int) -> float:
    """One decode step's own input and output: the token's q and output per query head, its k
    and v per k/v head (el bytes per element)."""
    return float(el * shape.batch * shape.head_dim * 2 * (shape.heads + shape.hkv))


def gpu_path(device: torch.device | str) -> bool:
    """Whether a call takes the GPU path: on CUDA, and anywhere when the environment sets
    ATTNBENCH_FORCE_GPU_PATHS=1 (so the CPU tests cover the paths a GPU runs). The GPU path of a
    variant is launch-light — its dispatched ops do not grow with batch·heads or n — makes no
    host syncs, and runs its matmuls in the input dtype (fp32 statistics and accumulators)."""
    return torch.device(device).type == "cuda" or os.environ.get(FORCE_GPU_PATHS) == "1"


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half inputs (features, prefix sums and the pseudo-inverse need the range)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def mm_dtype(dtype: torch.dtype, device: torch.device | str, states: bool = False) -> torch.dtype:
    """The matmuls' dtype: the input dtype on the GPU path (tensor cores; fp32 accumulation inside
    the GEMM), the compute dtype elsewhere (a CPU has no faster half GEMM to trade range for).
    `states`: the matmuls form un-normalised sums (the linear family's Σ φ(k)ᵀv over up to n
    keys, performer's shifted features down to 1e-8, and 1/normaliser in their gradients), which
    leave float16's range (max 65504, normals from 6e-5): float16 inputs run them in bfloat16,
    at the same tensor-core rate with float32's range."""
    if not gpu_path(device):
        return compute_dtype(dtype)
    return torch.bfloat16 if states and dtype == torch.float16 else dtype


CUDA_WORKSPACE = 64 << 20


def fused_workspace(device: torch.device | str, head_dim: int) -> int:
    """Scratch bytes of a fused attention kernel (SDPA's flash / efficient / cuDNN, flex) beyond
    its output and log-sum-exp: a bounded workspace on CUDA (64 MiB); on the CPU, per-thread
    tiles of scores and of rows of head_dim (aten's flash_cpu, measured at 2 threads: 0.6, 0.8
    and 2 MiB a thread at head_dim 64, 256 and 512; counted 1 MiB + 4 KiB·head_dim a thread),
    so the CPU model grows with `torch.get_num_threads()`."""
    if torch.device(device).type == "cuda":
        return CUDA_WORKSPACE
    return ((1 << 20) + 4096 * head_dim) * torch.get_num_threads()


def full_flops(shape: Shape, causal: bool = False) -> float:
    """FLOPs of exact attention: QKᵀ and PV, 2·2·B·H·Nq·Nk·D; causal: only the query–key pairs
    of the triangle (queries aligned to the last Nq keys)."""
    return 4.0 * shape.bh * causal_pairs(shape.nq, shape.seq_len, causal) * shape.head_dim


def causal_pairs(nq: int, nk: int, causal: bool) -> float:
    """Query–key pairs attention computes: all nq·nk, or, causal, query i (at position
    nk − nq + i) sees nk − nq + i + 1 keys."""
    return float(nq * (nk - nq) + nq * (nq + 1) / 2) if causal else float(nq * nk)


def _pow(e: float) -> str:
    if e == 0:
        return "O(1)"
    if e == 1:
        return "O(n)"
    return f"O(n^{e:g})" if not math.isclose(e, round(e)) else f"O(n^{round(e)})"
