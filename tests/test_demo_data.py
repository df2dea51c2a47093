"""experiments/demo_data.py on a small fake corpus: no download, a tiny vocabulary."""
import json
import re

import numpy as np
import pytest

from experiments import demo_data as dd
from yarn_minimal.data import open_segments

WORDS = ("the a an of to in is it for on with as be by this that can are from or not at when will "
         "module function value object list return file data method string type class error name "
         "call default used set new each must may first other time line only more").split()
N_LONG, N_HELDOUT, MIN_CHARS = 4, 2, 6000
VOCAB = 384  # 259 byte and special pieces + ~60 characters + a few merges


def _prose(rng, n_paragraphs, marker=""):
    paragraphs = []
    for _ in range(n_paragraphs):
        sentences = []
        for _ in range(rng.integers(3, 7)):
            words = list(rng.choice(WORDS, size=rng.integers(5, 13)))
            if marker:  # a character no other document uses, so the tokenizer can only learn it from here
                words[rng.integers(len(words))] = marker * 3
            sentences.append(" ".join(words).capitalize() + ".")
        text = " ".join(sentences)
        paragraphs.append("\n".join(text[i:i + 70] for i in range(0, len(text), 70)))
    return "\n\n".join(paragraphs)


def _write_corpus(root):
    rng = np.random.default_rng(123)
    texts = {}
    for i in range(12):
        texts[f"library/short{i}.rst.txt"] = (f"Short {i}\n========\n\n.. function:: f{i}(x)\n\n"
                                              + _prose(rng, 4) + "\n\n   >>> f(1)\n   2\n")
    for i in range(N_LONG):
        texts[f"howto/long{i}.rst.txt"] = f"Long {i}\n======\n\n" + _prose(rng, 40, marker=chr(0x3B1 + i))
    for name, text in texts.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return texts


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    _write_corpus(root)
    docs = dd.read_documents(root)
    train, heldout = dd.split_documents(docs, N_HELDOUT, MIN_CHARS)
    train_texts = [docs[n] for n in train]
    sp = dd.train_tokenizer(train_texts, tmp_path_factory.mktemp("tok") / "tokenizer.model", VOCAB, seed=0)
    return dict(root=root, docs=docs, train=train, heldout=heldout, sp=sp,
                train_texts=train_texts, stream=dd.document_stream(sp, train_texts))


def _markers(docs, names):
    return {c for n in names for c in docs[n] if ord(c) >= 0x3B1}


def test_split_holds_out_long_documents_by_name(corpus):
    docs, train, heldout = corpus["docs"], corpus["train"], corpus["heldout"]
    assert len(heldout) == N_HELDOUT and not set(heldout) & set(train)
    assert set(train) | set(heldout) == set(docs)
    assert all(len(docs[n]) >= MIN_CHARS for n in heldout)
    reordered = dict(reversed(list(docs.items())))
    assert dd.split_documents(reordered, N_HELDOUT, MIN_CHARS)[1] == heldout


def test_heldout_text_never_reaches_tokenizer_or_stream(corpus, tmp_path):
    docs, sp = corpus["docs"], corpus["sp"]
    held, seen = _markers(docs, corpus["heldout"]), _markers(docs, corpus["train"])
    assert len(held) == N_HELDOUT and len(seen) == N_LONG - N_HELDOUT
    lines = "".join(dd.tokenizer_sentences(corpus["train_texts"]))
    assert not held & set(lines)
    # a character the tokenizer saw becomes a piece; one it never saw is unknown (byte fallback)
    assert all(sp.piece_to_id(c) != dd.UNK_ID for c in seen)
    assert all(sp.piece_to_id(c) == dd.UNK_ID for c in held)
    # control: trained on every document, the held-out characters would have become pieces
    sp_all = dd.train_tokenizer(list(docs.values()), tmp_path / "all.model", VOCAB, seed=0)
    assert all(sp_all.piece_to_id(c) != dd.UNK_ID for c in held)
    assert not held & set(sp.decode(corpus["stream"].tolist()))


def test_stream_bookends_each_document(corpus):
    sp, stream, texts = corpus["sp"], corpus["stream"], corpus["train_texts"]
    bos, = np.nonzero(stream == dd.BOS_ID)
    eos, = np.nonzero(stream == dd.EOS_ID)
    assert len(bos) == len(eos) == len(texts)
    assert bos[0] == 0 and eos[-1] == len(stream) - 1
    assert np.array_equal(bos[1:], eos[:-1] + 1)
    decoded = [sp.decode(stream[b + 1:e].tolist()) for b, e in zip(bos, eos)]
    assert decoded == texts


