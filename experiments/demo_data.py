"""Training data for the CPU demo model: Python 3.11 docs -> tokenizer + token segments.

    python -m experiments.demo_data --out experiments/work/demo_data

Text: the reStructuredText sources of the Python 3.11 documentation (PSF license), taken from
Debian's `python3.11-doc` package. A fixed set of long documents is held out (never seen by the
tokenizer or the model) so that perplexity at 8x the training length can be measured on text of
the same kind; each is written as plain text under OUT/heldout/.

Tokenizer: a sentencepiece BPE model with Llama 2's conventions (unk 0, bos 1, eos 2, no pad,
byte fallback, split digits, no normalization), trained on the training documents only.
A vocabulary of 4096 keeps the untied embedding and output matrices (2 x 4096 x dim) to 30-40% of
a ~5M-parameter model at dim 192-256, while still encoding this text at about 3.3 characters
per token (a smaller vocabulary would spend the 256-token window on less text).

Segments: every training document is bookended with BOS and EOS, as in the paper's PG19 chunks,
the stream is cut into seq_len pieces, and passkey-retrieval prompts (one per segment, exactly
seq_len tokens) are mixed in. The prompt layout is the evaluation's, but the filler is plain prose
sentences from the training documents instead of the evaluation's "The grass is green..." so that
the model learns to find the key, not a memorised filler. The default --passkey-fraction 0.1 is
small enough that language-model loss stays dominated by text, yet gives ~1,300 retrieval
examples per epoch at 256 tokens, each with 10 random digits to copy (key line and answer).

Output (OUT = --out):
    tokenizer.model                    sentencepiece model
    manifest.json                      train and held-out document names, held-out lengths
    heldout/*.txt                      held-out documents, one per file
    train-{seq_len}/                   tokens.bin + meta.json, see yarn_minimal.data
    cache/                             the downloaded .deb and its extracted files

The held-out set depends only on file names (a hash), not on --seed, so it stays fixed across
runs; --seed drives passkey keys and positions, filler choice and segment order (and the
tokenizer's sentence sampling, which only happens above 2M lines).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import sentencepiece as spm
from tqdm import tqdm

from yarn_minimal.data import write_segments
from yarn_minimal.files import Output, atomic_write, check_output, holds, write_json

DEB_PACKAGE = "python3.11-doc"
SOURCES_SUBDIR = Path("usr/share/doc/python3.11/html/_sources")
SUFFIX = ".rst.txt"
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2

# The evaluation's passkey prompt (landmark attention, as the YaRN authors ran it), with the
# answer appended: training samples end where evaluation asks the model to continue.
HEADER = ("There is an important info hidden inside a lot of irrelevant text. "
          "Find it and memorize them. I will quiz you about the important information there.")
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is {key}."
# the evaluation's filler; training prompts must not contain it, or retrieval could be memorised
EVAL_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
# what --out may be besides new or empty: an earlier output of this script (with --overwrite)
DEMO_DATA = Output("demo data this script wrote", holds("manifest.json", "tokenizer.model", "heldout", "train-*", "cache"),
                   folder=True)


# ---------------------------------------------------------------------------- source documents

def fetch_sources(cache_dir: Path) -> Path:
    """Download and unpack python3.11-doc once; return its _sources folder."""
    return fetch_package(cache_dir, DEB_PACKAGE, SOURCES_SUBDIR)


def fetch_package(cache_dir: Path, package: str, subdir: Path) -> Path:
    """Download and unpack a Debian package once (apt-get download, dpkg-deb -x); return the
    folder `subdir` inside it. Also used by experiments/real_model.py."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    debs = sorted(cache_dir.glob(f"{package}_*.deb"))
    if not debs:
        print(f"downloading {package} with apt-get into {cache_dir}", file=sys.stderr)
        try:
            subprocess.run(["apt-get", "download", package], cwd=cache_dir, check=True)
        except (OSError, subprocess.CalledProcessError) as e:
            raise SystemExit(
                f"`apt-get download {package}` failed ({e}). This needs a Debian/Ubuntu apt with "
                f"a reachable package mirror. Alternatively extract the package elsewhere "
                f"(dpkg-deb -x {package}_*.deb DIR) and pass --source-dir DIR.") from e
        debs = sorted(cache_dir.glob(f"{package}_*.deb"))
        if not debs:
            raise SystemExit(f"apt-get download reported success but no {package}_*.deb is in {cache_dir}")
    extracted = cache_dir / debs[-1].name.removesuffix(".deb")
    if not (extracted / subdir).is_dir():
        tmp = extracted.with_name(extracted.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(tmp)], check=True)
        if not (tmp / subdir).is_dir():
            raise SystemExit(f"{debs[-1]}: no {subdir} inside; the package layout changed")
        shutil.rmtree(extracted, ignore_errors=True)
        tmp.rename(extracted)
    return extracted / subdir


