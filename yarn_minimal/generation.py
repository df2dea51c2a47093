"""Text generation: chunked prefill, a decode loop over the pre-RoPE KV cache, sampling.

    new_tokens = generate(model, prompt_tokens, max_new_tokens=64)            # greedy
    for token in stream(model, prompt_tokens, 64, temperature=0.8, top_p=0.9, seed=0):
        ...                                                                    # as produced

The cache itself lives in model.py (KVCache, one LayerCache per layer): under Dynamic Scaling
it keeps keys before RoPE and hands them to attention rotated at the current s, as Sec. 3.3 of
the paper asks; cache="rotated" keeps only rotated keys, the way Hugging Face, vLLM and the
authors' code do, to measure the stale-rotation error that causes. This module only drives it:

  prefill      the prompt in chunks of `prefill_chunk` tokens. Every chunk is told the whole
               prompt's length (scale_length), so under Dynamic Scaling every chunk uses the s
               of one big forward over the prompt; only the last position's logits are computed.
  decode_step  one token per forward pass; s follows the length, l' = tokens so far + 1.
  decode       the loop: sample a token, stop at EOS, yield it, feed it back.

`stream` runs the three and times them from outside (GenerationStats); none of them keeps time.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Collection, Iterator, Optional, Sequence

import torch
from tqdm import tqdm

from . import sizing
from .fast import decode_kernel
from .model import KVCache, Transformer
from .rope import effective_scale, is_int, is_number, warn_beyond_window

CACHE_MODES = ("pre-rope", "rotated")


# ---------------------------------------------------------------------------------------
# Prefill, decode step, decode loop
# ---------------------------------------------------------------------------------------

def prefill(model: Transformer, prompt_tokens: Sequence[int], cache: KVCache, chunk: int,
            progress: bool = False) -> torch.Tensor:
    """Run the prompt through the model into the cache, `chunk` tokens per forward pass; the
    logits (vocab,) of its last position. Every chunk rotates with the s of one forward pass
    over the whole sequence (scale_length, Sec. 3.3), so chunking changes nothing but memory."""
    device = model.tok_embeddings.weight.device
    prompt = torch.tensor([list(prompt_tokens)], dtype=torch.long, device=device)
    length = cache.length + prompt.shape[1]
    starts = range(0, prompt.shape[1], chunk)
    for a in tqdm(starts, desc="prefill", unit="chunk", disable=not progress or len(starts) < 2, leave=False):
        logits = model(prompt[:, a:a + chunk], cache=cache, last_only=True, scale_length=length)[0, -1]
    return logits


def decode_step(model: Transformer, token: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """One new token (1, 1) through the model after the cached ones: its logits (vocab,).
    s follows the length, l' = tokens so far + 1 (Sec. 3.3)."""
    return model(token, cache=cache, last_only=True)[0, -1]


DecodeStep = Callable[[Transformer, torch.Tensor, KVCache], torch.Tensor]


def decode(model: Transformer, cache: KVCache, logits: torch.Tensor, max_new_tokens: int,
           choose: Callable[[torch.Tensor], int], stop_ids: Collection[int],
           step: DecodeStep = decode_step) -> Iterator[int]:
    """The decode loop: a token chosen from the logits, then fed back for the next logits;
    stops before a token in stop_ids (not yielded) or after max_new_tokens tokens."""
    for i in range(max_new_tokens):
        token = choose(logits)
        if token in stop_ids:
            return
        yield token
        if i + 1 < max_new_tokens:  # the last token needs no logits after it
            logits = step(model, torch.tensor([[token]], device=logits.device), cache)


# ---------------------------------------------------------------------------------------
# The public entry points, and the timing around the loop
# ---------------------------------------------------------------------------------------

def stream(model: Transformer, prompt_tokens: Sequence[int], max_new_tokens: int, temperature: float = 0.0,
           top_p: float = 1.0, seed: Optional[int] = None, *, stats: Optional[GenerationStats] = None,
           on_logits: Optional[Callable[[torch.Tensor], None]] = None, progress: bool = False,
           **options) -> Iterator[int]:
    """Yield up to max_new_tokens new token ids, one at a time, as they are produced.

    options    the other fields of GenerationConfig: eos_id, ignore_eos, max_length, cache,
               prefill_chunk, compile
    stats      a GenerationStats to fill in (timings, final s)
    on_logits  called with the logits (vocab,) that every new token is sampled from
    progress   a tqdm bar (stderr) over the prefill chunks
    """
    config = GenerationConfig(max_new_tokens, temperature, top_p, seed, **options)
    total = check_request(model, prompt_tokens, config)  # here, so that bad input fails at the call
    return _run(model, list(prompt_tokens), total, config, GenerationStats() if stats is None else stats,
                on_logits, progress)


