"""Issue 22: every bad value gets one line, and so does Ctrl-C at any moment.

A bad flag names the flag, a bad config.json / params.json / rope.json key names the file and
the key, each with what was expected and what was found; a request whose KV cache could never
fit is refused before anything is allocated, with the figure; the cache grows with the
sequence instead of being sized for --max-new-tokens; Ctrl-C while a script is still importing
torch prints `interrupted` and exits 130. Scripts run in-process through cli.run_main (what their
`__main__` calls), except the Ctrl-C cases, which need a real process to signal."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import yarn_minimal
import yarn_minimal.model as model_module
from yarn_minimal import cli, ctrl_c, sizing, training
from yarn_minimal.checkpoint import CheckpointError
from yarn_minimal.cli import DEFAULT_CKPT
from yarn_minimal.generation import GenerationConfig, check_request, generate
from yarn_minimal.model import KVCache, ModelArgs, Transformer
from yarn_minimal.rope import RopeConfig

from conftest import run_cli as run  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import eval_passkey  # noqa: E402
import eval_perplexity  # noqa: E402
import generate as generate_script  # noqa: E402
import train  # noqa: E402


def one_error_line(code, err, *words) -> str:
    """The failure is one line `error: ...`, the last of stderr (progress lines may precede it)."""
    assert code not in (0, None), err
    assert "Traceback" not in err and "usage:" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and err.rstrip("\n").endswith(lines[0]), err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


# ---------------------------------------------------------------------------------------
# Ctrl-C at any moment, including while torch is being imported
# ---------------------------------------------------------------------------------------

ENTRIES = [["generate.py"], ["eval_passkey.py"], ["eval_perplexity.py"], ["train.py"], ["-m", "yarn_minimal", "rope"],
           ["-m", "yarn_minimal", "convert"], ["-m", "yarn_minimal", "data"]]


@pytest.mark.parametrize("entry", ENTRIES, ids=" ".join)
def test_ctrl_c_while_importing_is_one_line(entry):
    # Ctrl-C once the script has begun to import torch (which takes a second or more): that
    # printed a 75-line KeyboardInterrupt traceback. Waiting for torch's files to appear in the
    # process's memory map (libtorch), rather than a fixed time, keeps the test right on a loaded machine.
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, *entry], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    maps, deadline = Path(f"/proc/{p.pid}/maps"), time.monotonic() + 60
    if not maps.exists():  # no /proc (macOS): a fixed time into the import
        time.sleep(0.3)
    while maps.exists() and "libtorch" not in maps.read_text() and time.monotonic() < deadline:
        assert p.poll() is None, p.communicate()
        time.sleep(0.005)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert (p.returncode, err, out) == (130, "interrupted\n", "")


def test_importing_a_script_leaves_ctrl_c_alone():
    # tests import the scripts: only a script run as a program replaces Python's handler, and
    # run_main hands Ctrl-C back to KeyboardInterrupt before main() runs
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    ctrl_c.exit_quietly("generate")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    try:
        ctrl_c.exit_quietly("__main__")
        assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
        seen = []
        cli.run_main(lambda argv: seen.append(signal.getsignal(signal.SIGINT)), [])
        assert seen == [signal.default_int_handler]
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def test_importing_the_package_starts_no_compiler():
    """`import yarn_minimal` loads no torch (the API is imported on first use), and the modules
    themselves start no torch.compile: rope_op's compiled CUDA form is built on first use."""
    probe = ("import sys, yarn_minimal; print('torch' in sys.modules); "
             "import yarn_minimal.checkpoint, yarn_minimal.generation, yarn_minimal.model; "
             "print('torch._dynamo' in sys.modules, 'torch._inductor' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.split() == ["False", "False", "False"], r.stderr


# ---------------------------------------------------------------------------------------
# Flags: one line naming the flag, the expected and the found value
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, words", [
    (["--yarn-scale", "inf"], ["--yarn-scale", "finite number >= 1", "inf"]),
    (["--yarn-scale", "nan"], ["--yarn-scale", "nan"]),
    (["--yarn-scale", "0.5"], ["--yarn-scale", "0.5"]),
    (["--alpha", "inf"], ["--alpha/--beta", "inf"]),
    (["--beta", "nan"], ["--alpha/--beta", "nan"]),
    (["--attention-factor", "inf"], ["--attention-factor", "inf"]),
    (["--attention-factor", "0"], ["--attention-factor", "0.0"]),
    (["--original-length", "0"], ["--original-length", "positive integer", "0"]),
    (["--original-length", "-5"], ["--original-length", "-5"]),
    (["--method", "yarn"], ["--method yarn", "--yarn-scale", "--dynamic", "s = 1"]),
    (["--method", "pi"], ["--method pi", "--yarn-scale"]),
    (["--device", "tpu"], ["--device tpu", "cpu, cuda or cuda:N"]),
    (["--device", "cuda:x"], ["--device cuda:x"]),
    (["--device", "meta"], ["--device meta"]),
    (["--temperature", "inf"], ["--temperature", "inf"]),
    (["--temperature", "nan"], ["--temperature", "nan"]),
    (["--top-p", "nan"], ["--top-p", "nan"]),
    (["--top-p", "0"], ["--top-p", "0"]),
    (["--seed", str(2 ** 70)], ["--seed", str(2 ** 70)]),
    (["--max-new-tokens", "-1"], ["--max-new-tokens", "-1"]),
    (["--max-new-tokens", "abc"], ["--max-new-tokens", "'abc'"]),
    (["--prefill-chunk", "0"], ["--prefill-chunk", "0"]),
    (["--dtype", "float64"], ["--dtype", "'float64'"]),
])
def test_generate_bad_flag_is_one_line(argv, words, capsys):
    code, out, err = run(generate_script.main, ["--prompt", "hi", "--max-new-tokens", "2", *argv], capsys)
    one_error_line(code, err, *words)
    assert out == ""