def read_documents(source_dir: Path) -> dict[str, str]:
    """All *.rst.txt files under source_dir, keyed by relative path, in sorted order."""
    if (source_dir / SOURCES_SUBDIR).is_dir():  # the root of an extracted package
        source_dir = source_dir / SOURCES_SUBDIR
    paths = sorted(source_dir.rglob(f"*{SUFFIX}"))
    if not paths:
        raise SystemExit(f"{source_dir}: no *{SUFFIX} files found")
    docs = {}
    for path in paths:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        docs[path.relative_to(source_dir).as_posix()] = "\n".join(l.rstrip() for l in lines).strip("\n")
    return docs


def split_documents(docs: dict[str, str], n_heldout: int, min_chars: int) -> tuple[list[str], list[str]]:
    """Hold out n_heldout documents of >= min_chars characters, chosen by a hash of the name."""
    # a hash of the name, not an RNG, so the evaluation set never moves with --seed or the file list
    def rank(name): return hashlib.sha256(name.encode()).hexdigest()
    long_docs = sorted((n for n, t in docs.items() if len(t) >= min_chars), key=rank)
    if len(long_docs) < n_heldout:
        raise SystemExit(f"only {len(long_docs)} documents have >= {min_chars} characters; "
                         f"cannot hold out {n_heldout}")
    heldout = sorted(long_docs[:n_heldout])
    train = [n for n in docs if n not in set(heldout)]
    return train, heldout


def heldout_filename(name: str) -> str:
    return name.removesuffix(SUFFIX).replace("/", "__") + ".txt"


# ---------------------------------------------------------------------------- tokenizer

def tokenizer_sentences(texts: list[str]):
    """Non-empty lines: sentencepiece trains on lines, so newlines end up as byte tokens, as in Llama."""
    for text in texts:
        for line in text.split("\n"):
            if line.strip():
                yield line


def train_tokenizer(texts: list[str], model_file: Path, vocab_size: int, seed: int,
                    max_sentences: int = 2_000_000) -> spm.SentencePieceProcessor:
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()  # not model_prefix, which would write the output path into the model
    spm.SentencePieceTrainer.train(
        sentence_iterator=tokenizer_sentences(texts), model_writer=model,
        model_type="bpe", vocab_size=vocab_size,
        # Llama 2's ids and options: no pad token, unknown characters fall back to bytes,
        # each digit is its own token (which makes copying a passkey digit by digit possible)
        unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1,
        byte_fallback=True, split_digits=True, character_coverage=0.99995,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, allow_whitespace_only_pieces=True,  # rst indentation is meaningful
        input_sentence_size=max_sentences, shuffle_input_sentence=True,
        max_sentence_length=1 << 14, num_threads=2, minloglevel=2)
    atomic_write(model_file, lambda tmp: tmp.write_bytes(model.getvalue()))
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


# ---------------------------------------------------------------------------- text segments

