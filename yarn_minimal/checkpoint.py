"""Checkpoint files in and out. The only module that knows file formats.

The project's own layout is Meta's raw Llama 2 layout plus one file:

    params.json          Meta's model hyper-parameters
    consolidated.00.pth  the weights, Meta's key names
    tokenizer.model      sentencepiece (or in the parent folder, as Meta's download has it)
    rope.json            the RopeConfig the model was fine-tuned with (absent: plain RoPE)

rope.json sits beside params.json rather than inside it so that Meta's own loader, which
passes every params.json key to its ModelArgs, still reads the folder.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Optional

import torch

from .model import ModelArgs, Transformer
from .rope import RopeConfig
from .tokenizer import Tokenizer


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the file and the problem."""


def find_tokenizer(folder: Path) -> Path:
    for candidate in (folder / "tokenizer.model", folder.parent / "tokenizer.model"):
        if candidate.is_file():
            return candidate
    raise CheckpointError(f"{folder}: no tokenizer.model in the folder or its parent")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _torch_load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # truncated zip, pickle error, ...
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint ({type(e).__name__}: {e})") from None


def assign_weights(model: Transformer, state: dict, source: str, dtype: torch.dtype, device) -> None:
    """Check every key and shape against the model, then assign the tensors (no copy on the
    meta device). Missing or unexpected keys are errors: never a silently random weight."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{source}: keys do not match the model"
                              + (f"; missing {missing[:5]}{' ...' if len(missing) > 5 else ''}" if missing else "")
                              + (f"; unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}" if unexpected else ""))
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise CheckpointError(f"{source}: tensor {key} has shape {tuple(state[key].shape)}, "
                                  f"expected {shape} from the config")
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    model.load_state_dict(state, assign=True, strict=True)


def load_meta(folder: Path, rope: Optional[RopeConfig], device, dtype) -> tuple[Transformer, Tokenizer]:
    params_path = folder / "params.json"
    if not params_path.is_file():
        raise CheckpointError(f"{folder}: no params.json (expected Meta's layout: params.json + consolidated.*.pth)")
    params = _read_json(params_path)
    tokenizer = Tokenizer(find_tokenizer(folder))
    if params.get("vocab_size", -1) == -1:
        params["vocab_size"] = tokenizer.vocab_size
    if params.get("norm_eps") == 1e-6:
        warnings.warn(f"{params_path}: norm_eps is 1e-6; Llama 2 uses 1e-5 (an early download shipped 1e-6 "
                      "by mistake, meta-llama/llama issue 771)")
    if rope is None and (folder / "rope.json").is_file():
        rope = RopeConfig.from_dict(_read_json(folder / "rope.json"))
    try:
        args = ModelArgs.from_params(params, rope=rope)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{params_path}: {e}") from None
    shards = sorted(folder.glob("consolidated.*.pth"))
    if not shards:
        raise CheckpointError(f"{folder}: no consolidated.*.pth weight files")
    if len(shards) > 1:
        raise CheckpointError(f"{folder}: {len(shards)} shards; merging model-parallel shards is not supported yet")
    state = _torch_load(shards[0])
    state.pop("rope.freqs", None)  # a precomputed table some downloads carry; we make our own
    with torch.device("meta"):
        model = Transformer(args)
    assign_weights(model, state, str(shards[0]), dtype, device)
    if tokenizer.vocab_size != args.vocab_size:
        raise CheckpointError(f"{tokenizer.path}: tokenizer has {tokenizer.vocab_size} pieces, "
                              f"the model's embedding has {args.vocab_size}")
    return model, tokenizer


def load(path: str | os.PathLike, rope: Optional[RopeConfig] = None, device="cpu",
         dtype: torch.dtype = torch.float32) -> tuple[Transformer, Tokenizer]:
    """Load (model, tokenizer) from a checkpoint folder. rope=None keeps the checkpoint's own
    setting (plain RoPE for raw Llama 2); a RopeConfig overrides it."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder")
    model, tokenizer = load_meta(folder, rope, device, dtype)
    return model.eval(), tokenizer


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save(model: Transformer, tokenizer: Optional[Tokenizer], path: str | os.PathLike, format: str = "meta") -> Path:
    """Write the model (and tokenizer) to a folder in the project's layout (Meta's + rope.json)."""
    if format != "meta":
        raise ValueError(f"save: format {format!r} not supported yet; allowed: meta")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    _atomic_torch_save(state, folder / "consolidated.00.pth")
    _atomic_write_text(folder / "params.json", json.dumps(model.args.to_params(), indent=2) + "\n")
    _atomic_write_text(folder / "rope.json", json.dumps(model.rope.to_dict(), indent=2) + "\n")
    if tokenizer is not None:
        data = tokenizer.path.read_bytes()
        tmp = folder / "tokenizer.model.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, folder / "tokenizer.model")
    return folder
