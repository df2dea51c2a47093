"""Text generation: chunked prefill, a decode loop over the pre-RoPE KV cache, sampling.

    new_tokens = generate(model, prompt_tokens, max_new_tokens=64)            # greedy
    for token in stream(model, prompt_tokens, 64, temperature=0.8, top_p=0.9, seed=0):
        ...                                                                    # as produced

The cache itself lives in model.py (KVCache): under Dynamic Scaling it keeps keys before
RoPE and re-rotates them whenever s changes, as Sec. 3.3 of the paper asks; cache="rotated"
keeps only rotated keys, the way Hugging Face, vLLM and the authors' code do, to measure the
stale-rotation error that causes. This module only drives it:

  prefill  the prompt in chunks of `prefill_chunk` tokens. Every chunk is told the whole
           prompt's length (scale_length), so under Dynamic Scaling every chunk uses the s of
           one big forward over the prompt; only the last position's logits are computed.
  decode   one token per forward pass; s follows the length, l' = tokens so far + 1.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Callable, Collection, Iterator, Optional

import torch
from tqdm import tqdm

from .model import KVCache, Transformer
from .rope import effective_scale

CACHE_MODES = ("pre-rope", "rotated")


@dataclass
class GenerationStats:
    """Filled in by `stream` when passed as `stats=`; the numbers generate.py prints."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_steps: int = 0         # forward passes after the prefill (one token each)
    decode_seconds: float = 0.0
    compile_seconds: float = 0.0  # with compile=True: the first compiled step, mostly compilation (not in decode_*)
    compiled_steps: int = 0       # decode steps run by the compiled function (those where s was constant)
    final_scale: float = 1.0      # s in effect for the last forward pass (Sec. 3.3)
    stopped_at_eos: bool = False

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else float("nan")


def check_request(model: Transformer, prompt_tokens, max_new_tokens: int, temperature: float,
                  top_p: float, cache: str, prefill_chunk: int, max_length: Optional[int]) -> int:
    """Reject what cannot be run, warn about what runs but is outside the model's window.
    Returns the number of positions the KV cache needs."""
    if len(prompt_tokens) == 0:
        raise ValueError("prompt_tokens: the prompt is empty; generation needs at least one token (e.g. BOS)")
    vocab = model.args.vocab_size
    bad = [t for t in prompt_tokens if not (0 <= int(t) < vocab)]
    if bad:
        raise ValueError(f"prompt_tokens: token ids must be in [0, {vocab}), found {bad[:5]}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: must be >= 0, got {max_new_tokens}")
    if not (temperature >= 0):  # also rejects NaN
        raise ValueError(f"temperature: must be >= 0 (0 = greedy), got {temperature}")
    if not (0 < top_p <= 1):
        raise ValueError(f"top_p: must be in (0, 1], got {top_p}")
    if cache not in CACHE_MODES:
        raise ValueError(f"cache: {cache!r}; allowed: {', '.join(CACHE_MODES)}")
    if prefill_chunk <= 0:
        raise ValueError(f"prefill_chunk: must be > 0, got {prefill_chunk}")
    total = len(prompt_tokens) + max_new_tokens
    if max_length is not None:
        if len(prompt_tokens) > max_length:
            raise ValueError(f"max_length: the prompt has {len(prompt_tokens)} tokens, more than max_length={max_length}")
        total = min(total, max_length)
    model.check_length(total)  # a Mistral sliding window: refused before any work
    window = model.rope.window
    if window is not None and total > window:
        # Still well defined (and showing the breakdown is a legitimate experiment), so a
        # warning rather than an error: past L' the model sees rotations it was never trained on.
        warnings.warn(f"prompt ({len(prompt_tokens)}) + new tokens ({total - len(prompt_tokens)}) = {total} "
                      f"exceeds the window this RoPE setting supports, {window} tokens "
                      f"({model.rope.describe()}: L x s = {model.rope.original_length} x {model.rope.scale:g}); "
                      f"expect degraded output past it. Use --dynamic, or a --yarn-scale of at least "
                      f"{total / model.rope.original_length:.3g}.", stacklevel=3)
    return total


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus sampling: keep the smallest set of most likely tokens whose mass reaches top_p,
    renormalized. probs is (..., vocab)."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    sorted_probs = sorted_probs * (mass_before < top_p)  # the most likely token is always kept
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return kept / kept.sum(-1, keepdim=True)


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
           generator: Optional[torch.Generator] = None) -> int:
    """One token id from the logits (vocab,): argmax when temperature is 0, otherwise a draw
    from softmax(logits / temperature) restricted to the top-p nucleus."""
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    probs = top_p_filter(probs, top_p)
    return int(torch.multinomial(probs, 1, generator=generator))


def _decode_step(model: Transformer, token: torch.Tensor, cache: KVCache) -> torch.Tensor:
    return model(token, cache=cache, last_only=True)[0, -1]


