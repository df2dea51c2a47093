"""Generate text from a Llama 2 checkpoint with any RoPE extension method of the YaRN paper.

    python generate.py --yarn-scale 16 --prompt-file long_document.txt --max-new-tokens 128
    python generate.py --method yarn --dynamic --prompt "Once upon a time"

Tokens stream to stdout as they are produced; the statistics go to stderr at the end.
The KV cache keeps keys before RoPE under Dynamic Scaling (Sec. 3.3); --cache rotated
reproduces the stale-rotation cache of other implementations, for comparison.
"""
from __future__ import annotations

from yarn_minimal import ctrl_c

ctrl_c.exit_quietly(__name__)  # before torch loads: Ctrl-C during the imports is one line, exit 130

import argparse
import os
import sys
from dataclasses import asdict, fields
from typing import Optional

import torch

from yarn_minimal import cli, sizing
from yarn_minimal.checkpoint import CheckpointError, load
from yarn_minimal.generation import CACHE_MODES, GenerationConfig, GenerationStats, stream
from yarn_minimal.tokenizer import Tokenizer

DEFAULT_PROMPT = "Once upon a time,"


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device, dtype = cli.resolve_device_dtype(args.device, args.dtype)
    ckpt = cli.resolve_checkpoint(args.ckpt)
    try:
        model, tokenizer = load(ckpt, device=device, dtype=dtype)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: --ckpt {ckpt}: {e}") from None
    model.set_rope(cli.rope_from_args(args, model.rope))
    bos = cli.resolve_bos(args.bos, tokenizer)

    if args.prompt is not None:
        prompt_tokens = tokenizer.encode(args.prompt, bos=bos)
    elif ckpt.resolve() == cli.DEFAULT_CKPT:
        # the demo model (L = 256): a long document it never saw, 12 x L tokens of it, so that
        # `--yarn-scale 16` has a context far beyond L to work with
        n = 12 * model.rope.original_length
        prompt_tokens = tokenizer.encode(cli.DEMO_PROMPT.read_text(encoding="utf-8"), bos=bos)[:n]
        print(f"# no --prompt: the first {n} tokens of {cli.DEMO_PROMPT.name}, a held-out document", file=sys.stderr)
    else:
        prompt_tokens = tokenizer.encode(DEFAULT_PROMPT, bos=bos)
    stats = GenerationStats()
    text = TextStream(tokenizer, prompt_tokens[-1:])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    print(f"# {model.rope.describe()}, {len(prompt_tokens)} prompt tokens, {device} {str(dtype).removeprefix('torch.')}",
          file=sys.stderr)
    try:
        tokens = stream(model, prompt_tokens, **asdict(args.request), stats=stats, progress=True)
    except ValueError as e:  # a request the checkpoint cannot run (past a sliding window, or its memory)
        raise SystemExit(f"error: {as_flag(e)}") from None
    for token in tokens:
        print(text.push(token), end="", flush=True)
    print(text.flush())
    print(f"prompt: {stats.prompt_tokens} tokens | generated: {stats.new_tokens} tokens"
          f"{' (stopped at EOS)' if stats.stopped_at_eos else ''} | effective scale s at the end: "
          f"{'none (no forward pass ran)' if stats.final_scale is None else format(stats.final_scale, 'g')}\n"
          f"{speed_line(stats, args.compile)}\n"
          f"peak memory: {peak_memory(device)}", file=sys.stderr)


# ---------------------------------------------------------------------------------------
# What main calls: the flags, the streamed text, the summary lines

class TextStream:
    """Turns token ids into text as they come. Decoding each token alone would drop
    sentencepiece's leading spaces and split multi-byte characters made of byte-fallback
    pieces, so every new piece is decoded together with the previous ones and only the new
    characters are printed; text ending in an incomplete character waits for the next token."""

    def __init__(self, tokenizer: Tokenizer, context: list[int]):
        self.tokenizer = tokenizer
        self.ids = list(context)
        self.start, self.done = 0, len(self.ids)  # ids[start:done] is already printed

    def push(self, token: int) -> str:
        self.ids.append(token)
        printed = self.tokenizer.decode(self.ids[self.start:self.done])
        text = self.tokenizer.decode(self.ids[self.start:])
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return ""
        self.start, self.done = self.done, len(self.ids)
        return text[len(printed):] if text.startswith(printed) else text

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        printed = self.tokenizer.decode(self.ids[self.start:self.done])
        text = self.tokenizer.decode(self.ids[self.start:])
        self.start = self.done = len(self.ids)
        return text[len(printed):] if text.startswith(printed) else text


