"""evaluation.py and the eval scripts against independent computations: per-token NLLs from
Hugging Face transformers on the same weights, the protocol re-derived token by token, the
passkey prompt re-encoded, and Table 5's definitions applied by hand."""
import dataclasses
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import yarn_minimal
from yarn_minimal import training
from hf_oracle import hf_model
from test_model import L, tiny_model
from yarn_minimal import cli, eval_report as report, evaluation as ev
from yarn_minimal.model import ModelArgs, Transformer
from yarn_minimal.rope import RopeConfig, warn_beyond_window
from yarn_minimal.tokenizer import SentencePieceTokenizer

ROOT = Path(__file__).resolve().parent.parent
BOS = 1


def random_docs(lengths, vocab=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def hf_token_nll(hf, ids):
    """-log p(ids[j+1] | ids[:j+1]) for every j, float64, from transformers' logits."""
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].double()
    return -torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()


def brute_force_scores(model, doc, W, S):
    """The protocol re-derived: token i is scored by the first window whose end passes it,
    provided that window starts at or before i; its NLL comes from one full forward over
    that window's [BOS] + tokens[begin:end], by transformers on the same weights (a fresh
    model per window: HF's dynamic RoPE keeps the largest length it has seen)."""
    N, windows, begin = len(doc), [], 0
    while True:
        end = min(begin + W - 1, N)
        windows.append((begin, end))
        if end == N:
            break
        begin += S
    nll = {}
    per_window = []
    for k, (begin, end) in enumerate(windows):
        full = hf_token_nll(hf_model(model, max_position_embeddings=L), [BOS] + doc[begin:end])  # full[j] predicts doc[begin + j]
        mine = [i for i in range(begin, end) if all(e <= i for _, e in windows[:k])]
        for i in mine:
            nll[i] = full[i - begin]
        if mine:
            per_window.append(np.mean([nll[i] for i in mine]))
    return nll, per_window


@pytest.mark.parametrize("W, S, rope", [
    (16, 4, RopeConfig(original_length=L)),                          # W < N, S < W
    (16, 16, RopeConfig(method="yarn", scale=2.0, original_length=L)),  # S = W: one token per window unscored
    (40, 8, RopeConfig(method="pi", scale=4.0, original_length=L)),    # W = N of the longer document
    (64, 8, RopeConfig(method="ntk", dynamic=True, original_length=L)),  # W > N: one window; s from its length
])
def test_sliding_window_matches_brute_force(W, S, rope):
    model = tiny_model(rope)
    docs = random_docs([40, 23])
    scores = ev.score_documents(model, docs, BOS, W, S)
    total, count, window_means = 0.0, 0, []
    for doc, ours in zip(docs, scores.token_nll):
        ref, per_window = brute_force_scores(model, doc, W, S)
        assert sorted(np.flatnonzero(np.isfinite(ours))) == sorted(ref)  # the same tokens are scored
        for i, v in ref.items():
            assert abs(ours[i] - v) < 1e-4
        total, count = total + sum(ref.values()), count + len(ref)
        window_means += per_window
    assert scores.tokens == count
    assert scores.perplexity == pytest.approx(math.exp(total / count), rel=1e-5)
    assert scores.perplexity_window_mean == pytest.approx(math.exp(np.mean(window_means)), rel=1e-5)


def test_stride_equal_to_window_leaves_a_gap_and_smaller_stride_covers_all():
    # with S = W the token at end-of-window is never scored; S = W - 1 tiles exactly
    assert [(b, e, f) for b, e, f in ev.sliding_windows(10, 4, 4)] == [(0, 3, 0), (4, 7, 4), (8, 10, 8)]
    assert [(b, e, f) for b, e, f in ev.sliding_windows(10, 4, 3)] == [(0, 3, 0), (3, 6, 3), (6, 9, 6), (9, 10, 9)]


