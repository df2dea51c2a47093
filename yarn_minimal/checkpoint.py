"""Checkpoint files in and out: find the layout, hand it to its module, get the model back.

    layout                                          module             tells it apart by
    1. Meta's raw Llama 2 download                  formats/meta.py    params.json + consolidated.*.pth
    2. A Hugging Face Llama or Mistral folder       formats/hf.py      config.json + *.safetensors
    3. The project's own (save(format="meta"),      formats/meta.py    params.json + rope.json
       fine-tuning): Meta's, plus rope.json
    4. llama.cpp's GGUF: one .gguf file             formats/gguf.py    the .gguf suffix

Each format module turns its files into (model, tokenizer) and back; only checkpoint.py imports
them. Pieces they share: formats/common.py (key, shape, tokenizer and finite checks, the empty
model) and files.py (writing under a temporary name, checksums.json, CheckpointError).

Memory: the model is built on the meta device (no storage), checkpoint files are opened with
mmap / safetensors' lazy reader, every key and shape is checked before a byte of weights is
copied, and tensors are then converted one by one into the requested dtype and device and
assigned (not copied into a second, randomly initialised model). A one-shard Meta checkpoint
in its stored dtype is used straight from the page cache.

`save(model, tokenizer, folder, format="meta" | "hf")` writes either layout, and
`save(..., "x.gguf", format="gguf")` one GGUF file; every file goes to a temporary name first
and is renamed into place, and checksums.json records a folder's files. It never writes over
anything but an earlier checkpoint this project saved, and that only when told (overwrite=True).

    python -m yarn_minimal convert SRC DST --format hf | meta | gguf [--overwrite]
    python -m yarn_minimal checksums FOLDER             # protect a download you trust
    python -m yarn_minimal verify FILE --sha256 HEX     # check a download against its site's digest
"""
from __future__ import annotations

import fnmatch
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

from .files import (CHECKSUMS, CheckpointError, Output, check_output, check_sha256, holds, json_with, publish, read_json,
                    starts_with, verify_checksums, write_checksums, write_json)
from .formats.gguf import gguf_rope, load_gguf, open_gguf, read_gguf_config, read_gguf_tokenizer, save_gguf
from .formats.common import RopeExplanation, explain_rope
from .formats.hf import explain_hf, hf_rope_scaling, load_hf, permute_to_hf, read_hf_config, rope_from_hf, save_hf
from .formats.meta import SHARD_DIM, load_meta, read_meta_config, save_meta
from .model import ModelArgs, Transformer
from .rope import RopeConfig
from .tokenizer import Tokenizer, TokenizerNotFound, open_tokenizer

# Names tests, scripts and training import from here; each is defined in the module named above.
__all__ = ["CHECKSUMS", "CheckpointError", "SHARD_DIM", "explain_config", "hf_rope_scaling", "load", "load_tokenizer", "convert", "record_checksums", "verify",
           "permute_to_hf", "read_config", "rope_from_hf", "save", "verify_checksums", "write_checksums"]


def load(path: str | os.PathLike, rope: Optional[RopeConfig] = None, device: torch.device | str = "cpu",
         dtype: torch.dtype = torch.float32, progress: bool = False) -> tuple[Transformer, Tokenizer]:
    """Load (model, tokenizer) from a checkpoint folder in any of the layouts above, or from a
    llama.cpp .gguf file. rope=None keeps the checkpoint's own setting (rope.json, or config.json's
    rope_scaling; plain RoPE for raw Llama 2); a RopeConfig overrides it. progress=True shows a
    tqdm bar while tensors are read."""
    folder = Path(path)
    if folder.suffix.lower() == ".gguf" and not folder.is_dir():
        model, tokenizer = load_gguf(folder, rope, device, dtype, progress)
    else:
        if not folder.is_dir():
            found = "a file" if folder.exists() else "nothing"
            raise CheckpointError(f"{folder}: not a folder (a checkpoint is a model folder or a .gguf file; found {found})")
        verify_checksums(folder)
        if (folder / "params.json").is_file():
            model, tokenizer = load_meta(folder, rope, device, dtype, progress)
        elif (folder / "config.json").is_file():
            model, tokenizer = load_hf(folder, rope, device, dtype, progress)
        else:
            raise CheckpointError(f"{folder}: no params.json (Meta's layout: params.json + consolidated.*.pth) "
                                  "and no config.json (Hugging Face's layout: config.json + *.safetensors)")
    model.eos_ids = tokenizer.eos_ids  # generation stops at these unless told not to
    return model.eval(), tokenizer


