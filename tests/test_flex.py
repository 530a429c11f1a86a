"""FlexAttention runs compiled at every point of a sweep, or the point says why it can't."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from attnbench import variants
from attnbench.harness.run.config import from_dictconfig
from attnbench.harness.run.job import run_point
from attnbench.variants import flex as _flex

# 12 shapes, more than dynamo's 8 compiled versions per function (torch._dynamo.config
# .recompile_limit); tiny, so each compiles in seconds.
SEQ_LENS = [384 + 64 * i for i in range(12)]
FLEX_POINTS = [
    ({"name": "full", "backend": "flex"}, True),  # causal: a 128-block mask
    ({"name": "local", "impl": "flex", "window": 64}, False),
]


def _point(variant: dict, n: int, causal: bool):
    return from_dictconfig(dict(
        variant=variant, batch=1, heads=4, seq_len=n, head_dim=16, causal=causal, device="cpu",
        timing={"warmup": 0, "min_reps": 1, "min_time_s": 0}, error={"rows": 8},
    ))


@pytest.mark.slow
@pytest.mark.parametrize("variant,causal", FLEX_POINTS, ids=["full_flex", "local_flex"])
def test_every_point_of_a_long_sweep_runs_compiled(variant, causal):
    """Uncompiled, flex_attention materialises the (B, H, n, n) scores; compiled, it tiles them.
    Every point must be an ok row measured on the compiled kernel."""
    for n in SEQ_LENS:
        before = dict(_flex.COUNTS)
        rec = run_point(_point(variant, n, causal))
        assert rec.status == "ok", f"n={n}: {rec.status}: {rec.reason}"
        scores = 4 * n * n * 4  # (1, 4, n, n) float32
        # uncompiled: >= the scores (plus their softmax); compiled: O(n) buffers
        assert rec.peak_mem_bytes < scores / 2, f"n={n}: peak {rec.peak_mem_bytes} ~ n² scores"
        assert _flex.COUNTS["compiled"] > before.get("compiled", 0)
        assert _flex.COUNTS["refused"] == before.get("refused", 0)


@pytest.mark.slow
def test_flex_without_a_mask_stays_linear():
    """A call without a mask runs with an explicit all-keys block mask: maskless, the compiled
    CPU kernel stored all n² scores (10 / 37 / 137 MiB at n = 1K / 2K / 4K, B1 H2 d64) while the
    row said ok, flex:compiled and O(n). One compile (n = 1K)."""
    n = 1024
    rec = run_point(from_dictconfig(dict(
        variant={"name": "full", "backend": "flex"}, batch=1, heads=2, seq_len=n, head_dim=64,
        causal=False, device="cpu", timing={"warmup": 0, "min_reps": 1, "min_time_s": 0},
        error={"rows": 8},
    )))
    assert rec.status == "ok" and rec.kernel == "flex:compiled", rec.reason
    scores = 2 * n * n * 4  # (1, 2, n, n) float32
    assert rec.peak_mem_bytes < scores / 2, rec.peak_mem_bytes
    assert rec.peak_mem_bytes <= 1.5 * rec.predicted_mem_bytes
    assert rec.softmax_rel_error < 1e-5 and rec.impl_error < 1e-5


def test_uncompiled_flex_is_refused_not_run():
    """Whatever stops compilation (here a force_eager stance), flex raises instead of running
    its unfused fallback, and the sweep records an error row that says so."""
    q = torch.randn(1, 2, 64, 16)
    with torch.compiler.set_stance("force_eager"):
        with pytest.raises(_flex.FlexNotCompiled, match="uncompiled"):
            _flex.flex_attention_compiled(q, q, q)
        rec = run_point(_point({"name": "full", "backend": "flex"}, 64, False))
    assert rec.status == "error"
    assert "FlexNotCompiled" in rec.reason and "uncompiled" in rec.reason


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_flex_kernel_names_the_compiled_kernel(causal, grad):
    shape = variants.Shape(1, 2, 256, 16)
    for att in (variants.build("full", backend="flex"), variants.build("local", impl="flex")):
        assert att.kernel(shape, "cpu", causal, grad) == "flex:compiled"


class _Ops(TorchDispatchMode):
    """Names of the aten ops (with overload) one call dispatches."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(str(func))
        return func(*args, **(kwargs or {}))


# (variant, params, n): band interiors with cut edges, a whole-block pattern, a padded one
ENGINE_POINTS = [
    ("local", {"window": 13, "block": 8}, 151),
    ("strided", {"block": 16, "window_blocks": 1, "stride": 4}, 128),
    ("bigbird", {"block": 16, "window_blocks": 3, "globals": 1, "random": 1}, 100),
]


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("name,params,n", ENGINE_POINTS, ids=[p[0] for p in ENGINE_POINTS])
def test_blocksparse_kernel_names_the_paths_that_run(name, params, n, causal, grad):
    """kernel() names the engine paths; the ops one call dispatches confirm each of them:
    band → the fused CPU flash kernel over strided key windows (no gather), sdpa-gather → the
    fused kernel over index_select gathers, matmul-gather → index_select gathers and matmul
    (bmm.default)."""
    att = variants.build(name, **params)
    kernel = att.kernel(variants.Shape(1, 2, n, 16), "cpu", causal, grad)
    assert kernel.startswith("blocksparse:")
    paths = set(kernel.removeprefix("blocksparse:").split("+"))
    q, k, v = (torch.randn(1, 2, n, 16, requires_grad=grad) for _ in range(3))
    with torch.set_grad_enabled(grad), _Ops() as ops:
        att(q, k, v, causal=causal)
    sdpa = any("scaled_dot_product" in op for op in ops.seen)
    gather = any("index_select" in op for op in ops.seen)
    assert bool(paths & {"band", "sdpa-gather"}) == sdpa, (kernel, ops.seen)
    assert bool(paths & {"sdpa-gather", "matmul-gather"}) == gather, (kernel, ops.seen)
    assert ("matmul-gather" in paths) == ("aten.bmm.default" in ops.seen), (kernel, ops.seen)
