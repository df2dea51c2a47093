"""What every format module checks the same way before a byte of weights is used: the keys,
the shapes, the tokenizer against the embedding, finite values; and the empty model on the
meta device that the weights are assigned into; and RopeExplanation, what a checkpoint's RoPE
computes, for `python -m yarn_minimal rope --config`."""
from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..files import CheckpointError, check_zip_crcs
from ..model import ModelArgs, Transformer
from ..rope import RopeConfig, effective_scale, frequencies, is_int, is_number
from ..tokenizer import Tokenizer, open_tokenizer


# What a config key may hold, by the words an error uses for it. JSON can also hold NaN,
# Infinity, strings and nulls where a number belongs: each is named with its file and key.
EXPECTED = {
    "a positive integer": lambda v: is_int(v) and v > 0,
    "a positive integer (or -1: the tokenizer's size)": lambda v: is_int(v) and (v > 0 or v == -1),
    "a positive number": lambda v: is_number(v) and v > 0,
    "true or false": lambda v: isinstance(v, bool),
    "a string": lambda v: isinstance(v, str),
    "a JSON object": lambda v: isinstance(v, dict),
}
REQUIRED = object()


def check_key(value, key: str, expected: str, source: Path):
    """value (a config's `key`) if it is `expected` (an EXPECTED entry), else a CheckpointError
    naming the file, the key, what was expected and what was found."""
    if not EXPECTED[expected](value):
        raise CheckpointError(f"{source}: {key} is {json_text(value)}; expected {expected}")
    return value


def read_key(cfg: dict, key: str, expected: str, source: Path, default=REQUIRED):
    """cfg[key], checked (check_key); `default` when it is absent or null, unless it is required."""
    if cfg.get(key) is None:
        if default is REQUIRED:
            raise CheckpointError(f"{source}: no {key!r}" if key not in cfg else f"{source}: {key} is null; expected {expected}")
        return default
    return check_key(cfg[key], key, expected, source)


