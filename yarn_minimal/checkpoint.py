"""Checkpoint files in and out. The only module that knows file formats.

`load(folder)` reads three layouts and tells them apart by their files:

1. Meta's raw Llama 2 download
       params.json                     dim, n_layers, n_heads, n_kv_heads, multiple_of, ...
       consolidated.00.pth ... .NN.pth one file per model-parallel rank (7B: 1, 13B: 2, 70B: 8)
       tokenizer.model                 in the folder or its parent (Meta's download has it there)
2. A Hugging Face Llama or Mistral folder
       config.json                     LlamaConfig / MistralConfig, incl. rope_scaling (v4) /
                                       rope_parameters (v5); every key read: docs/checkpoints.md
       model.safetensors, or model-0000X-of-0000N.safetensors + model.safetensors.index.json
       (pytorch_model*.bin only where there is no safetensors file)
       tokenizer.model (sentencepiece) or tokenizer.json (Hugging Face `tokenizers`), with
       BOS/EOS from tokenizer_config.json / generation_config.json (tokenizer.open_tokenizer)
3. The project's own layout (what `save(format="meta")` and fine-tuning write): Meta's layout
   with one shard plus rope.json, the RopeConfig the model was fine-tuned with. rope.json sits
   beside params.json rather than inside it so that Meta's loader, which passes every
   params.json key to its ModelArgs, still reads the folder.

Memory: the model is built on the meta device (no storage), checkpoint files are opened with
mmap / safetensors' lazy reader, every key and shape is checked before a byte of weights is
copied, and tensors are then converted one by one into the requested dtype and device and
assigned (not copied into a second, randomly initialised model). A one-shard Meta checkpoint
in its stored dtype is used straight from the page cache.

`save(model, tokenizer, folder, format="meta" | "hf")` writes either layout; every file goes
to a temporary name first and is renamed into place.

    python -m yarn_minimal.checkpoint convert SRC DST --format hf
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm import tqdm

from .model import ModelArgs, Transformer
from .rope import RopeConfig, frequencies, ntk_aware_base, yarn_attention_factor
from .tokenizer import HFTokenizer, Tokenizer, open_tokenizer


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the file and the problem."""


# ---------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------