def _passkey_rows(sp, segments):
    return [row for row in segments.tolist() if sp.decode(row).startswith(dd.HEADER)]


@pytest.mark.parametrize("seq_len", [256, 512])
def test_segments_and_passkey_prompts(corpus, seq_len):
    sp, stream = corpus["sp"], corpus["stream"]
    filler = dd.Filler(sp, dd.filler_sentences(corpus["train_texts"]))
    segments, n_passkey = dd.build_segments(sp, stream, filler, seq_len, 0.25, seed=1)
    n_text = len(stream) // seq_len
    assert segments.shape == (n_text + n_passkey, seq_len)
    assert n_passkey == round(n_text / 3) > 0
    text_rows = {tuple(r) for r in stream[:n_text * seq_len].reshape(n_text, seq_len).tolist()}
    assert text_rows <= {tuple(r) for r in segments.tolist()}

    rows = _passkey_rows(sp, segments)
    assert len(rows) == n_passkey
    starts = []
    for row in rows:
        assert len(row) == seq_len and row[0] == dd.BOS_ID and row[-1] == dd.EOS_ID
        assert dd.BOS_ID not in row[1:] and dd.EOS_ID not in row[:-1]
        lines = sp.decode(row).split("\n")
        assert len(lines) == 5 and lines[0] == dd.HEADER
        key = re.fullmatch(r"The pass key is (\d{5})\. Remember it\. \1 is the pass key\.", lines[2]).group(1)
        assert lines[4] == f"What is the pass key? The pass key is {key}."
        prompt = "\n".join(lines[:4])
        assert prompt.count(key) == 2 and prompt.count("The pass key is") == 1  # only the key line
        assert not re.search(r"\d", lines[1] + lines[3])
        assert "grass is green" not in prompt
        # an evaluation prompt (everything up to "The pass key is") tokenizes to a prefix of the
        # row, and what follows it is the answer, then EOS
        question = sp.encode(sp.decode(row).removesuffix(f" {key}."))
        assert row[1:1 + len(question)] == question
        assert sp.id_to_piece(row[1 + len(question):-1]) == ["▁", *key, "."]  # split digits, as Llama
        starts.append(len(lines[1]) / (len(lines[1]) + len(lines[3]) + 1))
    # the key line moves through the filler
    assert min(starts) < 0.25 and max(starts) > 0.75


def test_filler_draws_exact_budgets(corpus):
    filler = dd.Filler(corpus["sp"], dd.filler_sentences(corpus["train_texts"]))
    rng = np.random.default_rng(0)
    for budget in [0, filler.min_len, filler.min_len + 1, 37, 200]:
        chosen = filler.draw(budget, rng)
        assert chosen is not None and sum(filler.lengths[i] for i in chosen) == budget


def _run(root, out, seed):
    dd.main(["--out", str(out), "--source-dir", str(root), "--vocab-size", str(VOCAB), "--seq-lens",
             "256,512", "--heldout", str(N_HELDOUT), "--heldout-min-chars", str(MIN_CHARS), "--seed", str(seed)])


def test_command_line_is_deterministic(corpus, tmp_path):
    for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
        _run(corpus["root"], tmp_path / name, seed)
    a, b, c = (tmp_path / n for n in "abc")
    assert (a / "tokenizer.model").read_bytes() == (b / "tokenizer.model").read_bytes()
    for seq_len in (256, 512):
        (sa, ma), (sb, mb), (sc, _) = (open_segments(d / f"train-{seq_len}") for d in (a, b, c))
        assert ma == mb and ma["vocab_size"] == VOCAB and ma["bos_id"] == 1 and ma["eos_id"] == 2
        assert np.array_equal(sa, sb) and not np.array_equal(sa, sc)
    manifest = json.loads((a / "manifest.json").read_text())
    assert sorted(h["name"] for h in manifest["heldout"]) == corpus["heldout"]
    assert manifest["train"] == corpus["train"]
    for h in manifest["heldout"]:
        assert (a / h["file"]).read_text() == corpus["docs"][h["name"]] + "\n"
