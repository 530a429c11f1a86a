"""Normalised linear attention φ(Q)φ(K)ᵀV shared by the linear-family variants, batched form.

Model shapes: q features (B, H, Nq, F), k features and v (B, Hkv, Nk, ·). The state is per k/v
head; the G = H/Hkv query heads of a group are folded into its rows (a view of q, never a copy of
k or v). The queries are the last Nq positions: the first Nk − Nq keys only build the state the
causal chunks start from.

Causal form by chunked prefix sums: inside a chunk of L positions the masked quadratic form;
across chunks the running state S = Σ φ(k)ᵀv (F × D per batch and k/v head) and normaliser
z = Σ φ(k) of all earlier chunks. The per-chunk states are formed in one batched matmul and
prefix-summed over chunks in one cumsum, so the ops per call do not grow with n or B·H and memory
is O(n·L + n/L·F·D): one state per chunk, never one per position.

Precision: the matmuls run in `mm` (the compute dtype on a CPU; on the GPU path the input dtype,
whose GEMMs accumulate in fp32, bfloat16 for float16 inputs: `mm_dtype`); normalisers, prefix
sums and the division in the features' dtype (float32 for half inputs). The normaliser never goes
through a half-precision matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnbench.variants.base import Shape, gpu_path


def path(device, causal: bool, grad: bool) -> str:
    """The linear family's path: tiled (CPU, non-causal, no autograd: cache-sized loops) |
    batched (autograd, or the GPU path) | chunked (causal)."""
    if causal:
        return "chunked"
    return "batched" if grad or gpu_path(device) else "tiled"


def path_name(chunk: int, shape: Shape, device, causal: bool, grad: bool) -> str:
    """`kernel()` of a linear-family variant: its path, and how a causal one sums over chunks."""
    name = path(device, causal, grad)
    if name != "chunked":
        return name
    prefix = "cumsum" if gpu_path(device) else "loop"  # over chunks: see _exclusive_prefix
    return f"chunked[L={min(chunk, shape.nq)},{prefix}]"


def linear_attention(
    qf: torch.Tensor,
    kf: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    chunk: int,
    eps: float | torch.Tensor,
    mm: torch.dtype | None = None,
) -> torch.Tensor:
    """out_i = Σ_j φq_i·φk_j v_j / (Σ_j φq_i·φk_j + eps), j over all keys (or, causal, the keys
    up to query i's position Nk − Nq + i).

    Args:
        qf: (B, H, Nq, F), kf: (B, Hkv, Nk, F) non-negative features; v: (B, Hkv, Nk, D).
        chunk: chunk length L of the causal path.
        eps: a float, or a (B, H, Nq, 1) tensor: one per query row.
        mm: dtype of the matmuls (default: the features' dtype).
    Returns:
        (B, H, Nq, D) in the features' dtype.
    """
    b, h, nq, f = qf.shape
    hkv, d = v.shape[1], v.shape[3]
    mm = mm or qf.dtype
    if not causal:
        s, z = context_state(kf, v, mm)  # (B, Hkv, F, D), (B, Hkv, F, 1)
        rows = qf.reshape(b, hkv, -1, f)  # (B, Hkv, G·Nq, F): the group's query heads as rows
        num = (rows.to(mm) @ s).to(qf.dtype)
        den = rows @ z  # (B, Hkv, G·Nq, 1), in the features' dtype
        return (num / den.add_(_rows(eps, b, hkv))).view(b, h, nq, d)
    num, den = _causal(qf, kf, v, chunk, mm)
    return num / den.add_(eps)


def context_state(
    kf: torch.Tensor, v: torch.Tensor, mm: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """S = φ(K)ᵀV (B, Hkv, F, D) in `mm`, z = Σφ(k) (B, Hkv, F, 1) in kf's dtype: one matmul."""
    return kf.to(mm).transpose(-2, -1) @ v.to(mm), kf.sum(-2).unsqueeze(-1)


def _rows(eps: float | torch.Tensor, b: int, hkv: int) -> float | torch.Tensor:
    return eps.reshape(b, hkv, -1, 1) if isinstance(eps, torch.Tensor) else eps


def _causal(
    qf: torch.Tensor, kf: torch.Tensor, v: torch.Tensor, chunk: int, mm: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Numerator (B, H, Nq, D) and normaliser (B, H, Nq, 1) of the causal form, chunked."""
    b, h, nq, f = qf.shape
    hkv, nk, d = v.shape[1], v.shape[2], v.shape[3]
    g, pre, acc = h // hkv, nk - nq, qf.dtype
    kq, vq = kf[..., pre:, :], v[..., pre:, :]  # the keys at the query positions
    L = min(chunk, nq)
    pad = -nq % L  # zero rows: padded keys add nothing, padded queries are dropped
    if pad:
        qf, kq, vq = (F.pad(t, (0, 0, 0, pad)) for t in (qf, kq, vq))
    c = (nq + pad) // L
    qc = qf.view(b, hkv, g, c, L, f).transpose(2, 3).reshape(b, hkv, c, g * L, f)  # G·L rows
    kc = kq.reshape(b, hkv, c, L, f)  # (B, Hkv, C, L, F)
    qm, km, vm = qc.to(mm), kc.to(mm), vq.reshape(b, hkv, c, L, d).to(mm)
    scores = qm @ km.transpose(-2, -1)  # (B, Hkv, C, G·L, L)
    scores.view(b, hkv, c, g, L, L).tril_()  # each head's block masked within the chunk
    num = scores @ vm  # (B, Hkv, C, G·L, D)
    den = scores.sum(-1, keepdim=True, dtype=acc)  # (B, Hkv, C, G·L, 1)
    # states of chunks 0..C-2 (and the context's, if any), prefix-summed in acc: chunk i sees
    # the context and chunks < i
    states = (km[:, :, :-1].transpose(-2, -1) @ vm[:, :, :-1]).to(acc)  # (B, Hkv, C-1, F, D)
    norms = kc[:, :, :-1].sum(-2)  # (B, Hkv, C-1, F)
    s0 = z0 = None
    if pre:  # the context before the first query: one more state, added to every chunk's
        s0, z0 = context_state(kf[..., :pre, :], v[..., :pre, :], mm)
        s0, z0 = s0.to(acc), z0[..., 0]
    launch_light = gpu_path(qf.device)
    prev, zprev = _exclusive_prefix(states, s0, launch_light), _exclusive_prefix(norms, z0,
                                                                                launch_light)
    num = num.to(acc).add_(qm @ prev.to(mm))
    den += qc @ zprev.unsqueeze(-1)  # (B, Hkv, C, G·L, 1)

    def unfold(x: torch.Tensor) -> torch.Tensor:  # (B, Hkv, C, G·L, E) → (B, H, Nq, E)
        e = x.shape[-1]
        x = x.view(b, hkv, c, g, L, e).transpose(2, 3).reshape(b, h, c * L, e)
        return x[:, :, :nq]

    return unfold(num), unfold(den)


def _exclusive_prefix(
    x: torch.Tensor, first: torch.Tensor | None, launch_light: bool
) -> torch.Tensor:
    """(B, Hkv, C, ...): `first` (or 0) plus the sums of x[:, :, :i] (x: (B, Hkv, C-1, ...)).
    Launch-light: one cumsum. Otherwise a loop of C adds: a CPU's cumsum over a middle dimension
    runs ~20x slower than the adds (8 MiB of states: 19 ms against 0.8-1.3 ms on this CPU)."""
    if first is None:
        first = x.new_zeros(x.shape[:2] + x.shape[3:])
    if launch_light:
        return torch.cat([first[:, :, None], x], dim=2).cumsum_(2)
    acc, out = first, [first]
    for xi in x.unbind(2):  # differentiable: unbind's backward is one stack, not C scatters
        acc = acc + xi
        out.append(acc)
    return torch.stack(out, dim=2)


def linear_flops(shape: Shape, f: int, causal: bool, chunk: int) -> float:
    """Matmul FLOPs of `linear_attention` with F features (features excluded; multiply-add 2)."""
    b, h, hkv, d = shape.batch, shape.heads, shape.hkv, shape.head_dim
    nq, nk = shape.nq, shape.seq_len
    if not causal:  # state, queries against it, normaliser
        return 2.0 * b * (hkv * nk * f * d + h * nq * f * d + h * nq * f)
    L = min(chunk, nq)
    c = -(-nq // L)
    intra = 2 * h * c * L * L * (f + d)  # masked scores and their product with v
    inter = 2 * h * c * L * f * (d + 1)  # queries against the carried state and normaliser
    states = 2 * hkv * ((c - 1) * L + nk - nq) * f * d  # chunk states and the context's
    return float(b * (intra + inter + states))


def linear_memory(shape: Shape, f: int, causal: bool, chunk: int, el: int, mm_el: int) -> int:
    """Upper estimate of the bytes `linear_attention` allocates: `el` bytes per element of the
    features' dtype, `mm_el` of the matmuls' (the casts to it: none when equal)."""
    b, h, hkv, d = shape.batch, shape.heads, shape.hkv, shape.head_dim
    nq, nk = shape.nq, shape.seq_len
    cast = mm_el if mm_el != el else 0
    if not causal:
        words = h * nq * (d + 1) + h * nq * d + hkv * f * (d + 1)  # num, den, out; state
        return b * (words * el + (h * nq * f + hkv * nk * (f + d)) * cast)
    L = min(chunk, nq)
    c = -(-nq // L)
    rows = c * L  # padded query positions
    words = (h + 2 * hkv) * rows * f + hkv * rows * d  # padded copies, folded query rows
    words += h * c * L * L + 2 * h * rows * (d + 1)  # scores; num, den and their unfolded copies
    words += 3 * hkv * c * f * (d + 1)  # states, prefix sums (and the cast of them)
    words += h * nq * d  # the output
    casts = (h + hkv) * rows * f + hkv * rows * d + h * c * L * L + h * rows * d
    return b * (words * el + casts * cast)
