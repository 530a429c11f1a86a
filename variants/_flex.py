"""FlexAttention helpers shared by the variants that offer a flex impl (full, local, sparse).

One compiled `flex_attention` for the whole process, so each shape and mask compiles once,
whichever variant asks (https://pytorch.org/blog/flexattention/).
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def compiled_flex():
    """`torch.compile(flex_attention)`; its first call per shape/mask compiles (tens of seconds
    on CPU), which the runner reports as setup time."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_reasons(device: torch.device | str, mode: str) -> list[str]:
    """Why a flex impl can't run this point: FlexAttention has no backward on CPU."""
    if mode == "fwd_bwd" and torch.device(device).type != "cuda":
        return ["flex: FlexAttention has no backward on CPU"]
    return []
