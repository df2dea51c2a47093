"""Files written whole or not at all, never over anything else, and known to be unchanged when read back.

Every output a user names (a checkpoint, a GGUF file, an evaluation's JSON or plot, token
files, a training run, an experiment's folder) is first checked by check_output, before any
work starts: a new path, an empty folder, or an earlier output of the same kind when the user
says --overwrite. Anything else there (a file or folder this program did not write) is never
deleted or replaced; the error names the path and the reason.

Every file or folder this package writes then goes through atomic_write: it is written under a
temporary name and renamed into place, so a kill at any moment leaves the old content or the
new one under the real name, never half of it. checksums.json records the size and CRC-32 of
what was written, and verify_checksums checks it before a byte is used; file_sha256 checks a
download against the digest its site publishes.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the file and the problem."""


class OutputError(ValueError):
    """An output path that cannot be written as asked; the message names the path and the reason."""


# ---------------------------------------------------------------------------------------
# Where a program may write: checked before the work, never over what it did not write
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Output:
    """One kind of output: a file (with the suffix it must have, if any) or a folder of files,
    and how to recognise an earlier output of the same kind, the only thing --overwrite replaces."""
    what: str                     # for messages: "a checkpoint this project saved"
    ours: Callable[[Path], bool]  # is this existing file or folder an earlier output of this kind?
    folder: bool = False
    suffix: str = ""              # e.g. ".gguf"
    again: str = "pass --overwrite to replace it"  # what the user can do about an earlier output


def check_output(path: str | os.PathLike, kind: Output, overwrite: bool = False) -> Path:
    """Whether `kind` may be written at path, checked before any work starts: nothing there yet,
    an empty folder (for a folder), or an earlier output of the same kind with overwrite=True.
    Anything else raises OutputError naming the path: a file or folder this program did not
    write (never replaced, with or without overwrite), a file where a folder goes or the
    reverse, a path without the suffix the format needs."""
    path = Path(path)
    if kind.suffix and path.suffix.lower() != kind.suffix:
        raise OutputError(f"{path}: not a {kind.suffix} file name; {kind.what} is written to one file named "
                          f"*{kind.suffix} (e.g. {path.with_suffix(kind.suffix)})")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise OutputError(f"{path}: {parent} is a file, not a folder")
    if not path.exists():
        if path.is_symlink():
            raise OutputError(f"{path}: a broken symbolic link; remove it or choose another path")
        return path
    if kind.folder and not path.is_dir():
        raise OutputError(f"{path}: an existing file, where a folder is to be written; give a new or empty folder")
    if not kind.folder and path.is_dir():
        name = f"out{kind.suffix or '.json'}"
        raise OutputError(f"{path}: an existing folder, where one file is to be written; give a file path "
                          f"(e.g. {path / name})")
    if kind.folder and not any(path.iterdir()):
        return path
    if not kind.ours(path):
        if kind.folder:
            raise OutputError(f"{path}: a folder holding {_listing(path)}, not {kind.what}; nothing in it is "
                              "replaced: give a new or empty folder")
        raise OutputError(f"{path}: an existing file that is not {kind.what}; it is never replaced: "
                          "choose another path")
    if not overwrite:
        raise OutputError(f"{path}: {'holds' if kind.folder else 'exists:'} {kind.what}; {kind.again}")
    return path


def _listing(folder: Path, n: int = 5) -> str:
    names = sorted(f.name + ("/" if f.is_dir() else "") for f in folder.iterdir())
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


# How each writer recognises its own earlier output (Output.ours)

def holds(*patterns: str) -> Callable[[Path], bool]:
    """A folder holding a file or folder whose name matches one of the patterns."""
    return lambda folder: any(fnmatch.fnmatch(f.name, p) for f in folder.iterdir() for p in patterns)


def starts_with(magic: bytes) -> Callable[[Path], bool]:
    """A file that begins with these bytes (a format's magic number)."""
    def ours(path: Path) -> bool:
        with path.open("rb") as f:
            return f.read(len(magic)) == magic
    return ours


def json_with(*keys: str) -> Callable[[Path], bool]:
    """A JSON object holding all these keys."""
    def ours(path: Path) -> bool:
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            return False
        return isinstance(obj, dict) and all(k in obj for k in keys)
    return ours


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_from(*software: str) -> Callable[[Path], bool]:
    """A PNG whose "Software" text chunk (written before the image data) names one of these."""
    def ours(path: Path) -> bool:
        with path.open("rb") as f:
            head = f.read(4096)
        return head.startswith(PNG_SIGNATURE) and any(b"Software\x00" + s.encode() in head for s in software)
    return ours


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
    """Rename a finished file or folder onto path: a file replaces a file, a folder a folder.
    os.replace cannot replace a non-empty folder, so an old folder is first moved aside to
    path.old, and deleted whole once the new one is in place: callers replace only folders
    that are theirs whole (a training checkpoint), or check_output first."""
    if path.is_dir() and not path.is_symlink():
        if not tmp.is_dir():
            raise OutputError(f"{path}: a folder; a file is never written in its place")
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


def publish(tmp: Path, folder: Path, remove: Iterable[str] = ()) -> None:
    """Move the finished folder tmp to folder. A new folder is one rename. An existing one (an
    earlier output being replaced) keeps everything that is not being replaced: each file of
    tmp is renamed over its namesake, checksums.json last, so that a folder caught halfway fails
    its checksums instead of loading a mix; then the names in `remove` (the earlier output's
    files that the new one does not have) are deleted. tmp is gone afterwards."""
    if not folder.exists():
        os.replace(tmp, folder)
        return
    for f in sorted(tmp.iterdir(), key=lambda f: f.name == CHECKSUMS):
        move_into_place(f, folder / f.name)
    for name in remove:
        _remove(folder / name)
    tmp.rmdir()


def write_json(path: Path, obj: dict) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n"))


def write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


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
    bytes loads silently. Reading every entry through zipfile checks them (one sequential pass;
    its cost is measured in docs/checkpoints.md). Legacy (pre-zip) files carry no checksum: torch.load decides."""
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
               f"`python -m yarn_minimal checksums {folder} --overwrite`)")
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


# ---------------------------------------------------------------------------------------
# A download against the digest its site publishes
# ---------------------------------------------------------------------------------------

def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def check_sha256(path: str | os.PathLike, expected: str) -> tuple[bool, str]:
    """(whether path's sha256 is `expected`, the digest found). The digest is the one the
    download site lists for this file (Hugging Face shows it per file as "SHA256"); any case,
    surrounding spaces ignored. Raises ValueError for a digest that is not 64 hex digits and
    for a path that is not a file."""
    path, want = Path(path), expected.strip().lower()
    if len(want) != 64 or any(c not in "0123456789abcdef" for c in want):
        raise ValueError(f"--sha256 {expected!r}: not a sha256 digest (64 hex digits)")
    if not path.is_file():
        raise ValueError(f"{path}: {'a folder' if path.is_dir() else 'no such file'}; a sha256 digest is of one file")
    found = file_sha256(path)
    return found == want, found
