"""`attnbench capture`: record the q, k, v that a Hugging Face causal LM's attention receives
(after RoPE, before grouped k/v heads are repeated) while it reads a text, into a safetensors
file that `inputs=file:PATH` replays (format: harness/run/replay.py).

The record is taken at the attention function itself: transformers models call it through
`ALL_ATTENTION_FUNCTIONS` (transformers/modeling_utils.py) with the model's own rotary
embedding already applied (`apply_rotary_pos_emb` in e.g. models/llama/modeling_llama.py), so
the capture is what the model computed, whatever its RoPE variant or q/k norms. Nothing is
downloaded: models load with `local_files_only`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import torch

from attnbench.harness.run.replay import FORMAT, parse_int_list, tensor_name

NEEDS = ("transformers", "safetensors")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
HELP_EPILOG = """\
examples:
  attnbench capture ~/models/llama-3.2-1b book.txt -o llama.safetensors --layers 0+8+15
  attnbench capture HuggingFaceTB/SmolLM2-360M notes.txt -o smol.safetensors --tokens 4096
  attnbench -m variant=full,local inputs=file:llama.safetensors@layers:8 seq_len=1024,2048

MODEL is a local model folder, a .gguf file, or a model id already in the local Hugging Face
cache: nothing is downloaded. Needs the `real` extra (transformers, safetensors; gguf and
accelerate for .gguf files). The file holds, per layer L, layers.L.q (1, H, N, D) and
layers.L.k, layers.L.v (1, Hkv, N, D) in --dtype, and in its metadata the model, the layers,
the head layout, the model's softmax scale and the text's name, sha256 and length."""


def fail(message: str) -> NoReturn:
    """One line, exit 2 (as config.fail, which this module cannot import: config checks inputs,
    whose real sample captures through this module)."""
    print(f"attnbench: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def missing_packages(names: tuple[str, ...] = NEEDS) -> list[str]:
    return [m for m in names if importlib.util.find_spec(m) is None]


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load(source: str):
    """(model, tokenizer) from a local folder, a .gguf file or a model id in the local cache;
    float32, eval mode, SDPA attention (whose function the capture wraps). Raises ValueError
    (one line) when there is no such model here."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: local_files_only below
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    path = Path(source).expanduser()
    kw: dict = {"local_files_only": True}
    where = source
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ValueError(f"{source}: no such file")
        where, kw["gguf_file"] = str(path.parent), path.name
    elif path.exists():
        where = str(path)
    try:
        tok = AutoTokenizer.from_pretrained(where, **kw)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32,
                                                     attn_implementation="sdpa", **kw)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{source}: not a causal LM in a local folder, a .gguf file or the "
                         f"local Hugging Face cache ({first})") from None
    return model.eval(), tok


