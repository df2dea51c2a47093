"""tokenizer.py and the tokenizer side of checkpoint folders, against transformers' own
tokenizer on the same files: BOS/EOS ids, whether BOS is added, ids and decoded text. A small
byte-level BPE (the kind SmolLM2, Llama 3 and GPT-2 use) is trained here in a second."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import yarn_minimal
from conftest import make_corpus
from test_evaluation import check_passkey_prompts
from yarn_minimal.checkpoint import CheckpointError
from yarn_minimal.model import ModelArgs, Transformer
from yarn_minimal.rope import RopeConfig
from yarn_minimal.tokenizer import HFTokenizer, open_tokenizer

ROOT = Path(__file__).resolve().parent.parent
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
    model.init_weights(seed=0)
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


def run(script, *args):
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


def test_generate_script_with_tokenizer_json_and_bos_flags(bpe_model):
    for flags in ([], ["--bos"], ["--no-bos"]):
        proc = run("generate.py", "--ckpt", str(bpe_model), "--prompt", "The pass key is", "--max-new-tokens", "4",
                   "--ignore-eos", *flags)
        assert proc.returncode == 0, proc.stderr
        n = len(open_tokenizer(bpe_model).encode("The pass key is", bos=False)) + (flags == ["--bos"])
        assert f"{n} prompt tokens" in proc.stderr


def test_scripts_show_the_new_flags():
    for script in ("generate.py", "eval_passkey.py", "eval_perplexity.py"):
        out = run(script, "--help").stdout
        assert "--bos, --no-bos" in out, script
    assert "--ignore-eos" in run("generate.py", "--help").stdout