def test_truncate_matches_transformers_one_forward_per_document():
    rope = RopeConfig(method="yarn", scale=4.0, original_length=L)
    model = tiny_model(rope)
    hf = hf_model(model, max_position_embeddings=L)
    docs = random_docs([50, 20, 33], seed=3)
    W = 33
    scores = ev.score_documents(model, docs, BOS, W, stride=4, truncate=True)
    nll_sum, n = 0.0, 0
    for doc in docs:
        ids = torch.tensor([[BOS] + doc[:W - 1]])
        with torch.no_grad():
            loss = hf(ids, labels=ids).loss.item()  # mean over the len(ids) - 1 predicted tokens
        nll_sum, n = nll_sum + loss * (ids.shape[1] - 1), n + ids.shape[1] - 1
    assert scores.tokens == n == 32 + 20 + 32
    assert len(scores.window_mean_nll) == 3  # one pass per document: S never slides
    assert scores.perplexity == pytest.approx(math.exp(nll_sum / n), rel=1e-5)


def test_segment_perplexities_match_transformers_token_losses():
    """Perplexity per segment of token positions, pooled over documents, against transformers'
    own token losses; the segments' tokens and NLLs add up to the whole."""
    model = tiny_model(RopeConfig(method="yarn", scale=4.0, original_length=L))
    hf = hf_model(model, max_position_embeddings=L)
    docs, W, seg = random_docs([50, 20, 33], seed=3), 33, 8
    scores = ev.score_documents(model, docs, BOS, W, truncate=True)
    nlls = [hf_token_nll(hf, [BOS] + d[:W - 1]) for d in docs]  # 32, 20 and 32 token losses
    want = [math.exp(np.concatenate([n[a:a + seg] for n in nlls]).mean()) for a in range(0, 32, seg)]
    assert scores.segment_perplexities(seg) == pytest.approx(want, rel=1e-5)
    assert scores.segment_perplexities(64) == pytest.approx([scores.perplexity], rel=1e-12)
    assert ev.PerplexityScores([np.array([np.nan, 1.0, np.nan, np.nan])]).segment_perplexities(2) == \
        [pytest.approx(math.e), None]


def test_attention_factor_sweep_matches_transformers_per_segment():
    model = tiny_model(RopeConfig(method="yarn", scale=4.0, original_length=L))
    docs = random_docs([40, 27], seed=5)
    W, seg = 33, 8
    sweep = ev.attention_factor_sweep(model, docs, BOS, W, [1.3, 0.8], truncate=True, segment_length=seg)
    assert sweep["factors"] == [0.8, 1.0, 1.3]  # t = 1 always added, as the reference of Eq. 26
    assert model.rope.attention_factor is None   # the model's setting is restored
    seg_ppl = {}
    for a in sweep["factors"]:
        hf = hf_model(tiny_model(RopeConfig(method="yarn", scale=4.0, original_length=L, attention_factor=a)),
                      max_position_embeddings=L)
        nlls = [hf_token_nll(hf, [BOS] + d[:W - 1]) for d in docs]
        k = sweep["factors"].index(a)
        assert sweep["perplexity"][k] == pytest.approx(math.exp(np.concatenate(nlls).mean()), rel=1e-5)
        seg_ppl[a] = [[math.exp(n[s:s + seg].mean()) if len(n[s:s + seg]) else np.nan for s in range(0, 32, seg)]
                      for n in nlls]
    for k, a in enumerate(sweep["factors"]):
        for j in range(4):
            eq26 = [100 * (seg_ppl[a][d][j] - seg_ppl[1.0][d][j]) / seg_ppl[1.0][d][j] for d in range(2)
                    if not np.isnan(seg_ppl[a][d][j])]
            assert sweep["segment_change_percent"][k][j] == pytest.approx(np.mean(eq26), abs=1e-3)  # in percentage points
    assert sum(c[0] for c in sweep["best_factor_counts"]) == 2  # every document is best somewhere


def test_sweep_needs_yarn():
    with pytest.raises(ev.EvalError, match="needs --method yarn"):
        ev.attention_factor_sweep(tiny_model(), random_docs([20]), BOS, 16, [1.1])


# ---------------------------------------------------------------------------------------
# passkey
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok(tokenizer_path):
    return SentencePieceTokenizer(tokenizer_path)


def words(text):
    return " ".join(text.split())  # whitespace as any tokenizer may normalize it


