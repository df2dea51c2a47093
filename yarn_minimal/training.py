"""Fine-tuning with the paper's recipe (Sec. 4.1), on one device or under torchrun with FSDP2.

    "We used a learning rate of 2e-5 with no weight decay and a linear warmup of 20 steps along
    with AdamW beta1 = 0.9 and beta2 = 0.95. For s = 16 we fine-tuned for 400 steps with global
    batch size 64 using PyTorch Fully Sharded Data Parallelism and Flash Attention 2 on the
    PG19 dataset chunked into 64k segments bookended with the BOS and EOS token. For s = 32 we
    followed the same procedure, but started from the finished s = 16 checkpoint and trained
    for an additional 200 steps."

train.py is the command line; this module holds the pieces its loop calls: the recipe's
optimizer and schedule, processes and FSDP2 (with random initialization from scratch), the
resume settings, metrics, and run folders with resumable checkpoints. What a run costs
(parameters, FLOPs, the memory estimate) is in sizing.py.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import pickle
import random
import shutil
import time
import warnings
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.metadata as dcp_metadata
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.device_mesh import init_device_mesh

try:  # public from torch 2.6; torch 2.5 has FSDP2 under its first, private name
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
except ImportError:
    from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard

from . import checkpoint
from .files import (CHECKSUMS, CheckpointError, Output, OutputError, atomic_write, check_output, holds,
                    move_into_place, read_json, temporary, verify_checksums, write_checksums)
from .model import ModelArgs, Transformer
from .rope import RopeConfig
from .tokenizer import Tokenizer

# Sec. 4.1. What the paper leaves open is chosen in the comments beside each value.
LR = 2e-5
BETAS = (0.9, 0.95)
WEIGHT_DECAY = 0.0
ADAM_EPS = 1e-8          # not stated; PyTorch's default
WARMUP_STEPS = 20
STEPS = 400              # s = 16; the s = 32 continuation runs 200
GLOBAL_BATCH = 64
SEQ_LEN = 65536
GRAD_CLIP = 1.0          # not stated in the paper, nor recorded in the public code (docs/training.md)
SCHEDULE = "linear"      # after warmup: not stated in the paper; the authors' finetune.py decays to 0
YARN_SCALE = 16.0        # s over Llama 2's L = 4096: 64k tokens


# ---------------------------------------------------------------------------------------------
# Optimizer and schedule

def make_optimizer(model: torch.nn.Module, lr: float = LR) -> torch.optim.AdamW:
    """AdamW(beta1 0.9, beta2 0.95), no weight decay on any parameter (Sec. 4.1)."""
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=BETAS, weight_decay=WEIGHT_DECAY, eps=ADAM_EPS)


def warmup_factor(step: int, warmup_steps: int) -> float:
    """lr multiplier at optimizer step `step` (0-based): linear warmup, then constant
    (--schedule constant: the paper says "linear warmup of 20 steps" and nothing after it).

    We ramp (step + 1) / warmup so that the first step already learns (lr / 20) and step
    warmup - 1 is the first at the full rate; HF's step / warmup would spend the first step
    at lr = 0."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