def test_the_shared_flags_read_the_same_in_the_eval_scripts(tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text("some words " * 50)
    code, _, err = run(eval_perplexity.main, ["--files", str(doc), "--lengths", "64", "--yarn-scale", "inf"], capsys)
    one_error_line(code, err, "--yarn-scale", "inf")
    code, _, err = run(eval_passkey.main, ["--lengths", "128", "--device", "tpu"], capsys)
    one_error_line(code, err, "--device tpu")


def test_a_scale_or_dynamic_makes_a_method_run():
    # the refusal is only for a method that would run at s = 1; with a scale, dynamic, or a
    # checkpoint fine-tuned at s > 1, the method runs as asked
    plain, tuned = RopeConfig(original_length=256), RopeConfig(method="yarn", scale=16.0, original_length=256)
    assert cli.updated_rope(plain, dict(method="pi", scale=4.0)) == RopeConfig(method="pi", scale=4.0, original_length=256)
    assert cli.updated_rope(plain, dict(method="yarn", dynamic=True)).dynamic
    assert cli.updated_rope(tuned, dict(method="pi")) == RopeConfig(method="pi", scale=16.0, original_length=256)
    assert cli.updated_rope(plain, dict(method="yarn", scale=1.0)).scale == 1.0  # said explicitly
    with pytest.raises(ValueError, match="method yarn without scale or dynamic would run at s = 1"):
        cli.updated_rope(plain, dict(method="yarn"))  # eval_perplexity's --config spells the keys this way


def test_rope_command_refuses_flags_beside_config(capsys):
    from conftest import rope_command as main

    code, out, err = run(main, ["--config", str(DEFAULT_CKPT), "--method", "yarn", "--scale", "4"], capsys)
    one_error_line(code, err, "--config", "--method, --scale", "cannot be combined")
    assert code == 2 and out == ""


def test_rope_command_refuses_a_length_that_changes_nothing(capsys, tmp_path):
    # the demo model's plain RoPE does not depend on the length: --seq-len would be silently unused;
    # an HF dynamic config does (transformers' base grows with it), so there it is taken
    from conftest import rope_command as main

    code, out, err = run(main, ["--config", str(DEFAULT_CKPT), "--seq-len", "1000"], capsys)
    one_error_line(code, err, "--seq-len", str(DEFAULT_CKPT), "static")
    assert code == 2 and out == ""
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
                                  "max_position_embeddings": 256, "rope_scaling": {"type": "dynamic", "factor": 2.0}}))
    code, out, err = run(main, ["--config", str(config), "--seq-len", "1000", "--json"], capsys)
    assert code in (0, None), err
    assert json.loads(out)["inv_freq"] != json.loads(run(main, ["--config", str(config), "--json"], capsys)[1])["inv_freq"]


