"""Fine-tune a Llama 2 model with a RoPE extension, using the YaRN paper's recipe (Sec. 4.1).

    python train.py --ckpt llama-2-7b --data pg19-64k --out runs/s16                 # one device
    torchrun --nproc_per_node 8 train.py --ckpt llama-2-7b --data pg19-64k --out runs/s16 \\
        --activation-checkpointing                                                       # FSDP2
    torchrun --nproc_per_node 8 train.py --init-from runs/s16 --yarn-scale 32 --steps 200 \\
        --data pg19-64k --out runs/s32 --activation-checkpointing                        # s = 32
    python train.py --estimate-memory --model-size 7b --n-gpus 8                        # dry run

See docs/training.md for the recipe, what the paper leaves open, and the memory arithmetic.
"""
from yarn_minimal import ctrl_c

ctrl_c.exit_quietly(__name__)  # before torch loads: Ctrl-C during the imports is one line, exit 130

import argparse
import json
import math
import os
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

import yarn_minimal
from yarn_minimal import cli, runs, sizing, training
from yarn_minimal.checkpoint import hf_rope_scaling
from yarn_minimal.data import SegmentLoader, check_vocabulary, open_segments
from yarn_minimal.formats.common import model_args
from yarn_minimal.model import ModelArgs, Transformer
from yarn_minimal.rope import RopeConfig
from yarn_minimal.tokenizer import Tokenizer

SHAPE_FLAGS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of")  # ModelArgs fields

