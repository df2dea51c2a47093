"""Files written whole or not at all, and known to be unchanged when read back.

Every file or folder this package writes (checkpoints, exports, training state, token files)
goes through atomic_write: it is written under a temporary name and renamed into place, so a
kill at any moment leaves the old content or the new one under the real name, never half of it.
checksums.json records the size and CRC-32 of what was written, and verify_checksums checks it
before a byte is used.
"""
from __future__ import annotations

import json
import os
import shutil
import zipfile
import zlib
from pathlib import Path
from typing import Callable


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the file and the problem."""


# ---------------------------------------------------------------------------------------
# Written whole or not at all
# ---------------------------------------------------------------------------------------

def temporary(path: Path) -> Path:
    """Where path is written before it is renamed into place."""
    return path.with_name(path.name + ".tmp")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def move_into_place(tmp: Path, path: Path) -> None:
    """Rename a finished file or folder onto path. os.replace cannot replace a non-empty folder,
    so an old folder is first moved aside to path.old, and deleted once the new one is in place."""
    if path.is_dir() and not path.is_symlink():
        old = path.with_name(path.name + ".old")
        _remove(old)
        os.replace(path, old)
        os.replace(tmp, path)
        _remove(old)
    else:
        os.replace(tmp, path)


def atomic_write(path: Path, write: Callable[[Path], object]) -> Path:
    """write(tmp) makes a file or a folder at tmp, which then replaces path. A leftover tmp from
    an earlier, killed run is removed first; a failed write leaves no tmp behind."""
    path, tmp = Path(path), temporary(Path(path))
    _remove(tmp)
    try:
        write(tmp)
        move_into_place(tmp, path)
    finally:
        if tmp.exists():
            _remove(tmp)
    return path


def write_json(path: Path, obj: dict) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


# ---------------------------------------------------------------------------------------
# Integrity: a corrupt file stops the load with one message naming it, never loads as garbage
# ---------------------------------------------------------------------------------------

CHECKSUMS = "checksums.json"  # written by save(): {file: {"bytes": n, "crc32": "8 hex digits"}}


def file_crc32(path: Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def check_zip_crcs(path: Path) -> None:
    """torch.save writes a zip archive that stores a CRC-32 for every entry (the pickle and each
    tensor's bytes), but torch.load(mmap=True) never verifies them: a shard with overwritten
    bytes loads silently. Reading every entry through zipfile checks them (0.8-2.3 GB/s on one
    core, docs/checkpoints.md). Legacy (pre-zip) files carry no checksum: torch.load decides."""
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                with archive.open(info) as entry:
                    while entry.read(1 << 24):
                        pass
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
        raise CheckpointError(f"{path}: corrupt ({type(e).__name__}: {e}); the file's own checksums do not "
                              "match its contents: download or copy it again") from None


def write_checksums(folder: Path, names: list[str], manifest: str = CHECKSUMS) -> None:
    """Size and CRC-32 of every file save() wrote, checked by load() (verify_checksums): the
    formats without checksums of their own (JSON, safetensors, sentencepiece) get one."""
    entries = {name: {"bytes": (folder / name).stat().st_size, "crc32": f"{file_crc32(folder / name):08x}"}
               for name in sorted(names)}
    write_json(folder / manifest, entries)


def verify_checksums(folder: Path, manifest: str = CHECKSUMS, required: bool = False) -> None:
    """Check the files listed in folder/checksums.json, if there is one (Meta's and Hugging
    Face's downloads have none; there the formats' own checks and check_finite remain)."""
    path = folder / manifest
    if not path.is_file():
        if required:
            raise CheckpointError(f"{folder}: no {manifest}; not a complete checkpoint")
        return
    entries = read_json(path)
    changed = (f"the file is corrupt, or was changed after it was saved (if you changed it, record it with "
               f"`python -m yarn_minimal.checkpoint checksums {folder}`)")
    for name, entry in entries.items():
        target = folder / name
        try:
            size, crc = int(entry["bytes"]), int(entry["crc32"], 16)
        except (TypeError, KeyError, ValueError) as e:
            raise CheckpointError(f"{path}: entry {name!r} is not {{\"bytes\": n, \"crc32\": hex}} ({e!r})") from None
        if not target.is_file():
            raise CheckpointError(f"{target}: listed in {path.name} but missing")
        found = target.stat().st_size
        if found != size:
            raise CheckpointError(f"{target}: {found} bytes, but {path.name} says {size}; {changed}")
        if target.match("consolidated.*.pth"):
            continue  # formats/meta.py checks the zip's own per-entry CRCs as it reads the shard
        found_crc = file_crc32(target)
        if found_crc != crc:
            raise CheckpointError(f"{target}: CRC-32 {found_crc:08x}, but {path.name} says {crc:08x}; {changed}")
