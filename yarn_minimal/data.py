"""Token files for training: the on-disk format shared by the data tool and the trainer.

A prepared dataset is a folder with two files:

    tokens.bin   raw little-endian token ids, uint16 (vocab <= 65535) or uint32,
                 n_segments * seq_len of them, row-major: segment i is
                 tokens[i * seq_len:(i + 1) * seq_len]
    meta.json    {"format": "yarn-minimal-tokens/1", "seq_len", "n_segments", "dtype",
                  "vocab_size", "bos_id", "eos_id", ...free-form provenance...}

vocab_size bounds the ids (every id < vocab_size). `python -m yarn_minimal data` also records the
tokenizer it used: "tokenizer" (its path), "tokenizer_kind" (sentencepiece, tokenizer.json or
gguf), "add_bos" (whether each document starts with bos_id) and "vocab_digest" (which train.py
compares with the model's tokenizer: check_vocabulary).

The file is memory-mapped when read, so a 64k x 10^5 segment dataset costs no RAM.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from .checkpoint import load_tokenizer
from .tokenizer import Tokenizer

from .files import Output, check_output, holds, move_into_place, temporary, write_json

FORMAT = "yarn-minimal-tokens/1"
# what --out may replace (with --overwrite): an earlier dataset, tokens.bin and meta.json
TOKEN_DATA = Output("token data (tokens.bin + meta.json)", holds("tokens.bin", "meta.json"), folder=True)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def write_segments(out_dir: str | os.PathLike, segments: np.ndarray, meta: dict, overwrite: bool = False) -> Path:
    """Write an (n_segments, seq_len) array of token ids plus meta.json, atomically, into a new
    or empty folder, or over an earlier dataset with overwrite=True (files.check_output)."""
    check_output(out_dir, TOKEN_DATA, overwrite)
    if segments.ndim != 2:
        raise ValueError(f"segments must be 2-D (n_segments, seq_len), got shape {segments.shape}")
    vocab_size = int(meta["vocab_size"])
    if segments.size and int(segments.max()) >= vocab_size:
        raise ValueError(f"token id {int(segments.max())} >= vocab_size {vocab_size}")
    writer = SegmentWriter(out_dir, int(segments.shape[1]), vocab_size)
    writer.append(segments.reshape(-1))
    return writer.close(meta)


def open_segments(data_dir: str | os.PathLike) -> tuple[np.memmap, dict]:
    """Memory-map a prepared dataset; returns (segments[n_segments, seq_len], meta)."""
    data_dir = Path(data_dir)
    meta_path = data_dir / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: missing; prepare data with `python -m yarn_minimal data`")
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


# ---------------------------------------------------------------------------------------------
# Preparing a dataset: documents -> BOS doc EOS BOS doc EOS ... -> fixed segments (Sec. 4.1:
# "PG19 chunked into 64k segments bookended with the BOS and EOS token"). BOS where the
# tokenizer's own encoding starts with it (Llama 2, Llama 3); a tokenizer that adds none
# (SmolLM2) gives doc EOS doc EOS ..., EOS alone marking where one document ends.

TEXT_SUFFIXES = (".txt", ".md", ".text")                      # one document per file
DOCUMENT_SUFFIXES = TEXT_SUFFIXES + (".jsonl", ".parquet")     # one document per line / row


def input_files(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """The files to read, in a fixed order: files as given, folders expanded to their sorted
    text / .jsonl / .parquet files (recursively). Shared by the data tool and the evaluation."""
    files = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in DOCUMENT_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"{path}: the folder holds no {', '.join(DOCUMENT_SUFFIXES)} files")
            files.extend(found)
        elif path.is_file():
            if path.suffix and path.suffix.lower() not in DOCUMENT_SUFFIXES:  # no extension: plain text
                raise ValueError(f"{path}: unknown input type {path.suffix!r}; expected one of "
                                 f"{', '.join(DOCUMENT_SUFFIXES)}, or a plain-text file with no extension")
            files.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    return files


def read_documents(path: Path, text_field: str = "text") -> Iterator[str]:
    """Yield the documents of one file: a text file (or one with no extension) is one document
    (PG19 stores one book per file); a .jsonl file has one JSON object per line; a .parquet file one row per document,
    the text in `text_field`. Every problem is a ValueError naming the file (and line)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _read_parquet(path, text_field)
        return
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                         "convert it to UTF-8, or give a .jsonl or .parquet file") from None
    if suffix != ".jsonl":
        yield text
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from None
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            found = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(f"{path}:{lineno}: expected an object with a string field {text_field!r} "
                             f"(--text-field), found {found}")
        yield record[text_field]


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading .parquet files needs pyarrow (pip install pyarrow)") from None

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # ArrowInvalid and friends: not a parquet file, truncated, ...
        raise ValueError(f"{path}: cannot be read as Parquet ({type(e).__name__}: {e})") from None
    if text_field not in pf.schema_arrow.names:
        raise ValueError(f"{path}: no column {text_field!r} (--text-field); columns: {pf.schema_arrow.names}")
    for batch in pf.iter_batches(columns=[text_field], batch_size=256):
        yield from (t for t in batch.column(0).to_pylist() if t is not None)