def document_stream(sp: spm.SentencePieceProcessor, texts: list[str], progress: bool = False) -> np.ndarray:
    """[BOS] doc [EOS] [BOS] doc [EOS] ... as one int array."""
    docs = [np.array([BOS_ID] + sp.encode(text) + [EOS_ID], dtype=np.int64)
            for text in tqdm(texts, desc="tokenizing", unit="doc", disable=not progress)]
    return np.concatenate(docs) if docs else np.zeros(0, dtype=np.int64)


def cut_segments(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """(n, seq_len) rows; the tail shorter than seq_len is dropped."""
    n = len(stream) // seq_len
    return stream[:n * seq_len].reshape(n, seq_len)


# ---------------------------------------------------------------------------- passkey prompts

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
# plain prose: no rst markup, and no digits, so that the key is the only number, as in the evaluation
_PLAIN = re.compile(r"[A-Z][A-Za-z ,;()'-]*[a-z]\.")


def filler_sentences(texts: list[str], min_words: int = 4, max_words: int = 30) -> list[str]:
    """Plain prose sentences from the training documents, in document order, without duplicates."""
    seen, excluded = {}, set(_SENTENCE_END.split(EVAL_FILLER))
    for text in texts:
        for paragraph in re.split(r"\n\s*\n", text):
            joined = " ".join(paragraph.split())
            for s in _SENTENCE_END.split(joined):
                if (_PLAIN.fullmatch(s) and min_words <= len(s.split()) <= max_words
                        and s not in excluded and "pass key" not in s):
                    seen.setdefault(s, None)
    return list(seen)


class Filler:
    """Draws filler sentences whose token counts add up to an exact budget."""

    def __init__(self, sp: spm.SentencePieceProcessor, sentences: list[str]):
        if not sentences:
            raise ValueError("no filler sentences: the training documents have no plain prose")
        # encoded alone the sentence gets a leading "▁", as it has in the middle of a line
        lengths = np.array([len(ids) for ids in sp.encode(sentences)])
        order = np.argsort(lengths, kind="stable")
        self.sentences = [sentences[i] for i in order]
        self.lengths = lengths[order]
        self.min_len = int(self.lengths[0])

    def draw(self, budget: int, rng: np.random.Generator) -> list[int] | None:
        """Indices of sentences with total length == budget, or None when stuck."""
        chosen = []
        while budget > 0:
            # never leave a remainder too short for any sentence
            n_small = int(np.searchsorted(self.lengths, budget - self.min_len, side="right"))
            lo, hi = np.searchsorted(self.lengths, [budget, budget + 1])
            n_exact = int(hi - lo)
            if n_small + n_exact == 0:
                return None
            j = int(rng.integers(n_small + n_exact))
            i = j if j < n_small else int(lo) + j - n_small
            chosen.append(i)
            budget -= int(self.lengths[i])
        return chosen if budget == 0 else None

    def text(self, chosen: list[int]) -> str:
        return " ".join(self.sentences[i] for i in chosen)


def passkey_prompt(filler: Filler, key: int, prefix: list[int], suffix: list[int]) -> str:
    return "\n".join([HEADER, filler.text(prefix), KEY_LINE.format(key=key),
                      filler.text(suffix), QUESTION.format(key=key)])


def fill_line(sp: spm.SentencePieceProcessor, filler: Filler, budget: int, rng: np.random.Generator,
              max_tries: int = 20) -> list[int]:
    """Sentences for one filler line that tokenizes, after a newline, to exactly `budget` tokens."""
    newline = len(sp.encode("\n"))
    chosen = filler.draw(budget, rng) or []
    for _ in range(max_tries):
        # "\n" is a byte token that never merges, so a line's tokens do not depend on its
        # neighbours; but its first sentence lacks the leading "▁" it was counted with
        gap = budget - (len(sp.encode("\n" + filler.text(chosen))) - newline)
        if gap == 0:
            return chosen
        while chosen and (gap < 0 or 0 < gap < filler.min_len):
            gap += int(filler.lengths[chosen.pop()])
        chosen += filler.draw(gap, rng) or []
    raise RuntimeError(f"could not fill a line to exactly {budget} tokens; the filler pool is too coarse")


def passkey_sample(sp: spm.SentencePieceProcessor, filler: Filler, key: int, position: float,
                   seq_len: int, rng: np.random.Generator) -> list[int]:
    """BOS + prompt + answer + EOS, exactly seq_len tokens, key line at `position` (0..1) of the filler."""
    budget = seq_len - 2 - len(sp.encode(passkey_prompt(filler, key, [], [])))
    if budget < 0:
        raise ValueError(f"seq_len {seq_len} is too short for the passkey prompt ({seq_len - budget} tokens)")
    n_prefix = round(position * budget)
    if 0 < n_prefix < filler.min_len or 0 < budget - n_prefix < filler.min_len:
        n_prefix = 0 if n_prefix < budget / 2 else budget  # no sentence is that short
    prefix = fill_line(sp, filler, n_prefix, rng)
    suffix = fill_line(sp, filler, budget - n_prefix, rng)
    ids = [BOS_ID] + sp.encode(passkey_prompt(filler, key, prefix, suffix)) + [EOS_ID]
    if len(ids) != seq_len:
        raise RuntimeError(f"passkey prompt has {len(ids)} tokens, expected {seq_len}: lines did not "
                           f"tokenize independently")
    return ids


def passkey_count(n_text: int, fraction: float) -> int:
    """Number of passkey segments so that they are `fraction` of all segments."""
    return round(n_text * fraction / (1 - fraction))


def build_segments(sp: spm.SentencePieceProcessor, stream: np.ndarray, filler: Filler, seq_len: int,
                   passkey_fraction: float, seed: int, progress: bool = False) -> tuple[np.ndarray, int]:
    """Text segments plus passkey segments, shuffled; returns (segments, n_passkey)."""
    text = cut_segments(stream, seq_len)
    n_passkey = passkey_count(len(text), passkey_fraction)
    # separate streams: keys never correlate with filler or order; each seq_len is independent
    key_rng, layout_rng, shuffle_rng = (np.random.default_rng(s)
                                        for s in np.random.SeedSequence([seed, seq_len]).spawn(3))
    keys = key_rng.integers(10_000, 100_000, size=n_passkey)
    positions = layout_rng.random(n_passkey)
    passkey = np.array([passkey_sample(sp, filler, int(k), float(p), seq_len, layout_rng)
                        for k, p in tqdm(zip(keys, positions), total=n_passkey, desc=f"passkey {seq_len}",
                                         unit="prompt", disable=not progress)],
                       dtype=np.int64).reshape(n_passkey, seq_len)
    segments = np.concatenate([text, passkey])
    return segments[shuffle_rng.permutation(len(segments))], n_passkey


# ---------------------------------------------------------------------------- command line

def earlier_heldout(out: Path) -> list[Path]:
    """The held-out files an earlier run listed in OUT/manifest.json (--overwrite replaces them)."""
    manifest = out / "manifest.json"
    if not manifest.is_file():
        return []
    try:
        entries = json.loads(manifest.read_text())["heldout"]
        return [out / "heldout" / Path(h["file"]).name for h in entries]
    except (ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: {manifest}: not a manifest this script wrote ({e!r}); move it away") from None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[2:]))
    p.add_argument("--out", type=Path, required=True, help="output folder: new or empty, or an earlier one with --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier output in --out: the files listed above (its cache/ is reused), nothing else")
    p.add_argument("--source-dir", type=Path,
                   help="already extracted python3.11-doc (package root or its _sources folder); "
                        "default: apt-get download into OUT/cache")
    p.add_argument("--seq-lens", default="256,2048",
                   help="comma-separated segment lengths; 256 = L for pre-training, 2048 = 8L for fine-tuning")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--passkey-fraction", type=float, default=0.1,
                   help="share of all segments that are passkey prompts (default 0.1)")
    p.add_argument("--heldout", type=int, default=24, help="number of held-out long documents")
    p.add_argument("--heldout-min-chars", type=int, default=24_000,
                   help="only documents this long are held out (at ~3.3 chars/token, >= ~6k tokens)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not 0 <= args.passkey_fraction < 1:
        p.error(f"--passkey-fraction must be in [0, 1), got {args.passkey_fraction}")
    seq_lens = [int(s) for s in args.seq_lens.split(",")]

    start = time.perf_counter()
    out: Path = args.out
    try:
        check_output(out, DEMO_DATA, args.overwrite)
    except ValueError as e:
        raise SystemExit(f"error: --out {e}") from None
    old_heldout = earlier_heldout(out)
    out.mkdir(parents=True, exist_ok=True)
    source_dir = args.source_dir or fetch_sources(out / "cache")
    docs = read_documents(source_dir)
    train, heldout = split_documents(docs, args.heldout, args.heldout_min_chars)
    train_texts = [docs[n] for n in train]

    t = time.perf_counter()
    sp = train_tokenizer(train_texts, out / "tokenizer.model", args.vocab_size, args.seed)
    print(f"tokenizer: vocab {sp.vocab_size()}, trained in {time.perf_counter() - t:.1f} s")

    heldout_dir = out / "heldout"
    for old in old_heldout:  # an earlier run's held-out files, and nothing else in heldout/
        old.unlink(missing_ok=True)
    heldout_dir.mkdir(exist_ok=True)
    heldout_info = []
    for name in heldout:
        (heldout_dir / heldout_filename(name)).write_text(docs[name] + "\n", encoding="utf-8")
        heldout_info.append(dict(name=name, file=f"heldout/{heldout_filename(name)}",
                                 chars=len(docs[name]), tokens=len(sp.encode(docs[name]))))
    manifest = dict(source=f"Debian {DEB_PACKAGE}: Python 3.11 documentation sources (PSF license)",
                    source_dir=str(source_dir), heldout_rule=f"sha256(name) order among documents "
                    f">= {args.heldout_min_chars} chars", train=train, heldout=heldout_info)
    write_json(out / "manifest.json", manifest)

    stream = document_stream(sp, train_texts, progress=True)
    filler = Filler(sp, filler_sentences(train_texts))
    meta = dict(vocab_size=sp.vocab_size(), bos_id=BOS_ID, eos_id=EOS_ID, tokenizer="../tokenizer.model",
                source=manifest["source"], n_documents=len(train), n_heldout_documents=len(heldout),
                n_stream_tokens=len(stream), passkey_fraction=args.passkey_fraction,
                passkey_format="evaluation layout, prose filler from training docs, 5-digit keys",
                n_filler_sentences=len(filler.sentences), seed=args.seed)
    summary = []
    for seq_len in seq_lens:
        segments, n_passkey = build_segments(sp, stream, filler, seq_len, args.passkey_fraction,
                                             args.seed, progress=True)
        path = write_segments(out / f"train-{seq_len}", segments,
                              dict(meta, n_text_segments=len(segments) - n_passkey,
                                   n_passkey_segments=n_passkey), overwrite=args.overwrite)
        size = (path / "tokens.bin").stat().st_size
        summary.append(f"  train-{seq_len}: {len(segments)} segments ({n_passkey} passkey), "
                       f"{size / 2**20:.1f} MiB")

    lengths = sorted(h["tokens"] for h in heldout_info)
    long_enough = sum(n >= 16 * 256 for n in lengths)
    print(f"documents: {len(train)} train, {len(heldout)} held out")
    print(f"train tokens (with BOS/EOS): {len(stream):,}; filler sentences: {len(filler.sentences):,}")
    print(*summary, sep="\n")
    print(f"held-out tokens: min {lengths[0]:,}, median {lengths[len(lengths) // 2]:,}, max {lengths[-1]:,}; "
          f"{long_enough}/{len(lengths)} have >= {16 * 256} tokens")
    print(f"wrote {out}  ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
