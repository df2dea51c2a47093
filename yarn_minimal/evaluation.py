"""The paper's evaluations, each protocol stated exactly and implemented plainly.

Perplexity (Sec. 4.3.1; Tables 1, 2, 4; Figure 1), the sliding window of Press et al. with
stride S (256 in the paper). For a document and a context window W:

    tokens = encode(document)                      # no BOS, no EOS; N tokens
    for begin in range(0, N, S):
        end = min(begin + W - 1, N)
        feed [BOS] + tokens[begin:end]             # at most W positions
        score tokens[i] for max(begin, prev_end) <= i < end, each predicted from
              [BOS] + tokens[begin:i]              # everything before it in this window
        prev_end = end
        stop when end == N
    perplexity = exp(sum of NLL / number of scored tokens), over all documents

(With S > W - 1 the tokens between one window's end and the next window's begin are never
scored; S <= W - 1 scores every token exactly once.)
`truncate=True` is the protocol of Table 2 / Figure 1: each document is cut to its first
W - 1 tokens, so the loop above runs once (begin = 0, end = N) and S never slides.

Passkey retrieval (Sec. 4.3.2, Table 5): the prompt of landmark attention, built to an exact
token count, answered by greedy decoding; correct when the first integer in the output is
the key.

Attention temperature sweep (Appendix A.2, Figures 2-4): perplexity for several sqrt(1/t)
at a fixed s, overall and per segment of token positions (Eq. 26).

The tables, plots, flags and JSON of the two evaluation scripts are in eval_report.py.
"""
from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from . import data
from .generation import generate
from .loss import token_nll
from .model import Transformer
from .rope import yarn_attention_factor
from .tokenizer import Tokenizer


class EvalError(ValueError):
    """Input an evaluation cannot run on; the message names the file or flag and the values."""


# ---------------------------------------------------------------------------------------
# Documents from local files
# ---------------------------------------------------------------------------------------

def load_documents(paths: Sequence[str], text_field: str = "text") -> list[str]:
    """Documents from files and folders, read exactly as the training data tool reads them
    (yarn_minimal.data): a text file is one document, a .jsonl file one JSON object per line,
    a .parquet file one row per document, the text in `text_field`; folders recursively."""
    try:
        return [doc for f in data.input_files(paths) for doc in data.read_documents(f, text_field)]
    except (ValueError, OSError) as e:
        raise EvalError(str(e)) from None


def skip_reason(min_tokens: int) -> str:
    """Why tokenize_documents skipped a document, in the words of the flag that decided it."""
    return "empty" if min_tokens <= 1 else f"fewer than --min-tokens {min_tokens} tokens"


def tokenize_documents(tokenizer: Tokenizer, documents: Sequence[str], min_tokens: int = 0,
                       max_documents: Optional[int] = None) -> tuple[list[list[int]], int]:
    """encode(document) without BOS/EOS for every document with at least min_tokens tokens
    (and at least one), keeping the first max_documents. Returns (token lists, number skipped)."""
    kept, skipped = [], 0
    for doc in tqdm(documents, desc="tokenize", unit="doc", leave=False, disable=len(documents) < 2):
        if max_documents is not None and len(kept) >= max_documents:
            break
        tokens = tokenizer.encode(doc, bos=False, eos=False)
        if len(tokens) < max(min_tokens, 1):
            skipped += 1
        else:
            kept.append(tokens)
    return kept, skipped


# ---------------------------------------------------------------------------------------
# Sliding-window perplexity
# ---------------------------------------------------------------------------------------



