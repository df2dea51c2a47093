"""The GPU checklist in one command: what has to be measured on a real card before the README may
quote a GPU figure. Writes OUT/gpu_check.json and OUT/gpu_check.md (a table).

    python bench/gpu_check.py --out gpu-check                   # on a CUDA machine (one or two GPUs)
    python bench/gpu_check.py --dry-run --out /tmp/gpu-check    # tiny shapes on the CPU: the script's logic

Checks (each one a function below; a failure is recorded and the others still run):
  memory          the card's usable memory (torch.cuda.mem_get_info)
  generate_128k   Llama 2 7B shapes, random weights, bf16, a 131072-token sequence with static YaRN
                  s = 32 and with Dynamic-YaRN: peak memory (max_memory_allocated), prefill and decode tok/s
  flash_vs_sdpa   logits of a prefill chunk after a cached prefix (Tq != Tk) through flash-attn and
                  through SDPA, same bf16 inputs; and whether the greedy tokens agree
  compile_decode  eager and --compile decode tok/s against the memory-bandwidth bound (bench_generate's)
  fsdp_resume     train.py under torchrun on 2 GPUs (FSDP2, NCCL): steps 3-4 of a 4-step run, redone with
                  --resume from its step-2 checkpoint, give the same losses and final weights
  train_mfu       one train step of 7B-shaped blocks at 16k tokens on one GPU (bf16 autocast, float32
                  AdamW, activation checkpointing): tokens/s and MFU

--dry-run runs the same functions with tiny shapes on the CPU (gloo, SDPA, one process for the
resume check), so that CI exercises everything but the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import yarn_minimal.attention as attention_module  # noqa: E402
from bench_generate import decode_bytes_per_token, machine, memory_bandwidth  # noqa: E402
from yarn_minimal import sizing, training  # noqa: E402
from yarn_minimal.data import write_segments  # noqa: E402
from yarn_minimal.files import Output, check_output, holds, write_json, write_text  # noqa: E402
from yarn_minimal.generation import GenerationStats, generate  # noqa: E402
from yarn_minimal.model import ModelArgs, Transformer  # noqa: E402
from yarn_minimal.rope import RopeConfig  # noqa: E402

GiB = 2 ** 30


@dataclass
class Setup:
    """Shapes and places for one run of the checklist: the real one, or the dry run's."""

    device: torch.device
    dtype: torch.dtype
    model: ModelArgs                  # generation and compile checks (Llama 2 7B)
    train_model: ModelArgs            # the MFU check (7B blocks, fewer of them: masters + AdamW must fit)
    original_length: int              # L
    long_len: int                     # the long sequence: prompt + new tokens
    new_tokens: int
    prefill_chunk: int
    short_prompt: int                 # compile check: a prompt where the weights dominate
    train_tokens: int
    fsdp_processes: int
    compile: bool = True              # the dry run leaves torch.compile out (minutes of CPU compilation)
    dry_run: bool = False


def real_setup() -> Setup:
    return Setup(device=torch.device("cuda"), dtype=torch.bfloat16, model=ModelArgs(),
                 train_model=ModelArgs(n_layers=8), original_length=4096, long_len=131072, new_tokens=32,
                 prefill_chunk=4096, short_prompt=1024, train_tokens=16384, fsdp_processes=2)


def dry_setup() -> Setup:
    tiny = dict(dim=64, n_heads=4, vocab_size=256, multiple_of=32)
    return Setup(device=torch.device("cpu"), dtype=torch.float32, model=ModelArgs(n_layers=2, **tiny),
                 train_model=ModelArgs(n_layers=2, **tiny), original_length=16, long_len=512, new_tokens=8,
                 prefill_chunk=128, short_prompt=32, train_tokens=256, fsdp_processes=1, compile=False,
                 dry_run=True)


# ---------------------------------------------------------------------------------------------
# helpers

def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device):
    return torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else None


def random_model(args: ModelArgs, setup: Setup, rope: RopeConfig, dtype=None) -> Transformer:
    """Random weights (init_weights, seed 0) of the given shape, built straight on the device."""
    with torch.device("meta"):
        model = Transformer(ModelArgs(**{**vars(args), "rope": rope}))
    model = model.to(dtype or setup.dtype).to_empty(device=setup.device)  # cast on meta: no float32 7B copy
    training.init_weights(model, seed=0)
    return model.eval()