def generate(model: Transformer, prompt_tokens: Sequence[int], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, seed: Optional[int] = None, **options) -> list[int]:
    """The new tokens (not the prompt) as a list; see `stream` for the options."""
    return list(stream(model, prompt_tokens, max_new_tokens, temperature, top_p, seed, **options))


@torch.inference_mode()
def _run(model: Transformer, prompt_tokens: list[int], total: int, config: GenerationConfig,
         stats: GenerationStats, on_logits: Optional[Callable[[torch.Tensor], None]],
         progress: bool) -> Iterator[int]:
    """stream's body: prefill, then the decode loop, each timed from outside."""
    stats.prompt_tokens = len(prompt_tokens)
    n_new = total - len(prompt_tokens)
    if n_new == 0:
        return
    weights = next(model.parameters())
    cache = KVCache(model.args, 1, total, device=weights.device, dtype=weights.dtype, mode=config.cache)
    generator = None if config.seed is None else torch.Generator(weights.device).manual_seed(config.seed)

    def choose(logits: torch.Tensor) -> int:
        if on_logits is not None:
            on_logits(logits)
        return sample(logits, config.temperature, config.top_p, generator)  # int(): waits for the device

    if weights.device.type == "cpu" and weights.dtype == torch.float32:
        decode_kernel.library()  # the CPU decoding steps' C kernel, built once per process before any clock starts
    t0 = time.perf_counter()
    logits = prefill(model, prompt_tokens, cache, config.prefill_chunk, progress)
    if weights.device.type == "cuda":
        torch.cuda.synchronize(weights.device)
    stats.prefill_seconds, stats.final_scale = time.perf_counter() - t0, cache.scale
    step = compiled_decode_step(stats) if config.compile else decode_step
    yield from timed(decode(model, cache, logits, n_new, choose, config.stop_ids(model), step), cache, stats)
    stats.stopped_at_eos = stats.new_tokens < n_new


def timed(tokens: Iterator[int], cache: KVCache, stats: GenerationStats) -> Iterator[int]:
    """The tokens of the decode loop, passed on, with the time of each decode step (its forward
    pass and the sampling after it) added to stats. The consumer's time between tokens
    (printing) is not counted, and the first compiled step, mostly compilation, is kept apart."""
    while True:
        length, compiled_before = cache.length, stats.compiled_steps
        t0 = time.perf_counter()
        token = next(tokens, None)
        if cache.length > length:  # a forward pass ran: every token but the first, and a final EOS
            seconds = time.perf_counter() - t0
            if compiled_before == 0 and stats.compiled_steps == 1:
                stats.compile_seconds = seconds
            else:
                stats.decode_seconds += seconds
                stats.decode_steps += 1
            stats.final_scale = cache.scale  # s of this step: l' = tokens so far (Sec. 3.3)
        if token is None:
            return
        stats.new_tokens += 1
        yield token


# ---------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------
# torch.compile of the decode step (--compile)
# ---------------------------------------------------------------------------------------

def compiled_decode_step(stats: GenerationStats) -> DecodeStep:
    """decode_step under torch.compile while s stays at its floor (every step of a static method,
    Dynamic Scaling's up to L s0), counted in stats.compiled_steps. s enters the graph as a
    constant, so past L s0, where s changes with every token, a compiled step would compile
    again at every token: those steps run eagerly."""
    decode_kernel.prepare_for_compile()  # whether the compiled step's GEMVs may call the C kernel
    compiled = torch.compile(decode_step, dynamic=True)  # the cache grows every step

    def step(model: Transformer, token: torch.Tensor, cache: KVCache) -> torch.Tensor:
        if effective_scale(model.rope, cache.length + 1) != model.rope.scale:
            return decode_step(model, token, cache)
        stats.compiled_steps += 1
        return compiled(model, token, cache)

    return step


