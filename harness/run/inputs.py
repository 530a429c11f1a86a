"""Seeded benchmark inputs: q (B, H, Nq, D), k and v (B, Hkv, N, D), by input kind (`inputs=`).

Which kind answers which question: README, "Inputs". Synthetic kinds are drawn in float32 on
the CPU from `seed` (the same on every device), for any n, then cast and moved:

- ``gaussian``: i.i.d. standard normal q, k, v. At d=64 the scores q·k/√d have unit variance,
  so softmax attention is close to uniform: approximations look better than they are.
- ``peaked``: queries and keys sharing low-dimensional structure. Per batch-head, 64 cluster
  centres lie in a random rank-8 subspace (norm ≈ √d); token i of cluster c(i) has
  q_i = μ_c + ε_i + 0.3·η_i and k_i = μ_c + ε_i + 0.3·η'_i with ε, η, η' ~ N(0, I): each query
  sees mostly its own key, then its cluster. Entries have std ≈ 1.45; v is standard normal.
- ``local``: locality through RoPE, as in a trained model. Each k/v head has a direction u
  with equal weight on every RoPE frequency pair (random phases), shared by its query heads;
  q_i = R_i(a·u + ε_i), k_j = R_j(a·u + ε'_j), R_p the rotary embedding of position p (base
  10000, rotate-half layout), a = √(LOCAL·√d): a key at distance Δ gains LOCAL·mean_f cos(Δθ_f)
  in the score, which fades as RoPE's frequencies fall out of phase
  ([RoFormer §3.4.3](https://arxiv.org/abs/2104.09864)).
- ``sink``: Gaussian scores plus an attention sink: key 0 gains SINK in every query's score, and
  its value is scaled by 0.2, a near no-op as in trained models
  ([Xiao et al. 2023](https://arxiv.org/abs/2309.17453)). A direction w per k/v head, after RoPE
  (real sinks live in the slow, barely rotated frequencies), is added to every query and to a
  noise-free key 0; every other key is made orthogonal to w.
- ``heavy``: Gaussian scores plus heavy hitters: one key in 256 (at least one; random positions
  after 0) gains HEAVY in every query's score, the same way through its own direction
  ([H2O](https://arxiv.org/abs/2306.14048)).
- ``realistic``: the three together, strengths set so that the statistics below land on the real
  sample's; its values share a direction per k/v head holding 15% of their energy, as the real
  sample's do (0.05–0.24 by layer, mean 0.15), so that dropping keys costs what it costs there
  (the err columns below).
- ``real``: q, k, v recorded from a small pretrained model reading text (SmolLM2-135M-Instruct,
  Apache-2.0; harness/run/real.py). Needs the `real` extra.
- ``file:PATH``: a capture written by `attnbench capture` (harness/run/capture.py), replayed.

Strengths are in score units (what q·k/√d gains), in `STRUCTURES`: local 11.5, sink 6.0,
heavy 4.9; realistic local 9.8, sink 9.4, heavy 4.6 (value_mean 0.15). The u, w and heavy
directions are orthonormal, so the features add without interfering.

Replayed kinds take a selection after the name: ``@layers:LIST`` and ``@heads:LIST`` (query
heads of the capture; LIST is ``3``, ``0-5`` or ``2+9+17``), e.g. ``inputs=real@layers:14``,
``inputs=file:run.safetensors@layers:0-3@heads:0+1``. They replay the first n positions (the
queries: the last q_len of those), the same for every seed; k/v heads keep the model's grouping
(harness/run/replay.py): a point needs B·Hkv k/v heads each with H/Hkv of its query heads,
picked evenly across the selected layers and heads, and tiled when the point asks for more than
the capture holds.

What each kind's attention looks like beside the real sample's (`attention_stats`, printed by
benchmarks/input_stats.py into results/benchmarks/input-stats-cpu.txt): causal, n=2048, 9 query
/ 3 k/v heads, d=64, means over heads and ten batch elements (the real sample's ten default
layers, or ten seeded draws). entropy in nats; sink: weight on key 0; local64/256: weight on the
64/256 keys ending at the query; heavy: share of the weight beyond those 64 keys and off key 0
that the top 1% of keys take; err w256 (+s4): relative error of causal attention over the last
256 keys (and the first 4) against full causal attention. What each kind is matched to is in the
last column; tests/test_inputs.py holds the kinds to wider ranges (a batch of two).

| kind | entropy | sink | local64 | local256 | heavy | err w256 | +s4 | matched to |
| --- | --- | --- | --- | --- | --- | --- | --- | --- |
| real, all 30 layers | 2.55 | 0.30 | 0.41 | 0.56 | 0.33 | 0.88 | 0.24 | |
| real, default layers | 2.50 | 0.31 | 0.39 | 0.56 | 0.29 | 0.81 | 0.25 | |
| gaussian | 6.12 | 0.01 | 0.14 | 0.39 | 0.04 | 0.88 | 0.87 | |
| peaked | 3.40 | 0.01 | 0.39 | 0.56 | 0.12 | 0.37 | 0.37 | |
| local | 3.03 | 0.00 | 0.77 | 0.89 | 0.08 | 0.14 | 0.14 | real local heads¹ |
| sink | 5.00 | 0.29 | 0.09 | 0.31 | 0.03 | 1.16 | 0.81 | sink 0.30 |
| heavy | 5.06 | 0.01 | 0.14 | 0.39 | 0.33 | 1.05 | 1.04 | heavy 0.33 |
| realistic | 2.69 | 0.34 | 0.42 | 0.60 | 0.31 | 0.55 | 0.26 | all five², +s4 |

¹ local64 of the real layers 1, 2, 10, 11: 0.58-0.83. ² within ±0.15 nats and ±0.05.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from attnbench.harness.run.replay import parse_int_list
from attnbench.variants.base import Shape

Generator = Callable[[Shape, torch.Generator], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
ROPE_BASE = 10000.0
SYNTHETIC_HELP = "gaussian, peaked, local, sink, heavy, realistic, real, file:PATH"


def _gaussian(shape: Shape, g: torch.Generator):
    dims = (shape.batch, shape.heads, shape.seq_len, shape.head_dim)
    return tuple(torch.randn(dims, generator=g) for _ in range(3))


def _peaked(shape: Shape, g: torch.Generator, clusters: int = 64, rank: int = 8):
    b, h, n, d = shape.batch, shape.heads, shape.seq_len, shape.head_dim
    r = min(rank, d)
    basis = torch.linalg.qr(torch.randn(b, h, d, r, generator=g))[0]  # (B, H, D, r) orthonormal
    centres = torch.randn(b, h, clusters, r, generator=g) @ basis.transpose(-2, -1)  # (B,H,C,D)
    centres *= math.sqrt(d / r)  # norm ≈ √d
    assign = torch.randint(clusters, (b, h, n, 1), generator=g).expand(b, h, n, d)
    shared = torch.gather(centres, 2, assign) + torch.randn(b, h, n, d, generator=g)  # μ_c + ε
    q = shared + 0.3 * torch.randn(b, h, n, d, generator=g)
    k = shared + 0.3 * torch.randn(b, h, n, d, generator=g)
    return q, k, torch.randn(b, h, n, d, generator=g)


def _every_head(draw: Generator) -> Generator:
    """A draw made at (B, H, N, D) for all three, k and v then keeping every (H/Hkv)-th head:
    k/v head j is the draw of q head j·H/Hkv (gaussian and peaked, drawn as they always were)."""

    def gen(shape: Shape, g: torch.Generator):
        q, k, v = draw(dataclasses.replace(shape, kv_heads=0, q_len=0), g)
        return q, k[:, :: shape.groups], v[:, :: shape.groups]  # (B, Hkv, N, D)

    return gen


@dataclass(frozen=True)
class Structure:
    """A structured kind's strengths, in score units (q·k/√d): what a key gains in a query's
    score. 0 turns a feature off."""

    local: float = 0.0  # gain at distance 0 through a shared RoPE-rotated direction
    sink: float = 0.0  # gain of key 0 for every query
    heavy: float = 0.0  # gain of the heavy-hitter keys for every query
    heavy_every: int = 256  # one heavy hitter per this many keys (at least one)
    sink_value: float = 0.2  # v of key 0 is scaled by this
    value_mean: float = 0.0  # share of v's energy in a direction its k/v head's keys share


def rope(x: torch.Tensor, base: float = ROPE_BASE, start: int = 0) -> torch.Tensor:
    """Rotary position embedding of x (..., N, D) at positions start.., rotate-half layout
    (pairs i and i + D/2), as Llama applies it."""
    n, d = x.shape[-2], x.shape[-1]
    freq = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # (D/2,)
    angle = torch.arange(start, start + n, dtype=torch.float64)[:, None] * freq  # (N, D/2)
    cos = torch.cat([angle.cos(), angle.cos()], -1).to(x.dtype)  # (N, D)
    sin = torch.cat([angle.sin(), angle.sin()], -1).to(x.dtype)
    half = torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1)
    return x * cos + half * sin


def _structured(p: Structure) -> Generator:
    """Draws at the point's own heads: the query heads of a group share their k/v head's
    directions (u, w, the heavy hitters' direction), so grouped heads keep the structure."""

    def gen(shape: Shape, g: torch.Generator):
        b, h, hkv, n, d = shape.batch, shape.heads, shape.hkv, shape.seq_len, shape.head_dim
        # every draw is made whatever the strengths: one seed, one set of directions
        # u: equal weight on every RoPE frequency pair (random phases), so u·R_Δu is the same
        # decay curve in every head; w, wh: orthonormal to u and to each other
        phase = torch.rand(b, hkv, d // 2, generator=g) * (2 * math.pi)
        u = torch.cat([phase.cos(), phase.sin()], -1) / math.sqrt(d // 2)  # (B, Hkv, D)
        basis = torch.stack([u, *torch.randn(2, b, hkv, d, generator=g)], -1)  # (B,Hkv,D,3)
        qr, r = torch.linalg.qr(basis)
        dirs = qr * r.diagonal(dim1=-2, dim2=-1).sign().unsqueeze(-2)  # u first, ⊥ after it
        u, w, wh = (dirs[..., i].unsqueeze(-2) for i in range(3))  # (B, Hkv, 1, D) each
        q_noise = torch.randn(b, h, n, d, generator=g)
        k_noise = torch.randn(b, hkv, n, d, generator=g)
        v = torch.randn(b, hkv, n, d, generator=g)
        order = torch.rand(b, hkv, max(n - 1, 0), generator=g).argsort(-1) + 1  # heavy hitters
        mean = torch.randn(b, hkv, 1, d, generator=g)
        if p.value_mean:  # (B, Hkv, 1, D) of norm √(value_mean·d): v keeps E‖v‖² = d
            mean = mean / mean.norm(dim=-1, keepdim=True) * math.sqrt(p.value_mean * d)
            v = v * math.sqrt(1 - p.value_mean) + mean
        to_q = lambda t: t.repeat_interleave(shape.groups, dim=1)  # noqa: E731  (B,Hkv,.)->(B,H,.)
        gain = lambda s: math.sqrt(s * math.sqrt(d))  # noqa: E731  two norms whose dot is s·√d
        u = u * gain(p.local)
        if p.sink:  # a pure sink key: no noise, so every head's sink weighs the same
            k_noise[:, :, 0] = 0.0
        q = rope(to_q(u) + q_noise)  # (B, H, N, D)
        k = rope(u + k_noise)  # (B, Hkv, N, D)
        for on, direction in ((p.sink, w), (p.heavy, wh)):
            if on:  # keys off the sink's and the hitters' directions: only those keys gain
                k = k - (k * direction).sum(-1, keepdim=True) * direction
        if p.sink:
            q = q + to_q(w) * gain(p.sink)
            k[:, :, :1] += w * gain(p.sink)
            v[:, :, 0] *= p.sink_value
        m = min(max(1, n // p.heavy_every), n - 1)
        if p.heavy and m > 0:
            hit = torch.zeros(b, hkv, n, 1).scatter_(2, order[..., :m, None], 1.0)  # (B,Hkv,N,1)
            q = q + to_q(wh) * gain(p.heavy)
            k = k + hit * wh * gain(p.heavy)
        return q, k, v

    return gen


# Strengths matched to the real sample (module docstring's table): local to its local heads
# (layers 1, 2, 10, 11: local64 0.58–0.83), sink and heavy to its means, realistic to all.
STRUCTURES = {
    "local": Structure(local=11.5),
    "sink": Structure(sink=6.0),
    "heavy": Structure(heavy=4.9),
    "realistic": Structure(local=9.8, sink=9.4, heavy=4.6, value_mean=0.15),
}
KINDS: dict[str, Generator] = {
    "gaussian": _every_head(_gaussian),
    "peaked": _every_head(_peaked),
    **{name: _structured(p) for name, p in STRUCTURES.items()},
}
REPLAYED = ("real", "file")


@dataclass(frozen=True)
class InputSpec:
    """A parsed `inputs=` value: a kind, the path of a file: capture, and for replayed kinds
    the layers and query heads selected (None: all)."""

    kind: str
    path: str = ""
    layers: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None


_SELECTOR = re.compile(r"@(\w+):([^@/]*)$")  # at the end; a path's own @ has no word: after


def parse_inputs(text: str) -> InputSpec:
    """`gaussian`, `real@layers:3`, `file:PATH@layers:0-5@heads:1+2`, … → InputSpec; a bad
    value raises ValueError with one line naming `inputs`."""
    rest = text[len("file:"):] if text.startswith("file:") else text
    picks: dict[str, tuple[int, ...]] = {}
    while m := _SELECTOR.search(rest):
        key, value = m.groups()
        if key not in ("layers", "heads"):
            raise ValueError(f"inputs={text!r}: unknown selection @{key}:; expected @layers:LIST "
                             f"or @heads:LIST (LIST: 3, 0-5 or 2+9+17)")
        if key in picks:
            raise ValueError(f"inputs={text!r}: @{key}: given twice")
        try:
            picks[key] = parse_int_list(value)
        except ValueError as exc:
            raise ValueError(f"inputs={text!r}: @{key}:{exc}") from None
        rest = rest[: m.start()]
    if text.startswith("file:"):
        if not rest:
            raise ValueError(f"inputs={text!r}: file: needs a path (inputs=file:PATH)")
        return InputSpec("file", rest, picks.get("layers"), picks.get("heads"))
    if rest not in KINDS and rest != "real":
        raise ValueError(f"inputs={text!r}: expected one of {SYNTHETIC_HELP}")
    if picks and rest != "real":
        raise ValueError(f"inputs={text!r}: @layers:/@heads: select from a capture; {rest} is "
                         f"synthetic (use inputs=real@… or inputs=file:PATH@…)")
    return InputSpec(rest, "", picks.get("layers"), picks.get("heads"))


def inputs_problem(text: str, shape: Shape, positions: int) -> str:
    """Why `inputs=text` cannot feed a point of `shape` that needs `positions` positions
    (seq_len, or seq_len + 1 for decode), as one line naming `inputs`; "" when it can. Cheap:
    reads at most a capture's header, never loads a model."""
    try:
        spec = parse_inputs(text)
        if spec.kind in STRUCTURES and (shape.head_dim % 2 or shape.head_dim < 4):
            return (f"inputs={text!r}: needs an even head_dim of at least 4 (RoPE turns pairs "
                    f"of dimensions); head_dim={shape.head_dim}")
        if spec.kind not in REPLAYED:
            return ""
        from attnbench.harness.run import replay

        layout = _layout(spec, text)
        replay.plan_slots(layout, shape, positions, spec.layers, spec.heads)
    except ValueError as exc:
        return str(exc) if str(exc).startswith("inputs=") else f"inputs={text!r}: {exc}"
    return ""


def _layout(spec: InputSpec, text: str):
    from attnbench.harness.run import real, replay

    if spec.kind == "real":
        real.check_available()
        return real.layout(spec.layers)
    return replay.read_layout(spec.path)


def make_inputs(
    shape: Shape,
    dtype: torch.dtype,
    device: torch.device | str,
    seed: int = 0,
    kind: str = "gaussian",
    requires_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v for one point: q (B, H, q_len, D), the last q_len positions; k, v
    (B, kv_heads, seq_len, D). `kind` is an `inputs=` value (module docstring).

    Synthetic kinds are drawn in float32 on the CPU from `seed` (same on every device);
    gaussian and peaked with kv_heads = 0 and q_len = 0 are drawn as they always were. Replayed
    kinds are the same for every seed."""
    spec = parse_inputs(kind)
    if spec.kind in REPLAYED:
        from attnbench.harness.run import real, replay

        layers, path = spec.layers, spec.path
        if spec.kind == "real":  # its default layers, whatever else the cached file holds
            layers = layers or real.DEFAULT_LAYERS
            path = real.sample(shape.seq_len, spec.layers)
        q, k, v = replay.replay(path, shape, layers, spec.heads)
    else:
        g = torch.Generator(device="cpu").manual_seed(seed)
        q, k, v = KINDS[spec.kind](dataclasses.replace(shape, q_len=0), g)
        q = q[:, :, shape.seq_len - shape.nq:]  # (B, H, Nq, D)
    return tuple(t.to(device=device, dtype=dtype).contiguous().requires_grad_(requires_grad)
                 for t in (q, k, v))


def attention_entropy(q: torch.Tensor, k: torch.Tensor, rows: int = 256, seed: int = 0,
                      causal: bool = False) -> float:
    """Mean entropy (nats) of softmax(q·kᵀ/√d) over a seeded sample of query rows, in float64,
    under the point's own mask (`causal`: query i, the (N − Nq + i)-th position, sees keys up to
    itself), a head at a time.

    Compare with log(n), the entropy of uniform attention (causal: the mean of log of each
    sampled row's key count).
    """
    nq, n, d = q.shape[-2], k.shape[-2], q.shape[-1]
    g = torch.Generator(device="cpu").manual_seed(seed)
    idx = torch.randperm(nq, generator=g)[: min(rows, nq)].to(q.device)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # grouped k/v heads
    qs = q[..., idx, :].flatten(0, 1)  # (B·H, R, D)
    ks = k.flatten(0, 1)  # (B·H, N, D)
    hidden = None
    if causal:
        hidden = torch.arange(n, device=q.device)[None, :] > (idx + n - nq)[:, None]  # (R, N)
    total = 0.0
    for h in range(qs.shape[0]):
        s = qs[h].double() @ ks[h].double().T / math.sqrt(d)
        if hidden is not None:
            s = s.masked_fill(hidden, -math.inf)
        logp = torch.log_softmax(s, dim=-1)
        total += float(-(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1).sum())
    return total / (qs.shape[0] * qs.shape[1])


def attention_stats(q: torch.Tensor, k: torch.Tensor, causal: bool = True, rows: int = 256,
                    windows: tuple[int, ...] = (64, 256)) -> dict[str, float]:
    """What real attention looks like, as means over `rows` evenly spaced query rows of
    softmax(q·kᵀ/√d) in float64 (queries: the last Nq of the N key positions):

    entropy (nats); sink: mass on key 0; local{w}: mass on the w keys ending at the query's
    position (within distance < w either side when not causal); heavy: share of the mass
    beyond distance 64 and off key 0 that goes to the top 1% of keys (by that mass, per head).
    """
    n, nq, d = k.shape[-2], q.shape[-2], q.shape[-1]
    rows_q = torch.linspace(0, nq - 1, min(rows, nq), dtype=torch.float64).round().long()
    pos = (rows_q + n - nq).to(q.device)  # key position of each sampled query
    kk = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1).double()  # grouped k/v heads
    s = q[..., rows_q.to(q.device), :].double() @ kk.transpose(-2, -1) / math.sqrt(d)
    dist = pos[:, None] - torch.arange(n, device=q.device)[None, :]  # (R, N): query - key
    if causal:
        s = s.masked_fill(dist < 0, -math.inf)
    else:
        dist = dist.abs()
    logp = torch.log_softmax(s, dim=-1)  # (B, H, R, N)
    p = logp.exp()
    out = {"entropy": float(-(p * logp.nan_to_num(neginf=0.0)).sum(-1).mean()),
           "sink": float(p[..., 0].mean())}
    for w in windows:
        out[f"local{w}"] = float((p * ((dist >= 0) & (dist < w))).sum(-1).mean())
    far = p.masked_fill(dist < 64, 0.0)
    far[..., 0] = 0.0
    col = far.sum(-2)  # (B, H, N): mass each key takes from the sampled rows
    top = max(1, n // 100)
    total = col.sum(-1)
    share = col.topk(min(top, n), dim=-1).values.sum(-1) / total.clamp_min(1e-300)
    out["heavy"] = float(share[total > 0].mean()) if bool((total > 0).any()) else 0.0
    return out
