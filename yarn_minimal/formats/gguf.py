"""llama.cpp's GGUF files in and out: written by the `gguf` package's GGUFWriter (llama.cpp's own
gguf-py), dequantized by its numpy code, read by a strict parser here (GGUFFile).

A GGUF file is one file: metadata (key -> value) followed by tensors, each stored in a ggml type
(F32, F16, BF16 or a block quantization such as Q4_1 or Q4_K). For the "llama" architecture:

    metadata                                    here
    general.architecture                        must be "llama"
    llama.embedding_length / block_count        ModelArgs.dim / n_layers
    llama.feed_forward_length                   the SwiGLU width (Meta's multiple_of form)
    llama.attention.head_count(_kv)             n_heads / n_kv_heads
    llama.attention.layer_norm_rms_epsilon      norm_eps
    llama.context_length                        the context the file says the model has
    llama.rope.freq_base / dimension_count      b / |D| (must be the whole head)
    llama.rope.scaling.*                        RopeConfig (rope_from_metadata)
    tokenizer.ggml.*                            the vocabulary (tokenizer_from_metadata)
    rope_freqs.weight (a tensor, F32, |D|/2)    per-pair factors f_d (Llama 3.x's "llama3" RoPE):
                                                read as NTK-by-parts with the paper's ramp
                                                (rope_from_freq_factors); written (freq_factors)
                                                for every per-pair RoPE the "yarn" type cannot
                                                say, with the RopeConfig under yarn_minimal.rope

    tensor                                      Meta's key
    token_embd                                  tok_embeddings
    blk.N.attn_q / attn_k / attn_v / attn_output layers.N.attention.wq / wk / wv / wo
    blk.N.ffn_gate / ffn_down / ffn_up          layers.N.feed_forward.w1 / w2 / w3
    blk.N.attn_norm / ffn_norm                  layers.N.attention_norm / ffn_norm
    output_norm / output                        norm / output (no output: tied to token_embd)

Q/K row order. HF's Llama checkpoints rotate split halves (i, i + |D|/2) and store wq / wk rows
permuted for that; llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel.permute) undoes the
permutation, and llama.cpp rotates adjacent pairs (2i, 2i+1) (its rope type NORM). A GGUF file
therefore holds Meta's interleaved order, the order model.py rotates (Eq. 3 and Eq. 4): the rows are
used as they are. tests/test_gguf.py proves it against transformers' own GGUF loader, which
permutes them back to HF's order.

RoPE. llama.cpp has no Dynamic Scaling, so a GGUF file states a static method: "none", "linear"
(PI, Eq. 10) or "yarn" (Eq. 17 to Eq. 22, the code's ramp, floored/ceiled as ggml_rope_yarn_corr_dims
does, with beta_fast/slow 32/1 whatever the file says). Its YaRN multiplies cos/sin by
attn_factor * (0.1 ln s + 1), i.e. Eq. 22 times rope.scaling.attn_factor (1 by default); with any
other type it multiplies them by attn_factor alone. Any other static per-pair RoPE is written as
rope_freqs.weight (below) plus attn_factor, with the RopeConfig under ROPE_KEY (gguf_rope).

Llama 3.1/3.2/3.3 carry no rope.scaling.* keys. llama.cpp's converter (convert_hf_to_gguf.py,
LlamaModel.generate_extra_tensors, for rope_type "llama3") writes instead one F32 tensor
rope_freqs.weight of |D|/2 factors f_d: 1 for wavelengths below L/high_freq_factor, `factor`
above L/low_freq_factor, 1/f_d = (1 - smooth)/factor + smooth in between; the base class writes no
scaling type for "llama3". llama.cpp loads it once for all layers (src/llama-model.cpp, LLM_ARCH_LLAMA:
LLM_TENSOR_ROPE_FREQS, {n_rot/2}, not required) and divides each pair's angle by it
(ggml/src/ggml-cpu/ops.cpp, ggml_rope_cache_init: rope_yarn(theta / ff, ...)), so it rotates pair d
by h_d = theta_d / f_d. That is Eq. 20 with gamma_d = (1/f_d - 1/s)/(1 - 1/s) and s = max f_d.

Integrity. Every file save() writes carries two sha256 digests in keys of its own (DIGESTS,
which llama.cpp skips): one of the metadata, one of the tensor data. open_gguf verifies the first,
load_gguf both, before anything else is read. A file from elsewhere has no digest, and gets what
can be checked without one: the structure by llama.cpp's rules (GGUFFile), names, layer count and
shapes against the metadata, model and RoPE keys in range, the tokenizer's ids, types and merges,
finite weights (docs/checkpoints.md: what each catches, measured).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import mmap
import os
import struct
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from ..files import CheckpointError, atomic_write
from ..model import ModelArgs, Transformer
from ..rope import (RopeConfig, attention_factor, frequencies, ntk_aware_base, rope_frequencies, wavelength,
                    yarn_attention_factor)
from ..tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer
from .common import assign_weights, check_finite, check_keys, check_shape, empty_model, model_args
from .meta import meta_ffn_params

# The gguf package is imported inside the functions that read or write a GGUF file, so that
# loading any other layout does not pay for its import.

ARCH = "llama"

# llama.cpp's block names -> Meta's (model.py's parameter names)
_BLOCK = {"attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv",
          "attn_output": "attention.wo", "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2",
          "ffn_up": "feed_forward.w3", "attn_norm": "attention_norm", "ffn_norm": "ffn_norm"}
_TOP = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}


def meta_key(gguf_name: str) -> Optional[str]:
    """llama.cpp's tensor name -> Meta's key, None for a name this model has no place for."""
    stem, _, suffix = gguf_name.rpartition(".")
    if suffix != "weight":
        return None
    if stem in _TOP:
        return f"{_TOP[stem]}.weight"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isascii() and parts[1].isdigit() and parts[2] in _BLOCK:
        return f"layers.{parts[1]}.{_BLOCK[parts[2]]}.weight"
    return None


def gguf_name(key: str) -> str:
    """Meta's key -> llama.cpp's tensor name (the inverse of meta_key)."""
    stem = key.removesuffix(".weight")
    top = {v: k for k, v in _TOP.items()}
    if stem in top:
        return f"{top[stem]}.weight"
    _, layer, rest = stem.split(".", 2)
    block = {v: k for k, v in _BLOCK.items()}
    return f"blk.{layer}.{block[rest]}.weight"


# ---------------------------------------------------------------------------------------
# Reading: the file's structure, every size checked against the file before it is used
# ---------------------------------------------------------------------------------------

# GGUF versions 2 and 3 (ggml's docs/gguf.md), little-endian:
#   "GGUF", uint32 version, uint64 n_tensors, uint64 n_kv
#   n_kv      x  key (string), uint32 value type, value          a string: uint64 length + UTF-8 bytes
#   n_tensors x  name (string), uint32 n_dims, n_dims x uint64 ne, uint32 ggml type, uint64 offset
#   padding to general.alignment (32 by default), then the tensors' data at their offsets
# The gguf package's GGUFReader trusts each size field as it meets it (a string of 2^63 bytes, an
# array of 2^40 items are attempted) and lets UnicodeDecodeError, KeyError and numpy's errors out,
# so the header is parsed here, by llama.cpp's own rules (ggml/src/gguf.cpp, gguf_init_from_file_impl):
# known types, no key or tensor name twice, names under 64 bytes, 1 to 4 dims, rows a whole number
# of blocks, and the tensors back to back in their listed order, each padded to the alignment.

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q", 12: "<d"}
_BOOL, _STRING, _ARRAY = 7, 8, 9
_MAX_NAME = 63  # GGML_MAX_NAME, 64 bytes with the terminating zero
# the fewest bytes one entry takes (a one-character name, the smallest value, one dim): a count
# that the rest of the file cannot hold is refused before anything is read for it
_MIN_KV, _MIN_TENSOR = 8 + 1 + 4 + 1, 8 + 1 + 4 + 8 + 4 + 8

# The checksum save() writes into every file: two 64-digit hex sha256 strings. llama.cpp skips
# keys it does not know. "metadata" covers the bytes before the tensor data (header, every key,
# tensor infos, padding), "tensors" the rest of the file; both are taken with the 64 characters
# of the two values written as "0", their content while the digests are computed.
DIGESTS = {"metadata": "yarn_minimal.sha256.metadata", "tensors": "yarn_minimal.sha256.tensors"}


@dataclasses.dataclass
class Field:
    name: str
    types: list  # [GGUFValueType], or [ARRAY, element type]
    value: object  # int, float, bool, str, or a list of them
    offset: int  # where the entry begins
    span: tuple[int, int]  # the value's bytes (a string's without its length)


@dataclasses.dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml's order: the row length first
    tensor_type: object  # gguf.GGMLQuantizationType
    offset: int  # absolute, in the file
    n_bytes: int
    buffer: object = dataclasses.field(repr=False)

    @property
    def data(self) -> np.ndarray:
        """The stored bytes as rows of uint8 (gguf.quants.dequantize's input): a view of the map."""
        from gguf import GGML_QUANT_SIZES

        block, size = GGML_QUANT_SIZES[self.tensor_type]
        rows = (*reversed(self.shape[1:]), self.shape[0] // block * size)
        return np.frombuffer(self.buffer, np.uint8, self.n_bytes, self.offset).reshape(rows)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _align(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


class GGUFFile:
    """One .gguf file's keys and tensor infos, parsed and checked; the tensor data stays in the
    read-only memory map until a tensor's `data` is used."""

    def __init__(self, path: Path):
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

        self._value_type, self._tensor_type, self._sizes = GGUFValueType, GGMLQuantizationType, GGML_QUANT_SIZES
        self.path = path
        if not path.is_file():
            raise CheckpointError(f"{path}: not a file")
        with path.open("rb") as f:
            magic = f.read(4)
            if magic != b"GGUF":
                raise CheckpointError(f"{path}: cannot be read as GGUF (it begins with {magic!r}, not b'GGUF')")
            self.size = os.fstat(f.fileno()).st_size
            self.buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.pos = 4
        self.version = self._uint(4, "the version")
        if self.version not in (2, 3):
            other = " (written on a big-endian machine?)" if self.version & 0xFFFF == 0 else ""
            raise CheckpointError(f"{path}: cannot be read as GGUF: version {self.version}{other}; known: 2 and 3")
        n_tensors, n_kv = self._uint(8, "the tensor count"), self._uint(8, "the key count")
        self._fits(n_kv, _MIN_KV, "metadata keys")
        self.fields: dict[str, Field] = {}
        for _ in range(n_kv):
            self._field()
        self.alignment = self._alignment()
        self._fits(n_tensors, _MIN_TENSOR, "tensors")
        infos = [self._tensor_info() for _ in range(n_tensors)]
        self.data_offset = _align(self.pos, self.alignment)
        self.tensors = self._place(infos)

    # -- reading, each size checked first

    def _corrupt(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: corrupt GGUF header: {what}")

    def _need(self, n: int, what: str) -> int:
        start = self.pos
        if n > self.size - start:
            raise CheckpointError(f"{self.path}: truncated GGUF file (the file has {self.size} bytes, but {what} at "
                                  f"byte {start} would end at byte {start + n}): an incomplete download, or a corrupt "
                                  "length")
        self.pos += n
        return start

    def _fits(self, count: int, least: int, what: str) -> None:
        left = self.size - self.pos
        if count > left // least:
            raise self._corrupt(f"it declares {count} {what} at byte {self.pos}, but the {left} bytes after it "
                                f"hold at most {left // least}")

    def _uint(self, n: int, what: str) -> int:
        return int.from_bytes(self.buffer[self._need(n, what):self.pos], "little")

    def _string(self, what: str) -> tuple[str, int]:
        n = self._uint(8, f"the length of {what}")
        start = self._need(n, what)
        try:
            return str(self.buffer[start:self.pos], "utf-8"), start
        except UnicodeDecodeError as e:
            raise self._corrupt(f"{what} at byte {start} is not UTF-8 ({e.reason} at its byte {e.start})") from None

    def _field(self) -> None:
        offset = self.pos
        key, _ = self._string("a key name")
        if not key or not key.isprintable():
            raise self._corrupt(f"key name {key!r} at byte {offset} is empty or holds control characters")
        if key in self.fields:
            raise self._corrupt(f"key {key!r} appears twice, at bytes {self.fields[key].offset} and {offset}")
        vtype = self._uint(4, f"the type of key {key!r}")
        if vtype == _ARRAY:
            etype, n = self._uint(4, f"the item type of key {key!r}"), self._uint(8, f"the length of key {key!r}")
            start = self.pos
            value = self._array(key, etype, n)
            types = [self._value_type(_ARRAY), self._value_type(etype)]
        else:
            value, start = self._scalar(key, vtype)
            types = [self._value_type(vtype)]
        self.fields[key] = Field(key, types, value, offset, (start, self.pos))

    def _scalar(self, key: str, vtype: int):
        if vtype == _STRING:
            return self._string(f"the value of key {key!r}")
        if vtype not in _SCALARS:
            raise self._corrupt(f"key {key!r} has value type {vtype}, which GGUF does not define")
        start = self._need(struct.calcsize(_SCALARS[vtype]), f"the value of key {key!r}")
        value = struct.unpack_from(_SCALARS[vtype], self.buffer, start)[0]
        if vtype == _BOOL:
            if value > 1:
                raise self._corrupt(f"key {key!r} is a bool stored as {value}; GGUF writes 0 or 1")
            value = bool(value)
        return value, start

    def _array(self, key: str, etype: int, n: int) -> list:
        if etype == _STRING:
            return self._string_array(key, n)
        if etype not in _SCALARS:
            raise self._corrupt(f"key {key!r} is an array of value type {etype}; GGUF arrays hold numbers, "
                                "bools or strings")
        dtype = np.dtype(_SCALARS[etype])
        self._fits(n, dtype.itemsize, f"items in key {key!r}")
        items = np.frombuffer(self.buffer, dtype, n, self._need(n * dtype.itemsize, f"the items of key {key!r}"))
        if etype == _BOOL and n and items.max() > 1:
            raise self._corrupt(f"key {key!r} holds a bool stored as {items.max()}; GGUF writes 0 or 1")
        return items.astype(bool).tolist() if etype == _BOOL else items.tolist()

    def _string_array(self, key: str, n: int) -> list[str]:
        """_string n times, in one loop (a vocabulary is 10^5 strings)."""
        self._fits(n, 8, f"strings in key {key!r}")
        buf, size, pos, raw, length_at = self.buffer, self.size, self.pos, [], struct.Struct("<Q").unpack_from
        for i in range(n):
            length = length_at(buf, pos)[0] if pos + 8 <= size else 8
            if pos + 8 + length > size:
                self.pos = pos
                self._need(8, f"the length of item {i} of key {key!r}")
                self._need(length, f"item {i} of key {key!r}")
            raw.append(buf[pos + 8:pos + 8 + length])
            pos += 8 + length
        self.pos = pos
        try:
            return [str(item, "utf-8") for item in raw]
        except UnicodeDecodeError:
            i = next(i for i, item in enumerate(raw) if not _is_utf8(item))
            raise self._corrupt(f"item {i} of key {key!r} is not UTF-8: {raw[i][:40]!r}") from None

    def _alignment(self) -> int:
        field = self.fields.get("general.alignment")
        if field is None:
            return 32  # GGUF_DEFAULT_ALIGNMENT
        value = field.value
        if field.types != [self._value_type.UINT32] or value == 0 or value & (value - 1):
            raise self._corrupt(f"general.alignment is {value!r} ({field.types[0].name}); it must be a uint32 "
                                "power of 2")
        return value

    def _tensor_info(self) -> tuple:
        offset = self.pos
        name, _ = self._string("a tensor name")
        if not 0 < len(name.encode()) <= _MAX_NAME or not name.isprintable():
            raise self._corrupt(f"tensor name {name!r} at byte {offset}: GGUF names are 1 to {_MAX_NAME} "
                                "printable bytes")
        n_dims = self._uint(4, f"the dimension count of tensor {name}")
        if not 1 <= n_dims <= 4:
            raise self._corrupt(f"tensor {name} has {n_dims} dimensions; ggml tensors have 1 to 4")
        shape = tuple(self._uint(8, f"dimension {i} of tensor {name}") for i in range(n_dims))
        raw = self._uint(4, f"the type of tensor {name}")
        try:
            qtype = self._tensor_type(raw)
            block, size = self._sizes[qtype]
        except (ValueError, KeyError):
            raise self._corrupt(f"tensor {name} has ggml type {raw}, which the gguf package does not know") from None
        if shape[0] % block:
            raise self._corrupt(f"tensor {name}: rows of {shape[0]} values are not a whole number of "
                                f"{qtype.name} blocks of {block}")
        n_bytes = math.prod(shape) // block * size  # an exact integer: compared with the file size below
        return name, shape, qtype, self._uint(8, f"the data offset of tensor {name}"), n_bytes, offset

    def _place(self, infos: list) -> list[TensorInfo]:
        """Tensors back to back in the listed order, each starting at a multiple of the
        alignment, all inside the file (llama.cpp refuses anything else)."""
        tensors, names, expected = [], {}, 0
        for name, shape, qtype, offset, n_bytes, at in infos:
            if name in names:
                raise self._corrupt(f"tensor {name} is listed twice, at bytes {names[name]} and {at}")
            names[name] = at
            if offset != expected:
                raise self._corrupt(f"tensor {name}'s data is at offset {offset}; after the tensors before it, "
                                    f"padded to {self.alignment} bytes, it must be {expected}")
            end = self.data_offset + offset + n_bytes
            if end > self.size:
                raise CheckpointError(f"{self.path}: truncated GGUF file (the file has {self.size} bytes, but tensor "
                                      f"{name}'s data ends at byte {end}); an incomplete download?")
            tensors.append(TensorInfo(name, shape, qtype, self.data_offset + offset, n_bytes, self.buffer))
            expected = _align(offset + n_bytes, self.alignment)
        return tensors

    # -- the checksum

    def sha256(self, start: int, end: int) -> str:
        """sha256 of bytes [start, end) with the two digest values read as "0" x 64."""
        h, view, pos = hashlib.sha256(), memoryview(self.buffer), start
        for a, b in sorted(f.span for key, f in self.fields.items() if key in DIGESTS.values()):
            if start <= a and b <= end:
                h.update(view[pos:a])
                h.update(b"0" * (b - a))
                pos = b
        for chunk in range(pos, end, 1 << 24):
            h.update(view[chunk:min(end, chunk + (1 << 24))])
        view.release()
        return h.hexdigest()

    def region(self, part: str) -> tuple[int, int]:
        return (0, self.data_offset) if part == "metadata" else (self.data_offset, self.size)

    def verify(self, part: str) -> None:
        """Check DIGESTS[part] when the file has one (every file save() wrote); a file from
        elsewhere has none, and the checks in load_gguf are all there is."""
        ours = {k for k in self.fields if k.startswith("yarn_minimal.sha256.")}  # not ROPE_KEY
        if not ours:
            return
        if ours != set(DIGESTS.values()):
            raise self._corrupt(f"it has the keys {sorted(ours)}; a file yarn_minimal wrote has exactly "
                                f"{sorted(DIGESTS.values())}")
        if self._rewritten():
            return
        key = DIGESTS[part]
        stored = self.fields[key].value
        if not (isinstance(stored, str) and len(stored) == 64 and all(c in "0123456789abcdef" for c in stored)):
            raise self._corrupt(f"{key} is {stored!r}, not 64 hex digits")
        found = self.sha256(*self.region(part))
        if found != stored:
            raise CheckpointError(f"{self.path}: the sha256 of its {part} is {found}, but its key {key} says {stored}: "
                                  "the file was damaged after it was saved (copy or download it again), or another "
                                  "tool rewrote it keeping this key")

    def _rewritten(self) -> bool:
        """llama-quantize copies every key of its input, the digests too, into a file with other
        tensor types: one whose general.file_type and tensor types are both ones save() never
        writes is such a file, and its stale digests are not checked (one damaged byte cannot
        change both)."""
        file_type = self.fields.get("general.file_type")
        ours = {code for _, code in FILE_TYPES.values()}
        written = {self._tensor_type[name] for name, _ in FILE_TYPES.values()}
        if file_type is None or file_type.value in ours or all(t.tensor_type in written for t in self.tensors):
            return False
        warnings.warn(f"{self.path}: yarn_minimal.sha256.* not checked: general.file_type {file_type.value} and "
                      "its tensor types are not ones yarn_minimal writes (F32, F16, BF16), so another tool "
                      "(llama-quantize) made it from a file of ours and copied the keys")
        return True


def open_gguf(path: Path) -> GGUFFile:
    """The file's header, parsed and checked, and its metadata checksum verified when it has one
    (no tensor data is read)."""
    try:
        gguf = GGUFFile(path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    gguf.verify("metadata")
    return gguf


class Metadata:
    """The file's key -> value pairs; need() names a missing key, number() a key of the wrong kind."""

    def __init__(self, gguf: GGUFFile, path: Path):
        self.gguf, self.path = gguf, path

    def __contains__(self, key: str) -> bool:
        return key in self.gguf.fields

    def get(self, key: str, default=None):
        field = self.gguf.fields.get(key)
        return default if field is None else field.value

    def need(self, key: str):
        if key not in self:
            raise CheckpointError(f"{self.path}: metadata key {key!r} is missing")
        return self.get(key)

    def number(self, key: str, default=None, kind=int, least=None):
        """A scalar key: an integer for kind=int, any finite number for kind=float, at least
        `least` when given (need()'s error when absent and no default is given)."""
        value = self.need(key) if default is None else self.get(key, default)
        integer = isinstance(value, int) and not isinstance(value, bool)
        if not (integer or (kind is float and isinstance(value, float) and math.isfinite(value))):
            raise CheckpointError(f"{self.path}: metadata key {key!r} is {_short(value)}; expected one "
                                  f"{'finite number' if kind is float else 'integer'}")
        if least is not None and value < least:
            raise CheckpointError(f"{self.path}: metadata key {key!r} is {value}; expected at least {least}")
        return kind(value)

    @property
    def arch(self) -> str:
        return self.need("general.architecture")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({type(value).__name__} of {len(value)})"


def _check_arch(meta: Metadata) -> None:
    arch = meta.arch
    if arch != ARCH:
        raise CheckpointError(f"{meta.path}: general.architecture is {_short(arch)}; only {ARCH!r} "
                              "(Llama-architecture models: Llama 2/3, SmolLM, Mistral converted as llama) can be loaded")


# ---------------------------------------------------------------------------------------
# Metadata -> RopeConfig and ModelArgs
# ---------------------------------------------------------------------------------------

def rope_from_metadata(meta: Metadata) -> tuple[RopeConfig, dict, list[str]]:
    """(RopeConfig, provenance: field -> metadata key, tensor or "default", warnings): the
    rope.* keys (rope_from_keys), or the rope_freqs.weight tensor when the file has one: read
    as the RopeConfig under ROPE_KEY when this project wrote it (rope_from_project_key, checked
    against the table), else as Llama 3's llama3 (rope_from_freq_factors), with attn_factor as
    its temperature. A table of ones is plain RoPE; factors together with a scaling type
    (llama.cpp would apply both, one after the other) are refused."""
    rope, prov, notes = rope_from_keys(meta)
    tensor = next((t for t in meta.gguf.tensors if t.name == ROPE_FREQS), None)
    if tensor is None:
        if ROPE_KEY in meta:
            raise CheckpointError(f"{meta.path}: {ROPE_KEY} is set but the file has no tensor {ROPE_FREQS}, which is "
                                  "what llama.cpp would run it with")
        return rope, prov, notes
    head_dim = head_dim_from_metadata(meta)
    if math.prod(tensor.shape) != head_dim // 2:  # checked before |D| sizes anything
        raise CheckpointError(f"{meta.path}: tensor {ROPE_FREQS} has {math.prod(tensor.shape)} factors; expected "
                              f"|D|/2 = {head_dim // 2}, one per pair")
    factors = _to_torch(tensor, torch.float64, "cpu")  # |D|/2 numbers: cheap even for read_gguf_config
    if bool((factors == 1).all()) and ROPE_KEY not in meta:
        return rope, prov, notes
    a = meta.arch
    if not (rope.method == "none" or (rope.method == "yarn" and rope.scale == 1.0)):  # a temperature alone is fine
        raise CheckpointError(f"{meta.path}: tensor {ROPE_FREQS} (Llama 3's per-pair RoPE factors) and "
                              f"{a}.rope.scaling.* ({rope.describe()}) are both set; llama.cpp would apply one after "
                              "the other, which no RopeConfig expresses")
    temperature = attention_factor(rope, rope.scale)  # rope.scaling.attn_factor, 1 when absent
    if ROPE_KEY in meta:
        rope = rope_from_project_key(meta, factors, rope.base, temperature, head_dim)
        prov.update({field: f"{ROPE_KEY} (checked against {ROPE_FREQS} and {a}.rope.scaling.attn_factor)"
                     for field in ("method", "scale", "original_length", "alpha", "beta", "ramp", "truncate",
                                   "attention_factor", "attention_coefficient")})
        if rope.window is not None and meta.number(f"{a}.context_length", least=1) != rope.window:
            notes.append(f"{a}.context_length = {meta.get(f'{a}.context_length')}, but the window of "
                         f"{rope.describe()} is {rope.window}")
        return rope, prov, notes
    rope = rope_from_freq_factors(factors, rope.base, head_dim, f"{meta.path}: tensor {ROPE_FREQS}")
    L, s = rope.original_length, rope.scale
    prov.update(method=f"{ROPE_FREQS} (per-pair factors f_d: Llama 3's llama3, as llama.cpp stores it)",
                scale=f"{ROPE_FREQS}: s = max f_d", ramp=f"{ROPE_FREQS}: f_d follows Eq. 18, linear in r",
                original_length=f"{ROPE_FREQS}: L/alpha = the wavelength where f_d reaches s (fit)",
                beta=f"{ROPE_FREQS}: L/beta = the wavelength where f_d reaches 1 (fit)",
                alpha=f"an assumption (Llama 3's low_freq_factor): {ROPE_FREQS} fixes only L/alpha and L/beta, "
                      "and every alpha with those two gives the same frequencies")
    if temperature != 1.0:  # llama.cpp multiplies cos/sin by attn_factor whatever the scaling type (tested)
        rope = dataclasses.replace(rope, method="yarn", attention_factor=temperature)
    context = meta.number(f"{a}.context_length", least=1)
    if context != round(s * L):
        if context < L:
            notes.append(f"{a}.context_length = {context} is shorter than L = {L}, read from {ROPE_FREQS}")
        else:  # the window the file states (Llama 3.1: 131072, not s L = 65536), as formats/hf.py reads llama3
            rope = dataclasses.replace(rope, extended_length=context)
            prov["extended_length"] = f"{a}.context_length"
    return rope, prov, notes


def rope_from_project_key(meta: Metadata, factors: torch.Tensor, base: float, temperature: float,
                          head_dim: int) -> RopeConfig:
    """The RopeConfig save() wrote under ROPE_KEY beside a rope_freqs.weight table, accepted only
    if it is what llama.cpp runs: its f_d = theta_d / h(theta_d) equal the table's (relative
    FACTOR_TOLERANCE), its sqrt(1/t) equals rope.scaling.attn_factor and its base rope.freq_base."""
    where = f"{meta.path}: metadata key {ROPE_KEY!r}"
    text = meta.get(ROPE_KEY)
    try:
        fields = json.loads(text) if isinstance(text, str) else None
        if not isinstance(fields, dict):
            raise ValueError(f"expected a JSON object of RopeConfig fields, found {_short(text)}")
        rope = RopeConfig(**fields)
    except (ValueError, TypeError) as e:  # json's errors are ValueErrors
        raise CheckpointError(f"{where}: {e}") from None
    if rope.dynamic:
        raise CheckpointError(f"{where}: says {rope.describe()}; a GGUF file is static (llama.cpp has no Dynamic Scaling)")
    if abs(rope.base - base) > 1e-6 * base:
        raise CheckpointError(f"{where}: says base {rope.base:g}, but {meta.arch}.rope.freq_base is {base:g}")
    want = freq_factors(rope, head_dim).double()
    mismatch = ((factors.flatten() - want).abs() / want)
    if mismatch.max().item() > FACTOR_TOLERANCE:
        d = int(mismatch.argmax())
        raise CheckpointError(f"{where}: says {rope.describe()}, which needs f_{d} = {want[d].item():.7g} at pair "
                              f"d={d}, but tensor {ROPE_FREQS} (what llama.cpp runs) has {factors.flatten()[d].item():.7g}")
    wanted = attention_factor(rope, rope.scale)
    if abs(wanted - temperature) > 1e-6 * wanted:
        raise CheckpointError(f"{where}: says {rope.describe()} with sqrt(1/t) = {wanted:.7g}, but llama.cpp "
                              f"multiplies cos/sin by {meta.arch}.rope.scaling.attn_factor = {temperature:.7g}")
    return rope


def rope_from_keys(meta: Metadata) -> tuple[RopeConfig, dict, list[str]]:
    """The rope.* keys as a RopeConfig, read the way llama.cpp reads them (llama-model.cpp
    load_hparams, llama-context.cpp):

    freq_base                 b, default 10000
    scaling.type              "none" | "linear" | "yarn"; absent means "linear" with factor 1
    scaling.factor            s (the older key rope.scale_linear too); 0 or absent means 1
    scaling.original_context_length   L for YaRN; default context_length
    scaling.attn_factor       multiplies cos/sin whatever the type: for "yarn" sqrt(1/t) = attn_factor *
                              (0.1 ln s + 1); with no scaling, sqrt(1/t) itself (YaRN at s = 1);
                              with "linear" refused (PI has no temperature)
    scaling.yarn_beta_fast/slow       not read by llama.cpp for "llama" (it uses 32/1), nor here;
                              a note says so when the file sets them
    """
    a = meta.arch
    prov, notes = {}, []

    def read(field, key, default, convert=float, least=None):
        full = f"{a}.{key}"
        if full not in meta:
            prov[field] = "default"
            return default
        prov[field] = full
        if convert is not str:
            return meta.number(full, kind=convert, least=least)
        if not isinstance(meta.get(full), str):
            raise CheckpointError(f"{meta.path}: metadata key {full!r} is {_short(meta.get(full))}; expected a string")
        return meta.get(full)

    # ranges RopeConfig does not state itself: positive lengths, a factor of 0 (meaning 1) or >= 1
    base = read("base", "rope.freq_base", 10000.0)
    context = meta.number(f"{a}.context_length", least=1)
    kind = read("method", "rope.scaling.type", "linear", str)
    factor = read("scale", "rope.scaling.factor", 0.0, least=0)
    if prov["scale"] == "default" and f"{a}.rope.scale_linear" in meta:
        factor = read("scale", "rope.scale_linear", 0.0, least=0)
    scale = 1.0 if factor == 0.0 else factor
    original = read("original_length", "rope.scaling.original_context_length", context, int, least=1)
    if prov["original_length"] == "default":
        prov["original_length"] = f"{a}.context_length"
    for key in ("rope.scaling.yarn_log_multiplier", "rope.scaling.yarn_ext_factor"):
        if f"{a}.{key}" in meta:
            raise CheckpointError(f"{meta.path}: {a}.{key} = {_short(meta.get(f'{a}.{key}'))} is set; that llama.cpp "
                                  "YaRN variant (DeepSeek's mscale / a partial ramp) has no RopeConfig equivalent")
    # llama.cpp multiplies cos/sin by attn_factor whatever the scaling type (tested); for "yarn" it
    # multiplies Eq. 22 (0.1 ln s + 1), for the others it is sqrt(1/t) itself
    attn = read("attention_factor", "rope.scaling.attn_factor", 1.0)
    try:
        if kind == "none" or (scale == 1.0 and kind in ("linear", "yarn")):
            if kind == "yarn":
                notes.append(f"{a}.rope.scaling.type is 'yarn' with factor 1: llama.cpp then applies plain RoPE")
            prov = {k: v for k, v in prov.items() if k in ("base", "method", "original_length", "attention_factor")}
            if attn != 1.0:  # plain RoPE with a temperature: YaRN at s = 1 with its sqrt(1/t) set
                return RopeConfig(method="yarn", base=base, original_length=original, attention_factor=attn), prov, notes
            return RopeConfig(base=base, original_length=original), prov, notes
        if kind == "linear":
            if attn != 1.0:
                raise CheckpointError(f"{meta.path}: {a}.rope.scaling.attn_factor = {attn:g} with linear scaling: "
                                      "llama.cpp multiplies PI's cos/sin by it, which no RopeConfig expresses "
                                      "(only YaRN has a temperature)")
            if original * scale != context and prov["original_length"] == f"{a}.context_length":
                notes.append(f"linear scaling s = {scale:g} with L = {a}.context_length = {context}: the file does "
                             f"not say whether context_length is L or L' = s L")
            return RopeConfig(method="pi", scale=scale, original_length=original, base=base), prov, notes
        if kind == "yarn":
            if prov["original_length"] == f"{a}.context_length":
                notes.append(f"no {a}.rope.scaling.original_context_length: L = context_length = {context} "
                             "(llama.cpp's fallback)")
            if original * scale != context and context != meta.get(f"{a}.attention.sliding_window"):  # save()'s min
                notes.append(f"{a}.context_length = {context}, but s L = {scale:g} x {original} = {original * scale:g}")
            alpha, beta = 1.0, 32.0  # Eq. 18's bounds as llama.cpp applies them to "llama" files
            for key, used in (("rope.scaling.yarn_beta_slow", alpha), ("rope.scaling.yarn_beta_fast", beta)):
                if f"{a}.{key}" in meta:
                    found = meta.number(f"{a}.{key}", kind=float)
                    notes.append(f"{a}.{key} = {found:g} is set, but llama.cpp does not read it "
                                 f"for 'llama' and uses {used:g}; so does this loader")
            # Sec. 3.4: llama.cpp multiplies Eq. 22 by attn_factor; 1 leaves Eq. 22 itself (None)
            factor = None if attn == 1.0 else attn * yarn_attention_factor(scale)
            if factor is not None and abs(factor - 1.0) < 1e-6:  # float32 attn_factor = 1 / Eq. 22
                # YaRN without its attention factor is NTK-by-parts (Eq. 17 to Eq. 20), what gguf_rope writes for it
                return RopeConfig(method="ntk-by-parts", scale=scale, original_length=original, base=base,
                                  alpha=alpha, beta=beta), prov, notes
            return RopeConfig(method="yarn", scale=scale, original_length=original, base=base,
                              alpha=alpha, beta=beta, attention_factor=factor), prov, notes
    except ValueError as e:
        raise CheckpointError(f"{meta.path}: {a}.rope.*: {e}") from None
    raise CheckpointError(f"{meta.path}: {a}.rope.scaling.type is {kind!r}; supported: none, linear, yarn")


def head_dim_from_metadata(meta: Metadata) -> int:
    """|D| = embedding_length / head_count; RoPE must rotate the whole head."""
    a = meta.arch
    dim, n_heads = meta.number(f"{a}.embedding_length", least=1), meta.number(f"{a}.attention.head_count", least=1)
    if dim % n_heads:
        raise CheckpointError(f"{meta.path}: {a}.embedding_length {dim} is not a multiple of "
                              f"{a}.attention.head_count {n_heads}")
    head_dim = dim // n_heads
    for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        found = meta.number(f"{a}.{key}", head_dim)
        if found != head_dim:
            raise CheckpointError(f"{meta.path}: {a}.{key} is {found}; this model needs the whole head, "
                                  f"embedding_length / head_count = {head_dim}")
    return head_dim


def args_from_metadata(meta: Metadata, rope: Optional[RopeConfig], vocab_size: int, tied: bool = False) -> ModelArgs:
    a = meta.arch
    head_dim_from_metadata(meta)  # RoPE must cover the whole head
    dim, n_heads = meta.number(f"{a}.embedding_length"), meta.number(f"{a}.attention.head_count")
    if meta.number(f"{a}.expert_count", 0) > 0:
        raise CheckpointError(f"{meta.path}: {a}.expert_count is {meta.get(f'{a}.expert_count')}: a mixture of "
                              "experts (Mixtral) is not a Llama 2 model")
    hidden = meta.number(f"{a}.feed_forward_length", least=1)  # per-layer arrays (some GGUFs) are refused here
    multiple_of, multiplier = meta_ffn_params(dim, hidden, meta.path)
    eps = meta.number(f"{a}.attention.layer_norm_rms_epsilon", kind=float)
    if not 0 < eps < 1:
        raise CheckpointError(f"{meta.path}: {a}.attention.layer_norm_rms_epsilon is {eps:g}; RMSNorm's epsilon "
                              "lies between 0 and 1 (Llama: 1e-5 or 1e-6)")
    params = dict(dim=dim, n_layers=meta.number(f"{a}.block_count", least=1), n_heads=n_heads,
                  n_kv_heads=meta.number(f"{a}.attention.head_count_kv", n_heads, least=1), vocab_size=vocab_size,
                  multiple_of=multiple_of, ffn_dim_multiplier=multiplier, norm_eps=eps)
    if f"{a}.attention.sliding_window" in meta:  # save() writes it for a Mistral; llama.cpp ignores it for "llama"
        params["sliding_window"] = meta.number(f"{a}.attention.sliding_window", least=1)
    if rope is None:
        rope, _, notes = rope_from_metadata(meta)
        for note in notes:
            warnings.warn(f"{meta.path}: {note}")
    return model_args(params, rope, meta.path, tied)


# ---------------------------------------------------------------------------------------
# Llama 3's rope_freqs.weight: per-pair factors <-> RopeConfig
# ---------------------------------------------------------------------------------------

ROPE_FREQS = "rope_freqs.weight"
# relative, on h_d = theta_d / f_d: the factors are float32, and llama.cpp's converter forms theta_d in
# float32 too; Llama 3.1's and 3.2's tables (from transformers' llama3 init or the converter's loop) are
# within 2.5e-7 of their configs' own frequencies
FACTOR_TOLERANCE = 1e-6


def freq_factors(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """f_d = theta_d / h(theta_d) for every pair, float32: the rope_freqs.weight with which
    llama.cpp, dividing theta_d by f_d, rotates pair d by this RopeConfig's h(theta_d)."""
    theta = rope_frequencies(head_dim, rope.base)
    h, _ = frequencies(rope, head_dim, rope.scale)
    return (theta / h).float()


def rope_from_freq_factors(factors: torch.Tensor, base: float, head_dim: int, where: str) -> RopeConfig:
    """The NTK-by-parts RopeConfig with the paper's ramp (Eq. 17 to Eq. 20) whose frequencies are
    theta_d / f_d at every pair; a table of any other shape is refused, naming its worst pair.

    s = max f_d. Eq. 20 with h = theta/f gives gamma_d = (1/f_d - 1/s)/(1 - 1/s). Eq. 18 is linear
    in r = L/lambda = L theta/(2 pi), so on the pairs strictly inside the ramp gamma is a line in
    theta_d, 0 at the wavelength L/alpha and 1 at L/beta. A line fixes those two wavelengths and no
    more: alpha = 1 (Llama 3's low_freq_factor) is assumed, which makes L = the wavelength where
    gamma = 0 and beta = L / the wavelength where gamma = 1. The config is then checked against
    every pair, inside the ramp and outside it."""
    theta, f = rope_frequencies(head_dim, base), factors.double().flatten()
    if f.shape != theta.shape:
        raise CheckpointError(f"{where} has {f.numel()} factors; expected |D|/2 = {head_dim // 2}, one per pair")
    if not bool((torch.isfinite(f) & (f > 0)).all()):
        raise CheckpointError(f"{where}: every factor must be finite and > 0; found {f.min().item():g} .. {f.max().item():g}")
    top = f.max().item()
    gamma = (1 / f - 1 / top) / (1 - 1 / top) if top > 1 else torch.ones_like(f)
    inside = (gamma > 0) & (gamma < 1)
    if int(inside.sum()) < 2:
        raise CheckpointError(f"{where}: not a llama3 table: {int(inside.sum())} of its {f.numel()} factors lie "
                              f"strictly between 1 and the largest, {top:.7g}; Eq. 18's ramp needs at least 2")
    slope, intercept = (float(c) for c in np.polyfit(theta[inside].numpy(), gamma[inside].numpy(), 1))
    if not (slope > 0 and intercept < 0):  # gamma = slope theta + intercept must be 0 at some theta > 0
        raise CheckpointError(f"{where}: not a llama3 table: its {int(inside.sum())} factors between 1 and {top:.7g} "
                              f"(pairs {inside.nonzero().flatten().tolist()}) are not Eq. 18's ramp, a line in "
                              "r = L/lambda that starts at a positive r")
    theta_start, theta_end = -intercept / slope, (1 - intercept) / slope  # gamma = 0 and gamma = 1
    L, beta = wavelength(theta_start), theta_end / theta_start  # beta = L / wavelength(theta_end)
    scale = float(str(np.float32(top)))  # the factor as the config wrote it (8, 32, 3.3), not its float32 rounding
    for b in (round(beta, 4), beta):  # a fit to float32 data: a short decimal (4, not 3.9999992) if it fits as well
        try:
            cfg = RopeConfig(method="ntk-by-parts", ramp="paper", scale=scale, original_length=round(L), base=base,
                             alpha=1.0, beta=b)
        except ValueError as e:
            raise CheckpointError(f"{where}: not a llama3 table: the fit gives L = {L:.6g}, beta = {beta:.6g} ({e})") from None
        h, _ = frequencies(cfg, head_dim, scale)
        mismatch = (h - theta / f).abs() / (theta / f)
        if mismatch.max().item() <= FACTOR_TOLERANCE:
            return cfg
    d = int(mismatch.argmax())
    raise CheckpointError(f"{where}: not a llama3 table: the nearest NTK-by-parts with the paper's ramp "
                          f"({cfg.describe()}, alpha=1, beta={beta:.6g}) needs f_{d} = {(theta[d] / h[d]).item():.7g} at "
                          f"pair d={d}, the file has {f[d].item():.7g} (relative mismatch {mismatch[d].item():.1e}, "
                          f"tolerance {FACTOR_TOLERANCE:g})")


def rope_config(path: str | os.PathLike) -> tuple[RopeConfig, dict, list[str]]:
    """(RopeConfig, provenance, warnings) of a .gguf file, for `python -m yarn_minimal rope --config`."""
    meta = Metadata(open_gguf(Path(path)), Path(path))
    _check_arch(meta)
    return rope_from_metadata(meta)


def read_gguf_config(path: str | os.PathLike) -> tuple[ModelArgs, dict, list[str]]:
    """(ModelArgs with the file's RopeConfig, provenance, warnings) without reading a weight:
    checkpoint.read_config's answer for a .gguf file."""
    path = Path(path)
    meta = Metadata(open_gguf(path), path)
    _check_arch(meta)
    vocab_rows = check_layout(meta, tensors_by_key(meta.gguf, path))
    rope, provenance, notes = rope_from_metadata(meta)
    provenance["head_dim"] = f"{meta.arch}.embedding_length / {meta.arch}.attention.head_count"
    return args_from_metadata(meta, rope, vocab_rows), provenance, notes


# ---------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------

@functools.cache
def can_dequantize(qtype) -> bool:
    """Whether gguf's Python code can turn this ggml type into float32 (tried on one zero block)."""
    from gguf import GGML_QUANT_SIZES
    from gguf.quants import dequantize

    _, type_size = GGML_QUANT_SIZES[qtype]
    try:
        dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
        return True
    except (NotImplementedError, ValueError, TypeError):
        return False


def _to_torch(t, dtype, device) -> torch.Tensor:
    """One tensor, dequantized to float32 by gguf's numpy code, then converted."""
    from gguf.quants import dequantize

    arr = dequantize(t.data, t.tensor_type)
    if not arr.flags.writeable:  # an F32 tensor is a view of the read-only memory map
        arr = np.array(arr)
    return torch.from_numpy(arr).to(device=device, dtype=dtype)


def tensors_by_key(gguf: GGUFFile, path: Path) -> dict:
    """Meta's key -> the file's tensor; unknown names are errors. rope_freqs.weight is not a
    weight: rope_from_metadata reads it into the RopeConfig."""
    by_key, unknown = {}, []
    for t in gguf.tensors:
        key = meta_key(t.name)
        if key is not None:
            by_key[key] = t
        elif t.name != ROPE_FREQS:
            unknown.append(t.name)
    if unknown:
        raise CheckpointError(f"{path}: tensors this Llama model has no place for: {unknown[:5]}"
                              f"{f' and {len(unknown) - 5} more' if len(unknown) > 5 else ''}")
    return by_key


def check_layout(meta: Metadata, tensors: dict) -> int:
    """What holds before a model is built from the metadata: token_embd is a (vocab, dim) matrix
    with dim = embedding_length, and the layers present are exactly 0 .. block_count - 1. The
    number of embedding rows (the vocabulary size) is returned."""
    a, embedding = meta.arch, tensors.get("tok_embeddings.weight")
    if embedding is None:
        raise CheckpointError(f"{meta.path}: no token_embd.weight tensor")
    dim, n_layers = meta.number(f"{a}.embedding_length", least=1), meta.number(f"{a}.block_count", least=1)
    if len(embedding.shape) != 2 or embedding.shape[0] != dim:  # GGUF lists dims innermost first
        raise CheckpointError(f"{meta.path}: tensor token_embd.weight has shape {embedding.shape[::-1]}; expected "
                              f"(vocabulary, {a}.embedding_length = {dim})")
    layers = sorted({int(key.split(".")[1]) for key in tensors if key.startswith("layers.")})
    if layers != list(range(n_layers)):
        found = f"layers {layers[0]} to {layers[-1]} ({len(layers)} of them)" if layers else "no layer"
        raise CheckpointError(f"{meta.path}: {a}.block_count is {n_layers}, but the file has tensors for {found}")
    return embedding.shape[1]


def inspect_gguf(gguf: GGUFFile, rope: Optional[RopeConfig] = None) -> tuple[Transformer, Tokenizer, dict]:
    """Every check that needs no tensor data: names, the layout, the RoPE and model keys, the
    tokenizer, every shape and type. (the model on the meta device, the tokenizer, Meta's key ->
    tensor), all that load_gguf needs besides the tensors' bytes."""
    path = gguf.path
    meta = Metadata(gguf, path)
    _check_arch(meta)
    tensors = tensors_by_key(gguf, path)
    vocab_rows = check_layout(meta, tensors)
    tied = "output.weight" not in tensors  # no output tensor: llama.cpp uses token_embd (SmolLM2, Llama 3.2)
    args = args_from_metadata(meta, rope, vocab_rows, tied)
    tokenizer = tokenizer_from_metadata(meta)
    if tokenizer.vocab_size != args.vocab_size:
        raise CheckpointError(f"{path}: tokenizer.ggml.tokens has {tokenizer.vocab_size} tokens, but token_embd "
                              f"has {args.vocab_size} rows")
    if tied:
        tensors["output.weight"] = tensors["tok_embeddings.weight"]
    model = empty_model(args)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_keys(set(tensors), set(expected), str(path))
    for key, shape in expected.items():
        t = tensors[key]
        check_shape(t.name, tuple(reversed(t.shape)), shape, str(path), " from the metadata")
        if not can_dequantize(t.tensor_type):
            raise CheckpointError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, which the gguf "
                                  "package cannot dequantize")
    return model, tokenizer, tensors


def load_gguf(path: Path, rope: Optional[RopeConfig], device: torch.device | str,
              dtype: torch.dtype, progress: bool = False) -> tuple[Transformer, Tokenizer]:
    """The file's structure and, when it has them (every file save() wrote), its two checksums
    first; then inspect_gguf's checks; then the weights, each checked finite."""
    gguf = open_gguf(path)
    gguf.verify("tensors")
    model, tokenizer, tensors = inspect_gguf(gguf, rope)
    state = {}
    for key in tqdm(model.state_dict(), desc="dequantizing", unit="tensor", disable=not progress):
        if key == "output.weight" and model.args.tie_word_embeddings:
            state[key] = state["tok_embeddings.weight"]  # one tensor, dequantized once
            continue
        state[key] = _to_torch(tensors[key], dtype, device)
        check_finite(tensors[key].name, state[key], path)
    assign_weights(model, state)
    return model, tokenizer


# ---------------------------------------------------------------------------------------
# The tokenizer, from the vocabulary in the metadata
# ---------------------------------------------------------------------------------------

# llama.cpp's pre-tokenizer regexes (llama-vocab.cpp), applied one after another, per
# tokenizer.ggml.pre. The GPT-2 split, and the same after splitting off every digit.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_SPLITS = {
    **dict.fromkeys(("default", "gpt-2", "gpt2", "mpt", "olmo", "jais"), (_GPT2,)),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"),
                    (r"\p{N}", _GPT2)),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx"), (_LLAMA3,)),
}
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = range(1, 7)  # llama.cpp's token types (gguf.TokenType)


def _byte_level_tokenizer(meta: Metadata, tokens: list[str]):
    from tokenizers import Regex, Tokenizer as Backend, decoders, models, pre_tokenizers

    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_SPLITS:
        raise CheckpointError(f"{meta.path}: tokenizer.ggml.pre is {pre!r}, a pre-tokenizer this loader does not "
                              f"know (it would split text differently from llama.cpp); known: {', '.join(sorted(PRE_SPLITS))}")
    merges = [tuple(m.split(" ", 1)) for m in _strings(meta, "tokenizer.ggml.merges")]
    vocab, seen = {tok: i for i, tok in enumerate(tokens)}, {}
    for i, merge in enumerate(merges):  # what BPE needs of each merge: both parts and the result are tokens
        if len(merge) != 2 or merge[0] not in vocab or merge[1] not in vocab or "".join(merge) not in vocab:
            raise CheckpointError(f"{meta.path}: tokenizer.ggml.merges[{i}] is {' '.join(merge)!r}, not two tokens "
                                  "of tokenizer.ggml.tokens whose concatenation is a token too")
        if seen.setdefault(merge, i) != i:  # a pair is merged once, at its rank
            raise CheckpointError(f"{meta.path}: tokenizer.ggml.merges[{i}] is {' '.join(merge)!r}, the same merge as "
                                  f"tokenizer.ggml.merges[{seen[merge]}]")
    tok = Backend(models.BPE(vocab, merges, ignore_merges=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_SPLITS[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def sentencepiece_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a sentencepiece vocabulary: every way to split a piece into two
    pieces of the vocabulary, the piece with the higher score merged first (sentencepiece's
    BPE merges the pair whose result scores highest)."""
    index = {t: i for i, t in enumerate(tokens)}
    found = []
    for piece, score in zip(tokens, scores):
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in index and right in index:
                found.append((-score, index[left], index[right], left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def _sentencepiece_tokenizer(meta: Metadata, tokens: list[str]):
    from tokenizers import Tokenizer as Backend, decoders, models, normalizers

    scores = meta.need("tokenizer.ggml.scores")
    if not isinstance(scores, list) or len(scores) != len(tokens) or \
            not all(isinstance(s, (int, float)) and math.isfinite(s) for s in scores):
        raise CheckpointError(f"{meta.path}: tokenizer.ggml.scores is {_short(scores)}; expected {len(tokens)} "
                              "finite numbers, one per token")
    unk = _token_id(meta, "unknown", len(tokens))
    tok = Backend(models.BPE({t: i for i, t in enumerate(tokens)}, sentencepiece_merges(tokens, scores),
                             unk_token=None if unk is None else tokens[unk], fuse_unk=True, byte_fallback=True))
    prefix = _flag(meta, "tokenizer.ggml.add_space_prefix", True)  # sentencepiece's add_dummy_prefix
    tok.normalizer = normalizers.Sequence(([normalizers.Prepend("▁")] if prefix else [])
                                          + [normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok


def tokenizer_from_metadata(meta: Metadata) -> HFTokenizer:
    """An HFTokenizer built from tokenizer.ggml.*: "gpt2" (byte-level BPE: tokens + merges) or
    "llama" (sentencepiece: tokens + scores). BOS/EOS are the ids the file states (None when
    absent); `add_bos` is tokenizer.ggml.add_bos_token (llama.cpp's default when absent: True
    for "llama", False for "gpt2"); `eos_ids` adds the end-of-turn / end-of-message ids."""
    from tokenizers import AddedToken

    model = meta.need("tokenizer.ggml.model")
    tokens = _strings(meta, "tokenizer.ggml.tokens")
    types = _token_types(meta, len(tokens))
    ids = {name: _token_id(meta, name, len(tokens)) for name in ("bos", "eos", "eot", "eom", "unknown")}
    if model not in ("gpt2", "llama"):
        raise CheckpointError(f"{meta.path}: tokenizer.ggml.model is {_short(model)}; supported: 'gpt2' (byte-level "
                              "BPE) and 'llama' (sentencepiece)")
    try:
        tok = _byte_level_tokenizer(meta, tokens) if model == "gpt2" else _sentencepiece_tokenizer(meta, tokens)
    except CheckpointError:
        raise
    except Exception as e:  # the `tokenizers` library's own refusal (it raises Exception)
        raise CheckpointError(f"{meta.path}: tokenizer.ggml.*: the `tokenizers` library refuses the vocabulary "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    # llama.cpp matches control and user-defined tokens whole in the text; so do we
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == USER_DEFINED])
    out = HFTokenizer(tok, ids["bos"], ids["eos"], meta.path)
    out.add_bos = _flag(meta, "tokenizer.ggml.add_bos_token", model == "llama")
    # every id llama.cpp ends generation at: EOS, end of turn (Llama 3's <|eot_id|>), end of message
    out.eos_ids = tuple(dict.fromkeys(ids[name] for name in ("eos", "eot", "eom") if ids[name] is not None))
    # what save(format="gguf") writes back: every tokenizer.* key with its stored types
    out.gguf_vocab = {key: (f.value, f.types[0], f.types[1] if len(f.types) > 1 else None)
                      for key, f in meta.gguf.fields.items() if key.startswith("tokenizer.")}
    return out


def _strings(meta: Metadata, key: str) -> list[str]:
    value = meta.need(key)
    if not isinstance(value, list) or not value or not isinstance(value[0], str):
        raise CheckpointError(f"{meta.path}: metadata key {key!r} is {_short(value)}; expected a list of strings")
    return value


def _token_types(meta: Metadata, n: int) -> list[int]:
    """tokenizer.ggml.token_type: one type per token, NORMAL (1) to BYTE (6) as gguf's TokenType
    and llama.cpp's converters write them (llama.cpp's 0, "undefined", is written by none)."""
    types = meta.get("tokenizer.ggml.token_type", [])
    if not isinstance(types, list) or (types and len(types) != n):
        raise CheckpointError(f"{meta.path}: tokenizer.ggml.token_type is {_short(types)}; expected {n} token types")
    bad = next((i for i, t in enumerate(types) if not NORMAL <= t <= BYTE), None)
    if bad is not None:
        raise CheckpointError(f"{meta.path}: tokenizer.ggml.token_type[{bad}] is {types[bad]}; token types are "
                              f"{NORMAL} (normal) to {BYTE} (byte)")
    return types


def _token_id(meta: Metadata, name: str, n: int) -> Optional[int]:
    key = f"tokenizer.ggml.{name}_token_id"
    if key not in meta:
        return None
    value = meta.number(key)
    if not 0 <= value < n:
        raise CheckpointError(f"{meta.path}: {key} is {value}; the vocabulary has ids 0 to {n - 1}")
    return value


def _flag(meta: Metadata, key: str, default: bool) -> bool:
    value = meta.get(key, default)
    if not isinstance(value, bool):
        raise CheckpointError(f"{meta.path}: metadata key {key!r} is {_short(value)}; expected true or false")
    return value


def read_gguf_tokenizer(path: str | os.PathLike) -> HFTokenizer:
    """The tokenizer of a .gguf file from its metadata alone (no tensor is read): for preparing
    data and training from scratch with a model's vocabulary (checkpoint.load_tokenizer)."""
    path = Path(path)
    return tokenizer_from_metadata(Metadata(open_gguf(path), path))


# ---------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------

# The RopeConfig a rope_freqs.weight table was written from, as JSON (dataclasses.asdict): llama.cpp
# skips the key and runs the table; the reader checks that the two agree and reads the config back
ROPE_KEY = "yarn_minimal.rope"


def gguf_rope(rope: RopeConfig, head_dim: int) -> tuple[float, dict, Optional[torch.Tensor]]:
    """(freq_base, {metadata key suffix: value}, rope_freqs or None) with which llama.cpp applies
    `rope` exactly, or a CheckpointError saying why it cannot. llama.cpp (arch "llama") honours
    rope.freq_base, rope.scaling.type/factor/original_context_length, rope.scaling.attn_factor
    (cos/sin are multiplied by it whatever the type) and the tensor rope_freqs.weight (pair d's
    angle divided by f_d); it ignores rope.scaling.yarn_beta_fast/slow for "llama" (tested).

    RoPE, or any method at s = 1 -> no scaling keys (+ attn_factor = sqrt(1/t) when YaRN's is set).
    PI      -> scaling.type "linear", factor s (Eq. 10).
    NTK     -> plain RoPE with freq_base b' (Eq. 16), as Code Llama's rope_theta.
    YaRN / NTK-by-parts with llama.cpp's own ramp (the code's, floored/ceiled, alpha/beta = 1/32)
            -> scaling.type "yarn", factor s, original_context_length L; llama.cpp multiplies
               cos/sin by attn_factor * (0.1 ln s + 1), so attn_factor = sqrt(1/t) / (0.1 ln s + 1)
               (1 / (0.1 ln s + 1) for NTK-by-parts, which has no temperature).
    Any other static per-pair form (the paper's ramp, i.e. HF's llama3; truncate=False; other
    alpha/beta such as Yarn-Mistral's 2/128; c = 0.07) -> no scaling type, the tensor
            rope_freqs.weight f_d = theta_d / h(theta_d), attn_factor = sqrt(1/t), and the
            RopeConfig itself under ROPE_KEY (for reading back; llama.cpp skips it).
    Dynamic Scaling is refused: llama.cpp's RoPE is static."""
    L, s = rope.original_length, rope.scale
    where = f"format='gguf': {rope.describe()}"
    if rope.dynamic:
        raise CheckpointError(f"{where}: llama.cpp has no Dynamic Scaling (Sec. 3.3; no dynamic rope.scaling.type), "
                              "its RoPE is static; save a static setting (e.g. the s you fine-tuned with), or use "
                              "format='meta'")
    target = attention_factor(rope, s)  # the sqrt(1/t) this model multiplies cos/sin by (1 but for YaRN)
    temperature = {} if abs(target - 1.0) <= 1e-7 else {"rope.scaling.attn_factor": target}
    if rope.method == "none" or (s == 1 and rope.method != "ntk"):  # every method is plain RoPE at s = 1
        return rope.base, temperature, None
    if rope.method == "pi":
        return rope.base, {"rope.scaling.type": "linear", "rope.scaling.factor": float(s),
                           "rope.scaling.original_context_length": L}, None
    if rope.method == "ntk":
        return ntk_aware_base(rope.base, s, head_dim), {}, None
    # "yarn" and "ntk-by-parts"
    if rope.ramp == "code" and rope.truncate and (rope.alpha, rope.beta) == (1.0, 32.0):  # ggml_rope_yarn_corr_dims
        scaling = {"rope.scaling.type": "yarn", "rope.scaling.factor": float(s),
                   "rope.scaling.original_context_length": L}
        attn = target / yarn_attention_factor(s)  # llama.cpp's own Eq. 22 (0.1 ln s + 1) is divided out
        if abs(attn - 1.0) > 1e-7:
            scaling["rope.scaling.attn_factor"] = attn
        return rope.base, scaling, None
    return rope.base, temperature, freq_factors(rope, head_dim)


def gguf_context_length(args: ModelArgs) -> int:
    """llama.context_length: the window the model is meant for (RopeConfig.window, s L for a
    static extension), no longer than a sliding window this model cannot run past."""
    window = args.rope.window
    return window if args.sliding_window is None else min(window, args.sliding_window)


def _sentencepiece_vocab(tok: SentencePieceTokenizer) -> dict:
    """tokenizer.ggml.* for a sentencepiece model: llama.cpp's "llama" vocabulary."""
    sp = tok.sp
    n = sp.get_piece_size()

    def kind(i):
        return (UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i) else UNUSED if sp.is_unused(i)
                else BYTE if sp.is_byte(i) else NORMAL)

    vocab = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
             "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
             "tokenizer.ggml.scores": [float(sp.get_score(i)) for i in range(n)],
             "tokenizer.ggml.token_type": [kind(i) for i in range(n)],
             "tokenizer.ggml.add_bos_token": tok.add_bos, "tokenizer.ggml.add_eos_token": False,
             # sentencepiece's add_dummy_prefix, seen from the outside: "a" encodes as "▁a"
             "tokenizer.ggml.add_space_prefix": sp.encode_as_pieces("a")[0].startswith("▁")}
    if sp.unk_id() >= 0:
        vocab["tokenizer.ggml.unknown_token_id"] = sp.unk_id()
    return vocab


def _pre_steps(spec: Optional[dict]) -> tuple:
    """A tokenizer.json pre-tokenizer as a tuple of regex splits: HF's ByteLevel(use_regex=True)
    is the GPT-2 split, Digits(individual_digits=True) the digit split (\\p{N})."""
    if spec is None:
        return ()
    if spec["type"] == "Sequence":
        return tuple(step for sub in spec["pretokenizers"] for step in _pre_steps(sub))
    if spec["type"] == "ByteLevel":
        return (_GPT2,) if spec.get("use_regex", True) else ()
    if spec["type"] == "Digits" and spec.get("individual_digits"):
        return (r"\p{N}",)
    if spec["type"] == "Split" and spec.get("behavior") == "Isolated" and not spec.get("invert"):
        regex = spec["pattern"].get("Regex")
        return (_LLAMA3,) if regex == _HF_LLAMA3 else (regex,)
    return (f"<{spec['type']}>",)  # matches no llama.cpp pre-tokenizer


# Llama 3's tokenizer.json spells llama.cpp's case-insensitive contractions with (?i:...)
_HF_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level_vocab(tok: HFTokenizer) -> dict:
    """tokenizer.ggml.* ("gpt2") for a byte-level BPE tokenizer.json whose pre-tokenizer is one
    llama.cpp names (PRE_SPLITS); anything else is refused rather than written with a split
    llama.cpp would apply differently."""
    spec = json.loads(tok.tok.to_str())
    steps = _pre_steps(spec.get("pre_tokenizer"))
    pre = next((name for name, splits in PRE_SPLITS.items() if tuple(splits) == steps), None)
    byte_level = (spec["model"]["type"] == "BPE" and (spec.get("decoder") or {}).get("type") == "ByteLevel")
    if not byte_level or pre is None:
        raise CheckpointError(f"format='gguf': {tok.path} is not a byte-level BPE tokenizer with a pre-tokenizer "
                              "llama.cpp names (GPT-2's, GPT-2's with single digits, or Llama 3's); save with "
                              "format='hf' and convert that folder with llama.cpp's convert_hf_to_gguf.py")
    by_id = sorted(tok.tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
    if [i for _, i in by_id] != list(range(len(by_id))):
        raise CheckpointError(f"format='gguf': {tok.path}: token ids are not 0..{len(by_id) - 1} without gaps")
    added = {t["content"]: CONTROL if t["special"] else USER_DEFINED for t in spec.get("added_tokens", [])}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
            "tokenizer.ggml.tokens": [t for t, _ in by_id],
            "tokenizer.ggml.token_type": [added.get(t, NORMAL) for t, _ in by_id],
            "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.add_bos_token": bool(getattr(tok, "add_bos", False))}


def tokenizer_metadata(tok: Tokenizer) -> dict:
    """tokenizer.ggml.* for a tokenizer: sentencepiece as "llama", a byte-level BPE
    tokenizer.json as "gpt2", one read from a GGUF file as it was read. {key: (value, type,
    array type)}."""
    if isinstance(tok, SentencePieceTokenizer):
        vocab = {key: _typed(key, value) for key, value in _sentencepiece_vocab(tok).items()}
    elif getattr(tok, "gguf_vocab", None) is not None:
        vocab = dict(tok.gguf_vocab)  # (value, type, array type) as the file had them
    elif isinstance(tok, HFTokenizer):
        vocab = {key: _typed(key, value) for key, value in _byte_level_vocab(tok).items()}
    else:
        raise CheckpointError(f"format='gguf': no GGUF vocabulary for a {type(tok).__name__} ({tok.path})")
    for name in ("bos", "eos"):
        ident = getattr(tok, f"{name}_id")
        if ident is not None:
            vocab[f"tokenizer.ggml.{name}_token_id"] = _typed("", int(ident))
    if getattr(tok, "gguf_vocab", None) is None:
        vocab.update(_end_ids(tok))
    return vocab


def _end_ids(tok: Tokenizer) -> dict:
    """tokenizer.ggml.eot/eom_token_id for the end ids beyond EOS (generation_config.json's
    list: Llama 3.1 Instruct ends at <|eot_id|>, <|eom_id|> and <|end_of_text|>). GGUF has one key
    for each of end of turn and end of message, and llama.cpp stops at both; a token named "eom"
    takes the end-of-message key, the others go in order. A third extra id has no key left."""
    extra = [i for i in tok.eos_ids if i != tok.eos_id]
    eom = next((i for i in extra if "eom" in (tok.piece(i) or "")), None)
    rest = [i for i in extra if i != eom]
    keys = dict(zip(["eot"] if eom is not None else ["eot", "eom"], rest))
    if eom is not None:
        keys["eom"] = eom
    left = [i for i in extra if i not in keys.values()]
    if left:
        warnings.warn(f"format='gguf': {tok.path}: end ids {left} have no GGUF key (only EOS, end of turn and "
                      "end of message exist); llama.cpp stops at them only if it knows their text")
    return {f"tokenizer.ggml.{name}_token_id": _typed("", int(i)) for name, i in keys.items()}


FILE_TYPES = {torch.float32: ("F32", 0), torch.float16: ("F16", 1), torch.bfloat16: ("BF16", 32)}  # llama_ftype


def _numpy_tensor(t: torch.Tensor):
    """(array, ggml type) for one weight: 1-D norms stay float32 (as llama.cpp's converter keeps
    them); bf16 goes out as its raw bits, since numpy has no bfloat16."""
    from gguf import GGMLQuantizationType as Q

    t = t.detach().cpu().contiguous()
    if t.dim() == 1 or t.dtype == torch.float32:
        return t.float().numpy(), Q.F32
    if t.dtype == torch.float16:
        return t.numpy(), Q.F16
    return t.view(torch.int16).numpy().view(np.uint8), Q.BF16


def save_gguf(model: Transformer, tokenizer: Optional[Tokenizer], path: Path) -> Path:
    """One .gguf file that llama.cpp (and Ollama) run with the model's RoPE. Weights keep the
    model's dtype (F32, F16 or BF16); Q/K rows are written in Meta's order, which is llama.cpp's.
    Written to a temporary name and renamed."""
    from gguf import GGUFWriter

    args, state = model.args, model.state_dict()
    dtype = state["layers.0.attention.wq.weight"].dtype
    if dtype not in FILE_TYPES:
        raise CheckpointError(f"format='gguf': weights in {dtype}; llama.cpp's float files are F32, F16 and BF16")
    if tokenizer is None:
        raise CheckpointError("format='gguf': a GGUF file carries its tokenizer; pass the tokenizer to save()")
    base, scaling, factors = gguf_rope(args.rope, args.head_dim)  # refuses before anything is written
    context = gguf_context_length(args)
    vocab = tokenizer_metadata(tokenizer)
    n_tokens = len(vocab["tokenizer.ggml.tokens"][0])
    if n_tokens != args.vocab_size:
        raise CheckpointError(f"format='gguf': the tokenizer has {n_tokens} tokens, the "
                              f"model's embedding {args.vocab_size} rows")

    def write(tmp: Path) -> None:
        w = GGUFWriter(str(tmp), ARCH)
        a = ARCH
        w.add_uint32("general.file_type", FILE_TYPES[dtype][1])
        w.add_uint32("general.quantization_version", 2)
        for key, value in ((f"{a}.vocab_size", args.vocab_size), (f"{a}.context_length", context),
                           (f"{a}.embedding_length", args.dim), (f"{a}.block_count", args.n_layers),
                           (f"{a}.feed_forward_length", args.ffn_hidden_dim),
                           (f"{a}.attention.head_count", args.n_heads), (f"{a}.attention.head_count_kv", args.n_kv_heads),
                           (f"{a}.rope.dimension_count", args.head_dim)):
            w.add_uint32(key, int(value))
        w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", args.norm_eps)
        w.add_float32(f"{a}.rope.freq_base", base)
        for key, value in scaling.items():
            if isinstance(value, str):
                w.add_string(f"{a}.{key}", value)
            elif isinstance(value, int):
                w.add_uint32(f"{a}.{key}", value)
            else:
                w.add_float32(f"{a}.{key}", value)
        for key, (value, vtype, sub_type) in vocab.items():
            w.add_key_value(key, value, vtype, sub_type)
        for key in DIGESTS.values():
            w.add_string(key, "0" * 64)  # filled in by seal() once the file is written
        if args.sliding_window is not None:  # llama.cpp ignores it for "llama"; read back into ModelArgs
            w.add_uint32(f"{a}.attention.sliding_window", args.sliding_window)
        if factors is not None:
            w.add_string(ROPE_KEY, json.dumps(dataclasses.asdict(args.rope)))
            w.add_tensor(ROPE_FREQS, factors.numpy())  # F32, one for all layers, as llama.cpp's converter writes it
        for key, t in state.items():
            if key == "output.weight" and args.tie_word_embeddings:
                continue  # llama.cpp reuses token_embd when there is no output tensor
            arr, qtype = _numpy_tensor(t)
            w.add_tensor(gguf_name(key), arr, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        seal(tmp)

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)
    return path


def seal(path: Path) -> None:
    """Write the two sha256 digests (DIGESTS) into a finished file, in place of their zeros."""
    gguf = GGUFFile(path)
    digests = {DIGESTS[part]: gguf.sha256(*gguf.region(part)) for part in DIGESTS}
    with path.open("r+b") as f:
        for key, digest in digests.items():
            f.seek(gguf.fields[key].span[0])
            f.write(digest.encode())


def _typed(key: str, value) -> tuple:
    """(value, GGUFValueType, array element type) for GGUFWriter.add_key_value; token types
    are INT32, as llama.cpp reads them."""
    from gguf import GGUFValueType as V

    def scalar(x):
        return V.BOOL if isinstance(x, bool) else V.UINT32 if isinstance(x, int) else \
            V.FLOAT32 if isinstance(x, float) else V.STRING

    if isinstance(value, (list, tuple)):
        return list(value), V.ARRAY, V.INT32 if key.endswith("token_type") else scalar(value[0])
    return value, scalar(value), None