def sliding_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, score_from) of every window over a document of n_tokens tokens: the
    window feeds [BOS] + tokens[begin:end] and scores tokens[score_from:end]."""
    if window < 2:
        raise EvalError(f"window {window}: must be >= 2 (BOS plus at least one token)")
    if stride < 1:
        raise EvalError(f"--stride {stride}: must be >= 1")
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window - 1, n_tokens)
        out.append((begin, end, max(begin, prev_end)))  # only tokens after the previous window
        prev_end = end
        if end == n_tokens:
            break
    return out


@torch.inference_mode()
def window_nll(model: Transformer, tokens: torch.Tensor, bos_id: Optional[int], begin: int, end: int,
               score_from: int) -> torch.Tensor:
    """Float32 NLL of tokens[score_from:end], one forward over [BOS] + tokens[begin:end] in the
    model's dtype. Under Dynamic Scaling the model takes s from this window's length.
    bos_id None (--no-bos, for checkpoints trained without BOS): the forward is over
    tokens[begin:end] alone, so nothing predicts tokens[begin] and scoring starts after it."""
    if bos_id is None:
        score_from = max(score_from, begin + 1)
        h = model.hidden_states(tokens[begin:end][None])[0]
        # input position j holds tokens[begin:begin+j+1] and predicts tokens[begin + j + 1]
        h = h[score_from - begin - 1:end - begin - 1]
    else:
        bos = torch.tensor([bos_id], dtype=tokens.dtype, device=tokens.device)
        h = model.hidden_states(torch.cat([bos, tokens[begin:end]])[None])[0]
        # input position j holds [BOS] + tokens[begin:begin+j] and predicts tokens[begin + j]
        h = h[score_from - begin:end - begin]
    targets = tokens[score_from:end]
    return token_nll(model.output, h, targets)  # in chunks: never a T x vocab float32 tensor


@dataclass
class PerplexityScores:
    """Per-token NLLs of every document (NaN where the protocol scores nothing) and the
    mean NLL of every window, from which both perplexity definitions follow."""

    token_nll: list[np.ndarray] = field(default_factory=list)
    window_mean_nll: list[float] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return int(sum(np.isfinite(n).sum() for n in self.token_nll))

    @property
    def nll(self) -> float:
        return float(sum(np.nansum(n) for n in self.token_nll))

    @property
    def perplexity(self) -> float:
        """Token-weighted: exp(total NLL / total scored tokens) over all documents."""
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")

    @property
    def perplexity_window_mean(self) -> float:
        """The authors' variant: exp(mean over windows of each window's mean NLL). Windows that
        score fewer tokens (a document's last one) weigh as much as full ones."""
        return math.exp(float(np.mean(self.window_mean_nll))) if self.window_mean_nll else float("nan")

    def document_perplexities(self) -> np.ndarray:
        return np.array([math.exp(float(np.nanmean(n))) for n in self.token_nll])

    def segment_perplexities(self, segment_length: int) -> list[Optional[float]]:
        """Token-weighted perplexity of the token positions [k L_seg, (k+1) L_seg) of every
        document, for each k (None where nothing was scored): where along a long window the
        loss rises (the position segments of Appendix A.2's Figure 3)."""
        check_segment_length(segment_length)
        n_max = max((len(n) for n in self.token_nll), default=0)
        out = []
        for a in range(0, n_max, segment_length):
            parts = [n[a:a + segment_length] for n in self.token_nll]
            count = sum(int(np.isfinite(p).sum()) for p in parts)
            out.append(math.exp(sum(float(np.nansum(p)) for p in parts) / count) if count else None)
        return out


def check_segment_length(segment_length: int) -> None:
    if segment_length < 1:
        raise EvalError(f"--segment-length {segment_length}: must be >= 1")


def score_documents(model: Transformer, documents: Sequence[Sequence[int]], bos_id: Optional[int], window: int,
                    stride: int = 256, truncate: bool = False, desc: str = "perplexity") -> PerplexityScores:
    """Run the protocol of the module docstring over token lists (encoded without BOS/EOS).
    bos_id None: windows without BOS (see window_nll)."""
    check_length(model, window, "window")
    if truncate:  # Table 2 / Figure 1: one pass over the first W - 1 tokens of each document
        documents = [d[:window - 1] for d in documents]
    plans = [sliding_windows(len(d), window, stride) for d in documents]
    device = next(model.parameters()).device
    scores = PerplexityScores()
    with tqdm(total=sum(map(len, plans)), desc=desc, unit="window", leave=False) as bar:
        for doc, plan in zip(documents, plans):
            tokens = torch.tensor(doc, dtype=torch.long, device=device)
            nll = np.full(len(doc), np.nan)
            for begin, end, score_from in plan:
                w = _catch_oom(lambda: window_nll(model, tokens, bos_id, begin, end, score_from),
                               f"a window of {end - begin + 1} tokens", device)
                if len(w) == 0:  # without BOS, a one-token window predicts nothing
                    bar.update()
                    continue
                nll[end - len(w):end] = w.double().cpu().numpy()
                scores.window_mean_nll.append(float(w.double().mean()))
                bar.update()
            scores.token_nll.append(nll)
    return scores


def _catch_oom(fn: Callable, what: str, device: torch.device):
    """fn(), with running out of memory said as one line that names what ran and what to change."""
    try:
        return fn()
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in str(e):
            raise
        raise EvalError(f"out of memory running {what} on {device}: ({str(e).splitlines()[0]}). "
                        "Use shorter --lengths, --dtype bfloat16, or a device with more memory") from None


def check_length(model: Transformer, length: int, what: str) -> None:
    """A checkpoint with a sliding window (Mistral) runs only sequences that fit in it."""
    try:
        model.check_length(length)
    except ValueError as e:
        raise EvalError(f"{what} {length}: {e}") from None


# ---------------------------------------------------------------------------------------
# Passkey retrieval
# ---------------------------------------------------------------------------------------

PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
                 "I will quiz you about the important information there.")