def prompt_tokens(n: int, vocab_size: int, seed: int = 0) -> list[int]:
    return torch.randint(3, vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# the checks: each returns a dict of figures, raises on failure, or returns {"skipped": reason}

def check_memory(setup: Setup) -> dict:
    if setup.device.type != "cuda":
        return {"skipped": "no CUDA device (dry run)"}
    free_bytes, total = torch.cuda.mem_get_info(setup.device)
    return {"card": torch.cuda.get_device_name(setup.device), "total_gib": total / GiB,
            "free_gib": free_bytes / GiB, "torch": torch.__version__, "cuda": torch.version.cuda}


def check_generate_128k(setup: Setup) -> dict:
    L = setup.original_length
    s = setup.long_len / L
    ropes = {f"static YaRN s={s:g}": RopeConfig(method="yarn", scale=s, original_length=L),
             "Dynamic-YaRN": RopeConfig(method="yarn", scale=1.0, original_length=L, dynamic=True)}
    prompt = prompt_tokens(setup.long_len - setup.new_tokens, setup.model.vocab_size)
    out = {"tokens": setup.long_len, "flash_attn": attention_module.flash_attn_func is not None}
    for name, rope in ropes.items():
        model = random_model(setup.model, setup, rope)
        reset_peak(setup.device)
        stats = GenerationStats()
        try:
            generate(model, prompt, setup.new_tokens, stats=stats, prefill_chunk=setup.prefill_chunk)
            out[name] = {"peak_gib": peak_gib(setup.device), "final_scale": stats.final_scale,
                         "prefill_tok_s": stats.prefill_tokens_per_s, "decode_tok_s": stats.decode_tokens_per_s}
        except torch.OutOfMemoryError as e:
            out[name] = {"error": f"out of memory: {str(e).splitlines()[0]}", "peak_gib": peak_gib(setup.device)}
        del model
        free(setup.device)
    failed = [name for name in ropes if "error" in out[name]]
    if failed:
        raise RuntimeError(f"{', '.join(failed)} ran out of memory: {json.dumps(out)}")
    return out


def naive_attention(q, k, v, causal=False, return_attn_probs=False):
    """flash_attn_func's contract written out: (B, T, H, D) layout, causal mask aligned bottom-right,
    the log-sum-exp (B, H, Tq) with return_attn_probs. The dry run's stand-in for flash-attn, so
    that the comparison itself is exercised on CPU."""
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / q.shape[-1] ** 0.5
    if causal:
        Tq, Tk = q.shape[1], k.shape[1]
        mask = torch.arange(Tk, device=q.device)[None, :] <= torch.arange(Tk - Tq, Tk, device=q.device)[:, None]
        scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.float()).type_as(q)
    return (out, scores.logsumexp(-1), None) if return_attn_probs else out


@contextmanager
def attention_path(path: str, dry_run: bool):
    """Route model.py's attention through flash-attn, SDPA, or (dry run) the naive stand-in."""
    saved_flash, saved_applies = attention_module.flash_attn_func, attention_module.flash_attn_applies
    try:
        if path == "sdpa":
            attention_module.flash_attn_func = None
        elif dry_run:  # every attention call, whatever the device and dtype (the dry run is float32 CPU)
            attention_module.flash_attn_func = naive_attention
            attention_module.flash_attn_applies = lambda q: True
        yield
    finally:
        attention_module.flash_attn_func, attention_module.flash_attn_applies = saved_flash, saved_applies


def check_flash_vs_sdpa(setup: Setup) -> dict:
    if not setup.dry_run and attention_module.flash_attn_func is None:
        return {"skipped": "flash-attn is not installed (pip install 'flash-attn>=2.1' --no-build-isolation)"}
    model = random_model(setup.model, setup, RopeConfig(method="yarn", scale=8.0, original_length=setup.original_length))
    # two prefill chunks: the second (Tq = chunk) attends to the cached first one too (Tk = 2 chunks)
    prompt = prompt_tokens(2 * setup.prefill_chunk, setup.model.vocab_size, seed=1)
    runs = {}
    for path in ("flash", "sdpa"):
        logits = []
        with attention_path(path, setup.dry_run):
            tokens = generate(model, prompt, 4, prefill_chunk=setup.prefill_chunk,
                              on_logits=lambda x: logits.append(x.float().cpu()))
        runs[path] = (tokens, torch.stack(logits))
    (tok_f, log_f), (tok_s, log_s) = runs["flash"], runs["sdpa"]
    first = (log_f[0] - log_s[0]).abs().max().item()
    out = {"flash": "naive stand-in (dry run)" if setup.dry_run else "flash-attn", "dtype": str(setup.dtype)[6:],
           "Tq": setup.prefill_chunk, "Tk": 2 * setup.prefill_chunk,
           "max_abs_logit_diff_prefill_chunk": first, "max_abs_logit_diff_all": (log_f - log_s).abs().max().item(),
           "logit_scale": log_s[0].abs().max().item(), "greedy_tokens_equal": tok_f == tok_s}
    tolerance = 0.05 * out["logit_scale"] + 0.05  # bf16 kernels round differently; a misaligned mask does not
    if first > tolerance:
        raise RuntimeError(f"flash and SDPA logits differ by {first:.3g} (tolerance {tolerance:.3g}): {out}")
    return out