def linear_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Warmup, then linear decay to 0 at total_steps (--schedule linear, the default): what
    the authors' finetune.py, which trained the released models, does on both of its paths
    (transformers' get_linear_schedule_with_warmup; DeepSpeed's WarmupDecayLR). After warmup
    this is their (total - step) / (total - warmup) exactly."""
    if step < warmup_steps:
        return warmup_factor(step, warmup_steps)
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def cosine_factor(step: int, warmup_steps: int, total_steps: int, floor: float = 0.1) -> float:
    """Warmup, then cosine decay to `floor` x lr at total_steps. Not the paper's fine-tuning
    recipe: used to pre-train the small demo model from scratch (--schedule cosine)."""
    if step < warmup_steps:
        return warmup_factor(step, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


SCHEDULES = ("linear", "constant", "cosine")


def make_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int = WARMUP_STEPS,
                   schedule: str = SCHEDULE, total_steps: int = STEPS) -> torch.optim.lr_scheduler.LambdaLR:
    # stepped exactly once per optimizer step on every rank (the public code's accelerate path
    # could advance it once per process)
    factor = {"linear": lambda step: linear_factor(step, warmup_steps, total_steps),
              "constant": lambda step: warmup_factor(step, warmup_steps),
              "cosine": lambda step: cosine_factor(step, warmup_steps, total_steps)}.get(schedule)
    if factor is None:
        raise ValueError(f"schedule: {schedule!r}; allowed: {', '.join(SCHEDULES)}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------------------------------------
# Processes and FSDP2

@dataclass
class DistEnv:
    """This process's place among torchrun's: rank 0 of 1 without torchrun."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """Average over ranks (SUM / world: gloo has no AVG)."""
        if self.distributed:
            x = x.clone()
            dist.all_reduce(x, op=dist.ReduceOp.SUM)
            x /= self.world_size
        return x


# Rank 0 alone writes the final model (13.5 GB for 7B in bf16, twice with --export-hf) and deletes
# old checkpoints while the other ranks wait in a barrier: NCCL's default 10 minutes is too short
# on a slow shared disk (200 MB/s: 27 GB in 2.3 minutes, 13 B or 70 B far longer).
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=90)


def init_distributed(device: torch.device) -> DistEnv:
    """Single process unless torchrun set WORLD_SIZE > 1; then NCCL on CUDA, gloo on CPU, one
    GPU per process (cuda:LOCAL_RANK)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistEnv(0, 1, 0, device)
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=PROCESS_GROUP_TIMEOUT,
                            device_id=device if device.type == "cuda" else None)
    return DistEnv(dist.get_rank(), world_size, local_rank, device)


def shard_model(model: Transformer, env: DistEnv, compute_dtype: torch.dtype, init_seed: Optional[int] = None) -> Transformer:
    """FSDP2: one unit per TransformerBlock plus the root (embedding, final norm, output).
    Masters, gradients and AdamW states stay float32 and sharded; each unit is all-gathered in
    the compute dtype for its forward/backward, and gradients are reduce-scattered in float32.
    Blocks are moved to the device one at a time, so the full float32 model never has to fit;
    a meta-device model (--init random) is initialized block by block the same way (init_seed)."""
    mesh = init_device_mesh(env.device.type, (env.world_size,))
    mp = MixedPrecisionPolicy(param_dtype=None if compute_dtype == torch.float32 else compute_dtype,
                              reduce_dtype=torch.float32)
    blocks = set(model.layers)

    def place(unit):
        unit.to(device=env.device, dtype=torch.float32)
        if unit in blocks:
            fully_shard(unit, mesh=mesh, mp_policy=mp)

    if init_seed is not None:
        materialize_random(model, init_seed, place)
    else:
        for unit in (*model.layers, model.tok_embeddings, model.norm, model.output):
            place(unit)
    fully_shard(model, mesh=mesh, mp_policy=mp)  # the root: embedding, final norm, output
    return model


def place_model(model: Transformer, env: DistEnv, compute_dtype: torch.dtype,
                init_seed: Optional[int] = None) -> Transformer:
    """float32 master weights on env.device: sharded with FSDP2 under torchrun, whole in one
    process. init_seed: the model is on the meta device (--init random) and is initialized
    on the way, block by block."""
    if env.distributed:
        return shard_model(model, env, compute_dtype, init_seed)
    if init_seed is not None:
        materialize_random(model, init_seed)
    return model.to(device=env.device, dtype=torch.float32)


def autocast(device: torch.device, compute_dtype: torch.dtype, env: DistEnv) -> AbstractContextManager:
    """Single-process mixed precision: float32 masters, matmuls in the compute dtype. Under FSDP
    the MixedPrecisionPolicy does this instead."""
    if env.distributed or compute_dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device.type, dtype=compute_dtype)


def grad_norm_and_clip(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Total gradient 2-norm before clipping; clips to max_norm when > 0 (it does run)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else math.inf)
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2: the norm over all shards
        norm = norm.full_tensor()
    return norm


# ---------------------------------------------------------------------------------------------
# A model from scratch (train.py --init random): built on the meta device, made real one unit
# at a time, so that no process holds the whole float32 model before it is sharded

def model_from_scratch(tokenizer_path: str, shape: dict) -> tuple[Transformer, Tokenizer]:
    """A Llama of the given ModelArgs fields (vocab_size: one embedding row per tokenizer id
    unless given) on the meta device, and its tokenizer: anything checkpoint.load_tokenizer
    opens (a model folder, a tokenizer.model, a tokenizer.json or a .gguf file), saved with the
    run's checkpoints. place_model makes the model real with materialize_random's values."""
    tokenizer = checkpoint.load_tokenizer(tokenizer_path)
    args = ModelArgs(**{"vocab_size": tokenizer.max_id() + 1, **shape})
    if args.vocab_size <= tokenizer.max_id():  # yarn_minimal.load would refuse the result
        raise ValueError(f"--vocab-size {args.vocab_size}, but {tokenizer_path} has ids up to {tokenizer.max_id()}")
    with torch.device("meta"):
        return Transformer(args), tokenizer