def peak_memory(device: torch.device) -> str:
    what = "CUDA max_memory_allocated" if device.type == "cuda" else "process peak RSS"
    return f"{sizing.peak_memory(device) / 2**30:.2f} GiB ({what})"


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on. Decoding is bound by memory
    bandwidth: a second hyperthread on a core adds no bandwidth, only contention, and torch's
    own default (os.cpu_count) also ignores taskset/cgroup affinity."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        try:
            topology = f"/sys/devices/system/cpu/cpu{cpu}/topology/"
            cores.add((open(topology + "physical_package_id").read(), open(topology + "core_id").read()))
        except OSError:  # no sysfs topology (not Linux, a container hiding it): count logical CPUs
            cores.add(cpu)
    return max(1, len(cores))


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Generate text with a RoPE-extended Llama 2 (YaRN, PI, NTK, ...). "
                    "Tokens stream to stdout; prompt length, final scale s, tokens/s and peak memory go to stderr.")
    cli.add_checkpoint_arg(p)
    cli.add_rope_args(p)
    g = p.add_argument_group("prompt and sampling")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--prompt", default=None,
                     help=f"prompt text (default: {DEFAULT_PROMPT!r}; with the embedded demo model, the first "
                          f"12 x L tokens of {cli.DEMO_PROMPT.relative_to(cli.DEFAULT_CKPT.parent.parent)}, "
                          "a document it never saw)")
    src.add_argument("--prompt-file", default=None,
                     help="read the prompt from this UTF-8 file (e.g. a long document followed by a question)")
    g.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate (default 128)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1: off)")
    g.add_argument("--seed", type=int, default=None, help="seed for sampling (reproducible output)")
    g.add_argument("--ignore-eos", action="store_true",
                   help="keep going past the end-of-sequence token(s); by default generation stops at any of the "
                        "checkpoint's EOS ids (tokenizer_config.json eos_token and generation_config.json eos_token_id)")
    cli.add_bos_arg(g)
    r = p.add_argument_group("runtime")
    cli.add_device_args(r)
    r.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (removes per-op overhead; on the CPU in float32 the eager "
                        "step, whose matrix products and attention run in C, decoded SmolLM2 faster: docs/generation.md)")
    r.add_argument("--threads", type=cli.positive_int, default=physical_cores(), metavar="N",
                   help="CPU threads for torch (default: the physical cores this process may use, here "
                        f"{physical_cores()}); on a shared machine, 1 (or OMP_NUM_THREADS=1) is often much faster")
    r.add_argument("--cache", choices=CACHE_MODES, default="pre-rope",
                   help="pre-rope (default): keys cached before RoPE, correct under --dynamic (Sec. 3.3); "
                        "rotated: cache rotated keys like other implementations (stale under --dynamic)")
    r.add_argument("--prefill-chunk", type=int, default=4096,
                   help="prompt tokens per prefill forward pass; bounds activation memory (default 4096)")
    args = p.parse_args(argv)

    try:  # the request is checked when it is made; its message names the field, i.e. the flag
        args.request = GenerationConfig(args.max_new_tokens, args.temperature, args.top_p, args.seed,
                                        ignore_eos=args.ignore_eos, cache=args.cache,
                                        prefill_chunk=args.prefill_chunk, compile=args.compile)
    except ValueError as e:
        p.error(as_flag(e))
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                args.prompt = f.read()
        except (OSError, UnicodeDecodeError) as e:
            p.error(f"--prompt-file {args.prompt_file}: cannot be read ({e})")
    if args.prompt is not None and not args.prompt.strip():
        p.error(f"{'--prompt-file ' + args.prompt_file if args.prompt_file else '--prompt'}: the prompt is empty")
    return args


def as_flag(e: ValueError) -> str:
    """A request's error names its GenerationConfig field first ("top_p: ..."): say the flag instead."""
    field, _, problem = str(e).partition(": ")
    if field in {f.name for f in fields(GenerationConfig)}:
        return f"--{field.replace('_', '-')}: {problem}"
    return str(e)


def compile_note(stats: GenerationStats) -> str:
    if stats.compiled_steps == 0:
        return "; --compile: no step compiled, s changed at every step (Dynamic Scaling past L s0)"
    return f"; {stats.compiled_steps} steps compiled, the first with compilation: {stats.compile_seconds:.1f} s"


def speed_line(stats: GenerationStats, compiled: bool) -> str:
    """Tokens/s of the parts that ran; a part that did not run (--max-new-tokens 0) says so
    instead of printing nan."""
    if stats.prefill_seconds == 0:
        return "prefill: not run (--max-new-tokens 0: nothing to generate)"
    line = f"prefill: {stats.prefill_tokens_per_s:.1f} tokens/s ({stats.prefill_seconds:.2f} s) | "
    if stats.decode_steps == 0:  # one new token (from the prefill), or one compiled step kept apart
        return line + f"decode: no timed step{compile_note(stats) if compiled and stats.compiled_steps else ''}"
    return (line + f"decode: {stats.decode_tokens_per_s:.1f} tokens/s ({stats.decode_steps} steps, "
            f"{stats.decode_seconds:.2f} s{compile_note(stats) if compiled else ''})")


if __name__ == "__main__":
    cli.run_main(main)
