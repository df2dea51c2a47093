"""tokenizer.py and the tokenizer side of checkpoint folders, against transformers' own
tokenizer on the same files: BOS/EOS ids, whether BOS is added, ids and decoded text. A small
byte-level BPE (the kind SmolLM2, Llama 3 and GPT-2 use) is trained here in a second."""
import json
import shutil
import warnings
from pathlib import Path

import pytest

import yarn_minimal
from yarn_minimal import training
from conftest import make_corpus
from test_evaluation import check_passkey_prompts, load_script
from yarn_minimal.checkpoint import CheckpointError
from yarn_minimal.model import ModelArgs, Transformer
from yarn_minimal.rope import RopeConfig
from yarn_minimal.tokenizer import HFTokenizer, open_tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|eot|>"]  # ids 0..3
TEXT = "Unicode HOWTO: caf\u00e9, na\u00efve \u2014 \u65e5\u672c\u8a9e.\nThe pass key is 12345.  Two  spaces\tand a tab."


def train_bpe(path: Path, bos_template: bool = False) -> Path:
    """A byte-level BPE tokenizer.json; with bos_template its post-processor adds <|im_start|>
    the way Llama 3's adds <|begin_of_text|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(make_corpus().splitlines(), trainer)
    if bos_template:
        tok.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    return path


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj))


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    return train_bpe(tmp_path_factory.mktemp("bpe"))


@pytest.fixture()
def folder(bpe_dir, tmp_path):
    shutil.copy(bpe_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    return tmp_path


def hf_tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


# ---------------------------------------------------------------------------------------
# BOS / EOS / add_bos: as stated by the folder, and as transformers reads them
# ---------------------------------------------------------------------------------------

ADDED_TOKEN = {"__type": "AddedToken", "content": "<|im_start|>", "lstrip": False, "normalized": False,
               "rstrip": False, "single_word": False, "special": True}  # the dict form older configs carry


@pytest.mark.parametrize("bos_token", ["<|im_start|>", ADDED_TOKEN])
def test_special_tokens_from_tokenizer_config_match_transformers(folder, bos_token):
    write_json(folder / "tokenizer_config.json", {"bos_token": bos_token, "eos_token": "<|im_end|>",
                                                  "add_bos_token": True, "tokenizer_class": "PreTrainedTokenizerFast"})
    tok, ref = open_tokenizer(folder), hf_tokenizer(folder)
    assert (tok.bos_id, tok.eos_id, tok.eos_ids, tok.add_bos) == (ref.bos_token_id, ref.eos_token_id, (2,), True)
    # (transformers 5's TokenizersBackend does not apply add_bos_token to a byte-level
    # tokenizer.json, as LlamaTokenizer does; we follow the config, so BOS is compared by hand)
    assert tok.encode(TEXT, bos=tok.add_bos) == [ref.bos_token_id] + ref(TEXT, add_special_tokens=False).input_ids
    assert tok.decode(tok.encode(TEXT, bos=False)) == ref.decode(ref(TEXT, add_special_tokens=False).input_ids) == TEXT


@pytest.mark.parametrize("bos_template", [False, True])
def test_add_bos_without_tokenizer_config_follows_the_post_processor(tmp_path, bos_template):
    """No add_bos_token anywhere: the checkpoint's own encoding decides (SmolLM2: no BOS;
    Llama 3: the template adds it), exactly what transformers' tokenizer does."""
    folder = train_bpe(tmp_path, bos_template)
    write_json(folder / "tokenizer_config.json", {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                                                  "tokenizer_class": "PreTrainedTokenizerFast"})
    tok, ref = open_tokenizer(folder), hf_tokenizer(folder)
    assert tok.add_bos == bos_template
    assert tok.encode(TEXT, bos=tok.add_bos) == ref(TEXT).input_ids


