"""Training data and training from scratch with every tokenizer the project reads: a .gguf file's
vocabulary, a Hugging Face folder with tokenizer.json, a sentencepiece model; and saving a
tokenizer keeps its BOS/EOS ids and add_bos.

Oracles: transformers' own tokenizer read from the SmolLM2 GGUF (and from the tokenizer.json
folder it writes), sentencepiece itself, and the ids and settings each test writes into the
tokenizer's config files."""
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

import train
import yarn_minimal
from conftest import smollm2_gguf
import yarn_minimal.__main__ as commands
from yarn_minimal import data
from yarn_minimal.checkpoint import load_tokenizer
from yarn_minimal.cli import DEFAULT_CKPT
from yarn_minimal.model import ModelArgs, Transformer
from yarn_minimal.tokenizer import HFTokenizer

REPO = Path(__file__).resolve().parent.parent
TEXT = (REPO / "demo" / "heldout-sample.txt").read_text()  # Python's Unicode HOWTO: real prose, digits, symbols
SEQ = 64


def documents(digits: bool) -> list[str]:
    """Twelve paragraphs of real text. transformers' GGUF tokenizer leaves out the file's digit
    split (test_gguf.py says why), so the GGUF comparison uses text without digits."""
    paragraphs = [p for p in TEXT[:9000].split("\n\n") if len(p) > 80][:12]
    return paragraphs if digits else ["".join(c for c in p if not c.isdigit()) for p in paragraphs]


def write_inputs(folder: Path, docs: list[str]) -> list[str]:
    """The first document as a .txt file, the rest as .jsonl lines: read in that order."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.txt").write_text(docs[0])
    (folder / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[1:]))
    return [str(folder / "a.txt"), str(folder / "b.jsonl")]


def hf_stream(hf, docs: list[str], bos: bool = None) -> np.ndarray:
    """transformers' ids of each document, with its own special tokens (bos=None: whatever its
    tokenizer adds), then EOS: the stream the data tool must write."""
    stream = []
    for d in docs:
        ids = hf(d, add_special_tokens=bos is None)["input_ids"]
        stream += ([hf.bos_token_id] if bos else []) + ids + [hf.eos_token_id]
    return np.array(stream)


def assert_segments_are(folder: Path, stream: np.ndarray) -> dict:
    segs, meta = data.open_segments(folder)
    assert segs.shape == (len(stream) // SEQ, SEQ)
    np.testing.assert_array_equal(np.asarray(segs).reshape(-1), stream[:segs.size])  # no id lost, changed or moved
    return meta


@pytest.fixture(scope="module")
def smollm2_folder(tmp_path_factory, hf_smollm2_tokenizer):
    """A Hugging Face tokenizer folder written by transformers from the GGUF: tokenizer.json and
    tokenizer_config.json (<|im_start|> / <|im_end|>), as a downloaded model folder holds them."""
    folder = tmp_path_factory.mktemp("smollm2-hf")
    hf_smollm2_tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def gguf_data(tmp_path_factory, hf_smollm2_tokenizer):
    """Documents tokenized with the GGUF file's vocabulary: (folder, documents)."""
    tmp = tmp_path_factory.mktemp("gguf-data")
    docs = documents(digits=False)
    commands.main(["data", *write_inputs(tmp / "in", docs),"--tokenizer", str(smollm2_gguf()), "--seq-len", str(SEQ),
                                                "--out", str(tmp / "data")])
    return tmp / "data", docs


def test_data_from_a_gguf_tokenizer_holds_transformers_ids(gguf_data, hf_smollm2_tokenizer):
    folder, docs = gguf_data
    hf = hf_smollm2_tokenizer
    meta = assert_segments_are(folder, hf_stream(hf, docs))
    adds_bos = hf("x")["input_ids"][0] == hf.bos_token_id  # SmolLM2: no BOS, so doc EOS doc EOS ...
    assert (meta["tokenizer"], meta["tokenizer_kind"]) == (str(smollm2_gguf().resolve()), "gguf")
    assert (meta["bos_id"], meta["eos_id"], meta["add_bos"], meta["vocab_size"]) == \
        (hf.bos_token_id, hf.eos_token_id, adds_bos, len(hf))


