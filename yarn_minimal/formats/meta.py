"""Meta's raw Llama 2 layout, and this project's own (Meta's plus rope.json), in and out.

    params.json                       dim, n_layers, n_heads, n_kv_heads, multiple_of, ...
    consolidated.00.pth ... .NN.pth   one file per model-parallel rank (7B: 1, 13B: 2, 70B: 8)
    tokenizer.model                   in the folder or its parent (Meta's download has it there)
    rope.json                         ours only: the RopeConfig the model was fine-tuned with

rope.json sits beside params.json rather than inside it so that Meta's loader, which passes
every params.json key to its ModelArgs, still reads the folder. A one-shard checkpoint in its
stored dtype is used straight from the page cache (torch.load with mmap).
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from ..files import CheckpointError, atomic_write, read_json, write_json
from ..model import ModelArgs, Transformer
from ..rope import RopeConfig
from ..tokenizer import Tokenizer
from .common import (assign_weights, check_finite, check_keys, check_shape, check_sliding_window, check_tokenizer,
                     empty_model, model_args, read_key, read_tokenizer, torch_load)

# Model-parallel split dimension of each weight in Meta's consolidated.NN.pth files
# (ColumnParallelLinear: output rows; RowParallelLinear: input columns; the embedding is split
# along the model dimension). Keys not listed (the RMSNorm weights) are replicated.
SHARD_DIM = {"tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "wo": 1, "w2": 1}


def shard_dim(key: str) -> Optional[int]:
    return SHARD_DIM.get(key.split(".")[-2])


def check_params(params: dict, source: Path) -> None:
    """Meta's params.json always states the shape; a missing or mistyped key is named here rather
    than replaced by a Llama 2 7B default and reported later as a shape mismatch. vocab_size may
    be -1 (Meta's "the tokenizer's size")."""
    for name in ("dim", "n_layers", "n_heads"):
        read_key(params, name, "a positive integer", source)
    for name in ("n_kv_heads", "multiple_of", "sliding_window"):
        read_key(params, name, "a positive integer", source, None)
    if params.get("vocab_size", -1) != -1:
        read_key(params, "vocab_size", "a positive integer (or -1: the tokenizer's size)", source)
    for name in ("norm_eps", "ffn_dim_multiplier"):
        read_key(params, name, "a positive number", source, None)
    if read_key(params, "rope_theta", "a positive number", source, 10000.0) <= 1:
        raise CheckpointError(f"{source}: rope_theta is {params['rope_theta']}; expected a number > 1 (RoPE's base b)")


def meta_ffn_params(dim: int, hidden: int, source: Path) -> tuple[int, Optional[float]]:
    """(multiple_of, ffn_dim_multiplier) for which Meta's FFN formula gives `hidden`, so that an
    HF or GGUF model (which states its FFN width directly) is described by params.json fields
    that Meta's own loader understands. Llama 2's own pairs first; else multiple_of = hidden,
    which rounds any width up to exactly hidden (with a multiplier < 1 when hidden < 8 dim / 3)."""
    base = int(2 * 4 * dim / 3)
    candidates = [(256, None), (4096, 1.3), (1024, 1.3), (hidden, None)]
    if hidden < base:
        candidates.append((hidden, hidden / base))
    for multiple_of, multiplier in candidates:
        if ModelArgs(dim=dim, n_heads=1, multiple_of=multiple_of, ffn_dim_multiplier=multiplier).ffn_hidden_dim == hidden:
            return multiple_of, multiplier
    raise CheckpointError(f"{source}: intermediate_size {hidden} cannot be written as Meta's FFN width for dim {dim}")


def project_rope(folder: Path) -> Optional[RopeConfig]:
    """rope.json, the RopeConfig this project saved beside params.json (None if absent)."""
    path = folder / "rope.json"
    if not path.is_file():
        return None
    stored = read_json(path)
    unknown = sorted(set(stored) - {f.name for f in fields(RopeConfig)})
    if unknown:
        raise CheckpointError(f"{path}: unknown key {unknown[0]!r}; expected RopeConfig's fields "
                              f"({', '.join(f.name for f in fields(RopeConfig))})")
    try:
        return RopeConfig(**stored)
    except ValueError as e:  # "RopeConfig.scale: ...": its keys are RopeConfig's fields
        raise CheckpointError(f"{path}: {str(e).removeprefix('RopeConfig.')}") from None


def read_meta_config(path: Path) -> tuple[ModelArgs, dict[str, str], list[str]]:
    """checkpoint.read_config for a params.json: ModelArgs, where each RoPE value came from, notes."""
    folder, cfg = path.parent, read_json(path)
    check_params(cfg, path)
    rope = project_rope(folder)
    if rope is None:
        rope = RopeConfig(base=float(cfg.get("rope_theta") or 10000.0))
        provenance = {"method": "default", "base": "params.json rope_theta" if "rope_theta" in cfg else "default",
                      "original_length": "default"}
        notes = [f"{path.name} states no context length: L = {rope.original_length} (Llama 2's; pass "
                 "--original-length otherwise)"]
    else:
        stored = read_json(folder / "rope.json")
        provenance = {field: "rope.json" if field in stored else "default" for field in asdict(rope)}
        notes = [f"rope.json has no {field!r}: using {value!r} (default)" for field, value in asdict(rope).items()
                 if field not in stored]
    if cfg.get("vocab_size", -1) == -1:
        cfg = dict(cfg, vocab_size=1)  # Meta's -1: the tokenizer's size, irrelevant to RoPE
    provenance["head_dim"] = "params.json dim / n_heads"
    return model_args(cfg, rope, path), provenance, notes


def _merge(parts: list[torch.Tensor], dim: Optional[int], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """One full tensor from its model-parallel parts, written straight into the target dtype."""
    if dim is None or len(parts) == 1:
        return parts[0].to(device=device, dtype=dtype)
    shape = list(parts[0].shape)
    shape[dim] *= len(parts)
    out = torch.empty(shape, dtype=dtype, device=device)
    for i, part in enumerate(parts):
        out.narrow(dim, i * part.shape[dim], part.shape[dim]).copy_(part)
    return out


def load_meta(folder: Path, rope: Optional[RopeConfig], device: torch.device | str,
              dtype: torch.dtype, progress: bool = False) -> tuple[Transformer, Tokenizer]:
    params_path = folder / "params.json"
    params = read_json(params_path)
    check_params(params, params_path)
    tokenizer = read_tokenizer(folder)
    if params.get("vocab_size", -1) == -1:
        params["vocab_size"] = tokenizer.vocab_size
    if params.get("norm_eps") == 1e-6:
        warnings.warn(f"{params_path}: norm_eps is 1e-6; Llama 2 uses 1e-5 (an early download shipped 1e-6 "
                      "by mistake, meta-llama/llama issue 771)")
    asked = rope
    if rope is None:
        rope = project_rope(folder)
    args = model_args(params, rope, params_path)
    check_tokenizer(tokenizer, args, params_path)
    check_sliding_window(args, asked, params_path)

    paths = sorted(folder.glob("consolidated.*.pth"))
    if not paths:
        raise CheckpointError(f"{folder}: no consolidated.*.pth weight files beside params.json")
    n = len(paths)
    for name, heads in (("n_heads", args.n_heads), ("n_kv_heads", args.n_kv_heads)):
        if heads % n:
            raise CheckpointError(f"{folder}: {n} consolidated.*.pth shards, but {params_path} has {name} = {heads}, "
                                  f"which {n} does not divide (model-parallel shards split the heads evenly)")

    expected = {k: tuple(v.shape) for k, v in empty_model(args).state_dict().items()}
    shards = []
    for path in paths:
        state = torch_load(path)
        state.pop("rope.freqs", None)  # a precomputed table some downloads carry; we make our own
        if n == 1 and _same_tensor(state.get("output.weight"), state.get("tok_embeddings.weight")):
            args = replace(args, tie_word_embeddings=True)  # save_meta of a tied model: one tensor, two keys
        check_keys(set(state), set(expected), str(path))
        for key, full in expected.items():
            dim, part = shard_dim(key), list(full)
            if dim is not None:
                if full[dim] % n:
                    raise CheckpointError(f"{folder}: {n} shards cannot split {key} of shape {full} along dim {dim}")
                part[dim] //= n
            check_shape(key, state[key].shape, part, str(path),
                        f" (1/{n} of {full} along dim {dim})" if dim is not None and n > 1 else "")
        shards.append(state)

    merged = {}
    for key in tqdm(expected, desc=f"merging {n} shard(s)", unit="tensor", disable=not progress):
        # tensor by tensor, dropping each shard's reference as we go
        parts = [state.pop(key) for state in shards]
        if key == "output.weight" and args.tie_word_embeddings:
            merged[key] = merged["tok_embeddings.weight"]
            continue
        for path, part in zip(paths, parts):
            check_finite(key, part, path)
        merged[key] = _merge(parts, shard_dim(key), dtype, device)
    model = empty_model(args)
    assign_weights(model, merged)
    return model, tokenizer


def _same_tensor(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> bool:
    """torch.save writes a storage once, however many keys hold it; torch.load shares it again."""
    return a is not None and b is not None and a.shape == b.shape and a.stride() == b.stride() \
        and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() \
        and a.storage_offset() == b.storage_offset()


def params_json(args: ModelArgs) -> dict:
    """The params.json Meta's loader expects (plus rope_theta when it is not 10000)."""
    params = dict(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                  vocab_size=args.vocab_size, multiple_of=args.multiple_of,
                  ffn_dim_multiplier=args.ffn_dim_multiplier, norm_eps=args.norm_eps)
    if args.rope.base != 10000.0:
        params["rope_theta"] = args.rope.base
    if args.sliding_window is not None:
        params["sliding_window"] = args.sliding_window  # the key Mistral's own params.json uses
    return params


def save_meta(model: Transformer, state: dict[str, torch.Tensor], folder: Path) -> None:
    """consolidated.00.pth (one shard), params.json and rope.json: Meta's loader reads the first
    two, and any RopeConfig round-trips exactly through the third."""
    if model.args.tie_word_embeddings:
        # Meta's params.json has no key for a tie: the .pth stores one tensor under both keys,
        # which Meta's loader reads as two equal weights and load_meta as one
        state = dict(state, **{"output.weight": state["tok_embeddings.weight"]})
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "consolidated.00.pth", lambda tmp: torch.save(state, tmp))
    write_json(folder / "params.json", params_json(model.args))
    write_json(folder / "rope.json", asdict(model.rope))
