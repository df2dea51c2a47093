"""A training run's state on disk: the --out folder, resumable checkpoints, metrics and the
final model. training.py holds the recipe itself; this module is what makes a run survivable.

    OUT/metrics.jsonl          one line per optimizer step
    OUT/step-000100/           DCP shards of model + optimizer, trainer.json, rng-rank*.pt,
                               checksums-rank*.json (written to .tmp, renamed when every rank is done)
    OUT/latest                 the newest checkpoint's name
    OUT/final/ (+ final-hf/)   the finished model, loadable by yarn_minimal.load
    OUT/model-step-000004/     the model alone after a step of --save-models-at (learning curves)

A finished or interrupted run is never overwritten by accident, a resumed run continues
bit for bit (the data order, the schedule and every RNG), and nothing is unpickled that could
run code: the RNG states are tensors and numbers (torch.load(weights_only=True)), trainer.json
is JSON, and DCP's own pickled .metadata is read with only DCP's types allowed.
"""
from __future__ import annotations

import json
import pickle
import random
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.metadata as dcp_metadata
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from . import checkpoint
from .files import (CHECKSUMS, CheckpointError, Output, OutputError, atomic_write, check_output, holds,
                    move_into_place, read_json, temporary, verify_checksums, write_checksums)
from .model import Transformer
from .rope import RopeConfig
from .tokenizer import Tokenizer
from .training import DistEnv


class RunError(ValueError):
    """An --out folder or a checkpoint that cannot be used as asked; the message says what to do."""


# ---------------------------------------------------------------------------------------------
# Metrics