@pytest.mark.parametrize("given, bos", [("folder", None), ("tokenizer.json", True)])
def test_data_from_a_tokenizer_json_folder_holds_transformers_ids(smollm2_folder, tmp_path, given, bos):
    """The folder or its tokenizer.json (BOS/EOS from tokenizer_config.json beside it), with
    digits; --bos puts transformers' BOS before every document."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(smollm2_folder))
    docs = documents(digits=True)
    path = smollm2_folder if given == "folder" else smollm2_folder / "tokenizer.json"
    commands.main(["data", *write_inputs(tmp_path / "in", docs),"--tokenizer", str(path), "--seq-len", str(SEQ),
                                                     "--out", str(tmp_path / "d")] + (["--bos"] if bos else []))
    meta = assert_segments_are(tmp_path / "d", hf_stream(hf, docs, bos))
    assert (meta["tokenizer_kind"], meta["add_bos"], meta["bos_id"], meta["eos_id"]) == \
        ("tokenizer.json", bool(bos), hf.bos_token_id, hf.eos_token_id)


def test_data_from_a_tokenizer_model_follows_its_folders_config(tokenizer_path, tmp_path):
    """A tokenizer.model whose folder says add_bos_token: false gives doc EOS doc EOS (sentencepiece's
    own ids, EOS 2 from its header)."""
    shutil.copy(tokenizer_path, tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    docs = documents(digits=True)
    data.prepare(write_inputs(tmp_path / "in", docs), tmp_path / "tokenizer.model", SEQ, tmp_path / "d", progress=False)
    sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
    meta = assert_segments_are(tmp_path / "d", np.array([i for d in docs for i in sp.encode(d) + [2]]))
    assert (meta["tokenizer_kind"], meta["add_bos"], meta["eos_id"]) == ("sentencepiece", False, 2)


def scratch_flags(tokenizer, data_dir, out):
    return ["--init", "random", "--tokenizer", str(tokenizer), "--dim", "32", "--n-layers", "1", "--n-heads", "2",
            "--multiple-of", "16", "--method", "none", "--original-length", "32", "--data", str(data_dir),
            "--seq-len", "33", "--out", str(out), "--steps", "2", "--global-batch-size", "2", "--lr", "1e-3",
            "--save-every", "0"]


def test_from_scratch_with_a_tokenizer_json_saves_it_with_the_model(gguf_data, smollm2_folder, tmp_path):
    """Data from the GGUF's vocabulary trains a model whose tokenizer is the same vocabulary's
    tokenizer.json (transformers wrote it): accepted, and OUT/final carries that tokenizer."""
    from transformers import AutoTokenizer

    train.main(scratch_flags(smollm2_folder / "tokenizer.json", gguf_data[0], tmp_path / "run"))
    final = tmp_path / "run" / "final"
    model, tok = yarn_minimal.load(final)
    hf = AutoTokenizer.from_pretrained(str(smollm2_folder))
    assert isinstance(tok, HFTokenizer) and (final / "tokenizer.json").is_file()
    assert model.args.vocab_size == len(hf) == 49152
    assert (tok.bos_id, tok.eos_id, tok.eos_ids, tok.add_bos) == (hf.bos_token_id, hf.eos_token_id,
                                                                  (hf.eos_token_id,), False)
    for text in (TEXT[:3000], "<|im_start|>user\nHi there<|im_end|>\n"):
        assert tok.encode(text) == hf(text)["input_ids"]
        assert AutoTokenizer.from_pretrained(str(final))(text)["input_ids"] == hf(text)["input_ids"]


def test_data_with_another_vocabulary_is_refused(gguf_data, smollm2_folder, tokenizer_path, tmp_path):
    """The size differs (a 384-piece sentencepiece model), or only the vocabulary does (two
    tokens of the same tokenizer.json swapped): one line, before --out exists. The same for a
    checkpoint to fine-tune (the demo model's 4096-piece tokenizer)."""
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    spec = json.loads((smollm2_folder / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["the"], vocab["and"] = vocab["and"], vocab["the"]
    (swapped / "tokenizer.json").write_text(json.dumps(spec))
    for tokenizer, ids in ((tokenizer_path, 384), (swapped / "tokenizer.json", 49152)):
        with pytest.raises(SystemExit) as e:
            train.main(scratch_flags(tokenizer, gguf_data[0], tmp_path / "run"))
        assert re.fullmatch(rf"error: .*meta.json: tokenized with .*\.gguf \(49152 ids\), whose vocabulary is not the "
                            rf"model's \(.*, {ids} ids\); prepare the data with the model's tokenizer \(--tokenizer .*\)",
                            str(e.value.code))
        assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit, match=r"whose vocabulary is not the model's \(.*yarn-demo.*tokenizer.model, 4096 ids\)"):
        train.main(["--ckpt", str(DEFAULT_CKPT), "--data", str(gguf_data[0]), "--seq-len", "33",
                    "--out", str(tmp_path / "run"), "--steps", "1", "--global-batch-size", "2"])


def test_saved_tokenizer_keeps_its_bos_eos_and_add_bos(tokenizer_path, tmp_path):
    """A sentencepiece checkpoint whose folder states add_bos_token: false and other BOS/EOS ids
    than the model's header (1 and 2) comes back from every saved layout with the same ids and
    add_bos; the files say so in the keys transformers and llama.cpp read (transformers cannot
    read a sentencepiece model here: it needs protobuf)."""
    from gguf import GGUFReader

    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(tokenizer_path, src / "tokenizer.model")
    (src / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False, "bos_token": "</s>",
                                                           "eos_token": "<unk>"}))
    tok = load_tokenizer(src)
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (2, 0, False)  # as the config states, not the header
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=tok.vocab_size, multiple_of=16))
    for fmt, path in (("meta", tmp_path / "meta"), ("hf", tmp_path / "hf"), ("gguf", tmp_path / "m.gguf")):
        yarn_minimal.save(model, tok, path, format=fmt)
        _, again = yarn_minimal.load(path)
        assert (again.bos_id, again.eos_id, again.add_bos) == (2, 0, False), fmt
        assert again.encode("the pass key") == tok.encode("the pass key") == tok.encode("the pass key", bos=False)
    for fmt in ("meta", "hf"):
        config = json.loads((tmp_path / fmt / "tokenizer_config.json").read_text())
        assert (config["bos_token"], config["eos_token"], config["add_bos_token"]) == ("</s>", "<unk>", False)
    fields = GGUFReader(str(tmp_path / "m.gguf")).fields
    assert [fields[f"tokenizer.ggml.{k}"].contents() for k in ("bos_token_id", "eos_token_id", "add_bos_token")] \
        == [2, 0, False]