def _compiled_decode_step() -> Callable:
    # The cache grows every step, so dynamic shapes. Only used while s is constant: s enters
    # the graph as a constant, and a new s every step would mean a recompilation every step.
    return torch.compile(_decode_step, dynamic=True)


def stream(model: Transformer, prompt_tokens: list[int], max_new_tokens: int, temperature: float = 0.0,
           top_p: float = 1.0, seed: Optional[int] = None, *, cache: str = "pre-rope",
           prefill_chunk: int = 4096, eos_id: Optional[int | Collection[int]] = None, ignore_eos: bool = False,
           max_length: Optional[int] = None,
           compile: bool = False, stats: Optional[GenerationStats] = None,
           on_logits: Optional[Callable[[torch.Tensor], None]] = None, progress: bool = False) -> Iterator[int]:
    """Yield up to max_new_tokens new token ids, one at a time, as they are produced.

    cache          "pre-rope" (correct under Dynamic Scaling, Sec. 3.3) or "rotated" (the
                   stale-rotation cache of other implementations, for comparison)
    prefill_chunk  prompt tokens per prefill forward pass (bounds activation memory)
    eos_id         stop when this token (or any of these tokens) is produced; it is not yielded.
                   Default: the checkpoint's own EOS ids (model.eos_ids, set by load)
    ignore_eos     never stop early: produce max_new_tokens tokens
    max_length     cap on prompt + new tokens
    compile        torch.compile the decode steps where s is constant (all, for static methods)
    stats          a GenerationStats to fill in (timings, final s)
    on_logits      called with the logits (vocab,) that every new token is sampled from
    progress       a tqdm bar (stderr) over the prefill chunks
    """
    total = check_request(model, prompt_tokens, max_new_tokens, temperature, top_p, cache,
                          prefill_chunk, max_length)  # here, so that bad input fails at the call
    stop = model.eos_ids if eos_id is None else ([eos_id] if isinstance(eos_id, int) else eos_id)
    return _run(model, list(prompt_tokens), total, temperature, top_p, seed, cache, prefill_chunk,
                frozenset() if ignore_eos else frozenset(stop), compile, stats, on_logits, progress)


@torch.inference_mode()
def _run(model, prompt_tokens, total, temperature, top_p, seed, cache, prefill_chunk, stop_ids, compile,
         stats, on_logits, progress) -> Iterator[int]:
    stats = stats if stats is not None else GenerationStats()
    P = len(prompt_tokens)
    stats.prompt_tokens = P
    if total == P:
        return
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    kv = KVCache(model.args, 1, total, device=device, dtype=dtype, mode=cache)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    compiled = _compiled_decode_step() if compile else None
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    t0 = time.perf_counter()
    prompt = torch.tensor(prompt_tokens, dtype=torch.long, device=device)[None]
    starts = range(0, P, prefill_chunk)
    for a in tqdm(starts, desc="prefill", unit="chunk", disable=not progress or len(starts) < 2, leave=False):
        # scale_length=P: every chunk rotates with the s of the whole prompt (Sec. 3.3)
        logits = model(prompt[:, a:a + prefill_chunk], cache=kv, last_only=True, scale_length=P)[0, -1]
    sync()
    stats.prefill_seconds = time.perf_counter() - t0
    stats.final_scale = kv.scale

    n_new = total - P
    t_step = None  # the first new token comes from the prefill's logits
    compiling = False  # the step being timed is the compiled function's first call
    for i in range(n_new):
        if on_logits is not None:
            on_logits(logits)
        token = sample(logits, temperature, top_p, generator)  # int(): waits for the device
        if t_step is not None:
            if compiling:  # that step was mostly compilation: keep it out of the decode rate
                stats.compile_seconds, compiling = time.perf_counter() - t_step, False
            else:
                stats.decode_seconds += time.perf_counter() - t_step
                stats.decode_steps += 1
        if token in stop_ids:
            stats.stopped_at_eos = True
            return
        stats.new_tokens += 1
        yield token  # the consumer's time (printing) is not counted
        if i + 1 == n_new:
            return
        t_step = time.perf_counter()
        step = _decode_step
        # compiled while s stays at its floor (static methods always, Dynamic Scaling up to
        # L s0); past it s changes with every token, and those steps run eagerly
        if compiled is not None and effective_scale(model.rope, kv.length + 1) == model.rope.scale:
            step, compiling = compiled, stats.compiled_steps == 0
            stats.compiled_steps += 1
        logits = step(model, torch.tensor([[token]], dtype=torch.long, device=device), kv)
        stats.final_scale = kv.scale  # s of this step: l' = tokens so far (Sec. 3.3)


def generate(model: Transformer, prompt_tokens: list[int], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, seed: Optional[int] = None, **opts) -> list[int]:
    """The new tokens (not the prompt) as a list; see `stream` for the options."""
    return list(stream(model, prompt_tokens, max_new_tokens, temperature, top_p, seed, **opts))