def test_generation_config_eos_list_and_precedence(folder):
    """tokenizer_config's tokens win for bos_id/eos_id (what the tokenizer itself uses);
    generation_config's eos list (Llama 3.1 Instruct's three) is where generation stops,
    config.json only where generation_config says nothing."""
    write_json(folder / "tokenizer_config.json", {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"})
    write_json(folder / "generation_config.json", {"bos_token_id": 0, "eos_token_id": [0, 3]})
    write_json(folder / "config.json", {"bos_token_id": 1, "eos_token_id": 1})
    tok = open_tokenizer(folder)
    assert (tok.bos_id, tok.eos_id, tok.eos_ids) == (1, 2, (2, 0, 3))
    (folder / "tokenizer_config.json").unlink()
    tok = open_tokenizer(folder)  # generation_config's first id, then its list
    assert (tok.bos_id, tok.eos_id, tok.eos_ids, tok.add_bos) == (0, 0, (0, 3), False)
    (folder / "generation_config.json").unlink()
    tok = open_tokenizer(folder)
    assert (tok.bos_id, tok.eos_id, tok.eos_ids) == (1, 1, (1,))


def test_nothing_stated_means_no_bos_and_no_eos(folder):
    tok = open_tokenizer(folder)
    assert (tok.bos_id, tok.eos_id, tok.eos_ids, tok.add_bos) == (None, None, (), False)
    with pytest.raises(ValueError, match="has no BOS token; encode with bos=False"):
        tok.encode("a", bos=True)


def test_bad_special_tokens(folder):
    write_json(folder / "tokenizer_config.json", {"bos_token": "<s>"})
    with pytest.raises(ValueError, match=r"tokenizer_config.json: bos_token '<s>' is not a token of tokenizer.json"):
        open_tokenizer(folder)
    write_json(folder / "tokenizer_config.json", {"add_bos_token": True})
    with pytest.raises(ValueError, match="asks for BOS at the start .* but states no BOS token"):
        open_tokenizer(folder)


def test_missing_tokenizer_lists_what_was_looked_for(tmp_path):
    (tmp_path / "model").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer; looked for tokenizer.model and tokenizer.json in the "
                                                "folder and tokenizer.model in its parent"):
        open_tokenizer(tmp_path / "model")


def test_sentencepiece_folder_keeps_its_header_and_adds_bos(tokenizer_path, tmp_path):
    shutil.copy(tokenizer_path, tmp_path / "tokenizer.model")
    tok = open_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.eos_ids, tok.add_bos) == (1, 2, (2,), True)  # Meta's Llama 2 convention
    write_json(tmp_path / "tokenizer_config.json", {"add_bos_token": False, "eos_token": "</s>"})
    write_json(tmp_path / "generation_config.json", {"eos_token_id": [2, 0]})
    tok = open_tokenizer(tmp_path)
    assert (tok.add_bos, tok.eos_ids) == (False, (2, 0))


def test_passkey_prompts_with_byte_level_bpe(folder):
    """Passkey prompts need no sentencepiece byte token: exact length and key depth with BPE."""
    write_json(folder / "tokenizer_config.json", {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"})
    tok = open_tokenizer(folder)
    check_passkey_prompts(tok, bos=True)
    check_passkey_prompts(tok, bos=False)


# ---------------------------------------------------------------------------------------
# Model folders with tokenizer.json: load, the vocabulary rule, save round trips, EOS stops
# ---------------------------------------------------------------------------------------

def tiny_hf_folder(folder: Path, vocab_size: int) -> Path:
    """A tiny random model saved in HF's layout beside the BPE tokenizer of `folder`."""
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=vocab_size, multiple_of=16,
                                  rope=RopeConfig(original_length=64)))
    training.init_weights(model, seed=0)
    tok = open_tokenizer(folder)
    out = folder / "model"
    yarn_minimal.save(model, tok, out, format="hf")
    return out


@pytest.fixture()
def bpe_model(folder):
    write_json(folder / "tokenizer_config.json", {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                                                  "add_bos_token": False})
    write_json(folder / "generation_config.json", {"eos_token_id": [2, 3]})
    return tiny_hf_folder(folder, vocab_size=448)  # embedding padded past the 400 ids: allowed