@contextlib.contextmanager
def recording(model, layers: tuple[int, ...]) -> Iterator[dict]:
    """While active, the model's attention function records (q, k, v, scaling) of `layers`
    into the yielded dict, keyed by layer index, then runs as before."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    impl = model.config._attn_implementation
    if impl not in ALL_ATTENTION_FUNCTIONS:  # eager is called directly, not through the table
        model.set_attn_implementation("sdpa")
        impl = model.config._attn_implementation
    inner = ALL_ATTENTION_FUNCTIONS[impl]
    had_local = impl in ALL_ATTENTION_FUNCTIONS._local_mapping
    previous = ALL_ATTENTION_FUNCTIONS._local_mapping.get(impl)
    got: dict[int, tuple] = {}

    def record(module, query, key, value, *args, **kwargs):
        layer = getattr(module, "layer_idx", None)
        if layer in layers:
            scaling = kwargs.get("scaling") or getattr(module, "scaling", None) or \
                query.shape[-1] ** -0.5
            got[layer] = (query.detach().clone(), key.detach().clone(),
                          value.detach().clone(), float(scaling))
        return inner(module, query, key, value, *args, **kwargs)

    ALL_ATTENTION_FUNCTIONS[impl] = record
    try:
        yield got
    finally:
        if had_local:
            ALL_ATTENTION_FUNCTIONS[impl] = previous
        else:
            del ALL_ATTENTION_FUNCTIONS[impl]


def capture(model, input_ids: torch.Tensor, layers: tuple[int, ...]) -> dict[int, tuple]:
    """{layer: (q (1, H, N, D), k (1, Hkv, N, D), v (1, Hkv, N, D), scaling)} of one forward
    pass over `input_ids` (1, N), without a KV cache."""
    with recording(model, layers) as got, torch.no_grad():
        model(input_ids=input_ids, use_cache=False)
    missing = [layer for layer in layers if layer not in got]
    if missing:
        raise ValueError(f"layers {missing} were not seen: this model's attention does not go "
                         f"through transformers' attention functions")
    return got


def tokenize(tok, text: str, tokens: int = 0) -> torch.Tensor:
    """(1, N) token ids of `text` with the tokenizer's own special tokens; the first `tokens`
    of them when tokens > 0."""
    ids = tok(text, return_tensors="pt").input_ids
    return ids[:, :tokens] if tokens else ids


def save(path: str | Path, got: dict[int, tuple], meta: dict[str, str],
         dtype: torch.dtype = torch.float32) -> None:
    """Write a capture atomically (a partial file never has the final name)."""
    from safetensors.torch import save_file

    layers = sorted(got)
    q, k = got[layers[0]][0], got[layers[0]][1]
    scalings = {got[layer][3] for layer in layers}
    tensors = {tensor_name(layer, x): t.to(dtype).contiguous()
               for layer in layers for x, t in zip("qkv", got[layer][:3], strict=True)}
    meta = {**meta, "format": FORMAT, "layers": ",".join(map(str, layers)),
            "heads": str(q.shape[1]), "kv_heads": str(k.shape[1]),
            "head_dim": str(q.shape[-1]), "positions": str(q.shape[2]),
            "scaling": repr(scalings.pop()) if len(scalings) == 1 else "mixed",
            "dtype": str(dtype).removeprefix("torch.")}
    if meta["scaling"] == "mixed":
        raise ValueError("layers with different softmax scales: capture them one at a time")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, out)


def describe(model, source: str, text_name: str, text: str, n_tokens: int) -> dict[str, str]:
    """Metadata of a capture: what model read what."""
    import transformers

    meta = {"model": source, "model_type": str(getattr(model.config, "model_type", "")),
            "text": text_name, "text_sha256": hashlib.sha256(text.encode()).hexdigest(),
            "text_chars": str(len(text)), "tokens": str(n_tokens), "causal": "true",
            "transformers": transformers.__version__}
    if Path(source).is_file():
        meta["model_sha256"] = sha256_file(source)
    return meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="attnbench capture", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Record the post-RoPE q, k, v of chosen layers of a causal LM reading a "
                    "text, for inputs=file:OUT.",
        epilog=HELP_EPILOG)
    p.add_argument("model", metavar="MODEL", help="local folder, .gguf file or cached model id")
    p.add_argument("text", metavar="TEXT", type=Path, help="a UTF-8 text file")
    p.add_argument("-o", "--out", type=Path, required=True, help="the .safetensors to write")
    p.add_argument("--layers", default="all", help="3, 0-5, 2+9+17 or all (default: all)")
    p.add_argument("--tokens", type=int, default=0,
                   help="the first N tokens of TEXT (default: all, up to the model's context)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32",
                   help="storage dtype (default float32: the values as computed)")
    args = p.parse_args(argv)
    if not args.text.is_file():
        fail(f"TEXT {str(args.text)!r}: no such file")
    if args.tokens < 0:
        fail(f"--tokens {args.tokens}: must be 0 (all) or positive")
    try:
        layers = None if args.layers == "all" else parse_int_list(args.layers)
    except ValueError as exc:
        fail(f"--layers {exc}")
    missing = missing_packages(NEEDS + (("gguf",) if args.model.endswith(".gguf") else ()))
    if missing:
        fail(f"capture needs the optional `real` extra; missing here: {', '.join(missing)} "
             f"(pip install 'attnbench[real]' or make setup EXTRAS=test,real)")
    try:
        text = args.text.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"TEXT {str(args.text)!r}: cannot read it as UTF-8 ({exc})")
    try:
        model, tok = load(args.model)
    except ValueError as exc:
        fail(f"MODEL {exc}")
    count = model.config.num_hidden_layers
    layers = tuple(range(count)) if layers is None else layers
    bad = [layer for layer in layers if layer >= count]
    if bad:
        fail(f"--layers {args.layers}: the model has layers 0-{count - 1}")
    ids = tokenize(tok, text)
    context = int(getattr(model.config, "max_position_embeddings", 0) or ids.shape[1])
    n = args.tokens or min(ids.shape[1], context)
    if n > ids.shape[1]:
        fail(f"--tokens {n}: TEXT has only {ids.shape[1]} tokens")
    if n > context:
        print(f"attnbench: warning: --tokens {n} is beyond the model's context ({context})",
              file=sys.stderr)
    try:
        got = capture(model, ids[:, :n], layers)
        save(args.out, got, describe(model, args.model, args.text.name, text, n),
             DTYPES[args.dtype])
    except ValueError as exc:
        fail(f"MODEL {args.model!r}: {exc}")
    q, k = got[layers[0]][0], got[layers[0]][1]
    size = args.out.stat().st_size
    print(f"wrote {args.out}: {args.model}, layers {args.layers}, {n} tokens, heads "
          f"{q.shape[1]}/{k.shape[1]} (query/kv), head_dim {q.shape[-1]}, "
          f"{math.ceil(size / 2**20)} MiB")
    return 0
