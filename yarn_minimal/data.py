"""Token files for training: the on-disk format shared by the data tool and the trainer.

A prepared dataset is a folder with two files:

    tokens.bin   raw little-endian token ids, uint16 (vocab <= 65535) or uint32,
                 n_segments * seq_len of them, row-major: segment i is
                 tokens[i * seq_len:(i + 1) * seq_len]
    meta.json    {"format": "yarn-minimal-tokens/1", "seq_len", "n_segments", "dtype",
                  "vocab_size", "bos_id", "eos_id", ...free-form provenance...}

The file is memory-mapped when read, so a 64k x 10^5 segment dataset costs no RAM.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

FORMAT = "yarn-minimal-tokens/1"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def write_segments(out_dir: str | os.PathLike, segments: np.ndarray, meta: dict) -> Path:
    """Write an (n_segments, seq_len) array of token ids plus meta.json, atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if segments.ndim != 2:
        raise ValueError(f"segments must be 2-D (n_segments, seq_len), got shape {segments.shape}")
    vocab_size = int(meta["vocab_size"])
    dtype = token_dtype(vocab_size)
    if segments.size and int(segments.max()) >= vocab_size:
        raise ValueError(f"token id {int(segments.max())} >= vocab_size {vocab_size}")
    full_meta = dict(meta)
    full_meta.update(format=FORMAT, seq_len=int(segments.shape[1]),
                     n_segments=int(segments.shape[0]), dtype=dtype.name)
    tmp = out_dir / "tokens.bin.tmp"
    segments.astype(dtype.newbyteorder("<")).tofile(tmp)
    os.replace(tmp, out_dir / "tokens.bin")
    tmp = out_dir / "meta.json.tmp"
    tmp.write_text(json.dumps(full_meta, indent=2) + "\n")
    os.replace(tmp, out_dir / "meta.json")
    return out_dir


def open_segments(data_dir: str | os.PathLike) -> tuple[np.memmap, dict]:
    """Memory-map a prepared dataset; returns (segments[n_segments, seq_len], meta)."""
    data_dir = Path(data_dir)
    meta_path = data_dir / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: missing; prepare data with `python -m yarn_minimal.data`")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    path = data_dir / "tokens.bin"
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    expected = meta["n_segments"] * meta["seq_len"] * dtype.itemsize
    found = path.stat().st_size if path.exists() else None
    if found != expected:
        raise ValueError(f"{path}: expected {expected} bytes for {meta['n_segments']} x {meta['seq_len']} "
                         f"{meta['dtype']} tokens, found {found}")
    arr = np.memmap(path, dtype=dtype, mode="r", shape=(meta["n_segments"], meta["seq_len"]))
    return arr, meta