def test_hf_folder_with_tokenizer_json_round_trips(bpe_model, tmp_path):
    model, tok = yarn_minimal.load(bpe_model)
    assert isinstance(tok, HFTokenizer) and model.args.vocab_size == 448
    assert (tok.bos_id, tok.eos_id, tok.eos_ids, tok.add_bos) == (1, 2, (2, 3), False) and model.eos_ids == (2, 3)
    cfg = json.loads((bpe_model / "config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, [2, 3])
    ref = hf_tokenizer(bpe_model)  # transformers reads the saved tokenizer files the same way
    assert (ref.bos_token_id, ref.eos_token_id) == (tok.bos_id, tok.eos_id)
    assert tok.encode(TEXT, bos=tok.add_bos) == ref(TEXT).input_ids
    for fmt in ("meta", "hf"):
        yarn_minimal.save(model, tok, tmp_path / fmt, format=fmt)
        _, again = yarn_minimal.load(tmp_path / fmt)
        assert (again.bos_id, again.eos_id, again.eos_ids, again.add_bos) == (1, 2, (2, 3), False)
        assert again.encode(TEXT) == tok.encode(TEXT)


def test_gguf_keeps_end_ids_past_eos(folder, tmp_path):
    """generation_config.json's second end id survives GGUF as llama.cpp's end-of-turn key (read
    back with gguf's own reader, and by load); further ones go to end of message, a token named
    "eom" first; one more than that is said, not dropped silently."""
    from gguf import GGUFReader

    from yarn_minimal.formats.gguf import tokenizer_metadata

    write_json(folder / "generation_config.json", {"eos_token_id": [2, 3]})
    model, tok = yarn_minimal.load(tiny_hf_folder(folder, vocab_size=400))  # GGUF: one row per token
    yarn_minimal.save(model, tok, tmp_path / "model.gguf", format="gguf")
    field = GGUFReader(tmp_path / "model.gguf").fields["tokenizer.ggml.eot_token_id"]
    assert int(field.parts[field.data[0]][0]) == 3 and tok.piece(3) == "<|eot|>"
    _, again = yarn_minimal.load(tmp_path / "model.gguf")
    assert (again.eos_id, again.eos_ids) == (2, (2, 3))

    def ends(eos_ids):
        tok.set_special_tokens(1, 2, eos_ids, False)
        meta = tokenizer_metadata(tok)
        return {k.split(".")[-1]: v[0] for k, v in meta.items() if k.endswith(("eot_token_id", "eom_token_id"))}

    tok.tok.add_special_tokens(["<|eom_id|>"])
    eom = tok.tok.token_to_id("<|eom_id|>")
    assert ends([2]) == {}
    assert ends([2, 0]) == {"eot_token_id": 0}
    assert ends([2, 0, 3]) == {"eot_token_id": 0, "eom_token_id": 3}
    assert ends([2, eom, 3]) == ends([2, 3, eom]) == {"eot_token_id": 3, "eom_token_id": eom}
    with pytest.warns(UserWarning, match=r"end ids \[1\] have no GGUF key"):
        assert ends([2, 0, 3, 1]) == {"eot_token_id": 0, "eom_token_id": 3}


def test_tokenizer_ids_beyond_the_embedding_are_an_error(folder):
    path = tiny_hf_folder(folder, vocab_size=300)
    with pytest.raises(CheckpointError, match=r"tokenizer.json: tokenizer has ids up to 399 \(400 pieces\), but "
                                              r".*config.json gives the model's embedding 300 rows; expected at least 400"):
        yarn_minimal.load(path)


def test_generation_stops_at_any_eos_unless_told_not_to(bpe_model):
    model, tok = yarn_minimal.load(bpe_model)
    prompt = tok.encode("The pass key is", bos=False)
    free = yarn_minimal.generate(model, prompt, 12, ignore_eos=True)  # the greedy continuation
    k = next(i for i in range(1, len(free)) if free[i] not in free[:i])  # a token first produced at step k
    unused = next(i for i in range(400) if i not in free)
    model.eos_ids = (unused, free[k])  # the checkpoint's own EOS ids: the default stop set
    assert yarn_minimal.generate(model, prompt, 12) == free[:k]
    model.eos_ids = ()
    assert yarn_minimal.generate(model, prompt, 12, eos_id=[unused, free[k]]) == free[:k]
    assert yarn_minimal.generate(model, prompt, 12, eos_id=free[k]) == free[:k]
    model.eos_ids = (free[k],)
    assert yarn_minimal.generate(model, prompt, 12, ignore_eos=True) == free
    assert yarn_minimal.generate(model, prompt, 12, eos_id=[]) == free  # an explicit empty list: no stop ids


def test_generate_script_with_tokenizer_json_and_bos_flags(bpe_model, capsys, monkeypatch):
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # main() sets its own
    generate = load_script("generate.py")
    n = len(open_tokenizer(bpe_model).encode("The pass key is", bos=False))
    for flags, bos in (([], False), (["--bos"], True), (["--no-bos"], False)):  # the folder says no BOS
        generate.main(["--ckpt", str(bpe_model), "--prompt", "The pass key is", "--max-new-tokens", "4",
                       "--ignore-eos", "--device", "cpu", *flags])
        assert f"{n + bos} prompt tokens" in capsys.readouterr().err


def test_scripts_show_the_new_flags(capsys):
    for script in ("generate.py", "eval_passkey.py", "eval_perplexity.py"):
        with pytest.raises(SystemExit):
            load_script(script).parse_args(["--help"])
        out = capsys.readouterr().out
        assert "--bos, --no-bos" in out and "checkpoint's own setting" in out, script
        assert script != "generate.py" or "--ignore-eos" in out


@pytest.mark.parametrize("W, S", [(16, 4), (16, 15), (40, 8)])
def test_perplexity_without_bos_matches_transformers(W, S):
    """--no-bos windows: [tokens[begin:end]] alone, every token after the window's first one
    scored once (by the first window that reaches it), each from one transformers forward over
    its window on the same weights."""
    import numpy as np

    from hf_oracle import hf_model
    from test_evaluation import hf_token_nll, random_docs
    from test_model import L, tiny_model
    from yarn_minimal import evaluation as ev

    model = tiny_model(RopeConfig(method="yarn", scale=2.0, original_length=L))
    hf = hf_model(model, max_position_embeddings=L)
    docs = random_docs([40, 23])
    scores = ev.score_documents(model, docs, None, W, S)
    total, count = 0.0, 0
    for doc, ours in zip(docs, scores.token_nll):
        ref, reached = {}, 0
        for begin in range(0, len(doc), S):
            end = min(begin + W - 1, len(doc))
            full = hf_token_nll(hf, doc[begin:end])  # full[j] predicts doc[begin + j + 1]
            for i in range(max(begin + 1, reached), end):
                ref[i] = full[i - begin - 1]
            reached = max(reached, end)
            if end == len(doc):
                break
        assert sorted(np.flatnonzero(np.isfinite(ours))) == sorted(ref) and 0 not in ref
        assert max(abs(ours[i] - v) for i, v in ref.items()) < 1e-4
        total, count = total + sum(ref.values()), count + len(ref)
    assert scores.tokens == count
    assert scores.perplexity == pytest.approx(np.exp(total / count), rel=1e-5)
