"""A point's predicted peak bounds what it allocates: every built-in preset, in every mode, on
this CPU (the float64 references of the error: tests/test_reference_memory.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from attnbench import variants
from attnbench.harness.run.config import RunConfig
from attnbench.harness.run.inputs import make_inputs
from attnbench.harness.run.job import _make_call
from attnbench.harness.run.memory import peak_memory
from attnbench.harness.run.point import decide
from attnbench.variants.base import Shape

ROOT = Path(__file__).resolve().parents[1]
RATIO = 1.5  # measured / predicted above this: the model is too low
SIZES = (512, 1024)


def _presets() -> list:
    """Every built-in with its defaults, and the presets that take another path on a CPU: full's
    naive and math backends, local with sinks. Left to their own tests: flex impls (each shape
    compiles for 5–30 s here: tests/test_flex.py), the recurrent family's per-step form (a Python
    loop over n: below, at a small n); backends with no CPU kernel skip."""
    names = sorted(n for n in variants.names()
                   if variants.get(n).__module__.startswith("attnbench.variants."))
    out = [pytest.param(name, {}, id=name) for name in names]
    for preset in ("full_naive", "full_math", "local_sinks"):
        params = yaml.safe_load((ROOT / "conf" / "variant" / f"{preset}.yaml").read_text())
        out.append(pytest.param(params.pop("name"), params, id=preset))
    return out


def _points(att) -> list[RunConfig]:
    """At the smaller size the forward, causal and not (what the variant supports); at the
    larger, also forward and backward, decode and a grouped-heads, fewer-queries point."""
    small, large = SIZES
    modes = [("fwd", False, small), ("fwd", True, small), ("fwd", False, large),
             ("fwd", True, large), ("fwd_bwd", False, large), ("fwd_bwd", True, large),
             ("decode", True, large)]
    runs = [RunConfig(variant=att.name, params=att.params(), heads=2, seq_len=n, causal=causal,
                      mode=mode, device="cpu") for mode, causal, n in modes]
    runs.append(RunConfig(variant=att.name, params=att.params(), heads=2, kv_heads=1,
                          seq_len=large, q_len=large // 4, causal=True, device="cpu"))
    return runs


def _measured(att, run: RunConfig) -> dict[str, int]:
    """The peak of the point's first call (`_make_call`, the call `run_point` measures, here
    cold: whatever a first call builds, layouts and caches, counts too, so this is at least the
    recorded peak); for decode the state's build with the first step (what the prediction
    covers), then a step on that state (the recorded peak)."""
    shape, dtype = run.shape, run.torch_dtype
    if run.mode == "decode":
        n = shape.seq_len
        q, k, v = make_inputs(dataclasses.replace(shape, seq_len=n + 1), dtype, "cpu")
        ctx, new = (k[:, :, :n], v[:, :, :n]), (q[:, :, n:], k[:, :, n:], v[:, :, n:])
        state = []

        def build_and_step():
            state.append(att.decode_init(*ctx, heads=shape.heads))
            return att.decode_step(*new, state[0])[0]

        with torch.no_grad():
            build = peak_memory(build_and_step)
            step = peak_memory(lambda: att.decode_step(*new, state[0])[0])
        return {"decode state + step": build, "decode step": step}
    grad = run.mode == "fwd_bwd"
    q, k, v = make_inputs(shape, dtype, "cpu", requires_grad=grad)
    return {run.mode: peak_memory(_make_call(att, q, k, v, run.causal, grad))}


@pytest.mark.slow
@pytest.mark.parametrize("name,params", _presets())
def test_measured_peak_within_its_prediction(name, params):
    """Every point that runs here: the measured peak (peak_mem_bytes: above the inputs, gradients
    and output included) at most 1.5× the predicted peak (predicted_mem_bytes: inputs included,
    so the bound is generous only where inputs dominate)."""
    att = variants.build(name, **params)
    high, ran = [], 0
    for run in _points(att):
        decision = decide(att, run)
        if decision.outcome != "run":
            continue
        ran += 1
        for what, peak in _measured(att, run).items():
            if peak > RATIO * decision.predicted:
                high.append(f"{what} n={run.seq_len} causal={run.causal} kv_heads={run.kv_heads} "
                            f"q_len={run.q_len}: {peak / 2**20:.1f} MiB measured, "
                            f"{decision.predicted / 2**20:.1f} MiB predicted "
                            f"({peak / decision.predicted:.2f}×)")
    if not ran:
        pytest.skip(f"{att.label}: no point runs on this CPU")
    assert not high, f"{att.label}: model too low:\n" + "\n".join(high)


@pytest.mark.parametrize("name", ["retnet", "deltanet", "gated_deltanet"])
def test_per_step_form_backward_keeps_a_state_per_step(name):
    """impl=recurrent under autograd keeps every step's (Dk, Dv) state (two when gated) for the
    backward: O(n·d²), which 3× its forward model missed (deltanet: 2.9×, gated: 5× measured
    over predicted at n = 256). Small n: a Python loop over the steps."""
    att = variants.build(name, impl="recurrent")
    run = RunConfig(variant=name, params=att.params(), heads=2, seq_len=128, causal=True,
                    mode="fwd_bwd", device="cpu")
    peak = _measured(att, run)["fwd_bwd"]
    predicted = decide(att, run).predicted
    assert peak <= RATIO * predicted, (peak, predicted)
    assert predicted <= 4 * peak, (peak, predicted)


@pytest.mark.parametrize(("name", "params"), [("linear", {}), ("local", {}),
                                              ("local", {"window": 128, "sinks": 4}),
                                              ("moba", {}), ("nsa", {})])
def test_a_decode_prediction_is_the_state_s_not_the_forward_s(name, params):
    """A decode point is skipped when its prediction is over max_memory: the forward's model
    (query-side chunks over the whole context) predicted 10 GB for linear's 2 MB state at
    n = 65536 (llama3_8b's heads), a skip where nothing near that is needed. The decode model
    stays an upper bound of the state's build and a step (the class test) and within 4× of it
    here."""
    att = variants.build(name, **params)
    big = Shape(1, 32, 65536, 128, kv_heads=8)
    assert att.decode_memory_bytes(big, torch.float32) < att.memory_bytes(big, torch.float32,
                                                                          True) / 8
    run = RunConfig(variant=att.name, params=att.params(), heads=8, kv_heads=2, seq_len=4096,
                    head_dim=64, mode="decode", causal=True, device="cpu")
    shape = run.shape
    build = _measured(att, run)["decode state + step"]
    predicted = att.decode_memory_bytes(shape, torch.float32)
    assert build <= RATIO * predicted and predicted <= 4 * build, (build, predicted)


@pytest.mark.parametrize("name", ["moba", "nsa"])
def test_a_decode_step_does_not_copy_the_cache(name):
    """The selection engine padded the whole keys to a whole number of blocks whenever the
    length was not one (a decode step over a cache almost always): every token copied the cache
    (546 MB and 179 ms a step for MoBA at n = 65536 with llama3_8b's heads; 17 MB and 8 ms
    after). A step's peak is a small part of the cache it reads."""
    att = variants.build(name)
    n = 4100  # not a whole number of blocks
    q, k, v = make_inputs(Shape(1, 4, n + 1, 64, kv_heads=2), torch.float32, "cpu")
    with torch.no_grad():
        state = att.decode_init(k[:, :, :n], v[:, :, :n], heads=4)
        new = (q[:, :, n:], k[:, :, n:], v[:, :, n:])
        step = peak_memory(lambda: att.decode_step(*new, state)[0])
    cache = 2 * 2 * n * 64 * 4
    assert step < cache / 2, (step, cache)  # a copy of k and v is the whole cache