class SegmentWriter:
    """Appends a token stream to tokens.bin in whole segments of seq_len; the tail that does
    not fill a segment is dropped. Files appear under their final names only on close()."""

    def __init__(self, out_dir: str | os.PathLike, seq_len: int, vocab_size: int):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.seq_len, self.vocab_size = seq_len, vocab_size
        self.dtype = token_dtype(vocab_size).newbyteorder("<")
        self.tmp = temporary(self.out_dir / "tokens.bin")
        self.file = self.tmp.open("wb")
        self.pending: list[np.ndarray] = []
        self.n_pending = 0
        self.n_segments = 0
        self.n_tokens = 0  # every token appended, including the dropped tail

    def append(self, ids: Sequence[int] | np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        self.n_tokens += len(ids)
        self.pending.append(ids)
        self.n_pending += len(ids)
        if self.n_pending >= self.seq_len:
            stream = np.concatenate(self.pending)
            n = len(stream) // self.seq_len
            stream[:n * self.seq_len].astype(self.dtype).tofile(self.file)
            self.n_segments += n
            self.pending = [stream[n * self.seq_len:]]
            self.n_pending = len(self.pending[0])

    def discard(self, remove_folder: bool) -> None:
        """Delete what was written (and the folder, when it was made for this and is empty)."""
        self.file.close()
        self.tmp.unlink(missing_ok=True)
        if remove_folder and not any(self.out_dir.iterdir()):
            self.out_dir.rmdir()

    def close(self, meta: dict) -> Path:
        self.file.close()
        full_meta = dict(meta)
        full_meta.update(format=FORMAT, seq_len=self.seq_len, n_segments=self.n_segments, dtype=self.dtype.name,
                         vocab_size=self.vocab_size, n_tokens_read=self.n_tokens,
                         n_tokens_dropped=self.n_tokens - self.n_segments * self.seq_len)
        move_into_place(self.tmp, self.out_dir / "tokens.bin")
        write_json(self.out_dir / "meta.json", full_meta)
        return self.out_dir


def prepare(inputs: list[str], tokenizer_path: str | os.PathLike, seq_len: int, out_dir: str | os.PathLike,
            text_field: str = "text", progress: bool = True, bos: Optional[bool] = None,
            overwrite: bool = False) -> dict:
    """Tokenize every document, bookend it with BOS (bos=None: when the tokenizer's own add_bos
    says so) and EOS, concatenate the documents in input order and cut the stream into segments
    of seq_len tokens. tokenizer_path: anything checkpoint.load_tokenizer opens (a model folder,
    a tokenizer.model, a tokenizer.json or a .gguf file). Deterministic: the same inputs give the
    same bytes. out_dir: a new or empty folder, or an earlier dataset with overwrite=True, whose
    tokens.bin and meta.json are replaced (nothing else in it). Returns meta.json's content."""
    check_output(out_dir, TOKEN_DATA, overwrite)
    if seq_len < 2:
        raise ValueError(f"--seq-len must be >= 2 (one input and one target token), got {seq_len}")
    tok = load_tokenizer(tokenizer_path)
    bos = tok.add_bos if bos is None else bos
    if bos and tok.bos_id is None:
        raise ValueError(f"{tok.path}: the tokenizer states no BOS token; prepare with --no-bos")
    if tok.eos_id is None:
        raise ValueError(f"{tok.path}: the tokenizer states no EOS token, which ends every document "
                         "(tokenizer_config.json eos_token, generation_config.json or config.json eos_token_id)")
    files = input_files(inputs)
    created = not Path(out_dir).exists()  # removed again if this run fails: no empty --out folders
    writer = SegmentWriter(out_dir, seq_len, tok.max_id() + 1)
    n_docs = 0
    try:
        bar = tqdm(files, desc="tokenizing", unit="file", disable=not progress)
        for path in bar:
            for text in read_documents(path, text_field):
                if not isinstance(text, str):
                    raise ValueError(f"{path}: document {n_docs} field {text_field!r} is {type(text).__name__}, "
                                     "expected text")
                writer.append(tok.encode(text, bos=bos, eos=True))
                n_docs += 1
            bar.set_postfix(docs=n_docs, segments=writer.n_segments)
    except BaseException:  # leave no half-written tokens.bin.tmp behind
        writer.discard(created)
        raise
    if writer.n_segments == 0:
        writer.discard(created)
        raise ValueError(f"{n_docs} documents hold {writer.n_tokens} tokens with {'BOS/' if bos else ''}EOS, fewer "
                         f"than one segment of --seq-len {seq_len}")
    meta = dict(tokenizer=str(Path(tokenizer_path).resolve()), tokenizer_kind=tok.kind, bos_id=tok.bos_id,
                eos_id=tok.eos_id, add_bos=bos, vocab_digest=tok.vocab_digest(),
                n_documents=n_docs, inputs=[str(p) for p in files], text_field=text_field)
    writer.close(meta)
    return json.loads((Path(out_dir) / "meta.json").read_text())


def check_vocabulary(meta: dict, tokenizer: Tokenizer, data_dir: str | os.PathLike) -> None:
    """Data tokenized with another vocabulary than the model's would train every id on the
    wrong token: refused when the recorded digest (or, for data prepared before digests were
    recorded, the vocabulary size) differs from the model's tokenizer. Arrays written by
    write_segments without a tokenizer are checked only against the embedding (train.py)."""
    if "tokenizer" not in meta:
        return
    n = tokenizer.max_id() + 1
    digest = meta.get("vocab_digest")
    if (digest is not None and digest != tokenizer.vocab_digest()) or meta["vocab_size"] != n:
        raise ValueError(f"{Path(data_dir) / 'meta.json'}: tokenized with {meta['tokenizer']} ({meta['vocab_size']} "
                         f"ids), whose vocabulary is not the model's ({tokenizer.path}, {n} ids); prepare the data "
                         f"with the model's tokenizer (--tokenizer {tokenizer.path})")


# ---------------------------------------------------------------------------------------------
# Reading it back for training.

class SegmentLoader:
    """Which segments each rank trains on at each optimizer step.

    Every epoch is a fresh permutation of all segments (seeded by (seed, epoch)); step k of an
    epoch takes the next global_batch segments of it, and rank r takes its own contiguous
    global_batch / world_size of those, in micro-batches. Segments left over at the end of an
    epoch (fewer than a global batch) are skipped that epoch. The position is a pure function
    of the step, so resuming at step k needs no other state, and ranks never overlap."""

    def __init__(self, segments: np.ndarray, global_batch: int, micro_batch: int = 1,
                 rank: int = 0, world_size: int = 1, seed: int = 0, seq_len: int | None = None):
        n, data_len = segments.shape
        if global_batch % world_size:
            raise ValueError(f"--global-batch-size {global_batch} is not divisible by the world size {world_size}")
        if (global_batch // world_size) % micro_batch:
            raise ValueError(f"--global-batch-size {global_batch} / world size {world_size} = "
                             f"{global_batch // world_size} sequences per rank, not divisible by "
                             f"--micro-batch-size {micro_batch}")
        if n < global_batch:
            raise ValueError(f"the data has {n} segments, fewer than one global batch of {global_batch}")
        seq_len = data_len if seq_len is None else seq_len
        if seq_len > data_len:
            raise ValueError(f"--seq-len {seq_len} is longer than the data's segments ({data_len} tokens)")
        self.segments, self.seq_len = segments, seq_len
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.steps_per_epoch = n // global_batch
        self.accumulation_steps = global_batch // world_size // micro_batch

    def epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.segments))

    def global_indices(self, step: int) -> np.ndarray:
        """The global_batch segment indices of optimizer step `step` (0-based), all ranks."""
        epoch, k = divmod(step, self.steps_per_epoch)
        return self.epoch_order(epoch)[k * self.global_batch:(k + 1) * self.global_batch]

    def rank_indices(self, step: int) -> np.ndarray:
        per_rank = self.global_batch // self.world_size
        return self.global_indices(step)[self.rank * per_rank:(self.rank + 1) * per_rank]

    def micro_batches(self, step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (inputs, targets) int64 tensors of shape (micro_batch, seq_len - 1): targets are
        the next tokens of the same segment (tokens[:, 1:] predicted from tokens[:, :-1])."""
        idx = self.rank_indices(step)
        for j in range(0, len(idx), self.micro_batch):
            rows = np.sort(idx[j:j + self.micro_batch])
            tokens = torch.from_numpy(self.segments[rows, :self.seq_len].astype(np.int64))
            yield tokens[:, :-1], tokens[:, 1:]


if __name__ == "__main__":  # the command's old name: `python -m yarn_minimal data ...`
    from yarn_minimal.__main__ import command

    command(["data", *sys.argv[1:]])
