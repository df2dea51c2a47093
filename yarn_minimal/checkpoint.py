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
and is renamed into place, and checksums.json records a folder's files.

    python -m yarn_minimal.checkpoint convert SRC DST --format hf | meta | gguf
    python -m yarn_minimal.checkpoint checksums FOLDER     # protect a download you trust
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

from .cli import DTYPES, run_main
from .files import CHECKSUMS, CheckpointError, verify_checksums, write_checksums, write_json
from .formats.gguf import load_gguf, read_gguf_config, read_gguf_tokenizer, save_gguf
from .formats.hf import hf_rope_scaling, load_hf, permute_to_hf, read_hf_config, rope_from_hf, save_hf
from .formats.meta import SHARD_DIM, load_meta, read_meta_config, save_meta
from .model import ModelArgs, Transformer
from .rope import RopeConfig
from .tokenizer import HFTokenizer, Tokenizer, TokenizerNotFound, open_tokenizer

# Names tests, scripts and training import from here; each is defined in the module named above.
__all__ = ["CHECKSUMS", "CheckpointError", "SHARD_DIM", "hf_rope_scaling", "load", "load_tokenizer", "main",
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

    `python -m yarn_minimal.rope --config PATH` prints this. It lives here, not in rope.py,
    because only the checkpoint code knows file formats and rope.py imports nothing from the
    package: rope.py's command line imports this function inside main(), when --config is given."""
    path = Path(path)
    if path.suffix.lower() == ".gguf":
        return read_gguf_config(path)
    folder = path if path.is_dir() else path.parent
    if path.is_dir():
        path = next((folder / n for n in ("params.json", "config.json") if (folder / n).is_file()), folder / "config.json")
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (give a config.json, a params.json or a model folder holding one)")
    return read_meta_config(path) if path.name == "params.json" else read_hf_config(path)


def _stamps(folder: Path) -> dict:
    """name -> (inode, size, mtime) of the files in folder: a file save() wrote differs (each is
    renamed into place, so at least its inode is new)."""
    if not folder.is_dir():
        return {}
    return {f.name: (s.st_ino, s.st_size, s.st_mtime_ns) for f in folder.iterdir()
            if f.is_file() and f.name != CHECKSUMS and (s := f.stat())}


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
    Weights keep the model's dtype. Each file is written under a temporary name and renamed, and
    (meta, hf) checksums.json records every file's size and CRC-32 for load() to verify."""
    if format not in ("meta", "hf", "gguf"):
        raise ValueError(f"save: format {format!r}; allowed: meta, hf, gguf")
    if format == "gguf":
        return save_gguf(model, tokenizer, Path(path))
    folder = Path(path)
    # files another save left that `load` would read instead of (or beside) the new ones
    stale = [f for f in sorted(folder.glob("consolidated.*.pth")) if f.name != "consolidated.00.pth"]
    stale += [f for f in (folder / "model.safetensors.index.json",) if f.is_file()]
    stale += [f for f in (folder / "params.json",) if format == "hf" and f.is_file()]
    # open_tokenizer prefers tokenizer.model to tokenizer.json
    stale += [f for f in (folder / "tokenizer.model",) if isinstance(tokenizer, HFTokenizer) and f.is_file()]
    if stale:
        raise CheckpointError(f"{folder}: already holds {', '.join(f.name for f in stale)}, which load() would read "
                              "instead of or beside what save() writes; save into an empty folder")
    before = _stamps(folder)  # checksums.json covers exactly the files this save writes
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if format == "hf":
        save_hf(model, state, folder, tokenizer)  # refuses a RoPE setting HF cannot express before writing
    else:
        save_meta(model, state, folder)
    if tokenizer is not None:
        _save_tokenizer(tokenizer, folder)
    write_checksums(folder, [name for name, stamp in _stamps(folder).items() if before.get(name) != stamp])
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
        write_json(folder / "generation_config.json",
                   {"bos_token_id": tokenizer.bos_id, "eos_token_id": list(tokenizer.eos_ids)})


# ---------------------------------------------------------------------------------------
# python -m yarn_minimal.checkpoint convert SRC DST --format hf
# ---------------------------------------------------------------------------------------

def main(argv: Optional[list[str]] = None) -> None:
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
    k = sub.add_parser("checksums", help="record the size and CRC-32 of FOLDER's files in FOLDER/checksums.json",
                       description="Write FOLDER/checksums.json (every file but *.md), which load() then verifies: "
                                   "run it once on a download you trust, and later damage to any of its files stops "
                                   "the load with a message naming the file.")
    k.add_argument("folder")
    args = p.parse_args(argv)
    if args.command == "checksums":
        folder = Path(args.folder)
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: not a folder")
        names = [f.name for f in sorted(folder.iterdir()) if f.is_file() and f.name != CHECKSUMS and f.suffix != ".md"]
        write_checksums(folder, names)
        print(f"wrote {folder / CHECKSUMS}: {len(names)} files", file=sys.stderr)
        return
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
    run_main(main)