class MetricsLog:
    """OUT/metrics.jsonl, one line per optimizer step. On resume, lines after the resumed step
    (written after the checkpoint by the interrupted run) are dropped."""

    def __init__(self, path: Path, resume_step: int = 0):
        self.path = path
        kept = []
        if resume_step and path.is_file():
            try:
                kept = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= resume_step]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}: not one JSON record with a 'step' per line ({e!r}); move it aside "
                                 "to resume without the old metrics") from None
        path.write_text("".join(l + "\n" for l in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------------------------------------
# Run folders: OUT holds metrics.jsonl, step-* checkpoints, latest (the newest one's name) and
# final/ (+ final-hf/)

RUN_FILES = ("latest", "final", "final-hf", "metrics.jsonl", "step-*", "model-step-*")  # what makes an --out folder a run
RUN = Output("a run (checkpoints, metrics.jsonl, final/)", holds(*RUN_FILES), folder=True,
             again="continue it with --resume, or start over with --overwrite")


def check_out(out: Path, resume: Optional[str], overwrite: bool) -> None:
    """--out, checked on every rank before anything is read or loaded: a new or empty folder, or
    one that holds a run (continued with --resume, started over with --overwrite). A file, or a
    folder of other things, is refused: nothing the trainer did not write is touched."""
    try:
        check_output(out, RUN, overwrite=overwrite or bool(resume))
    except OutputError as e:
        raise RunError(f"--out {e}") from None


def _held(out: Path) -> list[Path]:
    return sorted(p for pattern in RUN_FILES for p in out.glob(pattern))


def _not_from_a_run(path: Path) -> Optional[str]:
    """Why path, under a name a run writes, is not what the run wrote there (None if it is):
    --overwrite deletes it only when it is."""
    if path.name in ("latest", "metrics.jsonl"):
        return None if path.is_file() else "a folder"
    if not path.is_dir():
        return "a file"
    if path.name.startswith("step-"):
        written = path.suffix in (".tmp", ".old") or (path / "checksums-rank0.json").is_file()
        return None if written else "no checksums-rank0.json"
    if not (path / CHECKSUMS).is_file():  # final/, final-hf/: checkpoint.save's folders
        return f"no {CHECKSUMS}"
    others = sorted({f.name for f in path.iterdir()} - set(read_json(path / CHECKSUMS)) - {CHECKSUMS})
    return f"it also holds {', '.join(others)}" if others else None


def claim_out(out: Path, env: DistEnv, resume: Optional[str], overwrite: bool) -> bool:
    """Make --out (already passed check_out) ready for this run; True if it had to be created. A
    finished or interrupted run is never overwritten by accident: continue it with --resume, or
    start over with --overwrite, which deletes the old run's own files (step-*, model-step-*, final/,
    final-hf/, latest, metrics.jsonl) and nothing else in the folder."""
    created = not out.exists()
    held = _held(out) if out.is_dir() else []
    if env.main and held and not resume:
        if not overwrite:  # check_out said so already, unless the folder changed since
            raise RunError(f"--out {out} holds a run ({', '.join(p.name for p in held[:4])}); continue it "
                             "with --resume, or start over with --overwrite")
        for path in held:
            if why := _not_from_a_run(path):
                raise RunError(f"--out {out}: {path.name} is not what a run writes under that name ({why}); "
                                 "move it away, nothing was deleted")
        for path in held:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    if env.main:
        out.mkdir(parents=True, exist_ok=True)
    env.barrier()
    return created


def discard_if_empty(out: Path, created: bool) -> None:
    """A run that fails before finishing its first step leaves nothing behind: no empty
    metrics.jsonl, and no --out folder if it made it."""
    metrics = out / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size == 0:
        metrics.unlink()
    if created and out.is_dir() and not any(out.iterdir()):
        out.rmdir()


def interrupted(out: Path, step: int, save_every: int) -> str:
    """What Ctrl-C in the training loop says: the last step on disk and how to go on from it."""
    latest = out / "latest"
    if latest.is_file():
        saved = out / latest.read_text().strip()
        saved_step = json.loads((saved / "trainer.json").read_text())["step"]
        return (f"interrupted during step {step + 1}; the last checkpoint is {saved} (step {saved_step}). "
                "Continue with the same command plus --resume")
    if not (out / "metrics.jsonl").is_file():
        return f"interrupted during step {step + 1}; nothing was saved or kept: run the same command again"
    return (f"interrupted during step {step + 1}, before the first checkpoint (--save-every {save_every}); "
            "nothing to resume: run the same command again with --overwrite")


# ---------------------------------------------------------------------------------------------
# Checkpoints: OUT/step-000100/ (DCP shards of model + optimizer, trainer.json, rng-rank*.pt,
# checksums-rank*.json). Nothing is unpickled that could run code: the RNG states are tensors
# and numbers (torch.load(weights_only=True)), trainer.json is JSON, and DCP's own pickled
# .metadata is read with only DCP's types allowed.

def rng_state() -> dict:
    """Every RNG's state as tensors, numbers and strings: loadable with weights_only=True."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, mt, gauss_next = random.getstate()
    state = dict(torch=torch.get_rng_state(), numpy_keys=torch.from_numpy(keys.astype(np.int64)),
                 numpy=[kind, int(pos), int(has_gauss), float(gauss)],
                 python_mt=torch.tensor(mt, dtype=torch.int64), python=[version, gauss_next])
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, gauss_next = state["python"]
    random.setstate((version, tuple(state["python_mt"].tolist()), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# The types DCP's .metadata pickle holds (torch 2.5-2.13); anything else is refused unbuilt.
DCP_METADATA_TYPES = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
                      ("torch.serialization", "_get_layout"), ("torch", "Size"), ("collections", "OrderedDict"),
                      ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
                      ("pathlib", "PureWindowsPath"), ("builtins", "set"), ("builtins", "frozenset")}


class _DcpMetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        found = getattr(dcp_metadata, name, None) if module == dcp_metadata.__name__ else None
        allowed = ((isinstance(found, type) and found.__module__ == module)  # a class DCP defines, not an import
                   or (module, name) in DCP_METADATA_TYPES
                   or (module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                                     torch.memory_format))))
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not a type a checkpoint's metadata holds")
        return super().find_class(module, name)


def check_dcp_metadata(path: Path) -> None:
    """dcp.load unpickles .metadata with plain pickle, which runs whatever code a crafted file
    names. Unpickle it first with only DCP's types allowed, so such a file stops here."""
    try:
        with (path / ".metadata").open("rb") as f:
            _DcpMetadataUnpickler(f).load()
    except Exception as e:
        raise CheckpointError(f"{path / '.metadata'}: refused ({type(e).__name__}: {e}); a checkpoint's metadata "
                              "holds only DCP's own types, so this file is corrupt or crafted") from None


@dataclass(frozen=True)
class TrainConfig:
    """What a run must keep to be resumed: the data order (batch, seed, sequence length, the
    data's size), the rope it trains under, and the rate schedule (its peak rate and warmup too:
    the scheduler's restored state carries the old rate, so a new --lr would be silently
    ignored). Written to every checkpoint's trainer.json as asdict(cfg), and compared field by
    field on --resume."""

    global_batch_size: int
    seed: int
    seq_len: int
    schedule: str
    data_segments: int
    rope: RopeConfig
    lr: float
    warmup_steps: int
    steps: Optional[int] = None  # a decaying rate is a function of --steps; None when constant (it may grow)


def save_checkpoint(out: Path, name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, trainer_state: dict, env: DistEnv,
                    keep: int = 0) -> Path:
    """Write OUT/name atomically: everything goes to OUT/name.tmp, which is renamed only once
    every rank has finished, and OUT/latest is then pointed at it. A kill at any moment leaves
    either the previous checkpoint or the new one, never a half-written one under a final name.
    keep > 0 deletes all but the newest `keep` step-* checkpoints."""
    final, tmp = out / name, temporary(out / name)
    if env.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    env.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    torch.save(rng_state(), tmp / f"rng-rank{env.rank}.pt")
    mine = [f"rng-rank{env.rank}.pt"] + [f.name for f in tmp.glob(f"__{env.rank}_*.distcp")]
    if env.main:
        state = dict(trainer_state, scheduler=scheduler.state_dict(), world_size=env.world_size)
        (tmp / "trainer.json").write_text(json.dumps(state, indent=2) + "\n")
        mine += ["trainer.json", ".metadata"]
    write_checksums(tmp, mine, f"checksums-rank{env.rank}.json")  # each rank sums only what it wrote
    env.barrier()
    if env.main:
        move_into_place(tmp, final)  # every rank has written its part: publish the folder
        atomic_write(out / "latest", lambda t: t.write_text(name + "\n"))
        if keep > 0:
            for old in sorted(out.glob("step-*"))[:-keep]:
                if old.is_dir() and old.suffix not in (".tmp", ".old") and old.name != name:
                    shutil.rmtree(old)
    env.barrier()
    return final


def find_checkpoint(resume: str, out: Path) -> Path:
    """--resume (no value: OUT/latest) or --resume DIR."""
    if resume == "latest":
        pointer = out / "latest"
        if not pointer.is_file():
            raise RunError(f"--resume: {pointer} does not exist; no checkpoint to resume from in {out}")
        path = out / pointer.read_text().strip()
    else:
        path = Path(resume)
    if not (path / "trainer.json").is_file():
        raise RunError(f"--resume: {path} is not a complete checkpoint (no trainer.json)")
    return path


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, env: DistEnv, expected: dict) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG from a save_checkpoint folder.
    `expected` holds settings that must match (asdict of the run's TrainConfig). Every file is
    checked against the checksums its rank wrote before a byte of it is used."""
    manifests = sorted(f.name for f in path.glob("checksums-rank*.json"))
    if "checksums-rank0.json" not in manifests:
        raise CheckpointError(f"{path}: no checksums-rank0.json; not a complete checkpoint")
    for manifest in manifests:  # every rank's files: one read, small next to the load itself
        verify_checksums(path, manifest, required=True)
    state = json.loads((path / "trainer.json").read_text())
    for key in ("step", "scheduler", "world_size"):
        if key not in state:
            raise CheckpointError(f"{path / 'trainer.json'}: no {key!r}")
    for key, value in expected.items():
        if state.get(key) != value:
            raise RunError(f"--resume {path}: {key} was {state.get(key)!r} in the checkpoint, "
                             f"now {value!r}; resume with the same settings")
    check_dcp_metadata(path)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
        scheduler.load_state_dict(state["scheduler"])
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be restored ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    rng = path / f"rng-rank{env.rank}.pt"
    if state["world_size"] == env.world_size and rng.is_file():
        try:
            set_rng_state(torch.load(rng, weights_only=True))
        except Exception as e:  # a pickle that would build anything but tensors and numbers
            raise CheckpointError(f"{rng}: refused ({type(e).__name__}: {str(e).splitlines()[0]}); RNG states are "
                                  "stored as tensors, so this file is corrupt or crafted") from None
    return state


def full_state_dict(model: torch.nn.Module) -> dict:
    """The whole model's weights on CPU; under FSDP gathered to rank 0 (other ranks get {})."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_model(model: torch.nn.Module, tokenizer: Tokenizer, path: Path, dtype: torch.dtype, env: DistEnv,
               export_hf: bool = False) -> None:
    """The final model in the project's layout (params.json + weights + rope.json + tokenizer),
    so `generate.py --ckpt OUT/final` needs no rope flags; written to path.tmp, then renamed."""
    state = full_state_dict(model)
    if env.main:
        with torch.device("meta"):
            plain = Transformer(model.args)
        plain.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True, strict=True)
        for target, fmt in [(path, "meta")] + ([(path.with_name(path.name + "-hf"), "hf")] if export_hf else []):
            atomic_write(target, lambda tmp: checkpoint.save(plain, tokenizer, tmp, format=fmt))
    env.barrier()