def test_rope_command_config_json_and_plain_rope(capsys):
    from conftest import rope_command as main

    # the demo model: plain RoPE with b = 10000 and |D| = 256 / 4 = 64 (its params.json)
    code, out, err = run(main, ["--config", str(DEFAULT_CKPT), "--json"], capsys)
    assert code in (0, None), err
    data = json.loads(out)
    assert data["inv_freq"] == pytest.approx([10000 ** (-2 * d / 64) for d in range(32)], rel=1e-12)
    assert data["attention_factor"] == 1.0 and data["scale"] == 1.0
    # --method none alone is plain RoPE (it failed on the default --scale 16 before)
    code, out, err = run(main, ["--method", "none", "--head-dim", "8", "--json"], capsys)
    assert code in (0, None), err
    assert json.loads(out)["inv_freq"] == pytest.approx([10000 ** (-2 * d / 8) for d in range(4)], rel=1e-12)
    for argv, words in [(["--scale", "inf"], ["--scale", "inf"]), (["--head-dim", "7"], ["--head-dim", "7"]),
                        (["--seq-len", "0"], ["--seq-len", "0"]), (["--alpha", "nan"], ["--alpha/--beta", "nan"])]:
        code, _, err = run(main, argv, capsys)
        one_error_line(code, err, *words)


def test_help_names_every_checkpoint_layout(capsys):
    for parse in (generate_script.parse_args, eval_passkey.parse_args, eval_perplexity.parse_args, train.parse_args):
        with pytest.raises(SystemExit):
            parse(["--help"])
        text = " ".join(capsys.readouterr().out.split())
        for layout in ("params.json + consolidated.*.pth", "config.json + *.safetensors", "rope.json", ".gguf"):
            assert layout in text, (parse.__module__, layout)


def test_run_main_keeps_a_long_message_to_its_first_line(capsys):
    def torch_like(argv):
        raise RuntimeError("something failed\nException raised from foo at bar.cpp:12\nframe #0: ...")

    code, _, err = run(torch_like, [], capsys)
    assert one_error_line(code, err) == "error: RuntimeError: something failed (--debug shows the traceback)"


# ---------------------------------------------------------------------------------------
# Memory: the cache grows with the sequence; an impossible request is refused up front
# ---------------------------------------------------------------------------------------

L = 16


def tiny_model(rope: RopeConfig, n_layers: int = 2, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(dim=32, n_layers=n_layers, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=16,
                                  rope=rope))
    training.init_weights(model, std=0.1)
    return model.eval()


def cache_bytes(cache: KVCache) -> int:
    """What a cache holds in memory, measured on its tensors."""
    return sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values))


def test_cache_grows_with_the_sequence_not_with_max_len():
    model = tiny_model(RopeConfig(method="yarn", dynamic=True, original_length=L))
    cache = KVCache(model.args, 1, 300_000)
    assert cache_bytes(cache) == 0
    with torch.no_grad():
        model(torch.randint(0, 96, (1, 10)), cache=cache)
    # 2 layers x (keys + values) x 2 kv heads x 8 dims x 4 bytes = 256 bytes a position
    assert cache.capacity == model_module.CACHE_CHUNK and cache_bytes(cache) == 256 * model_module.CACHE_CHUNK
    assert cache_bytes(cache) * 70 < 256 * 300_000