OPEN_CHOICES = """what the paper leaves open, and what this script does:
  schedule after warmup   linear decay to 0 at --steps, as the authors' finetune.py (which trained
                          the released models) does; --schedule constant holds the rate (the
                          paper names only the 20-step linear warmup)
  warmup shape            lr x min(1, (step + 1) / 20) for 0-based optimizer steps: step 0 uses
                          lr/20, step 19 the full 2e-5
  gradient clipping       total-norm clipping at 1.0 (not in the paper; the public code's flag
                          never clips and its DeepSpeed config leaves it "auto"); --grad-clip 0: off
  AdamW epsilon           1e-8 (PyTorch's default)
  precision               float32 master weights, gradients and AdamW states; bf16 compute
  data order              a fresh seeded shuffle of all segments every epoch
  last tokens             each 64k segment trains 65535 next-token predictions (no cross-segment target)
rope: with no rope flags and a checkpoint without an extension (raw Llama 2), training uses
  --method yarn --yarn-scale 16 (the paper's s = 16 over L = 4096). A checkpoint saved by this
  script (rope.json) keeps its own setting unless flags change it, so --init-from runs/s16
  --yarn-scale 32 continues at s = 32. Use --method none for plain RoPE (from-scratch models)."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " Defaults are the paper's.",
                                epilog=OPEN_CHOICES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    cli.add_rope_args(p)
    add_recipe_args(p)
    add_runtime_args(p)
    g = p.add_argument_group("memory estimate (dry run: loads nothing)")
    g.add_argument("--estimate-memory", action="store_true", help="print per-GPU memory and exit")
    g.add_argument("--n-gpus", type=int, default=None, help="GPUs for the estimate (default: WORLD_SIZE or 8)")
    g.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory per GPU for the estimate (default 80)")
    return p.parse_args(argv)


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model to start from")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--ckpt", default=None, help=f"the model to fine-tune: {cli.CHECKPOINT_LAYOUTS}")
    src.add_argument("--init-from", default=None,
                     help="the --out folder of an earlier run (its final/ model is used), e.g. s = 16 -> s = 32")
    g.add_argument("--init", choices=("checkpoint", "random"), default="checkpoint",
                   help="random: train from scratch with the size flags below and --tokenizer")
    g.add_argument("--from-scratch", dest="init", action="store_const", const="random", help="same as --init random")
    g.add_argument("--tokenizer", default=None,
                   help="for --init random: the tokenizer the data was prepared with (a model folder, a "
                        "tokenizer.model, a tokenizer.json or a .gguf file); OUT/final carries it")
    g.add_argument("--model-size", choices=sorted(sizing.LLAMA2_SIZES), default=None,
                   help="Llama 2 shape for --init random / --estimate-memory")
    for name in SHAPE_FLAGS:
        g.add_argument(f"--{name.replace('_', '-')}", type=int, default=None, help=f"model {name} for --init random")


def add_recipe_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data and recipe (defaults: Sec. 4.1)")
    g.add_argument("--data", default=None, help="folder made by `python -m yarn_minimal data`")
    g.add_argument("--out", default=None, help="output folder: checkpoints, metrics.jsonl, final/; new, empty, or an "
                                               "earlier run's (--resume or --overwrite)")
    g.add_argument("--steps", type=int, default=training.STEPS, help="optimizer steps (default 400; 200 for s = 32)")
    g.add_argument("--seq-len", type=int, default=None,
                   help="tokens per sequence (default: the data's segment length, 65536 in the paper); shorter "
                        "uses the first --seq-len tokens of each segment")
    g.add_argument("--global-batch-size", type=int, default=training.GLOBAL_BATCH,
                   help="sequences per optimizer step over all ranks (default 64)")
    g.add_argument("--micro-batch-size", type=int, default=1,
                   help="sequences per forward pass per rank (default 1); accumulation steps = global / (world x micro)")
    g.add_argument("--lr", type=float, default=training.LR, help="peak learning rate (default 2e-5)")
    g.add_argument("--schedule", choices=training.SCHEDULES, default=training.SCHEDULE,
                   help="lr after warmup: linear decay to 0 at --steps (default; the authors' finetune.py), "
                        "constant (the paper states no decay), or cosine decay to 0.1 x lr at --steps (for "
                        "pre-training from scratch, e.g. the demo model)")
    g.add_argument("--warmup-steps", type=int, default=training.WARMUP_STEPS, help="linear warmup steps (default 20)")
    g.add_argument("--grad-clip", type=float, default=training.GRAD_CLIP, help="max gradient norm, 0 = off (default 1.0)")
    g.add_argument("--seed", type=int, default=0, help="data order and random init (default 0)")


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("runtime")
    cli.add_device_args(g)
    g.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each block in backward (needed for 7B at 64k; see --estimate-memory)")
    g.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps and at the end (0: only at the end)")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="keep the newest N step checkpoints (0: all)")
    g.add_argument("--save-models-at", type=cli.step_list, default=(), metavar="STEPS",
                   help="also write the model alone (no optimizer state) after these steps, e.g. 4,16,64, as "
                        "OUT/model-step-000004/ ...: loadable like final/, for learning curves")
    g.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from OUT/latest (or the given checkpoint folder), with the same flags")
    g.add_argument("--overwrite", action="store_true",
                   help="start over in an --out that holds a run (its checkpoints, final/ and metrics are deleted; "
                        "nothing else in the folder)")
    g.add_argument("--export-hf", action="store_true", help="also write the final model in HF layout to OUT/final-hf")


def check_flags(args: argparse.Namespace) -> None:
    """What train.py refuses before it reads a file."""
    if args.data is None or args.out is None:
        raise SystemExit("error: --data and --out are required (or use --estimate-memory)")
    if args.dtype == "float16":
        raise SystemExit("error: --dtype float16: float16 training needs loss scaling, which this trainer does not "
                         "do (gradients underflow); use --dtype bfloat16, the paper's precision")
    if args.resume and args.overwrite:
        raise SystemExit("error: --resume and --overwrite: choose one")
    if any(n > args.steps for n in args.save_models_at):
        raise SystemExit(f"error: --save-models-at {','.join(map(str, args.save_models_at))}: every step must be "
                         f"<= --steps {args.steps}")


def model_shape(args: argparse.Namespace) -> dict:
    """--model-size's Llama 2 shape with the size flags on top (--init random, --estimate-memory)."""
    shape = dict(sizing.LLAMA2_SIZES.get(args.model_size, {}))
    return shape | {key: getattr(args, key) for key in SHAPE_FLAGS if getattr(args, key) is not None}