def bare_length(tok, bos=True):
    """The shortest passkey prompt (no filler), found by asking for shorter and shorter ones."""
    n = 1000
    while True:
        try:
            ev.passkey_prompt(tok, n - 1, 12345, 0.5, bos)
        except ev.EvalError:
            return n
        n -= 1


def check_passkey_prompts(tok, bos=True):
    """Exact length, the key at the asked depth (counted in tokens), and a prompt that decodes to
    the intro, a cut of the repeating filler, the key line, filler and the question."""
    bare = bare_length(tok, bos)
    start = int(bos)
    key_at = lambda tokens: next(j for j in range(len(tokens)) if "54321" in tok.decode(tokens[start:j + 1]))
    j0 = key_at(ev.passkey_prompt(tok, bare, 54321, 0.0, bos).tokens)
    cycle = " ".join(ev.PASSKEY_FILLER) + " "
    for length, depth in [(bare, 0.5), (bare + 1, 0.0), (bare + 37, 1.0), (401, 0.3), (1000, 0.77)]:
        p = ev.passkey_prompt(tok, length, 54321, depth, bos)
        assert len(p.tokens) == length and (p.tokens[0] == tok.bos_id) == bos
        room = length - bare
        assert key_at(p.tokens) - j0 == round(depth * room)  # filler tokens before the key
        assert p.n_prefix + p.n_suffix == room and p.n_prefix == round(depth * room)
        text = words(tok.decode(p.tokens[start:]))
        line = ev.PASSKEY_LINE.format(key=54321)
        assert text.startswith(ev.PASSKEY_INTRO) and text.endswith(ev.PASSKEY_QUESTION)
        assert text.count("54321") == 2 and text.count(line) == 1
        before, after = text[len(ev.PASSKEY_INTRO):-len(ev.PASSKEY_QUESTION)].split(line)
        for filler in (before.strip(), after.strip()):  # each a prefix of the repeating filler
            assert (cycle * (len(filler) // len(cycle) + 1)).startswith(filler)
        assert ev.parse_answer(f" {p.key}. Remember it.") == 54321


def test_passkey_prompt_has_exact_length_and_key_at_depth(tok):
    check_passkey_prompts(tok, bos=True)
    check_passkey_prompts(tok, bos=False)


def test_passkey_length_below_scaffolding_is_a_clear_error(tok):
    bare = bare_length(tok)
    assert bare <= len(tok.encode(" ".join([ev.PASSKEY_INTRO, ev.PASSKEY_LINE.format(key=12345),
                                            ev.PASSKEY_QUESTION]))) + 3
    with pytest.raises(ev.EvalError, match=f"passkey length {bare - 1}: shorter .* {bare} tokens"):
        ev.passkey_prompt(tok, bare - 1, 12345, 0.5)


def test_passkey_seed_reproduces_prompts(tok):
    a = ev.passkey_prompts(tok, 300, 4, seed=7)
    b = ev.passkey_prompts(tok, 300, 4, seed=7)
    c = ev.passkey_prompts(tok, 300, 4, seed=8)
    assert [p.tokens for p in a] == [p.tokens for p in b]
    assert [p.key for p in a] != [p.key for p in c]
    assert all(10000 <= p.key <= 99999 and 0 <= p.depth <= 1 for p in a + c)


@pytest.mark.parametrize("text, key", [(" 48213. Remember it.", 48213), ("48213", 48213),
                                       (" is 48213 and 99999", 48213), ("\n  7 is it", 7), (" no idea.", None)])
def test_parse_answer_takes_the_first_integer(text, key):
    assert ev.parse_answer(text) == key


def test_passkey_scoring_with_an_oracle_and_a_wrong_model(tok, monkeypatch):
    model = tiny_model(RopeConfig(original_length=4096))  # the oracle below replaces its decoding
    digits = re.compile(r"\d{5}")

    def oracle(model, prompt, max_new_tokens, **kw):  # reads the key back from the prompt
        key = digits.search(tok.decode(prompt)).group()
        return tok.encode(f" {key}. Remember", bos=False)

    monkeypatch.setattr(ev, "generate", oracle)
    res = ev.run_passkey(model, tok, [300, 400], iterations=3, depths=[0.0, 1.0])
    assert [(r["iterations"], r["correct"], r["accuracy"]) for r in res] == [(6, 6, 1.0), (6, 6, 1.0)]
    assert [d["accuracy"] for d in res[0]["by_depth"]] == [1.0, 1.0]
    monkeypatch.setattr(ev, "generate", lambda *a, **k: tok.encode(" 10000 99999", bos=False))
    assert ev.run_passkey(model, tok, [300], iterations=2)[0]["correct"] == 0


def test_passkey_summary_is_table5():
    rows = [{"length": n, "accuracy": a} for n, a in [(8192, 1.0), (16384, 0.9), (32768, 0.5), (65536, 0.8),
                                                      (131072, 0.1)]]
    s = ev.passkey_summary(rows)
    assert s["passkey_context"] == 65536
    assert s["passkey_accuracy"] == pytest.approx((1.0 + 0.9 + 0.5 + 0.8) / 4)
    assert ev.passkey_summary([{"length": 8192, "accuracy": 0.7}])["passkey_context"] is None


# ---------------------------------------------------------------------------------------
# bad input and lengths the model cannot handle
# ---------------------------------------------------------------------------------------

def test_documents_from_files(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "b.jsonl").write_text(json.dumps({"content": "second"}) + "\n\n" + json.dumps({"content": "third"}) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["fourth", None, "fifth"]}), tmp_path / "c.parquet")
    (tmp_path / "ignored.bin").write_bytes(b"\x00\xff")
    assert ev.load_documents([str(tmp_path)], "content") == ["first document", "second", "third", "fourth", "fifth"]
    with pytest.raises(ev.EvalError, match=r"b.jsonl:1: .*'text'.* found \['content'\]"):
        ev.load_documents([str(tmp_path / "b.jsonl")], "text")
    with pytest.raises(ev.EvalError, match=r"c.parquet: no column 'text'.*content"):
        ev.load_documents([str(tmp_path / "c.parquet")], "text")