TOKENIZER_FILES = "a model folder, a sentencepiece .model, a Hugging Face tokenizer.json or a .gguf file"


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer a user names, without reading a weight (data preparation, train.py --init
    random). `path` is one of:

        a model folder          its tokenizer, as load() reads it (tokenizer.open_tokenizer)
        a .model / .json file   a sentencepiece model or a tokenizer.json, with BOS, EOS and
                                add_bos from the tokenizer_config.json / generation_config.json
                                beside it, as for the folder
        a .gguf file            the vocabulary in its metadata (formats/gguf.py)

    Every failure is a ValueError or FileNotFoundError whose one line names the path."""
    path = Path(path)
    if path.is_dir():
        return open_tokenizer(path)
    if not path.is_file():
        raise TokenizerNotFound(f"{path}: no such file or folder; a tokenizer is {TOKENIZER_FILES}")
    suffix = path.suffix.lower()
    if suffix == ".gguf":
        return read_gguf_tokenizer(path)
    if suffix in (".model", ".json"):
        return open_tokenizer(path.parent, path)
    raise ValueError(f"{path}: not a tokenizer file (suffix {path.suffix or 'none'!r}); a tokenizer is {TOKENIZER_FILES}")


def read_config(path: str | os.PathLike) -> tuple[ModelArgs, dict[str, str], list[str]]:
    """A checkpoint's ModelArgs (with its RopeConfig) as load() would build them, without reading
    weights, plus where each RoPE value came from and what is ambiguous (see formats/hf.py's
    rope_from_hf). `path`: a config.json, a params.json, a model folder holding one of them, or
    a .gguf file.

    `python -m yarn_minimal rope --config PATH` prints this. It lives here, not in rope.py,
    because only the checkpoint code knows file formats and rope.py imports nothing from the
    package: rope.py's command line imports this function inside main(), when --config is given."""
    path = _config_file(path)
    if path.suffix.lower() == ".gguf":
        return read_gguf_config(path)
    return read_meta_config(path) if path.name == "params.json" else read_hf_config(path)


def explain_config(path: str | os.PathLike, seq_len: Optional[int] = None) -> RopeExplanation:
    """What a checkpoint's RoPE computes at length seq_len, key by key (`rope --config`). A
    config.json of any architecture is explained from its RoPE keys alone (formats/hf.py's
    explain_hf: qwen2, deepseek, gpt_oss, HF's dynamic and Phi-3's longrope too); a params.json or
    a .gguf file from the RopeConfig read_config builds."""
    path = _config_file(path)
    if path.suffix.lower() != ".gguf" and path.name != "params.json":
        return explain_hf(read_json(path), path, seq_len)
    args, provenance, notes = read_config(path)
    return explain_rope(args.rope, args.head_dim, provenance, notes, seq_len)


def _config_file(path: str | os.PathLike) -> Path:
    """The file read_config reads: a .gguf, or a folder's params.json or config.json."""
    path = Path(path)
    if path.suffix.lower() == ".gguf":
        return path
    folder = path if path.is_dir() else path.parent
    if path.is_dir():
        path = next((folder / n for n in ("params.json", "config.json") if (folder / n).is_file()), folder / "config.json")
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (give a config.json, a params.json or a model folder holding one)")
    return path


# What save() writes, and what it may replace: a checkpoint folder that holds checksums.json
# (every save writes one; so does `checkpoint checksums` on a download the user trusts), or a
# GGUF file. A download without it, or a folder of anything else, is never replaced.
CHECKPOINT = Output("a checkpoint this project saved", holds(CHECKSUMS), folder=True)
GGUF_FILE = Output("a GGUF file", starts_with(b"GGUF"), suffix=".gguf")
CHECKSUMS_FILE = Output("a checksums.json", json_with(), again="it records the files as they were: pass --overwrite "
                        "to record them as they are now, only if you changed them yourself")