@pytest.mark.parametrize("rope", [RopeConfig(method="yarn", scale=2.0, original_length=L),
                                  RopeConfig(method="yarn", dynamic=True, original_length=L),
                                  RopeConfig(method="ntk", dynamic=True, original_length=L)], ids=["static", "dynamic", "ntk"])
@pytest.mark.parametrize("mode", ["pre-rope", "rotated"])
def test_decoding_across_cache_growth_equals_full_forward(rope, mode, monkeypatch):
    # room for 5 positions first, so that the cache grows (5 -> 10 -> 20 -> 40 -> 56) while it
    # decodes; each step's logits against a forward over the whole sequence without a cache
    monkeypatch.setattr(model_module, "CACHE_CHUNK", 5)
    # under Dynamic Scaling one layer: a deeper layer's cached keys come from hidden states made
    # at an earlier s, which a full forward at today's s does not reproduce (Sec. 3.3)
    model = tiny_model(rope, n_layers=1 if rope.dynamic else 2)
    tokens = torch.randint(0, 96, (1, 3 * L + 8), generator=torch.Generator().manual_seed(1))
    cache = KVCache(model.args, 1, tokens.shape[1], mode=mode)
    capacities = set()
    with torch.no_grad():
        model(tokens[:, :3], cache=cache)
        for t in range(3, tokens.shape[1]):
            step = model(tokens[:, t:t + 1], cache=cache)[0, -1]
            capacities.add(cache.capacity)
            if mode == "rotated" and rope.dynamic and t >= L:
                continue  # rotated keys go stale past L under Dynamic Scaling (Sec. 3.3): not comparable
            full = model(tokens[:, :t + 1], last_only=True)[0, -1]
            assert (step - full).abs().max().item() <= 1e-4, t
    assert capacities == {5, 10, 20, 40, 56}


def test_request_that_cannot_fit_is_refused_before_allocating(monkeypatch):
    model = tiny_model(RopeConfig(original_length=L))
    prompt = list(range(1, 9))
    # bytes a position, measured on a real cache: its keys and values and its rotation table
    cache = KVCache(model.args, 1, 64)
    with torch.no_grad():
        model(torch.tensor([prompt]), cache=cache)
    per_position = (cache_bytes(cache) + cache.s0_table(model.rope, model.args.head_dim, "cpu").nbytes) // cache.capacity
    weights = sum(p.nbytes for p in model.parameters())
    have = weights + 1000 * per_position + per_position // 2  # room for 1000 positions, not 1001
    monkeypatch.setattr(sizing, "device_memory", lambda device: have)
    fits = 1000 - len(prompt)
    assert check_request(model, prompt, GenerationConfig(fits)) == 1000
    with pytest.raises(ValueError) as e:
        generate(model, prompt, fits + 1)
    assert f"({per_position} bytes a position)" in str(e.value)
    assert str(e.value).startswith(f"max_new_tokens: prompt ({len(prompt)}) + new tokens ({fits + 1}) = 1001 positions")
    assert f"at most {fits} new tokens fit" in str(e.value)


@pytest.mark.parametrize("n", [10 ** 9, 10 ** 30])
def test_absurd_max_new_tokens_is_one_line_with_the_figure(n, capsys):
    code, out, err = run(generate_script.main, ["--prompt", "hi", "--max-new-tokens", str(n)], capsys)
    line = one_error_line(code, err, "--max-new-tokens", "would need a KV cache of", "TiB", "bytes a position")
    # the demo model: 4 layers x (keys + values) x 4 heads x 64 dims x 4 bytes + 32 complex64 = 8448 bytes a position
    positions = int(line.split(" positions")[0].split(" = ")[-1])
    tib = float(line.split("KV cache of ")[1].split(" TiB")[0])
    assert tib == pytest.approx(positions * 8448 / 2 ** 40, rel=1e-2)
    assert out == ""