def check_compile_decode(setup: Setup) -> dict:
    new = 4 * setup.new_tokens
    model = random_model(setup.model, setup, RopeConfig(original_length=setup.short_prompt + new))  # plain RoPE
    prompt = prompt_tokens(setup.short_prompt, setup.model.vocab_size, seed=2)
    speeds = {"compile": None}
    for mode in ("eager", "compile") if setup.compile else ("eager",):
        best = 0.0
        for _ in range(2):  # the first compiled call also compiles; GenerationStats keeps it out
            stats = GenerationStats()
            generate(model, prompt, new, stats=stats, compile=mode == "compile")
            best = max(best, stats.decode_tokens_per_s)
        speeds[mode] = best
    per_token = decode_bytes_per_token(model, setup.short_prompt + new // 2)
    bandwidth = memory_bandwidth(setup.device, 1 << (30 if setup.device.type == "cuda" else 26))
    bound = bandwidth / per_token
    del model
    free(setup.device)
    return {"prompt": setup.short_prompt, "new_tokens": new, "eager_tok_s": speeds["eager"],
            "compile_tok_s": speeds["compile"], "bound_tok_s": bound, "bytes_per_token": per_token,
            "bandwidth_gb_s": bandwidth / 1e9, "eager_fraction_of_bound": speeds["eager"] / bound,
            "compile_fraction_of_bound": None if speeds["compile"] is None else speeds["compile"] / bound}


def check_fsdp_resume(setup: Setup) -> dict:
    n = setup.fsdp_processes
    if not setup.dry_run and torch.cuda.device_count() < 2:
        return {"skipped": f"needs 2 GPUs, {torch.cuda.device_count()} visible"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        vocab = 4096  # the demo model's, which both runs start from
        segments = np.random.default_rng(0).integers(3, vocab, size=(8, 129))
        write_segments(tmp / "data", segments, dict(vocab_size=vocab, bos_id=1, eos_id=2))
        device = ["--device", "cpu"] if setup.dry_run else ["--device", "cuda", "--dtype", "bfloat16"]

        def train(out: str, steps: int, *extra: str) -> None:
            launcher = [sys.executable] if n == 1 else \
                [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port", "29531"]
            cmd = [*launcher, str(ROOT / "train.py"), "--ckpt", str(ROOT / "demo" / "yarn-demo"), "--data",
                   str(tmp / "data"), "--out", str(tmp / out), "--global-batch-size", "4", "--lr", "1e-3",
                   "--warmup-steps", "1", "--save-every", "1", "--keep-checkpoints", "0", "--method", "yarn", "--yarn-scale", "2",
                   "--steps", str(steps), *device, *extra]
            env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            if res.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} exited {res.returncode}: {res.stderr[-2000:]}")

        # the resumed run starts from the straight run's checkpoint half-way and redoes the rest
        total = 2 if setup.dry_run else 4
        train("straight", total)
        train("resumed", total, "--resume", str(tmp / "straight" / f"step-{total // 2:06d}"))
        losses = {run: [json.loads(line)["loss"] for line in (tmp / run / "metrics.jsonl").read_text().splitlines()]
                  for run in ("straight", "resumed")}
        losses["straight"] = losses["straight"][total // 2:]  # the steps both runs took
        weights = {run: torch.load(tmp / run / "final" / "consolidated.00.pth", weights_only=True)
                   for run in ("straight", "resumed")}
    worst = max((weights["straight"][k].float() - weights["resumed"][k].float()).abs().max().item()
                for k in weights["straight"])
    loss_diff = max(abs(a - b) / abs(a) for a, b in zip(losses["straight"], losses["resumed"]))
    out = {"processes": n, "backend": "gloo" if setup.dry_run else "nccl", "steps": total,
           "losses_straight": losses["straight"], "losses_resumed": losses["resumed"],
           "bitwise_equal": losses["straight"] == losses["resumed"] and worst == 0,
           "max_rel_loss_diff": loss_diff, "max_abs_weight_diff": worst}
    # flash-attn's backward may sum in a different order from run to run, so a GPU run can differ
    # in the last bits; a lost optimizer state or data position moves the loss by far more
    if len(losses["resumed"]) != total - total // 2 or loss_diff > 2e-3:
        raise RuntimeError(f"--resume does not reproduce the uninterrupted run: {out}")
    return out


def check_train_mfu(setup: Setup) -> dict:
    args = setup.train_model
    # float32 masters, bf16 compute under autocast: train.py on one device
    model = random_model(args, setup, RopeConfig(method="yarn", scale=4.0, original_length=setup.original_length),
                         dtype=torch.float32).train()
    model.activation_checkpointing = True
    optimizer = training.make_optimizer(model)
    compute = torch.bfloat16 if setup.device.type == "cuda" else torch.float32
    env = training.DistEnv(0, 1, 0, setup.device)
    tokens = torch.randint(3, args.vocab_size, (1, setup.train_tokens + 1), device=setup.device)
    reset_peak(setup.device)
    times = []
    for _ in range(3):  # the first step allocates AdamW's states: not timed
        t0 = training.timer_sync(setup.device)
        with training.autocast(setup.device, compute, env):
            loss = model(tokens[:, :-1], targets=tokens[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(training.timer_sync(setup.device) - t0)
    step = min(times[1:])
    tokens_per_s = setup.train_tokens / step
    peak = sizing.peak_flops(setup.device, compute)
    flops = sizing.flops_per_token(args, setup.train_tokens)
    out = {"layers": args.n_layers, "dim": args.dim, "tokens": setup.train_tokens, "step_s": step,
           "tokens_per_s": tokens_per_s, "model_tflops": tokens_per_s * flops / 1e12,
           "mfu": None if peak is None else tokens_per_s * flops / peak, "peak_gib": peak_gib(setup.device),
           "loss": loss.item()}
    del model, optimizer
    free(setup.device)
    return out


CHECKS = {"memory": check_memory, "generate_128k": check_generate_128k, "flash_vs_sdpa": check_flash_vs_sdpa,
          "compile_decode": check_compile_decode, "fsdp_resume": check_fsdp_resume, "train_mfu": check_train_mfu}


# ---------------------------------------------------------------------------------------------

def run_checks(setup: Setup, names: list[str]) -> dict:
    results = {}
    for name in names:
        print(f"# {name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            figures = CHECKS[name](setup)
            status = "skipped" if "skipped" in figures else "ok"
        except Exception as e:  # recorded; the other checks still run
            figures, status = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}, "failed"
            free(setup.device)
        results[name] = {"status": status, "seconds": round(time.perf_counter() - t0, 1), **figures}
        print(f"#   {status} ({results[name]['seconds']} s)", file=sys.stderr, flush=True)
    return results


def summary(name: str, result: dict) -> str:
    """One table cell of figures: every number and short value, rounded."""
    if result["status"] != "ok":
        return result.get("skipped") or result.get("error", "").splitlines()[0][:300]
    parts = []
    for key, value in result.items():
        if key in ("status", "seconds", "traceback"):
            continue
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in value.items())
            parts.append(f"**{key}**: {value}")
        elif isinstance(value, float):
            parts.append(f"{key} {value:.3g}")
        elif not isinstance(value, list):
            parts.append(f"{key} {value}")
    return "; ".join(parts)


def markdown(report: dict) -> str:
    lines = [f"# GPU checklist{' (DRY RUN: tiny shapes on CPU, no GPU figure)' if report['dry_run'] else ''}", "",
             f"machine: {report['machine']}", "", "| check | status | seconds | figures |", "|---|---|---|---|"]
    for name, result in report["checks"].items():
        lines.append(f"| {name} | {result['status']} | {result['seconds']} | {summary(name, result)} |")
    return "\n".join(lines) + "\n"


# what --out may be besides new or empty: an earlier checklist's folder (with --overwrite)
GPU_CHECK = Output("an earlier checklist (gpu_check.json)", holds("gpu_check.json", "gpu_check.md"), folder=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md: new or empty, "
                                                "or an earlier checklist's with --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="replace gpu_check.json and gpu_check.md of an earlier checklist in --out (nothing else)")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU: checks the script, measures nothing")
    p.add_argument("--only", nargs="+", choices=sorted(CHECKS), default=None, help="run only these checks")
    args = p.parse_args(argv)
    try:
        check_output(args.out, GPU_CHECK, args.overwrite)  # before the checks run, not after
    except ValueError as e:
        raise SystemExit(f"error: --out {e}") from None
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device visible to torch; run on a GPU machine, or use --dry-run")
    setup = dry_setup() if args.dry_run else real_setup()
    if args.dry_run:
        torch.set_num_threads(1)  # tiny shapes: more threads only contend
    names = args.only or list(CHECKS)
    report = {"machine": machine(), "dry_run": args.dry_run, "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "checks": run_checks(setup, names)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "gpu_check.json", report)
    write_text(out / "gpu_check.md", markdown(report))
    print(markdown(report))
    failed = [n for n, r in report["checks"].items() if r["status"] == "failed"]
    if failed:
        raise SystemExit(f"error: {len(failed)} check(s) failed: {', '.join(failed)} (details in {out / 'gpu_check.json'})")


if __name__ == "__main__":
    main()