@pytest.mark.parametrize("content, needle", [
    (None, "no such file or folder"),
    (b"caf\xe9 au lait", r"not UTF-8 text \(byte 0xe9 at offset 3\)"),
    (b"{not json\n", r":1: not valid JSON"),
    (b"PAR1 garbage", "cannot be read as Parquet"),
])
def test_bad_document_files(tmp_path, content, needle):
    suffix = {b"{not json\n": ".jsonl", b"PAR1 garbage": ".parquet"}.get(content, ".txt")
    path = tmp_path / f"doc{suffix}"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ev.EvalError, match=needle) as e:
        ev.load_documents([str(path)])
    assert str(path) in str(e.value)


def test_min_tokens_counts_skipped_documents(tok):
    docs = ["short.", "The grass is green. " * 30, "", "The sky is blue. " * 40]
    kept, skipped = ev.tokenize_documents(tok, docs, min_tokens=50)
    assert skipped == 2 and len(kept) == 2 and all(len(k) >= 50 for k in kept)
    assert kept[0] == tok.encode(docs[1], bos=False)  # no BOS/EOS in the document tokens


def test_window_beyond_supported_length_warns_and_dynamic_does_not():
    with pytest.warns(UserWarning, match=r"window 17 exceeds the window RoPE supports, L x s = 16"):
        assert warn_beyond_window(RopeConfig(original_length=16), 17, "window")
    assert not warn_beyond_window(RopeConfig(method="yarn", scale=4, original_length=16), 64, "window")
    assert not warn_beyond_window(RopeConfig(method="ntk", dynamic=True, original_length=16), 10 ** 6, "window")


def test_out_of_memory_is_a_clear_error(monkeypatch):
    model = tiny_model()

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")

    monkeypatch.setattr(model, "hidden_states", oom)
    with pytest.raises(ev.EvalError, match=r"out of memory running a window of 24 tokens on cpu.*shorter --lengths"):
        ev.score_documents(model, random_docs([30]), BOS, 24, 8)