# ---------------------------------------------------------------------------------------
# The library's own checks (what the files and the flags come through)
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, words", [
    (dict(scale=math.inf), "RopeConfig.scale"), (dict(scale="big"), "'big'"), (dict(base=math.inf), "RopeConfig.base"),
    (dict(original_length=4096.5), "RopeConfig.original_length"), (dict(original_length=True), "True"),
    (dict(dynamic="yes"), "RopeConfig.dynamic"), (dict(truncate=1), "RopeConfig.truncate"),
    (dict(beta=math.inf), "alpha/beta"), (dict(attention_factor=math.nan), "RopeConfig.attention_factor"),
    (dict(attention_coefficient=-0.1), "RopeConfig.attention_coefficient"),
])
def test_rope_config_names_the_field(kwargs, words):
    with pytest.raises(ValueError, match=words):
        RopeConfig(method="yarn", **kwargs)


@pytest.mark.parametrize("kwargs, words", [
    (dict(dim="big"), "ModelArgs.dim"), (dict(n_heads=-4), "ModelArgs.n_heads: expected a positive integer, got -4"),
    (dict(n_layers=2.0), "ModelArgs.n_layers"), (dict(norm_eps=math.nan), "ModelArgs.norm_eps"),
    (dict(ffn_dim_multiplier=math.inf), "ModelArgs.ffn_dim_multiplier"), (dict(sliding_window=0), "ModelArgs.sliding_window"),
])
def test_model_args_names_the_field(kwargs, words):
    with pytest.raises(ValueError, match=words):
        ModelArgs(**kwargs)


@pytest.mark.parametrize("kwargs, words", [
    (dict(temperature=math.inf), "temperature"), (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(seed=-2 ** 64), "seed"), (dict(max_length=0), "max_length"), (dict(prefill_chunk=1.5), "prefill_chunk"),
])
def test_generation_config_names_the_field(kwargs, words):
    with pytest.raises(ValueError, match=f"^{words}: "):
        GenerationConfig(**{"max_new_tokens": 4, **kwargs})


# ---------------------------------------------------------------------------------------
# Every key the Hugging Face and Meta loaders read
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_config():
    """The demo model's config.json as an HF export writes it."""
    model, tokenizer = yarn_minimal.load(DEFAULT_CKPT)
    from yarn_minimal.formats.hf import hf_config as make

    return make(model, torch.float32, tokenizer)


INTEGER, NUMBER = "a positive integer", "a positive number"
BAD_INTEGERS = [(0, "0"), (-4, "-4"), (2.5, "2.5"), ("big", '"big"'), (True, "true")]
BAD_NUMBERS = [(0, "0"), (-1e-5, "-1e-05"), (math.nan, "NaN"), (math.inf, "Infinity"), ("big", '"big"')]


def hf_cases():
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
                "intermediate_size", "max_position_embeddings"):
        for value, shown in BAD_INTEGERS:
            yield {key: value}, f"{key} is {shown}; expected {INTEGER}"
    for value, shown in BAD_INTEGERS[:3]:
        yield {"sliding_window": value}, f"sliding_window is {shown}; expected {INTEGER}"
    for key in ("rms_norm_eps", "rope_theta"):
        for value, shown in BAD_NUMBERS:
            yield {key: value}, f"{key} is {shown}; expected {NUMBER}"
    yield {"rope_theta": 0.5}, "rope_theta: must be > 1 and finite, got 0.5"
    yield {"hidden_size": None}, f"hidden_size is null; expected {INTEGER}"
    yield {"tie_word_embeddings": "yes"}, 'tie_word_embeddings is "yes"; expected true or false'
    yield {"model_type": ["llama"]}, 'model_type is ["llama"]; expected a string'
    yield {"rope_scaling": "yarn"}, 'rope_scaling is "yarn"; expected a JSON object'
    yield {"rope_scaling": {"type": 5}}, "rope_scaling: type is 5; expected a string"
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    for key in ("factor", "beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim"):
        for value, shown in BAD_NUMBERS:
            yield {"rope_scaling": dict(yarn, **{key: value})}, f"rope_scaling: {key} is {shown}; expected {NUMBER}"
    for value, shown in BAD_INTEGERS:
        yield ({"rope_scaling": dict(yarn, original_max_position_embeddings=value)},
               f"rope_scaling: original_max_position_embeddings is {shown}; expected {INTEGER}")
    yield {"rope_scaling": dict(yarn, truncate="false")}, 'rope_scaling: truncate is "false"; expected true or false'
    yield {"rope_scaling": dict(yarn, factor=0.5)}, "rope_scaling: factor: expected a finite number >= 1"
    llama3 = {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 64, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0}
    for key in ("low_freq_factor", "high_freq_factor"):
        yield {"rope_scaling": dict(llama3, **{key: math.nan})}, f"rope_scaling: {key} is NaN; expected {NUMBER}"
    yield {"model_type": "mistral", "rope_scaling": yarn, "auto_map": "x"}, 'auto_map is "x"; expected a JSON object'
    yield {"head_dim": 32}, "head_dim is 32; Llama 2 (and this model) needs 64"
    yield {"num_attention_heads": 3}, "hidden_size 256, num_attention_heads 3"