# ---------------------------------------------------------------------------------------
# The request: its options, what a run measured, and the checks before anything runs
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GenerationConfig:
    """One request: how many tokens, how each is chosen, when to stop, how the model runs.
    Values that no model could run are refused here, when the request is made; `check_request`
    checks the rest against the model.

    max_new_tokens  tokens to generate at most
    temperature     0: greedy; otherwise sample from softmax(logits / temperature)
    top_p           nucleus sampling mass in (0, 1]; 1: off
    seed            seed for sampling (reproducible output)
    eos_id          stop when this token (or any of these tokens) is produced; it is not yielded.
                    None: the checkpoint's own EOS ids (model.eos_ids, set by load)
    ignore_eos      never stop early: produce max_new_tokens tokens
    max_length      cap on prompt + new tokens
    cache           "pre-rope" (correct under Dynamic Scaling, Sec. 3.3) or "rotated" (the
                    stale-rotation cache of other implementations, for comparison)
    prefill_chunk   prompt tokens per prefill forward pass (bounds activation memory)
    compile         torch.compile the decode steps where s is constant (all, for static methods)
    """

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = None
    eos_id: Optional[int | Collection[int]] = None
    ignore_eos: bool = False
    max_length: Optional[int] = None
    cache: str = "pre-rope"
    prefill_chunk: int = 4096
    compile: bool = False

    def __post_init__(self) -> None:
        # each message starts with the field's name: generate.py turns it into the flag's
        if not is_int(self.max_new_tokens) or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens: expected an integer >= 0, got {self.max_new_tokens!r}")
        if not (is_number(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature: must be >= 0 (0 = greedy) and finite, got {self.temperature!r}")
        if not (is_number(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not (is_int(self.seed) and -2 ** 63 <= self.seed < 2 ** 64):
            raise ValueError(f"seed: expected an integer from -2^63 to 2^64 - 1 (torch's range), got {self.seed!r}")
        if self.max_length is not None and not (is_int(self.max_length) and self.max_length > 0):
            raise ValueError(f"max_length: expected a positive integer, got {self.max_length!r}")
        if self.cache not in CACHE_MODES:
            raise ValueError(f"cache: {self.cache!r}; allowed: {', '.join(CACHE_MODES)}")
        if not is_int(self.prefill_chunk) or self.prefill_chunk <= 0:
            raise ValueError(f"prefill_chunk: must be > 0, got {self.prefill_chunk!r}")

    def stop_ids(self, model: Transformer) -> frozenset[int]:
        if self.ignore_eos:
            return frozenset()
        if self.eos_id is None:
            return frozenset(model.eos_ids)
        return frozenset([self.eos_id] if isinstance(self.eos_id, int) else self.eos_id)


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
    final_scale: Optional[float] = None  # s in effect for the last forward pass (Sec. 3.3); None: none ran
    stopped_at_eos: bool = False

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else float("nan")


def check_request(model: Transformer, prompt_tokens: Sequence[int], config: GenerationConfig) -> int:
    """Reject what this model cannot run, warn about what runs but is outside its window.
    Returns the number of positions the KV cache needs."""
    if len(prompt_tokens) == 0:
        raise ValueError("prompt_tokens: the prompt is empty; generation needs at least one token (e.g. BOS)")
    vocab = model.args.vocab_size
    bad = [t for t in prompt_tokens if not (0 <= int(t) < vocab)]
    if bad:
        raise ValueError(f"prompt_tokens: token ids must be in [0, {vocab}), found {bad[:5]}")
    total = len(prompt_tokens) + config.max_new_tokens
    max_length = config.max_length
    if max_length is not None:
        if len(prompt_tokens) > max_length:
            raise ValueError(f"max_length: the prompt has {len(prompt_tokens)} tokens, more than max_length={max_length}")
        total = min(total, max_length)
    model.check_length(total)  # a Mistral sliding window: refused before any work
    check_memory(model, len(prompt_tokens), total, "max_length" if total == max_length else "max_new_tokens")
    warn_beyond_window(model.rope, total, f"prompt ({len(prompt_tokens)}) + new tokens "
                                          f"({total - len(prompt_tokens)}) =", stacklevel=3)
    return total


def check_memory(model: Transformer, prompt_length: int, total: int, field: str) -> None:
    """Refuse a request whose KV cache could never fit beside the weights: the cache grows with
    the sequence (KVCache.make_room), so what a request may use is what `total` positions need,
    and the error comes now, with the figure, rather than from the allocator mid-run."""
    weights = next(model.parameters())
    have = sizing.device_memory(weights.device)
    per_position = sizing.kv_cache_bytes(model.args, 1, weights.dtype)
    need = total * per_position
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if have is not None and need + model_bytes > have:
        fit = max(0, (have - model_bytes) // per_position - prompt_length)
        raise ValueError(f"{field}: prompt ({prompt_length}) + new tokens ({total - prompt_length}) = {total} positions "
                         f"would need a KV cache of {sizing.format_bytes(need)} ({per_position} bytes a position) "
                         f"beside the model's {sizing.format_bytes(model_bytes)}, more than the "
                         f"{sizing.format_bytes(have)} of {weights.device} memory; at most {fit} new tokens fit "
                         "after this prompt")