@pytest.mark.parametrize("spec, needle", [("method=yarn,scal=8", "'scal=8' is not key=value"),
                                          ("method=yarn,scale=x", "scale='x' is not a valid float"),
                                          ("dynamic=maybe", "dynamic='maybe'"),
                                          ("method=rope", "unknown method 'rope'")])
def test_bad_config_specs(spec, needle):
    with pytest.raises(ev.EvalError, match=needle):
        report.apply_config(RopeConfig(), report.parse_config(spec), spec)


def test_config_spec_applies_rope_fields():
    c = report.parse_config("method=pi, scale=8,dynamic=1,label=Dynamic PI,original_length=2048")
    rope = report.apply_config(RopeConfig(), c)
    assert (rope.method, rope.scale, rope.dynamic, rope.original_length) == ("pi", 8.0, True, 2048)
    assert report.apply_config(RopeConfig(), report.parse_config("scale=4")).method == "yarn"  # as --yarn-scale alone


def test_length_and_number_flags():
    assert report.parse_lengths("2048, 4k,8K") == [2048, 4096, 8192]  # k = 1024
    assert report.parse_floats("0,0.25, 1", "--depths") == [0.0, 0.25, 1.0]
    for text, needle in [("2k,x", "'x' is not an integer"), ("0,8", "must be > 0, got 0"), (" , ", "no values")]:
        with pytest.raises(ev.EvalError, match=needle):
            report.parse_lengths(text)
    with pytest.raises(ev.EvalError, match="--depths 'a,1': 'a' is not a number"):
        report.parse_floats("a,1", "--depths")


def test_config_keys_are_rope_fields_with_their_types():
    """--config's explicit key-to-type map covers every RopeConfig field, and each field's
    default (where it has one) is a value of the type the map reads."""
    rope_fields = {f.name: f.default for f in dataclasses.fields(RopeConfig)}
    assert set(report.CONFIG_TYPES) == set(rope_fields) | {"label", "ckpt"}
    for name, default in rope_fields.items():
        if default is not None:
            assert type(default) is report.CONFIG_TYPES[name], name
    assert report.parse_config("truncate=no,attention_factor=1.5,original_length=2048") == {
        "truncate": False, "attention_factor": 1.5, "original_length": 2048}


# ---------------------------------------------------------------------------------------
# the scripts end to end on a saved tiny checkpoint
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer_path):
    tok = SentencePieceTokenizer(tokenizer_path)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size, multiple_of=32,
                     rope=RopeConfig(original_length=64))
    torch.manual_seed(0)
    model = Transformer(args)
    training.init_weights(model, std=0.1)
    return yarn_minimal.save(model, tok, tmp_path_factory.mktemp("ckpt") / "tiny")