def _open_tokenizer(folder: Path) -> Tokenizer:
    try:
        return open_tokenizer(folder)
    except (ValueError, FileNotFoundError) as e:
        raise CheckpointError(str(e)) from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _torch_load(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint (RuntimeError: {e})") from None
        state = None  # a legacy (pre-zip) file cannot be memory-mapped: read it whole
    except Exception as e:  # truncated zip, pickle error, ...
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint ({type(e).__name__}: {e})") from None
    if state is None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    return state


def _check_tokenizer(tokenizer: Tokenizer, args: ModelArgs, source: Path) -> None:
    """Every id the tokenizer can produce needs an embedding row. More rows than ids is fine and
    common (embeddings padded to a multiple of 64 or 128 for speed); fewer is an error, since
    those tokens would index past the embedding."""
    top = max([tokenizer.max_id(), *(i for i in (tokenizer.bos_id, *tokenizer.eos_ids) if i is not None)])
    if top >= args.vocab_size:
        raise CheckpointError(f"{tokenizer.path}: tokenizer has ids up to {top} ({tokenizer.vocab_size} pieces), "
                              f"but {source} gives the model's embedding {args.vocab_size} rows; "
                              f"expected at least {top + 1}")


def _check_sliding_window(args: ModelArgs, rope: Optional[RopeConfig], source: Path) -> None:
    """A RopeConfig asked for at load time states the context the user means to run; with a
    sliding window shorter than it, this model (full attention only) would compute something
    the checkpoint was never trained for. Longer inputs are refused again in the forward pass."""
    if args.sliding_window is not None and rope is not None and rope.window is not None \
            and rope.window > args.sliding_window:
        raise CheckpointError(f"{source}: sliding_window is {args.sliding_window}, shorter than the requested "
                              f"context {rope.window} ({rope.describe()}); this model has no sliding-window "
                              "attention, so it runs at most sliding_window tokens")


def _check_keys(found: set, expected: set, source: str, ignored: str = "") -> None:
    """Missing or unexpected keys are errors: never a silently random weight."""
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        show = lambda keys: f"{keys[:5]}{f' and {len(keys) - 5} more' if len(keys) > 5 else ''}"
        raise CheckpointError(f"{source}: keys do not match the model"
                              + (f"; missing {show(missing)}" if missing else "")
                              + (f"; unexpected {show(unexpected)}" if unexpected else "") + ignored)


def _check_shape(key: str, found, expected, source: str, note: str = "") -> None:
    if tuple(found) != tuple(expected):
        raise CheckpointError(f"{source}: tensor {key} has shape {tuple(found)}, expected {tuple(expected)}{note}")


def _empty_model(args: ModelArgs) -> Transformer:
    with torch.device("meta"):  # parameters without storage: nothing is allocated twice
        return Transformer(args)


def _model_args(params: dict, rope: Optional[RopeConfig], source: Path) -> ModelArgs:
    try:
        return ModelArgs.from_params(params, rope=rope)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: {e}") from None


# ---------------------------------------------------------------------------------------
# 1 and 3: Meta's layout (and ours, which adds rope.json)
# ---------------------------------------------------------------------------------------

# Model-parallel split dimension of each weight in Meta's consolidated.NN.pth files
# (ColumnParallelLinear: output rows; RowParallelLinear: input columns; the embedding is split
# along the model dimension). Keys not listed (the RMSNorm weights) are replicated.
SHARD_DIM = {"tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "wo": 1, "w2": 1}


def shard_dim(key: str) -> Optional[int]:
    return SHARD_DIM.get(key.split(".")[-2])


def _merge(parts: list[torch.Tensor], dim: Optional[int], dtype, device) -> torch.Tensor:
    """One full tensor from its model-parallel parts, written straight into the target dtype."""
    if dim is None or len(parts) == 1:
        return parts[0].to(device=device, dtype=dtype)
    shape = list(parts[0].shape)
    shape[dim] *= len(parts)
    out = torch.empty(shape, dtype=dtype, device=device)
    for i, part in enumerate(parts):
        out.narrow(dim, i * part.shape[dim], part.shape[dim]).copy_(part)
    return out


def load_meta(folder: Path, rope: Optional[RopeConfig], device, dtype, progress=False) -> tuple[Transformer, Tokenizer]:
    params_path = folder / "params.json"
    params = _read_json(params_path)
    tokenizer = _open_tokenizer(folder)
    if params.get("vocab_size", -1) == -1:
        params["vocab_size"] = tokenizer.vocab_size
    if params.get("norm_eps") == 1e-6:
        warnings.warn(f"{params_path}: norm_eps is 1e-6; Llama 2 uses 1e-5 (an early download shipped 1e-6 "
                      "by mistake, meta-llama/llama issue 771)")
    asked = rope
    if rope is None:
        rope = _project_rope(folder)
    args = _model_args(params, rope, params_path)
    _check_tokenizer(tokenizer, args, params_path)
    _check_sliding_window(args, asked, params_path)

    paths = sorted(folder.glob("consolidated.*.pth"))
    if not paths:
        raise CheckpointError(f"{folder}: no consolidated.*.pth weight files beside params.json")
    n = len(paths)
    for name, heads in (("n_heads", args.n_heads), ("n_kv_heads", args.n_kv_heads)):
        if heads % n:
            raise CheckpointError(f"{folder}: {n} consolidated.*.pth shards, but {params_path} has {name} = {heads}, "
                                  f"which {n} does not divide (model-parallel shards split the heads evenly)")

    model = _empty_model(args)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    shards = []
    for path in paths:
        state = _torch_load(path)
        state.pop("rope.freqs", None)  # a precomputed table some downloads carry; we make our own
        _check_keys(set(state), set(expected), str(path))
        for key, full in expected.items():
            dim, part = shard_dim(key), list(full)
            if dim is not None:
                if full[dim] % n:
                    raise CheckpointError(f"{folder}: {n} shards cannot split {key} of shape {full} along dim {dim}")
                part[dim] //= n
            _check_shape(key, state[key].shape, part, str(path),
                         f" (1/{n} of {full} along dim {dim})" if dim is not None and n > 1 else "")
        shards.append(state)

    merged = {}
    for key in tqdm(expected, desc=f"merging {n} shard(s)", unit="tensor", disable=not progress):
        # tensor by tensor, dropping each shard's reference as we go
        merged[key] = _merge([state.pop(key) for state in shards], shard_dim(key), dtype, device)
    model.load_state_dict(merged, assign=True, strict=True)
    return model, tokenizer


# ---------------------------------------------------------------------------------------
# 2: Hugging Face layout
# ---------------------------------------------------------------------------------------

def hf_key(meta_key: str) -> str:
    """Meta's key name -> HF LlamaForCausalLM's."""
    top = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
    if meta_key in top:
        return top[meta_key]
    _, layer, rest = meta_key.split(".", 2)
    rest = {"attention.wq.weight": "self_attn.q_proj.weight", "attention.wk.weight": "self_attn.k_proj.weight",
            "attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
            "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w2.weight": "mlp.down_proj.weight",
            "feed_forward.w3.weight": "mlp.up_proj.weight", "attention_norm.weight": "input_layernorm.weight",
            "ffn_norm.weight": "post_attention_layernorm.weight"}[rest]
    return f"model.layers.{layer}.{rest}"


def permute_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta rotates interleaved pairs (2i, 2i+1) of each head; HF rotates halves (i, i + D/2).
    Reorder the rows of wq / wk so that HF's rotation gives the same q.k (HF's converter)."""
    out_dim, in_dim = w.shape
    head_dim = out_dim // n_heads
    return w.view(n_heads, head_dim // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def permute_from_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of permute_to_hf: HF's split-half rows back to Meta's interleaved pairs."""
    out_dim, in_dim = w.shape
    head_dim = out_dim // n_heads
    return w.view(n_heads, 2, head_dim // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def _heads_of(meta_key: str, args: ModelArgs) -> Optional[int]:
    """n_heads for wq, n_kv_heads for wk: the rows HF permutes. None for every other key."""
    if meta_key.endswith("attention.wq.weight"):
        return args.n_heads
    if meta_key.endswith("attention.wk.weight"):
        return args.n_kv_heads
    return None


# The released Yarn-Mistral checkpoints (NousResearch/Yarn-Mistral-7b-64k, -128k) run the authors'
# remote code, which their config.json names in auto_map. That code hard-codes constants that
# differ from Llama's 32 / 1 / 0.1 and that the config does not carry: jquesnelle/yarn,
# scaled_rope/modeling_mistral_yarn.py, `MistralYaRNScaledRotaryEmbedding.__init__` defaults
# beta_fast=128, beta_slow=2 (its `_init_rope` passes neither) and `_yarn_get_mscale`:
# sqrt(1/t) = 0.07 ln(s) + 1.
YARN_MISTRAL_CODE = "modeling_mistral_yarn"
YARN_MISTRAL_CONSTANTS = {"beta": 128.0, "alpha": 2.0, "attention_coefficient": 0.07}

# max_position_embeddings when config.json omits it: LlamaConfig's and MistralConfig's defaults
DEFAULT_MAX_POSITIONS = {"llama": 2048, "mistral": 4096 * 32}


def _remote_code(cfg: dict) -> Optional[str]:
    """The auto_map entry that points at the authors' Yarn-Mistral code, if any."""
    for ref in (cfg.get("auto_map") or {}).values():
        if YARN_MISTRAL_CODE in str(ref):
            return str(ref)
    return None


def rope_from_hf(cfg: dict, source: Path) -> tuple[RopeConfig, dict[str, str], list[str]]:
    """RopeConfig from a config.json's rope_scaling (transformers v4) or rope_parameters (v5),
    with where each value came from (RopeConfig field -> config key, or "default") and the
    ambiguities worth a reader's attention (defaults used, a factor that disagrees with
    max_position_embeddings / original_max_position_embeddings, constants that live in remote
    code). The loader and `python -m yarn_minimal.rope --config` both read configs with it.

    default -> plain RoPE, L = max_position_embeddings.
    linear  -> PI (Eq. 10), s = factor.
    dynamic -> Dynamic NTK-aware (Sec. 3.1 + 3.3) with L = max_position_embeddings. HF computes
               b' = b (a l/L - (a - 1))^(D/(D-2)) with its factor a; for a = 1 that is the
               paper's s = max(1, l/L). For a != 1 there is no RopeConfig equivalent, so we stop
               and ask for an explicit rope= rather than silently change the model.
    yarn    -> YaRN (Eq. 17-22) with the public code's ramp: alpha = beta_slow, beta = beta_fast,
               L = original_max_position_embeddings, s = factor (default max_position_embeddings/L,
               as transformers), sqrt(1/t) = attention_factor, or HF's 0.1 mscale ln(s) + 1 over
               0.1 mscale_all_dim ln(s) + 1 when both are set, or else Eq. 22.
               The released Yarn-Llama-2 configs add "finetuned": true; it only matters to the
               authors' dynamic variant, so a static "yarn" accepts and ignores it.
               Yarn-Mistral (auto_map -> modeling_mistral_yarn): the remote code's 128 / 2 / 0.07
               (YARN_MISTRAL_CONSTANTS) wherever the config itself says nothing.
    llama3  -> Llama 3.1's NTK-by-parts: Eq. 17-20 with the paper's ramp (Eq. 18, linear in
               r = L/lambda), alpha = low_freq_factor, beta = high_freq_factor,
               L = original_max_position_embeddings, s = factor, no temperature. transformers
               keeps theta where lambda < L/high_freq_factor (r > beta: gamma = 1), uses
               theta/factor where lambda > L/low_freq_factor (r < alpha: gamma = 0) and blends
               with smooth = (L/lambda - low)/(high - low) = gamma(r) in between.
    """
    key = "rope_scaling" if cfg.get("rope_scaling") else "rope_parameters"
    scaling = cfg.get(key) or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    provenance: dict[str, str] = {}
    notes: list[str] = []

    def read(field: str, names: list[str], default, why: str, fallback: str = "default"):
        """The first of the config keys `names` that is set ("a.b" looks inside a); else default,
        recorded as `fallback` (and noted when it is a plain default)."""
        for name in names:
            value = cfg
            for part in name.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            if value is not None:
                provenance[field] = name
                return value
        provenance[field] = fallback
        if fallback == "default":
            notes.append(f"{' / '.join(names)} not set: using {default:g} ({why})")
        return default

    def need(name):
        if scaling.get(name) is None:
            raise CheckpointError(f"{source}: {key} of type {kind!r} has no {name!r}")
        provenance[_FIELD_OF.get(name, name)] = f"{key}.{name}"
        return scaling[name]

    model_type = cfg.get("model_type", "llama")
    base = float(read("base", [f"{key}.rope_theta", "rope_theta"], 10000.0, "LlamaConfig's default"))
    max_default = DEFAULT_MAX_POSITIONS.get(model_type, 2048)
    max_pos = int(read("max_position_embeddings", ["max_position_embeddings"], max_default,
                       f"{model_type} config default"))
    provenance["original_length"] = provenance["max_position_embeddings"]  # L, unless the method states another
    provenance["method"] = f"{key}.{'rope_type' if 'rope_type' in scaling else 'type'}" if scaling else "default"

    try:
        if kind in ("default", "none", None):
            return RopeConfig(base=base, original_length=max_pos), provenance, notes
        if kind == "linear":
            provenance["scale"] = f"{key}.factor"
            return RopeConfig(method="pi", scale=float(need("factor")), original_length=max_pos, base=base), provenance, notes
        if kind == "dynamic":
            factor = float(read("scale", [f"{key}.factor"], 1.0, "the paper's Dynamic NTK"))
            if factor != 1.0:
                raise CheckpointError(
                    f"{source}: {key} dynamic with factor {factor:g}: transformers then uses "
                    f"b' = b (factor l/L - (factor - 1))^(D/(D-2)), which differs from the paper's Dynamic NTK "
                    f"(s = max(1, l/L), i.e. factor 1) and has no RopeConfig equivalent. Pass rope= to load(), "
                    f"e.g. RopeConfig(method='ntk', dynamic=True, original_length={max_pos}), to choose explicitly")
            provenance["dynamic"] = provenance["method"]
            return RopeConfig(method="ntk", dynamic=True, original_length=max_pos, base=base), provenance, notes
        if kind == "llama3":
            rope = RopeConfig(method="ntk-by-parts", ramp="paper", scale=float(need("factor")),
                              original_length=int(need("original_max_position_embeddings")), base=base,
                              alpha=float(need("low_freq_factor")), beta=float(need("high_freq_factor")))
            provenance["ramp"] = provenance["method"]
            _check_factor(rope, max_pos, key, notes)
            return rope, provenance, notes
        if kind == "yarn":
            return _yarn_from_hf(cfg, scaling, key, max_pos, base, model_type, read, provenance, notes), provenance, notes
    except ValueError as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{source}: {key}: {e}") from None
    raise CheckpointError(f"{source}: {key} type {kind!r} is not supported; supported: default, linear, dynamic, "
                          "yarn, llama3")


# config key -> RopeConfig field, for the provenance of required keys
_FIELD_OF = {"factor": "scale", "original_max_position_embeddings": "original_length",
             "low_freq_factor": "alpha", "high_freq_factor": "beta"}


def _check_factor(rope: RopeConfig, max_pos: int, key: str, notes: list[str]) -> None:
    """Two keys state the extension ratio; say so when they disagree (transformers issue 38224)."""
    if max_pos != rope.window:
        notes.append(f"{key}.factor {rope.scale:g} disagrees with max_position_embeddings / "
                     f"original_max_position_embeddings = {max_pos} / {rope.original_length} = "
                     f"{max_pos / rope.original_length:g}; s = factor is used (as transformers does), "
                     f"so the intended window L x s is {rope.window}, not {max_pos}")


def _yarn_from_hf(cfg, scaling, key, max_pos, base, model_type, read, provenance, notes) -> RopeConfig:
    original = int(read("original_length", [f"{key}.original_max_position_embeddings"], max_pos,
                        "max_position_embeddings"))
    scale = float(read("scale", [f"{key}.factor"], max_pos / original,
                       "max_position_embeddings / original_max_position_embeddings"))
    provenance["ramp"] = provenance["method"]  # "yarn" means the public code's ramp
    remote = _remote_code(cfg) if model_type == "mistral" else None
    fallback = f"remote code ({remote})" if remote else "default"
    if remote:
        constants, why = YARN_MISTRAL_CONSTANTS, "the Yarn-Mistral remote code"
        notes.append(f"auto_map -> {remote}: beta_fast 128, beta_slow 2 and sqrt(1/t) = 0.07 ln(s) + 1 live in "
                     "that remote code (jquesnelle/yarn scaled_rope/modeling_mistral_yarn.py), not in this config")
    else:
        constants, why = {"beta": 32.0, "alpha": 1.0, "attention_coefficient": 0.1}, "transformers' and the paper's default"
        if model_type == "mistral":
            notes.append("model_type mistral with yarn and no auto_map to the authors' modeling_mistral_yarn.py: "
                         "transformers' constants (32 / 1 / 0.1) are used; NousResearch's Yarn-Mistral checkpoints "
                         "were trained with 128 / 2 / 0.07")
    alpha = float(read("alpha", [f"{key}.beta_slow"], constants["alpha"], why, fallback))
    beta = float(read("beta", [f"{key}.beta_fast"], constants["beta"], why, fallback))
    factor = scaling.get("attention_factor")
    coefficient = constants["attention_coefficient"]
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if factor is not None:
        provenance["attention_factor"] = f"{key}.attention_factor"
    elif mscale and mscale_all_dim:  # DeepSeek-style: the ratio of two Eq. 22 forms
        factor = yarn_attention_factor(scale, 0.1 * mscale) / yarn_attention_factor(scale, 0.1 * mscale_all_dim)
        provenance["attention_factor"] = f"{key}.mscale / {key}.mscale_all_dim"
    else:
        provenance["attention_coefficient"] = fallback
    rope = RopeConfig(method="yarn", scale=scale, original_length=original, base=base, alpha=alpha, beta=beta,
                      attention_factor=None if factor is None else float(factor), attention_coefficient=coefficient,
                      truncate=bool(scaling.get("truncate", True)))
    if "original_max_position_embeddings" in scaling and "factor" in scaling:
        _check_factor(rope, max_pos, key, notes)
    return rope


def meta_ffn_params(dim: int, hidden: int, source: Path) -> tuple[int, Optional[float]]:
    """(multiple_of, ffn_dim_multiplier) for which Meta's FFN formula gives `hidden`, so that an
    HF model (which states intermediate_size directly) is described by params.json fields that
    Meta's own loader understands. Llama 2's own pairs first; else multiple_of = hidden, which
    rounds any width up to exactly hidden (with a multiplier < 1 when hidden < 8 dim / 3)."""
    base = int(2 * 4 * dim / 3)
    candidates = [(256, None), (4096, 1.3), (1024, 1.3), (hidden, None)]
    if hidden < base:
        candidates.append((hidden, hidden / base))
    for multiple_of, multiplier in candidates:
        if ModelArgs(dim=dim, n_heads=1, multiple_of=multiple_of, ffn_dim_multiplier=multiplier).ffn_hidden_dim == hidden:
            return multiple_of, multiplier
    raise CheckpointError(f"{source}: intermediate_size {hidden} cannot be written as Meta's FFN width for dim {dim}")


def args_from_hf(cfg: dict, rope: Optional[RopeConfig], source: Path) -> tuple[ModelArgs, dict, list[str]]:
    """(ModelArgs, RoPE provenance, notes) from a config.json; see rope_from_hf."""
    if cfg.get("model_type", "llama") not in DEFAULT_MAX_POSITIONS:
        raise CheckpointError(f"{source}: model_type {cfg.get('model_type')!r}; only Llama-architecture "
                              f"checkpoints (model_type {' or '.join(map(repr, DEFAULT_MAX_POSITIONS))}) are supported")
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size"):
        if name not in cfg:
            raise CheckpointError(f"{source}: no {name!r}")
    dim, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
    for name, allowed in (("hidden_act", ("silu",)), ("attention_bias", (False,)), ("mlp_bias", (False,)),
                          ("partial_rotary_factor", (1, 1.0)), ("head_dim", (dim // n_heads,))):
        if cfg.get(name) is not None and cfg[name] not in allowed:
            raise CheckpointError(f"{source}: {name} is {cfg[name]!r}; Llama 2 (and this model) needs {allowed[0]!r}")
    multiple_of, multiplier = meta_ffn_params(dim, cfg["intermediate_size"], source)
    params = dict(dim=dim, n_layers=cfg["num_hidden_layers"], n_heads=n_heads,
                  n_kv_heads=cfg.get("num_key_value_heads") or n_heads, vocab_size=cfg["vocab_size"],
                  multiple_of=multiple_of, ffn_dim_multiplier=multiplier,
                  norm_eps=cfg.get("rms_norm_eps", 1e-6),  # 1e-6: LlamaConfig's default
                  sliding_window=cfg.get("sliding_window"))  # Mistral 7B v0.1: 4096; null: full attention
    own, provenance, notes = rope_from_hf(cfg, source)
    if rope is not None:
        provenance, notes = {field: "rope= (given to load)" for field in provenance}, []
    return _model_args(params, rope if rope is not None else own, source), provenance, notes


def read_config(path: str | os.PathLike) -> tuple[ModelArgs, dict[str, str], list[str]]:
    """A checkpoint's ModelArgs (with its RopeConfig) as load() would build them, without reading
    weights, plus where each RoPE value came from and what is ambiguous (see rope_from_hf).
    `path`: a config.json, a params.json, or a model folder holding one of them.

    `python -m yarn_minimal.rope --config PATH` prints this. It lives here, not in rope.py,
    because only checkpoint.py knows file formats and rope.py imports nothing from the package:
    rope.py's command line imports this function inside main(), when --config is given."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if path.is_dir():
        path = next((folder / n for n in ("params.json", "config.json") if (folder / n).is_file()), folder / "config.json")
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (give a config.json, a params.json or a model folder holding one)")
    cfg = _read_json(path)
    if path.name != "params.json":
        return args_from_hf(cfg, None, path)
    rope, provenance = _project_rope(folder), {}
    if rope is None:
        rope = RopeConfig(base=float(cfg.get("rope_theta", 10000.0)))
        provenance = {"method": "default", "base": "params.json rope_theta" if "rope_theta" in cfg else "default",
                      "original_length": "default"}
        notes = [f"{path.name} states no context length: L = {rope.original_length} (Llama 2's; pass "
                 "--original-length otherwise)"]
    else:
        stored = _read_json(folder / "rope.json")
        provenance = {field: "rope.json" if field in stored else "default" for field in rope.to_dict()}
        notes = [f"rope.json has no {field!r}: using {value!r} (default)" for field, value in rope.to_dict().items()
                 if field not in stored]
    if cfg.get("vocab_size", -1) == -1:
        cfg = dict(cfg, vocab_size=1)  # Meta's -1: the tokenizer's size, irrelevant to RoPE
    return _model_args(cfg, rope, path), provenance, notes


def _project_rope(folder: Path) -> Optional[RopeConfig]:
    """rope.json, the RopeConfig this project saved beside params.json (None if absent)."""
    if not (folder / "rope.json").is_file():
        return None
    try:
        return RopeConfig.from_dict(_read_json(folder / "rope.json"))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{folder / 'rope.json'}: {e}") from None


def hf_weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map'")
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{f}: listed in {index.name} but missing")
        return files
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise CheckpointError(f"{folder}: no weight files (model.safetensors, model-*-of-*.safetensors "
                              "or pytorch_model*.bin) beside config.json")
    return files


def _open_hf_files(files: list[Path], stack: contextlib.ExitStack) -> dict[str, tuple[Path, Callable, tuple]]:
    """HF key -> (file, read(), shape), reading no tensor data yet."""
    from safetensors import safe_open

    tensors = {}
    for path in files:
        if path.suffix == ".safetensors":
            try:
                f = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
                for k in f.keys():
                    tensors[k] = (path, lambda f=f, k=k: f.get_tensor(k), tuple(f.get_slice(k).get_shape()))
            except Exception as e:  # truncated or corrupt header / data
                raise CheckpointError(f"{path}: cannot be read as safetensors ({type(e).__name__}: {e})") from None
        else:
            state = _torch_load(path)
            for k, v in state.items():
                tensors[k] = (path, lambda v=v: v, tuple(v.shape))
    return tensors


def load_hf(folder: Path, rope: Optional[RopeConfig], device, dtype, progress=False) -> tuple[Transformer, Tokenizer]:
    config_path = folder / "config.json"
    cfg = _read_json(config_path)
    args, _, _ = args_from_hf(cfg, rope, config_path)
    tokenizer = _open_tokenizer(folder)
    _check_tokenizer(tokenizer, args, config_path)
    _check_sliding_window(args, rope, config_path)
    files = hf_weight_files(folder)
    model = _empty_model(args)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with contextlib.ExitStack() as stack:
        tensors = _open_hf_files(files, stack)
        for k in [k for k in tensors if k.endswith("rotary_emb.inv_freq")]:
            del tensors[k]  # older transformers saved this buffer; we compute our own
        if cfg.get("tie_word_embeddings") and "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors:
            tensors["lm_head.weight"] = tensors.get("model.embed_tokens.weight")
        source = str(files[0].parent / (files[0].name if len(files) == 1 else "{" + ",".join(f.name for f in files) + "}"))
        _check_keys(set(tensors), {hf_key(k) for k in expected}, source)
        for key, shape in expected.items():
            path, _, found = tensors[hf_key(key)]
            _check_shape(hf_key(key), found, shape, str(path), f" from {config_path.name}")
        state = {}
        for key in tqdm(expected, desc=f"reading {len(files)} file(s)", unit="tensor", disable=not progress):
            path, read, _ = tensors.pop(hf_key(key))
            try:
                t = read()
            except Exception as e:
                raise CheckpointError(f"{path}: cannot read tensor {hf_key(key)} ({type(e).__name__}: {e})") from None
            heads = _heads_of(key, args)
            state[key] = (permute_from_hf(t, heads) if heads else t).to(device=device, dtype=dtype)
    model.load_state_dict(state, assign=True, strict=True)
    return model, tokenizer


# ---------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------

def load(path: str | os.PathLike, rope: Optional[RopeConfig] = None, device="cpu",
         dtype: torch.dtype = torch.float32, progress: bool = False) -> tuple[Transformer, Tokenizer]:
    """Load (model, tokenizer) from a checkpoint folder in any of the three layouts (see the
    module docstring), or from a llama.cpp .gguf file (formats/gguf.py). rope=None keeps the checkpoint's own setting (rope.json, or config.json's
    rope_scaling; plain RoPE for raw Llama 2); a RopeConfig overrides it. progress=True shows a
    tqdm bar while tensors are read."""
    folder = Path(path)
    if folder.suffix == ".gguf" and not folder.is_dir():
        from .formats.gguf import load_gguf  # llama.cpp's single-file format (formats/gguf.py)

        return load_gguf(folder, rope, device, dtype, progress)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder")
    if (folder / "params.json").is_file():
        model, tokenizer = load_meta(folder, rope, device, dtype, progress)
    elif (folder / "config.json").is_file():
        model, tokenizer = load_hf(folder, rope, device, dtype, progress)
    else:
        raise CheckpointError(f"{folder}: no params.json (Meta's layout: params.json + consolidated.*.pth) "
                              "and no config.json (Hugging Face's layout: config.json + *.safetensors)")
    model.eos_ids = tokenizer.eos_ids  # generation stops at these unless told not to
    return model.eval(), tokenizer


# ---------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------

def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) then rename: a reader never sees a half-written file under the real name."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_json(path: Path, obj: dict) -> None:
    _atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def hf_rope_scaling(rope: RopeConfig, head_dim: int) -> tuple[float, Optional[dict], int]:
    """(rope_theta, rope_scaling, max_position_embeddings) for config.json.

    rope_scaling carries both "rope_type" (transformers >= 4.45, vLLM) and "type" (older
    transformers, llama.cpp's converter). Static NTK-aware is written exactly as a base change,
    rope_theta = b' (Eq. 16). Methods with no counterpart that transformers, vLLM and llama.cpp
    all read the same way are refused rather than written approximately."""
    L, s = rope.original_length, rope.scale
    entry = lambda kind, **kw: {"rope_type": kind, "type": kind, **kw}
    if rope.method == "none" or (s == 1 and not rope.dynamic and rope.method != "ntk" and rope.attention_factor is None):
        return rope.base, None, L
    if rope.method == "pi" and not rope.dynamic:
        return rope.base, entry("linear", factor=s), L  # HF's convention: max_position_embeddings = L
    if rope.method == "ntk" and not rope.dynamic:
        # Eq. 14-16: static NTK-aware is plain RoPE with base b' (what Code Llama's rope_theta is)
        return ntk_aware_base(rope.base, s, head_dim), None, int(round(L * s))
    if rope.method == "ntk" and rope.dynamic and s == 1:
        return rope.base, entry("dynamic", factor=1.0), L  # HF's dynamic uses L = max_position_embeddings
    if rope.method == "yarn" and not rope.dynamic and rope.ramp == "code":
        scaling = entry("yarn", factor=s, original_max_position_embeddings=L, beta_fast=rope.beta, beta_slow=rope.alpha)
        if not rope.truncate:
            scaling["truncate"] = False
        if rope.attention_factor is not None or rope.attention_coefficient != 0.1:
            # transformers' key (replaces Eq. 22); a coefficient other than 0.1 has no key of its own
            scaling["attention_factor"] = frequencies(rope, head_dim, s)[1]
        return rope.base, scaling, int(round(L * s))
    if rope.method == "ntk-by-parts" and not rope.dynamic and rope.ramp == "paper":
        # Llama 3.1's "llama3" is exactly this (see rope_from_hf)
        return rope.base, entry("llama3", factor=s, original_max_position_embeddings=L, low_freq_factor=rope.alpha,
                                high_freq_factor=rope.beta), int(round(L * s))
    raise CheckpointError(
        f"format='hf': {rope.describe()} (ramp={rope.ramp}) has no Hugging Face rope_scaling equivalent "
        "(transformers knows static PI 'linear', Dynamic NTK 'dynamic' with s0 = 1, static YaRN 'yarn' with the "
        "code's ramp, and static NTK-by-parts with the paper's ramp as 'llama3'). Save with format='meta' (this project's layout keeps any RopeConfig in rope.json)")


def hf_config(model: Transformer, dtype: torch.dtype, tokenizer: Optional[Tokenizer] = None) -> dict:
    """config.json for transformers' LlamaForCausalLM (also read by vLLM and llama.cpp's converter);
    MistralForCausalLM for a model with a sliding window, so that the window is not dropped.
    BOS/EOS ids are the tokenizer's (Llama 2's 1 and 2 without one); eos_token_id lists every
    id that ends generation when there are several."""
    args = model.args
    rope_theta, rope_scaling, max_pos = hf_rope_scaling(args.rope, args.head_dim)
    bos, eos = (1, [2]) if tokenizer is None else (tokenizer.bos_id, list(tokenizer.eos_ids))
    mistral = args.sliding_window is not None
    return {
        "architectures": ["MistralForCausalLM" if mistral else "LlamaForCausalLM"],
        "model_type": "mistral" if mistral else "llama",
        **({"sliding_window": args.sliding_window} if mistral else {}),
        "hidden_size": args.dim, "intermediate_size": args.ffn_hidden_dim,
        "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim, "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps, "hidden_act": "silu", "max_position_embeddings": max_pos,
        "rope_theta": rope_theta, "rope_scaling": rope_scaling,
        "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1,
        "bos_token_id": bos, "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "initializer_range": 0.02, "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def save(model: Transformer, tokenizer: Optional[Tokenizer], path: str | os.PathLike, format: str = "meta") -> Path:
    """Write the model (and tokenizer.model) to a folder, or to one .gguf file.

    format="meta": this project's layout (params.json, consolidated.00.pth, rope.json), which
                   Meta's own loader also reads; any RopeConfig round-trips exactly.
    format="hf":   config.json with rope_scaling, model.safetensors with wq / wk permuted to
                   HF's split-half rotation; loads with transformers' from_pretrained, vLLM and
                   llama.cpp's convert_hf_to_gguf.py. Refuses RoPE settings HF cannot express.
    format="gguf": one llama.cpp file at `path` (formats/gguf.py) with llama.cpp's rope-scaling
                   metadata and the tokenizer's vocabulary. Refuses RoPE settings llama.cpp
                   cannot run (Dynamic Scaling, the paper's ramp, non-default alpha/beta).
    Weights keep the model's dtype. Each file is written under a temporary name and renamed."""
    if format not in ("meta", "hf", "gguf"):
        raise ValueError(f"save: format {format!r}; allowed: meta, hf, gguf")
    if format == "gguf":
        from .formats.gguf import save_gguf  # one file, not a folder (formats/gguf.py)

        return save_gguf(model, tokenizer, Path(path))
    folder = Path(path)
    # files another save left that `load` would read instead of (or beside) the new ones
    stale = [f for f in sorted(folder.glob("consolidated.*.pth")) if f.name != "consolidated.00.pth"]
    stale += [f for f in (folder / "model.safetensors.index.json",) if f.is_file()]
    stale += [f for f in (folder / "params.json",) if format == "hf" and f.is_file()]
    if stale:
        raise CheckpointError(f"{folder}: already holds {', '.join(f.name for f in stale)}, which load() would read "
                              "instead of or beside what save() writes; save into an empty folder")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if format == "hf":
        config = hf_config(model, next(iter(state.values())).dtype, tokenizer)  # refuses unsupported RoPE before writing
        folder.mkdir(parents=True, exist_ok=True)
        from safetensors.torch import save_file

        hf_state = {}
        for key, t in state.items():
            heads = _heads_of(key, model.args)
            hf_state[hf_key(key)] = (permute_to_hf(t, heads) if heads else t).contiguous()
        _atomic_write(folder / "model.safetensors", lambda tmp: save_file(hf_state, str(tmp), metadata={"format": "pt"}))
        _write_json(folder / "config.json", config)
    else:
        folder.mkdir(parents=True, exist_ok=True)
        _atomic_write(folder / "consolidated.00.pth", lambda tmp: torch.save(state, tmp))
        _write_json(folder / "params.json", model.args.to_params())
        _write_json(folder / "rope.json", model.rope.to_dict())
    if tokenizer is not None:
        _save_tokenizer(tokenizer, folder)
    return folder


def _save_tokenizer(tokenizer: Tokenizer, folder: Path) -> None:
    """The tokenizer's own files (tokenizer.model, or tokenizer.json + tokenizer_config.json),
    written into a temporary folder and renamed into place; generation_config.json when there are
    several EOS ids, which no tokenizer file can hold (open_tokenizer reads them back)."""
    with tempfile.TemporaryDirectory(dir=folder, prefix=".tokenizer.") as tmp:
        tokenizer.save(Path(tmp))
        for f in sorted(Path(tmp).iterdir()):
            os.replace(f, folder / f.name)
    if len(tokenizer.eos_ids) > 1:
        _write_json(folder / "generation_config.json",
                    {"bos_token_id": tokenizer.bos_id, "eos_token_id": list(tokenizer.eos_ids)})


# ---------------------------------------------------------------------------------------
# python -m yarn_minimal.checkpoint convert SRC DST --format hf
# ---------------------------------------------------------------------------------------

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m yarn_minimal.checkpoint",
        description="Convert a Llama 2 checkpoint between layouts: Meta's raw download (params.json + "
                    "consolidated.*.pth, any number of model-parallel shards), a Hugging Face folder "
                    "(config.json + *.safetensors), this project's own (Meta's + rope.json) or llama.cpp's .gguf "
                    "(read: any type the gguf package dequantizes; written: F32 / F16 / BF16).")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="read SRC (any layout), write DST in --format",
                       description="Read SRC in any supported layout and write DST. The RoPE setting travels "
                                   "with the weights: rope.json or config.json's rope_scaling.")
    c.add_argument("src", help="checkpoint folder (or .gguf file) to read")
    c.add_argument("dst", help="folder to write (created; files in it are replaced), or the .gguf file for --format gguf")
    c.add_argument("--format", choices=("hf", "meta", "gguf"), required=True,
                   help="hf: config.json + model.safetensors (transformers, vLLM, llama.cpp); "
                        "meta: params.json + consolidated.00.pth + rope.json; "
                        "gguf: one llama.cpp / Ollama file with its rope-scaling metadata")
    c.add_argument("--dtype", "--outtype", choices=sorted(DTYPES), default="bfloat16",
                   help="dtype of the written weights (gguf: F32 / F16 / BF16); default bfloat16 "
                        "(Llama 2's released precision)")
    args = p.parse_args(argv)
    src, dst = Path(args.src), Path(args.dst)
    if src.resolve() == dst.resolve():
        p.error("SRC and DST must be different folders")
    try:
        print(f"reading {src} ...", file=sys.stderr)
        model, tokenizer = load(src, dtype=DTYPES[args.dtype], progress=True)
        print(f"writing {dst} ({args.format}, {args.dtype}, RoPE: {model.rope.describe()}) ...", file=sys.stderr)
        save(model, tokenizer, dst, format=args.format)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {dst}", file=sys.stderr)


if __name__ == "__main__":
    main()