# the files load() reads from a folder: those of an earlier checkpoint that a new save does not
# write are removed when it replaces it (overwrite=True), so that load() cannot mix the two
CHECKPOINT_FILES = ("params.json", "rope.json", "consolidated.*.pth", "config.json", "*.safetensors",
                    "model.safetensors.index.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                    "generation_config.json", CHECKSUMS)


def output_kind(format: str) -> Output:
    if format not in ("meta", "hf", "gguf"):
        raise ValueError(f"save: format {format!r}; allowed: meta, hf, gguf")
    return GGUF_FILE if format == "gguf" else CHECKPOINT


def save(model: Transformer, tokenizer: Optional[Tokenizer], path: str | os.PathLike, format: str = "meta",
         overwrite: bool = False) -> Path:
    """Write the model (and tokenizer.model) to a folder, or to one .gguf file.

    format="meta": this project's layout (params.json, consolidated.00.pth, rope.json), which
                   Meta's own loader also reads; any RopeConfig round-trips exactly.
    format="hf":   config.json with rope_scaling, model.safetensors with wq / wk permuted to
                   HF's split-half rotation; loads with transformers' from_pretrained, vLLM and
                   llama.cpp's convert_hf_to_gguf.py. Refuses RoPE settings HF cannot express.
    format="gguf": one llama.cpp file at `path`, which must end in .gguf (formats/gguf.py),
                   with llama.cpp's rope-scaling metadata and the tokenizer's vocabulary. Refuses
                   RoPE settings llama.cpp cannot run (Dynamic Scaling, the paper's ramp,
                   non-default alpha/beta).
    `path` must be new, an empty folder, or (overwrite=True) an earlier checkpoint this project
    saved, or GGUF file (files.check_output); nothing else is ever replaced. Replacing a
    folder replaces only the checkpoint's own files; anything else in it stays.
    Weights keep the model's dtype. The folder is written whole under a temporary name first,
    and (meta, hf) checksums.json records every file's size and CRC-32 for load() to verify."""
    path = check_output(path, output_kind(format), overwrite)
    if format == "gguf":
        return save_gguf(model, tokenizer, path)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's folder is private; a checkpoint is not
        if format == "hf":
            save_hf(model, state, tmp, tokenizer)  # refuses a RoPE setting HF cannot express before writing
        else:
            save_meta(model, state, tmp)
        if tokenizer is not None:
            _save_tokenizer(tokenizer, tmp)
        names = sorted(f.name for f in tmp.iterdir())
        write_checksums(tmp, names)
        old = [f.name for f in path.iterdir() if f.name not in names and f.name != CHECKSUMS
               and any(fnmatch.fnmatch(f.name, p) for p in CHECKPOINT_FILES)] if path.is_dir() else []
        publish(tmp, path, old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _save_tokenizer(tokenizer: Tokenizer, folder: Path) -> None:
    """The tokenizer's own files (tokenizer.model, or tokenizer.json + tokenizer_config.json);
    generation_config.json when there are several EOS ids, which no tokenizer file can hold
    (open_tokenizer reads them back)."""
    tokenizer.save(folder)
    if len(tokenizer.eos_ids) > 1:
        write_json(folder / "generation_config.json",
                   {"bos_token_id": tokenizer.bos_id, "eos_token_id": list(tokenizer.eos_ids)})


def stored_dtype(path: str | os.PathLike) -> torch.dtype:
    """The dtype a checkpoint stores its weights in (that of its first attention weight), which
    `convert` keeps unless --dtype says otherwise: float32 for a GGUF whose weights are
    quantized (they dequantize exactly to float32) and whenever it cannot be told (load() then
    reports what is wrong with the checkpoint)."""
    path, names = Path(path), {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    try:
        if path.suffix.lower() == ".gguf" and path.is_file():
            t = next(t for t in open_gguf(path).tensors if t.name == "blk.0.attn_q.weight")
            return names.get(t.tensor_type.name, torch.float32)
        if (path / "params.json").is_file():
            shard = sorted(path.glob("consolidated.*.pth"))[0]
            return torch.load(shard, map_location="cpu", mmap=True, weights_only=True)["layers.0.attention.wq.weight"].dtype
        from safetensors import safe_open
        for f in sorted(path.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as st:
                key = next((k for k in st.keys() if k.endswith("layers.0.self_attn.q_proj.weight")), None)
                if key is not None:
                    return names.get(st.get_slice(key).get_dtype(), torch.float32)
    except Exception:  # a damaged or unusual checkpoint: load() says what is wrong with it
        pass
    return torch.float32


# ---------------------------------------------------------------------------------------
# convert, checksums, verify: the library side of `python -m yarn_minimal convert | checksums | verify`
# ---------------------------------------------------------------------------------------

def convert(src: Path, dst: Path, format: str, dtype: Optional[torch.dtype] = None, overwrite: bool = False) -> None:
    """Read src (any layout) and write dst in `format`, in dtype (default: src's own). dst is
    checked before src is read: it must be new, an empty folder, or (with overwrite) a checkpoint
    this project saved or a GGUF file; nothing else is ever replaced."""
    if src.resolve() == dst.resolve():
        raise ValueError(f"{dst}: the source itself; SRC and DST must be different")
    if format != "gguf" and dst.suffix.lower() == ".gguf":
        raise ValueError(f"{dst}: a .gguf name for a {format} folder; write a GGUF file with --format gguf")
    check_output(dst, output_kind(format), overwrite)  # before SRC is read, not after
    args = read_config(src)[0]  # a RoPE setting the format cannot state is refused before the weights are read
    if format == "gguf":
        gguf_rope(args.rope, args.head_dim)
    elif format == "hf":
        hf_rope_scaling(args.rope, args.head_dim)
    dtype = dtype or stored_dtype(src)
    print(f"reading {src} ...", file=sys.stderr)
    model, tokenizer = load(src, dtype=dtype, progress=True)
    print(f"writing {dst} ({format}, {str(dtype).removeprefix('torch.')}, RoPE: {model.rope.describe()}) ...",
          file=sys.stderr)
    save(model, tokenizer, dst, format=format, overwrite=overwrite)
    print(f"wrote {dst}", file=sys.stderr)


def record_checksums(folder: Path, overwrite: bool = False) -> int:
    """Write folder/checksums.json for every file but *.md (which load() then verifies); the
    number of files recorded. An existing checksums.json is replaced only with overwrite."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder")
    check_output(folder / CHECKSUMS, CHECKSUMS_FILE, overwrite)
    names = [f.name for f in sorted(folder.iterdir()) if f.is_file() and f.name != CHECKSUMS and f.suffix != ".md"]
    write_checksums(folder, names)
    return len(names)


def verify(path: Path, digests: list[str]) -> int:
    """`python -m yarn_minimal verify`: one line per file, match or mismatch with both digests; 0 if all match."""
    if path.is_dir():
        pairs = []
        for d in digests:
            name, sep, hexdigest = d.partition("=")
            if not sep:
                raise ValueError(f"{path}: a folder; give each file's digest as --sha256 NAME=HEX "
                                 f"(e.g. --sha256 model.safetensors={d})")
            pairs.append((path / name, hexdigest))
    elif len(digests) != 1 or "=" in digests[0]:
        raise ValueError(f"{path}: one file; give its digest as --sha256 HEX, once")
    else:
        pairs = [(path, digests[0])]
    failed = 0
    for file, hexdigest in pairs:
        match, found = check_sha256(file, hexdigest)
        expected = hexdigest.strip().lower()
        if match:
            print(f"{file}: sha256 matches ({found})")
        else:
            failed += 1
            print(f"{file}: sha256 MISMATCH: expected {expected}, found {found}; the file is not the one the "
                  "digest was published for (corrupt or incomplete): download it again")
    return 1 if failed else 0


if __name__ == "__main__":  # the command's old name: `python -m yarn_minimal.checkpoint convert ...`
    from yarn_minimal.__main__ import command

    command(sys.argv[1:])