def start_folder(args: argparse.Namespace) -> Path:
    if args.init_from is not None:
        out = Path(args.init_from)
        return out / "final" if (out / "final" / "params.json").is_file() else out
    return cli.resolve_checkpoint(args.ckpt)


def choose_rope(args: argparse.Namespace, base: RopeConfig) -> RopeConfig:
    """The flags on top of the starting model's rope; the paper's s = 16 when neither says more."""
    if args.method is None and args.scale is None and base.method == "none":
        base = cli.updated_rope(base, dict(method="yarn", scale=training.YARN_SCALE))
    return cli.rope_from_args(args, base)


def estimate(args: argparse.Namespace) -> str:
    """--estimate-memory: the per-GPU arithmetic for the starting checkpoint's shape or the size flags."""
    if args.ckpt or args.init_from:
        params = json.loads((start_folder(args) / "params.json").read_text())
        if params.get("vocab_size", -1) == -1:  # Meta's download leaves it to the tokenizer
            params["vocab_size"] = 32000
        margs = model_args(params, None, start_folder(args) / "params.json")
    else:
        margs = ModelArgs(**{"vocab_size": 32000, **model_shape(args)})
    world = args.n_gpus or int(os.environ.get("WORLD_SIZE", "8"))
    return sizing.format_memory_estimate(margs, args.seq_len or training.SEQ_LEN, world, args.micro_batch_size,
                                         args.gpu_memory_gb)