def materialize_random(model: Transformer, seed: int,
                       place: Callable[[torch.nn.Module], None] = lambda unit: None) -> Transformer:
    """A model built on the meta device (train.py --init random) made real one unit at a time
    (embedding, each block, final norm, output) and initialized with init_weights' rule from
    one seeded stream, in named_parameters order: the values init_weights(seed) gives. place(unit)
    runs as soon as a unit is done (under FSDP: move and shard it), so no process ever holds
    more than one full block beside the embedding."""
    gen = torch.Generator().manual_seed(seed)
    units = [("tok_embeddings", model.tok_embeddings)] + [(f"layers.{i}", b) for i, b in enumerate(model.layers)]
    for prefix, unit in units + [("norm", model.norm), ("output", model.output)]:
        unit.to_empty(device="cpu")
        for name, p in unit.named_parameters():
            with torch.no_grad():
                model.init_parameter(f"{prefix}.{name}", p, generator=gen)
        place(unit)
    return model


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

RUN_FILES = ("latest", "final", "final-hf", "metrics.jsonl", "step-*")  # what makes an --out folder a run
RUN = Output("a run (checkpoints, metrics.jsonl, final/)", holds(*RUN_FILES), folder=True,
             again="continue it with --resume, or start over with --overwrite")


def check_out(out: Path, resume: Optional[str], overwrite: bool) -> None:
    """--out, checked on every rank before anything is read or loaded: a new or empty folder, or
    one that holds a run (continued with --resume, started over with --overwrite). A file, or a
    folder of other things, is refused: nothing the trainer did not write is touched."""
    try:
        check_output(out, RUN, overwrite=overwrite or bool(resume))
    except OutputError as e:
        raise SystemExit(f"error: --out {e}") from None


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
    start over with --overwrite, which deletes the old run's own files (step-*, final/,
    final-hf/, latest, metrics.jsonl) and nothing else in the folder."""
    created = not out.exists()
    held = _held(out) if out.is_dir() else []
    if env.main and held and not resume:
        if not overwrite:  # check_out said so already, unless the folder changed since
            raise SystemExit(f"error: --out {out} holds a run ({', '.join(p.name for p in held[:4])}); continue it "
                             "with --resume, or start over with --overwrite")
        for path in held:
            if why := _not_from_a_run(path):
                raise SystemExit(f"error: --out {out}: {path.name} is not what a run writes under that name ({why}); "
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
    ignored). Written to every
    checkpoint's trainer.json as asdict(cfg), and compared field by field on --resume."""

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
            raise SystemExit(f"error: --resume: {pointer} does not exist; no checkpoint to resume from in {out}")
        path = out / pointer.read_text().strip()
    else:
        path = Path(resume)
    if not (path / "trainer.json").is_file():
        raise SystemExit(f"error: --resume: {path} is not a complete checkpoint (no trainer.json)")
    return path


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, env: DistEnv, expected: dict) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG from a save_checkpoint folder.
    `expected` holds settings that must match (asdict of the run's TrainConfig). Every file is
    checked against the checksums its rank wrote before a byte of it is used."""
    manifests = sorted(f.name for f in path.glob("checksums-rank*.json"))
    if "checksums-rank0.json" not in manifests:
        raise CheckpointError(f"{path}: no checksums-rank0.json; not a complete checkpoint")
    for manifest in manifests:  # every rank's files: a few GB/s, small next to the load itself
        verify_checksums(path, manifest, required=True)
    state = json.loads((path / "trainer.json").read_text())
    for key in ("step", "scheduler", "world_size"):
        if key not in state:
            raise CheckpointError(f"{path / 'trainer.json'}: no {key!r}")
    for key, value in expected.items():
        if state.get(key) != value:
            raise SystemExit(f"error: --resume {path}: {key} was {state.get(key)!r} in the checkpoint, "
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


def timer_sync(device: torch.device) -> float:
    """perf_counter after the device's queued work is done (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
