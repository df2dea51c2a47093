"""Fine-tuning with the paper's recipe (Sec. 4.1), on one device or under torchrun with FSDP2.

    "We used a learning rate of 2e-5 with no weight decay and a linear warmup of 20 steps along
    with AdamW beta1 = 0.9 and beta2 = 0.95. For s = 16 we fine-tuned for 400 steps with global
    batch size 64 using PyTorch Fully Sharded Data Parallelism and Flash Attention 2 on the
    PG19 dataset chunked into 64k segments bookended with the BOS and EOS token. For s = 32 we
    followed the same procedure, but started from the finished s = 16 checkpoint and trained
    for an additional 200 steps."

train.py is the command line and the loop; this module holds the recipe its loop calls: the
optimizer and schedule, processes and FSDP2 (with random initialization from scratch), mixed
precision and gradient clipping. A run's state on disk (the --out folder, resumable checkpoints,
metrics) is runs.py; what a run costs (parameters, FLOPs, the memory estimate) is sizing.py.
"""
from __future__ import annotations

import datetime
import math
import os
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

try:  # public from torch 2.6; torch 2.5 has FSDP2 under its first, private name
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
except ImportError:
    from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard

from . import checkpoint
from .model import ModelArgs, Transformer
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
# for 13B or 70B on a slow disk (27 GB at 200 MB/s is 2.3 minutes already).
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
    a meta-device model (--init random) is initialized block by block the same way (init_seed).
    FSDP2's mixed precision rebuilds every dataclass argument of a block with
    dataclasses.replace(), which refuses init=False fields: so model.Rotation has none."""
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


def forward_backward(model: torch.nn.Module, micro_batches, accumulation_steps: int, device: torch.device,
                     dtype: torch.dtype, env: DistEnv, grad_clip: float) -> tuple[float, float]:
    """One optimizer step's gradients: the mean next-token loss of every micro-batch, accumulated
    into the gradients, then clipped. Returns the loss averaged over ranks and the gradient norm
    before clipping; the caller steps the optimizer (or stops, if either is not finite)."""
    loss_sum = torch.zeros((), device=device)
    for inputs, targets in micro_batches:
        with autocast(device, dtype, env):
            loss = model(inputs.to(device), targets=targets.to(device))
        (loss / accumulation_steps).backward()
        loss_sum += loss.detach().float()
    loss = env.mean(loss_sum / accumulation_steps).item()
    return loss, grad_norm_and_clip(model, grad_clip).item()


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


def init_weights(model: Transformer, std: float = 0.02, seed: Optional[int] = None) -> None:
    """GPT-2 style initialization for training from scratch: N(0, std), with residual
    output projections scaled by 1/sqrt(2 n_layers)."""
    # the generator lives where the weights do (normal_ on CUDA refuses a CPU generator);
    # weights on the meta device have no values to draw
    device = next(model.parameters()).device
    gen = None if seed is None or device.type == "meta" else torch.Generator(device).manual_seed(seed)
    for name, p in model.named_parameters():
        init_parameter(model, name, p, std, gen)


def init_parameter(model: Transformer, name: str, p: torch.Tensor, std: float = 0.02,
                   generator: Optional[torch.Generator] = None) -> None:
    """init_weights' rule for one parameter (named as in named_parameters)."""
    if name.endswith("norm.weight"):
        torch.nn.init.ones_(p)
    else:
        out_proj = name.endswith(("wo.weight", "w2.weight"))
        std = std / math.sqrt(2 * model.args.n_layers) if out_proj else std
        torch.nn.init.normal_(p, 0.0, std, generator=generator)


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
                init_parameter(model, f"{prefix}.{name}", p, generator=gen)
        place(unit)
    return model


def timer_sync(device: torch.device) -> float:
    """perf_counter after the device's queued work is done (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