def test_bad_tokenizer_paths_are_one_line(tmp_path, smollm2_folder):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("not a tokenizer")
    (tmp_path / "fake.gguf").write_bytes(b"not a gguf file at all")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{\"model\": 1}")
    doc = tmp_path / "doc.txt"
    doc.write_text(TEXT)
    cases = {"missing": "no such file or folder; a tokenizer is a model folder, a sentencepiece .model, a Hugging "
                        "Face tokenizer.json or a .gguf file",
             "empty": "no tokenizer; looked for tokenizer.model and tokenizer.json in the folder",
             "notes.txt": "not a tokenizer file \\(suffix '.txt'\\)",
             "fake.gguf": "cannot be read as GGUF",
             "bad/tokenizer.json": "not a readable Hugging Face tokenizer.json"}
    for name, message in cases.items():
        with pytest.raises((ValueError, OSError)) as e:
            commands.main(["data", str(doc), "--tokenizer", str(tmp_path / name), "--seq-len", "8", "--out",
                           str(tmp_path / "o")])
        line = f"error: {e.value}"  # what cli.run_main prints
        assert "\n" not in line and re.match(rf"error: {re.escape(str(tmp_path / name))}: {message}", line), line
        assert not (tmp_path / "o").exists()
    (tmp_path / "d").mkdir()
    data.write_segments(tmp_path / "d", np.zeros((2, 34), dtype=np.int64), dict(vocab_size=49152))
    with pytest.raises(SystemExit, match=rf"^error: {re.escape(str(tmp_path / 'missing'))}: no such file or folder"):
        train.main(scratch_flags(tmp_path / "missing", tmp_path / "d", tmp_path / "run"))