def start_model(args: argparse.Namespace, dtype: torch.dtype, data_meta: dict) -> tuple[Transformer, Tokenizer]:
    """The model training starts from (a checkpoint, or --init random on the meta device) under
    the rope it will train with, checked against the data and --export-hf before --out is touched."""
    if args.init == "random" and args.tokenizer is None:
        raise SystemExit("error: --init random needs --tokenizer (a model folder, a tokenizer.model, a "
                         "tokenizer.json or a .gguf file)")
    try:
        model, tokenizer = (training.model_from_scratch(args.tokenizer, model_shape(args)) if args.init == "random"
                            else yarn_minimal.load(start_folder(args), dtype=dtype))
        check_vocabulary(data_meta, tokenizer, args.data)
    except (ValueError, OSError) as e:  # CheckpointError included; a missing tokenizer
        raise SystemExit(f"error: {e}") from None
    model.set_rope(choose_rope(args, model.rope))
    if args.export_hf:  # find out now, not after 400 steps, that the setting has no HF form
        try:
            hf_rope_scaling(model.rope, model.args.head_dim)
        except ValueError as e:
            raise SystemExit(f"error: --export-hf: {e}") from None
    if data_meta.get("vocab_size", model.args.vocab_size) > model.args.vocab_size:
        raise SystemExit(f"error: {args.data}: tokenized with vocab_size {data_meta['vocab_size']}, "
                         f"the model has {model.args.vocab_size}")
    return model, tokenizer


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.estimate_memory:
        return print(estimate(args))
    check_flags(args)
    device, dtype = cli.resolve_device_dtype(args.device, args.dtype)
    out = Path(args.out)
    runs.check_out(out, args.resume, args.overwrite)  # before a file is read or a model loaded
    segments, data_meta = open_segments(args.data)  # every input is checked before --out is touched
    env = training.init_distributed(device)
    device = env.device
    try:
        loader = SegmentLoader(segments, args.global_batch_size, args.micro_batch_size, env.rank,
                               env.world_size, args.seed, args.seq_len)
    except ValueError as e:
        raise SystemExit(f"error: {args.data}: {e}") from None
    torch.manual_seed(args.seed)
    model, tokenizer = start_model(args, dtype, data_meta)
    resume_from = runs.find_checkpoint(args.resume, out) if args.resume else None
    created = runs.claim_out(out, env, args.resume, args.overwrite)
    model.activation_checkpointing = args.activation_checkpointing
    model = training.place_model(model, env, dtype, init_seed=args.seed if args.init == "random" else None).train()
    optimizer = training.make_optimizer(model, args.lr)
    scheduler = training.make_scheduler(optimizer, args.warmup_steps, args.schedule, args.steps)
    cfg = runs.TrainConfig(args.global_batch_size, args.seed, loader.seq_len, args.schedule, int(segments.shape[0]),
                           model.rope, args.lr, args.warmup_steps, steps=None if args.schedule == "constant" else args.steps)
    start = runs.load_checkpoint(resume_from, model, optimizer, scheduler, env, asdict(cfg))["step"] if resume_from else 0
    metrics = runs.MetricsLog(out / "metrics.jsonl", start) if env.main else None
    if env.main:
        print(f"# {model.rope.describe()}; {env.world_size} process(es) on {device.type}, {str(dtype)[6:]}; "
              f"{loader.accumulation_steps} micro-batches of {args.micro_batch_size} x {loader.seq_len} per rank per step",
              file=sys.stderr)
    meter = sizing.StepMeter(model.args, device, dtype, args.global_batch_size, loader.seq_len, env.world_size)

    step = start
    try:  # Ctrl-C: one line saying which step is on disk and how to go on
        bar = tqdm(range(start, args.steps), initial=start, total=args.steps, disable=not env.main, desc="training")
        for step in bar:
            t0 = training.timer_sync(device)
            loss, grad_norm = training.forward_backward(model, loader.micro_batches(step), loader.accumulation_steps,
                                                        device, dtype, env, args.grad_clip)
            lr = optimizer.param_groups[0]["lr"]
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                stop_on_nonfinite(out, step, loss, grad_norm, model, optimizer, scheduler, cfg, loader, env)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            record = dict(step=step + 1, loss=loss, lr=lr, grad_norm=grad_norm,
                          **meter.measure(training.timer_sync(device) - t0))
            if env.main:
                metrics.write(record)
                bar.set_postfix(meter.postfix(record))
            if (args.save_every and (step + 1) % args.save_every == 0) or step + 1 == args.steps:
                runs.save_checkpoint(out, f"step-{step + 1:06d}", model, optimizer, scheduler,
                                     dict(asdict(cfg), step=step + 1), env, keep=args.keep_checkpoints)
            if step + 1 in args.save_models_at:
                runs.save_model(model, tokenizer, out / f"model-step-{step + 1:06d}", dtype, env)
    except BaseException as e:
        if env.main:
            runs.discard_if_empty(out, created)
        if isinstance(e, KeyboardInterrupt):
            raise SystemExit(f"error: {runs.interrupted(out, step, args.save_every)}" if env.main else 1) from None
        raise
    runs.save_model(model, tokenizer, out / "final", dtype, env, export_hf=args.export_hf)
    if env.main:
        print(f"final model: {out / 'final'}", file=sys.stderr)
    if env.distributed:
        torch.distributed.destroy_process_group()


def stop_on_nonfinite(out, step, loss, grad_norm, model, optimizer, scheduler, cfg, loader, env) -> None:
    """A non-finite loss or gradient norm: the weights are still those before this step; save
    them and the batch's segment ids to inspect, and stop."""
    name = f"nonfinite-step-{step + 1:06d}"
    runs.save_checkpoint(out, name, model, optimizer, scheduler,
                         dict(asdict(cfg), step=step, loss=loss, grad_norm=grad_norm,
                              segments=loader.global_indices(step).tolist()), env)
    raise SystemExit(f"error: step {step + 1}: non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} "
                     f"(loss {loss}, grad norm {grad_norm}); weights before the step and the batch's segment "
                     f"ids saved to {out / name}")


if __name__ == "__main__":
    cli.run_main(main)