def json_text(value) -> str:
    """A value as the config file spells it (null, true, "big", NaN), shortened."""
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def torch_load(path: Path) -> dict:
    """A consolidated.*.pth or pytorch_model.bin, memory-mapped. A legacy (pre-zip) file cannot be
    memory-mapped and carries no checksums: it is read whole, and torch.load decides."""
    check_zip_crcs(path)
    try:
        state = torch.load(path, map_location="cpu", mmap=zipfile.is_zipfile(path), weights_only=True)
    except Exception as e:  # truncated zip, pickle error, code the pickle would run, ...
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint ({type(e).__name__}: {first_line(e)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    return state


def read_tokenizer(folder: Path) -> Tokenizer:
    try:
        return open_tokenizer(folder)
    except (ValueError, FileNotFoundError) as e:
        raise CheckpointError(str(e)) from None


PARAMS_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
                 "norm_eps", "sliding_window")  # the ModelArgs fields a params.json holds


def model_args(params: dict, rope: Optional[RopeConfig], source: Path, tied: bool = False) -> ModelArgs:
    """ModelArgs from a params.json-shaped dict (every format builds one; a null value is the
    field's default). Without a rope, a rope_theta there (Code Llama) sets the base. tied: the
    file stores one tensor for the embedding and the output (no params.json key says so)."""
    kwargs = {k: v for k, v in params.items() if k in PARAMS_FIELDS and v is not None}
    try:
        if rope is None:
            rope = RopeConfig(base=float(params.get("rope_theta") or 10000.0))
        return ModelArgs(**kwargs, rope=rope, tie_word_embeddings=tied)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: {e}") from None


def empty_model(args: ModelArgs) -> Transformer:
    with torch.device("meta"):  # parameters without storage: nothing is allocated twice
        return Transformer(args)


def assign_weights(model: Transformer, state: dict[str, torch.Tensor]) -> None:
    """The loaded tensors become the model's parameters (no copy). load_state_dict gives each key
    its own Parameter, so a tied output is pointed at the embedding's again: one tensor, not two."""
    model.load_state_dict(state, assign=True, strict=True)
    if model.args.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight


def check_tokenizer(tokenizer: Tokenizer, args: ModelArgs, source: Path) -> None:
    """Every id the tokenizer can produce needs an embedding row. More rows than ids is fine and
    common (embeddings padded to a multiple of 64 or 128 for speed); fewer is an error, since
    those tokens would index past the embedding."""
    top = max([tokenizer.max_id(), *(i for i in (tokenizer.bos_id, *tokenizer.eos_ids) if i is not None)])
    if top >= args.vocab_size:
        raise CheckpointError(f"{tokenizer.path}: tokenizer has ids up to {top} ({tokenizer.vocab_size} pieces), "
                              f"but {source} gives the model's embedding {args.vocab_size} rows; "
                              f"expected at least {top + 1}")


def check_sliding_window(args: ModelArgs, rope: Optional[RopeConfig], source: Path) -> None:
    """A RopeConfig asked for at load time states the context the user means to run; with a
    sliding window shorter than it, this model (full attention only) would compute something
    the checkpoint was never trained for. Longer inputs are refused again in the forward pass."""
    if args.sliding_window is not None and rope is not None and rope.window is not None \
            and rope.window > args.sliding_window:
        raise CheckpointError(f"{source}: sliding_window is {args.sliding_window}, shorter than the requested "
                              f"context {rope.window} ({rope.describe()}); this model has no sliding-window "
                              "attention, so it runs at most sliding_window tokens")


def check_keys(found: set, expected: set, source: str, ignored: str = "") -> None:
    """Missing or unexpected keys are errors: never a silently random weight."""
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        show = lambda keys: f"{keys[:5]}{f' and {len(keys) - 5} more' if len(keys) > 5 else ''}"
        raise CheckpointError(f"{source}: keys do not match the model"
                              + (f"; missing {show(missing)}" if missing else "")
                              + (f"; unexpected {show(unexpected)}" if unexpected else "") + ignored)


def check_shape(key: str, found, expected, source: str, note: str = "") -> None:
    if tuple(found) != tuple(expected):
        raise CheckpointError(f"{source}: tensor {key} has shape {tuple(found)}, expected {tuple(expected)}{note}")


def check_finite(key: str, tensor: torch.Tensor, path) -> None:
    """NaN or inf in a weight is a corrupt file (random bytes decode to them), never a model.
    A sum is one fast pass with no temporary; a non-finite sum is then confirmed element-wise
    (a float16 sum can overflow where no element does)."""
    if not tensor.is_floating_point() or bool(torch.isfinite(tensor.sum())):
        return
    bad = (~torch.isfinite(tensor)).sum().item()
    if bad:
        raise CheckpointError(f"{path}: tensor {key} holds {bad} NaN/inf values of {tensor.numel()}; "
                              "the file is corrupt")


# ---------------------------------------------------------------------------------------
# What a checkpoint's RoPE computes, for `python -m yarn_minimal rope --config`
# ---------------------------------------------------------------------------------------

@dataclass
class RopeExplanation:
    """A config's RoPE at one length, as the command prints it: the frequencies h(theta_d), the
    factor on cos and sin, and each value with the key it came from. `rope` is the paper's form
    (a RopeConfig) where there is one; LongRoPE has none. softmax_factor: what the model's
    attention multiplies its softmax scale 1/sqrt(d) by besides (DeepSeek's mscale^2)."""
    title: str
    head_dim: int
    scale: float                    # s at this length
    inv_freq: torch.Tensor          # h(theta_d), d = 0..head_dim/2 - 1, float64
    attention_factor: float         # sqrt(1/t), on cos and sin
    rows: list[tuple[str, str, str]]  # (what, value, from: key)
    notes: list[str] = field(default_factory=list)
    rope: Optional[RopeConfig] = None
    softmax_factor: float = 1.0
    window: Optional[int] = None

    def as_json(self) -> dict:
        return {"inv_freq": self.inv_freq.tolist(), "attention_factor": self.attention_factor, "scale": self.scale,
                "softmax_factor": self.softmax_factor, "head_dim": self.head_dim, "window": self.window}


def explain_rope(rope: RopeConfig, head_dim: int, provenance: dict[str, str], notes: list[str],
                 seq_len: Optional[int], title: str = "") -> RopeExplanation:
    """The explanation of a RopeConfig read from a file: the per-key rows of `rope --config`."""
    src = lambda name: provenance.get(name, "default")
    s = effective_scale(rope, seq_len or 0)
    inv_freq, factor = frequencies(rope, head_dim, s)
    rows = [("method", f"{rope.method}{' (dynamic)' if rope.dynamic else ''}", src("method")),
            ("s (scale)", f"{rope.scale:g}", src("scale")),
            ("L (original_length)", f"{rope.original_length}", src("original_length")),
            ("b (base)", f"{rope.base:g}", src("base")),
            ("|D| (head_dim)", f"{head_dim}", provenance.get("head_dim", "dim / n_heads"))]
    if rope.method in ("ntk-by-parts", "yarn"):
        rows += [("alpha", f"{rope.alpha:g}", src("alpha")), ("beta", f"{rope.beta:g}", src("beta")),
                 ("ramp", rope.ramp + ("" if rope.truncate or rope.ramp == "paper" else ", correction dims not rounded"),
                  src("truncate") if not rope.truncate else src("ramp"))]
    if rope.method == "yarn":
        how = ("mscale ratio" if "mscale" in src("attention_factor") else f"attention_factor {rope.attention_factor:g}"
               if rope.attention_factor is not None else f"Eq. 22: {rope.attention_coefficient:g} ln(s) + 1")
        rows.append(("sqrt(1/t)", f"{factor:.4f} ({how})", src("attention_factor") if rope.attention_factor is not None
                     else src("attention_coefficient")))
    else:
        rows.append(("sqrt(1/t)", "1 (no temperature)", "method"))
    if rope.window is None:
        rows.append(("intended window", "none: s follows the length (Dynamic Scaling)", "derived"))
    elif rope.extended_length is not None:
        rows.append(("intended window", f"{rope.window} (stated; L x s = {int(round(rope.original_length * rope.scale))})",
                     src("extended_length")))
    else:
        rows.append(("intended window", f"{rope.window} (L x s)", "derived"))
    return RopeExplanation(title or rope.describe(), head_dim, s, inv_freq, factor, rows, list(notes), rope,
                           window=rope.window)