PASSKEY_FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                  "There and back again.")
PASSKEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"


@dataclass
class PasskeyPrompt:
    tokens: list[int]   # BOS included (when asked); len(tokens) == the length asked
    key: int
    depth: float        # where the key line sits, as a fraction of the filler
    n_prefix: int       # filler tokens before / after the key line
    n_suffix: int


def _continuation(tokenizer: Tokenizer, before: str, text: str) -> list[int]:
    """The tokens of `text` as they read after `before` in running text: tokenizers encode the
    start of a text differently (sentencepiece's dummy prefix, byte-level BPE's leading space).
    Where the two merge across the boundary, `text` encoded alone."""
    a = tokenizer.encode(before, bos=False)
    b = tokenizer.encode(before + text, bos=False)
    return b[len(a):] if b[:len(a)] == a else tokenizer.encode(text, bos=False)


def passkey_prompt(tokenizer: Tokenizer, length: int, key: int, depth: float,
                   bos: Optional[bool] = None) -> PasskeyPrompt:
    """The passkey prompt with exactly `length` tokens (BOS included when bos, by default the
    tokenizer's own add_bos):

        [BOS] intro, filler[:a], "\n" key line "\n", filler[:b], "\n" question

    Each piece is encoded once, as it reads after a filler sentence, and the filler token
    stream is cut to the token so that the total is exact, with a = round(depth (a + b)).
    Nothing here depends on how a tokenizer spells a newline (sentencepiece's <0x0A> byte
    token, byte-level BPE's "\u010a"), so any tokenizer works."""
    if not 0.0 <= depth <= 1.0:
        raise EvalError(f"passkey depth {depth}: must be in [0, 1]")
    sentences = " ".join(PASSKEY_FILLER)
    head = tokenizer.encode(PASSKEY_INTRO, bos=bos)
    line = _continuation(tokenizer, sentences, "\n" + PASSKEY_LINE.format(key=key) + "\n")
    question = _continuation(tokenizer, sentences, "\n" + PASSKEY_QUESTION)
    room = length - len(head) - len(line) - len(question)
    if room < 0:
        bare = length - room
        raise EvalError(f"passkey length {length}: shorter than the prompt without any filler, which takes "
                        f"{bare} tokens with this tokenizer; use lengths >= {bare}")
    cycle = _continuation(tokenizer, sentences, " " + sentences)  # one period of the filler
    filler = cycle * (room // len(cycle) + 1)
    a = round(depth * room)
    tokens = head + filler[:a] + line + filler[:room - a] + question
    return PasskeyPrompt(tokens=tokens, key=key, depth=depth, n_prefix=a, n_suffix=room - a)


def passkey_prompts(tokenizer: Tokenizer, length: int, iterations: int, seed: int = 0,
                    depth: Optional[float] = None, bos: Optional[bool] = None) -> list[PasskeyPrompt]:
    """`iterations` prompts of `length` tokens: a five-digit key (10000-99999) and, unless a
    fixed depth is given, a key position drawn uniformly over the context. The random stream
    depends only on (seed, length, depth), so adding lengths to a run changes no prompt."""
    rng = random.Random(f"{seed}:{length}:{depth}")
    prompts = []
    for _ in range(iterations):
        key = rng.randint(10000, 99999)
        d = rng.random() if depth is None else depth
        prompts.append(passkey_prompt(tokenizer, length, key, d, bos))
    return prompts


def parse_answer(text: str) -> Optional[int]:
    """The first integer in the model's output (" 48213. Remember it." -> 48213)."""
    match = re.search(r"\d+", text)
    return int(match.group()) if match else None


def run_passkey(model: Transformer, tokenizer: Tokenizer, lengths: Sequence[int], iterations: int = 10, seed: int = 0,
                depths: Optional[Sequence[float]] = None, max_new_tokens: int = 10, bos: Optional[bool] = None) -> list[dict]:
    """One result per length: {"length", "iterations", "correct", "accuracy", "by_depth", "trials"}.
    bos: start every prompt with BOS (eval_passkey.py: the checkpoint's own setting)."""
    device = next(model.parameters()).device
    results = []
    for length in lengths:
        check_length(model, length + max_new_tokens - 1, f"passkey length {length}")
        trials, by_depth = [], []
        for depth in (depths if depths else [None]):
            prompts = passkey_prompts(tokenizer, length, iterations, seed, depth, bos)
            n_ok = 0
            for p in tqdm(prompts, desc=f"passkey {length}" + ("" if depth is None else f" depth {depth:g}"),
                          unit="prompt", leave=False):
                new = _catch_oom(lambda: generate(model, p.tokens, max_new_tokens),
                                 f"a passkey prompt of {length} tokens", device)
                output = tokenizer.decode(new)
                ok = parse_answer(output) == p.key
                n_ok += ok
                trials.append({"key": p.key, "depth": p.depth, "output": output, "correct": ok})
            if depth is not None:
                by_depth.append({"depth": depth, "iterations": len(prompts), "correct": n_ok,
                                 "accuracy": n_ok / len(prompts)})
        correct = sum(t["correct"] for t in trials)
        row = {"length": length, "iterations": len(trials), "correct": correct, "accuracy": correct / len(trials)}
        if depths:
            row["by_depth"] = by_depth
        row["trials"] = trials
        results.append(row)
    return results


def passkey_summary(results: Sequence[dict], threshold: float = 0.8) -> dict:
    """Table 5: the passkey context is the largest tested length with accuracy >= 80%; the
    passkey accuracy is the mean accuracy over the tested lengths up to that context."""
    passing = [r["length"] for r in results if r["accuracy"] >= threshold]
    if not passing:
        return {"passkey_context": None, "passkey_accuracy": None}
    context = max(passing)
    accs = [r["accuracy"] for r in results if r["length"] <= context]
    return {"passkey_context": context, "passkey_accuracy": sum(accs) / len(accs)}


# ---------------------------------------------------------------------------------------
# Appendix A.2: the attention temperature sweep
# ---------------------------------------------------------------------------------------

def attention_factor_sweep(model: Transformer, documents: Sequence[Sequence[int]], bos_id: Optional[int], window: int,
                           factors: Sequence[float], stride: int = 256, truncate: bool = False,
                           segment_length: int = 2048) -> dict:
    """Perplexity for every sqrt(1/t) in `factors` at the model's fixed s (method yarn), overall
    (Figure 2: token-weighted, and mean/std of per-document perplexity) and per segment of
    token positions [k*segment_length, (k+1)*segment_length) (Figure 3: mean over documents of
    Eq. 26, (ppl(t) - ppl(t=1)) / ppl(t=1), in %; Figure 4: how many documents have their
    lowest perplexity at each factor). sqrt(1/t) = 1 is always evaluated, as the reference."""
    rope = model.rope
    if rope.method != "yarn":
        raise EvalError(f"--attention-factor-sweep: needs --method yarn (NTK-by-parts + temperature, Sec. 3.4), "
                        f"the model is set to {rope.method!r}")
    check_segment_length(segment_length)
    factors = sorted(set(float(f) for f in factors) | {1.0})
    per_factor = {}
    try:
        for a in factors:
            model.set_rope(replace(rope, attention_factor=a))
            per_factor[a] = score_documents(model, documents, bos_id, window, stride, truncate,
                                            desc=f"sqrt(1/t)={a:g}")
    finally:
        model.set_rope(rope)
    n_max = max(len(n) for n in per_factor[1.0].token_nll)
    segments = [(a, min(a + segment_length, n_max)) for a in range(0, n_max, segment_length)]

    def seg_ppl(nll):  # (segments,) perplexity of one document per segment; NaN where unscored
        out = []
        for a, b in segments:
            part = nll[a:b]
            out.append(math.exp(float(np.nanmean(part))) if np.isfinite(part).any() else float("nan"))
        return np.array(out)

    seg = {a: np.stack([seg_ppl(n) for n in s.token_nll]) for a, s in per_factor.items()}  # (docs, segments)
    change = {a: 100 * (seg[a] - seg[1.0]) / seg[1.0] for a in factors}                      # Eq. 26, in %
    stacked = np.stack([np.where(np.isnan(seg[a]), np.inf, seg[a]) for a in factors])      # (factors, docs, segments)
    best = stacked.argmin(0)
    doc_ppl = {a: per_factor[a].document_perplexities() for a in factors}
    return {
        "window": window, "scale": rope.scale, "segment_length": segment_length, "factors": factors,
        "recommended_factor": yarn_attention_factor(rope.scale, rope.attention_coefficient),  # Eq. 22
        "perplexity": [per_factor[a].perplexity for a in factors],
        "tokens": [per_factor[a].tokens for a in factors],
        "document_perplexity_mean": [float(doc_ppl[a].mean()) for a in factors],
        "document_perplexity_std": [float(doc_ppl[a].std()) for a in factors],
        "segments": [list(s) for s in segments],
        "segment_change_percent": [[_nan_to_none(float(np.nanmean(c))) if np.isfinite(c).any() else None
                                    for c in change[a].T] for a in factors],
        "best_factor_counts": [[int(((best[:, k] == i) & np.isfinite(stacked[i, :, k])).sum()) for k in range(len(segments))]
                               for i in range(len(factors))],
    }


def _nan_to_none(x: float):
    return None if math.isnan(x) else x

