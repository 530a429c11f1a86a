"""What a point is before it runs: its identity (`point_id`), its predicted peak
(`predicted_bytes`) and the one decision of what it becomes (`decide`: unsupported, skipped or
run), taken by the job and `plan` alike."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass

import torch

from attnbench import variants
from attnbench.harness.run.config import RunConfig, default_max_memory, resolve_device
from attnbench.variants.base import Shape, Variant


@dataclass(frozen=True)
class Decision:
    """What a point becomes before anything is measured: `run`, `unsupported` (the variant's own
    reasons) or `skipped` (its predicted peak above the cap); `predicted` in bytes (-1: not
    predicted, for an unsupported point)."""

    outcome: str
    reason: str
    predicted: int
    cap: int


def decide(att: Variant, run: RunConfig) -> Decision:
    """Support first, then the predicted peak against `max_memory` (0: the device's default)."""
    device = resolve_device(run.device)
    reasons = att.not_supported_reasons(run.shape, run.torch_dtype, device, run.causal, run.mode)
    cap = run.max_memory or default_max_memory(device)
    if reasons:
        return Decision("unsupported", "; ".join(reasons), -1, cap)
    predicted = predicted_bytes(att, run.shape, run.torch_dtype, run)
    if predicted > cap:
        return Decision("skipped", f"predicted peak {predicted / 2**30:.2f} GiB > max_memory "
                                   f"{cap / 2**30:.2f} GiB", predicted, cap)
    return Decision("run", "", predicted, cap)


def point_id(run: RunConfig) -> str:
    """A stable id of what a point measures: a hash of the validated, normalised config (decode
    is causal: `from_dictconfig` says so before any id is taken), seed included, with the
    variant's parameters completed by their defaults (``variant=local`` and
    ``variant=local variant.window=256`` are one point), less what does not change what is
    measured (timing, error, max_memory, resume, threads, isolate, the model preset's name).
    It names the point's folder. Computed once per point and process (`_identity`)."""
    return _identity(_config_blob(run))[1]


def point_label(run: RunConfig) -> str:
    """The point's variant label (`local[w=64]`); its variant name if it does not build."""
    return _identity(_config_blob(run))[0]


ID_SKIPS = ("timing", "error", "max_memory", "resume", "threads", "isolate", "model")


def _config_blob(run: RunConfig) -> str:
    d = {k: v for k, v in run.__dict__.items() if k not in ID_SKIPS}
    return json.dumps(d, sort_keys=True, default=str)


@functools.lru_cache(maxsize=1024)
def _identity(blob: str) -> tuple[str, str]:
    """(label, id) of a config: the variant is built once here, not once per caller (the
    folder resolver, the resume check, the record)."""
    d = json.loads(blob)
    label = d["variant"]
    with contextlib.suppress(Exception):  # a point that fails to build: params as written
        att = variants.build(d["variant"], **d["params"])
        d["params"], label = _old_names(att), att.label
    full = json.dumps(d, sort_keys=True, default=str)
    return label, hashlib.sha256(full.encode()).hexdigest()[:16]


def _old_names(att: Variant) -> dict:
    """The variant's parameters, a renamed one (`Variant.renamed`) under its old name: a point
    keeps its id, and so its folder, across the rename (strided's window_blocks hashes as
    `window`, as before it was renamed)."""
    old = {new: name for name, (new, _) in type(att).renamed.items()}
    return {old.get(k, k): v for k, v in att.params().items()}


def predicted_bytes(att: Variant, shape: Shape, dtype: torch.dtype, run: RunConfig) -> int:
    """Predicted peak of one measured call, inputs included. Forward and backward: the model's
    own (`memory_bytes(..., grad=True)`, where it takes `grad`), else 3× the forward's."""
    inputs = input_bytes(shape, dtype)
    device = resolve_device(run.device)
    if run.mode == "decode":  # the state of the context and one step
        return int(inputs + on_device(att.decode_memory_bytes, device)(shape, dtype))
    model = on_device(att.memory_bytes, device)
    if run.mode != "fwd_bwd":
        return int(inputs + model(shape, dtype, run.causal))
    if "grad" in inspect.signature(model).parameters:  # the model of forward and backward
        work = model(shape, dtype, run.causal, grad=True)
    else:  # what the backward keeps and makes: about twice the forward's working set
        work = 3 * model(shape, dtype, run.causal)
    return int(inputs + work + 2 * inputs)  # + the gradients of q, k, v and of the output


def input_bytes(shape: Shape, dtype: torch.dtype) -> int:
    """Bytes of a point's q (B, H, Nq, D) and k, v (B, Hkv, N, D)."""
    el = torch.empty((), dtype=dtype).element_size()
    return (shape.heads * shape.nq + 2 * shape.hkv * shape.seq_len) * shape.batch * \
        shape.head_dim * el


def on_device(model: Callable, device: str) -> Callable:
    """A variant's model (`flops`, `backward_flops`, `memory_bytes`) for `device`: models whose
    GPU path differs (padded block buckets) take an optional `device`; the base contract's
    models do not, and are called as they are."""
    if "device" in inspect.signature(model).parameters:
        return functools.partial(model, device=device)
    return model
