"""The data tool and the training loader, against brute-force recomputation."""
import json

import numpy as np
import pytest
import sentencepiece as spm

from conftest import make_corpus
import yarn_minimal.__main__ as commands
from yarn_minimal import data


def write_inputs(folder):
    """Documents in all three input types; returns (paths in input order, texts in that order)."""
    lines = make_corpus(60, seed=3).split("\n")
    (folder / "a.txt").write_text(" ".join(lines[:10]))
    (folder / "b.jsonl").write_text("".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(lines[10:40])))
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"body": lines[40:], "n": list(range(20))}), folder / "c.parquet")
    return [folder / "b.jsonl", folder / "a.txt", folder / "c.parquet"], lines[10:40] + [" ".join(lines[:10])] + lines[40:]


def brute_force_stream(texts, tokenizer_path):
    sp = spm.SentencePieceProcessor(model_file=tokenizer_path)  # sentencepiece itself, not our wrapper
    stream = []
    for t in texts:
        stream += [1] + sp.encode(t) + [2]
    return np.array(stream)


def test_prepare_bookends_segments_and_determinism(tmp_path, tokenizer_path):
    paths, texts = write_inputs(tmp_path)
    args = ["--tokenizer", tokenizer_path, "--seq-len", "50", "--text-field", "body"] + [str(p) for p in paths]
    commands.main(["data", *args, "--out", str(tmp_path / "d1")])
    commands.main(["data", *args, "--out", str(tmp_path / "d2")])
    segs, meta = data.open_segments(tmp_path / "d1")
    stream = brute_force_stream(texts, tokenizer_path)
    assert meta["n_segments"] == len(stream) // 50 == segs.shape[0] and meta["n_documents"] == len(texts)
    np.testing.assert_array_equal(np.asarray(segs).reshape(-1), stream[:segs.size])  # no token lost or reordered
    assert (stream == 1).sum() == (stream == 2).sum() == len(texts)  # one BOS and one EOS per document
    assert meta["bos_id"] == 1 and meta["eos_id"] == 2 and meta["n_tokens_dropped"] == len(stream) % 50
    assert (tmp_path / "d1" / "tokens.bin").read_bytes() == (tmp_path / "d2" / "tokens.bin").read_bytes()
    assert not list((tmp_path / "d1").glob("*.tmp"))


def test_prepare_errors_name_the_problem(tmp_path, tokenizer_path):
    (tmp_path / "x.jsonl").write_text(json.dumps({"content": "hello"}) + "\n")
    with pytest.raises(ValueError, match=r"x.jsonl:1: expected an object with a string field 'text'"):
        data.prepare([str(tmp_path / "x.jsonl")], tokenizer_path, 8, tmp_path / "o")
    (tmp_path / "y.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="y.csv: unknown input type"):
        data.prepare([str(tmp_path / "y.csv")], tokenizer_path, 8, tmp_path / "o")
    (tmp_path / "z.txt").write_text("short")
    with pytest.raises(ValueError, match="fewer than one segment"):
        data.prepare([str(tmp_path / "z.txt")], tokenizer_path, 1000, tmp_path / "o")


def numbered_segments(n, length):
    return np.arange(n * length, dtype=np.int64).reshape(n, length)  # every token unique


@pytest.mark.parametrize("world, micro", [(1, 1), (2, 1), (3, 2)])
def test_loader_shards_without_overlap(world, micro):
    n, G = 27, 6
    segs = numbered_segments(n, 9)
    loaders = [data.SegmentLoader(segs, G, micro, rank=r, world_size=world, seed=5) for r in range(world)]
    assert loaders[0].steps_per_epoch == n // G and loaders[0].accumulation_steps == G // world // micro
    for epoch in range(2):
        seen = []
        for k in range(n // G):
            step = epoch * (n // G) + k
            rows = []
            for ld in loaders:
                for inputs, targets in ld.micro_batches(step):
                    assert inputs.shape == targets.shape == (micro, 8)
                    assert (targets[:, :-1] == inputs[:, 1:]).all()  # next token, same segment
                    rows += (inputs[:, 0] // 9).tolist()
            assert len(rows) == G
            seen += rows
        assert len(seen) == len(set(seen)) == (n // G) * G  # each segment at most once per epoch
        if epoch == 0:
            first = seen
    assert first != seen  # a new order in the next epoch


def test_loader_resume_and_seed():
    segs = numbered_segments(20, 4)
    a = data.SegmentLoader(segs, 4, seed=1)
    b = data.SegmentLoader(segs, 4, seed=1)  # a fresh loader, as after a restart
    c = data.SegmentLoader(segs, 4, seed=2)
    assert [a.global_indices(s).tolist() for s in range(12)] == [b.global_indices(s).tolist() for s in range(12)]
    assert a.global_indices(7).tolist() != c.global_indices(7).tolist()
    # within an epoch the batches are consecutive slices of one permutation
    perm = np.random.default_rng([1, 1]).permutation(20)
    assert a.global_indices(6).tolist() == perm[4:8].tolist()


def test_loader_clear_errors():
    segs = numbered_segments(10, 8)
    with pytest.raises(ValueError, match="fewer than one global batch of 16"):
        data.SegmentLoader(segs, 16)
    with pytest.raises(ValueError, match="--seq-len 9 is longer than the data's segments \\(8 tokens\\)"):
        data.SegmentLoader(segs, 4, seq_len=9)
    with pytest.raises(ValueError, match="not divisible by the world size 3"):
        data.SegmentLoader(segs, 4, world_size=3)
    with pytest.raises(ValueError, match="--micro-batch-size 3"):
        data.SegmentLoader(segs, 4, micro_batch=3)