def run_script(name, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1")  # tiny tensors: threads only add contention
    proc = subprocess.run([sys.executable, str(ROOT / name), *map(str, args), "--device", "cpu"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def is_png(path):
    return Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_perplexity_script(ckpt, tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "long.txt").write_text("The grass is green. Here we go. " * 12)
    (tmp_path / "docs" / "more.jsonl").write_text(json.dumps({"text": "The sky is blue. " * 15}) + "\n"
                                                  + json.dumps({"text": "Tiny."}) + "\n")
    out, plot = tmp_path / "ppl.json", tmp_path / "ppl.png"
    proc = run_script("eval_perplexity.py", "--ckpt", ckpt, "--files", tmp_path / "docs", "--lengths", "32,96",
                      "--stride", "24", "--min-tokens", "20", "--config", "method=none",
                      "--config", "method=yarn,scale=2,label=yarn-2", "--out", out, "--plot", plot)
    assert "2 documents kept, 1 skipped" in proc.stderr
    assert "window 96 exceeds" in proc.stderr  # plain RoPE at L = 64
    data = json.loads(out.read_text())
    rows = data["results"]
    assert [(r["label"], r["window"]) for r in rows] == [("RoPE", 32), ("RoPE", 96), ("yarn-2", 32), ("yarn-2", 96)]
    for r in rows:
        assert {"method", "scale", "dynamic", "window", "perplexity", "tokens"} <= set(r)
        assert r["perplexity"] > 1 and r["documents"] == 2 and r["skipped_documents"] == 1
    assert rows[2]["method"] == "yarn" and rows[2]["scale"] == 2.0
    assert all(r["segment_length"] == 2048 and len(r["segment_perplexity"]) == 1 for r in rows)
    report.plot_segments(rows, str(tmp_path / "segments.png"), original_length=64)
    assert is_png(tmp_path / "segments.png")
    assert data["config"]["stride"] == 24 and "yarn-2" in proc.stdout
    assert is_png(plot)



def test_eval_perplexity_attention_factor_sweep(ckpt, tmp_path, monkeypatch):
    # in-process (the subprocess path is covered above): Appendix A.2 on a user's documents
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)
    (tmp_path / "long.txt").write_text("The grass is green. Here we go. " * 12)
    out, plot = tmp_path / "sweep.json", tmp_path / "sweep.png"
    load_script("eval_perplexity.py").main([
        "--ckpt", str(ckpt), "--files", str(tmp_path / "long.txt"), "--lengths", "64", "--truncate",
        "--method", "yarn", "--yarn-scale", "2", "--attention-factor-sweep", "0.9,1.1", "--segment-length", "16",
        "--out", str(out), "--plot", str(plot), "--device", "cpu"])
    data = json.loads(out.read_text())
    sweep = data["sweep"]
    assert sweep["factors"] == [0.9, 1.0, 1.1] and len(sweep["segments"]) == 4
    assert sweep["segment_change_percent"][1] == [0.0] * 4  # t = 1 against itself
    assert [r["attention_factor"] for r in data["results"]] == [0.9, 1.0, 1.1]
    assert is_png(plot)


def test_eval_passkey_script(ckpt, tmp_path):
    out, plot = tmp_path / "pk.json", tmp_path / "pk.png"
    proc = run_script("eval_passkey.py", "--ckpt", ckpt, "--lengths", "300,350", "--iterations", "2",
                      "--depths", "0,1", "--max-new-tokens", "4", "--out", out, "--plot", plot)
    data = json.loads(out.read_text())
    assert [(r["length"], r["iterations"]) for r in data["results"]] == [(300, 4), (350, 4)]
    for r in data["results"]:
        assert {"length", "iterations", "correct", "accuracy", "by_depth", "trials"} <= set(r)
        assert r["accuracy"] == r["correct"] / r["iterations"]
    assert "passkey_context" in data and data["config"]["iterations"] == 2
    assert "passkey context" in proc.stdout and is_png(plot)


def load_script(name):
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), ROOT / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scripts_report_bad_input(ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)
    ppl = load_script("eval_perplexity.py")
    with pytest.raises(SystemExit, match=r"error: .*nope.txt: no such file"):
        cli.run_main(ppl.main, ["--ckpt", str(ckpt), "--files", str(tmp_path / "nope.txt"), "--lengths", "32",
                                "--stride", "16", "--device", "cpu"])
    (tmp_path / "short.txt").write_text("Tiny.")
    with pytest.raises(SystemExit, match=r"no document left to score: 1 skipped \(fewer than --min-tokens 100 tokens\)"):
        cli.run_main(ppl.main, ["--ckpt", str(ckpt), "--files", str(tmp_path / "short.txt"), "--lengths", "32",
                                "--stride", "16", "--min-tokens", "100", "--device", "cpu"])
    with pytest.raises(SystemExit, match=r"error: --segment-length 0: must be >= 1"):  # before any checkpoint is read
        cli.run_main(ppl.main, ["--ckpt", str(tmp_path / "no-model"), "--files", str(tmp_path / "short.txt"), "--lengths", "32",
                                "--segment-length", "0", "--device", "cpu"])
    pk = load_script("eval_passkey.py")
    with pytest.raises(SystemExit, match=r"error: passkey length 20: shorter than the prompt"):
        cli.run_main(pk.main, ["--ckpt", str(ckpt), "--lengths", "20", "--device", "cpu"])
    with pytest.raises(SystemExit, match="no lengths"):
        cli.run_main(pk.main, ["--ckpt", str(ckpt), "--device", "cpu"])