@pytest.mark.parametrize("changes, words", list(hf_cases()))
def test_every_hf_key_read_is_named(hf_config, changes, words, tmp_path):
    # config.json is read before any other file, so a folder holding only it reaches the check
    (tmp_path / "config.json").write_text(json.dumps({**hf_config, **changes}))
    with pytest.raises(CheckpointError) as e:
        yarn_minimal.load(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / 'config.json'}: {words}"), str(e.value)
    assert "\n" not in str(e.value)


def meta_cases():
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "sliding_window"):
        for value, shown in BAD_INTEGERS:
            yield "params.json", {key: value}, f"{key} is {shown}; expected {INTEGER}"
    yield "params.json", {"vocab_size": 0}, f"vocab_size is 0; expected {INTEGER} (or -1: the tokenizer's size)"
    yield "params.json", {"dim": None}, f"dim is null; expected {INTEGER}"
    for key in ("norm_eps", "ffn_dim_multiplier", "rope_theta"):
        for value, shown in BAD_NUMBERS:
            yield "params.json", {key: value}, f"{key} is {shown}; expected {NUMBER}"
    yield "params.json", {"rope_theta": 1}, "rope_theta is 1; expected a number > 1"
    yield "params.json", {"n_kv_heads": 3}, "n_heads 4 is not divisible by n_kv_heads 3"
    for key, value, words in [("scale", math.inf, "scale: expected a finite number >= 1"),
                              ("scale", "big", "scale: expected a finite number >= 1"),
                              ("original_length", 0, "original_length: expected a positive integer, got 0"),
                              ("base", math.nan, "base: must be > 1 and finite, got nan"),
                              ("dynamic", "yes", "dynamic: expected true or false, got 'yes'"),
                              ("beta", math.inf, "alpha/beta: need finite numbers"),
                              ("attention_factor", -1, "attention_factor: expected a finite number > 0, got -1"),
                              ("bogus", 1, "unknown key 'bogus'")]:
        yield "rope.json", {key: value}, words


@pytest.mark.parametrize("name, changes, words", list(meta_cases()))
def test_every_meta_key_read_is_named(name, changes, words, tmp_path):
    for f in ("params.json", "rope.json", "tokenizer.model"):  # no weights: every check comes before them
        (tmp_path / f).write_bytes((DEFAULT_CKPT / f).read_bytes())
    (tmp_path / name).write_text(json.dumps({**json.loads((DEFAULT_CKPT / name).read_text()), **changes}))
    with pytest.raises(CheckpointError) as e:
        yarn_minimal.load(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / name}: ") and words in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_the_issues_config_values_through_generate(hf_config, tmp_path, capsys):
    for changes, words in [({"hidden_size": "big"}, 'hidden_size is "big"; expected a positive integer'),
                           ({"num_attention_heads": -4}, "num_attention_heads is -4; expected a positive integer")]:
        (tmp_path / "config.json").write_text(json.dumps({**hf_config, **changes}))
        code, out, err = run(generate_script.main, ["--ckpt", str(tmp_path), "--prompt", "hi"], capsys)
        one_error_line(code, err, "config.json", words)
