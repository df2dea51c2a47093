"""`python -m yarn_minimal rope --config X --json` against transformers' own RoPE init, on every
published config of tests/conformance_configs.py: inv_freq within 1e-5 relative, the cos/sin
factor within 1e-6 (transformers computes in float32, this project in float64).

The oracle is transformers' ROPE_INIT_FUNCTIONS[rope_type] (what its model classes call), or the
model class's compute_default_rope_parameters for plain RoPE, on a config built from the same
dict by AutoConfig.for_model; DeepSeek's softmax factor against its attention's
yarn_apply_mscale. Where this project differs by design (the Yarn-Mistral remote code's
constants), the test says so and checks against transformers given those constants.

Below: the project's own disagreements that issue 21 found, each with a test that fails on the
behaviour before the fix.
"""
import copy
import json
import math
import warnings

import pytest
import torch

from conformance_configs import BY_NAME, CONFIGS
from conftest import rope_command, run_cli
from yarn_minimal.checkpoint import CheckpointError, explain_config, hf_rope_scaling, rope_from_hf
from yarn_minimal.rope import RopeConfig, warn_beyond_window

CONFIG = "config.json"
LONG = 100000  # a --seq-len past every original length of the suite


def transformers_config(cfg: dict):
    from transformers import AutoConfig

    cfg = copy.deepcopy(cfg)
    model_type = cfg.pop("model_type")
    cfg.pop("auto_map", None)  # remote code: transformers' own classes, as without trust_remote_code
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoConfig.for_model(model_type, **cfg)


def transformers_rope(cfg: dict, seq_len=None) -> tuple[torch.Tensor, float]:
    """(inv_freq, cos/sin factor) as transformers builds them for this config.json."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = transformers_config(cfg)
    kind = config.rope_parameters["rope_type"]
    if kind == "default":
        return LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    if seq_len is None:
        return ROPE_INIT_FUNCTIONS[kind](config, "cpu")
    return ROPE_INIT_FUNCTIONS[kind](config, "cpu", seq_len)


def ours(capsys, tmp_path, cfg: dict, seq_len=None) -> dict:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    rope_command(["--config", str(path), "--json"] + ([] if seq_len is None else ["--seq-len", str(seq_len)]))
    return json.loads(capsys.readouterr().out)


def assert_agree(got: dict, inv_freq: torch.Tensor, factor: float):
    torch.testing.assert_close(torch.tensor(got["inv_freq"], dtype=torch.float64), inv_freq.double(), rtol=1e-5, atol=0)
    assert got["attention_factor"] == pytest.approx(factor, rel=1e-6, abs=1e-6)


REMOTE_CODE = ("Yarn-Mistral-7b-64k", "Yarn-Mistral-7b-128k")  # differ from transformers by design


@pytest.mark.parametrize("name", [name for name, _, _ in CONFIGS if name not in REMOTE_CODE])
def test_rope_config_json_equals_transformers(name, capsys, tmp_path):
    cfg = BY_NAME[name]
    got = ours(capsys, tmp_path, cfg)
    assert_agree(got, *transformers_rope(cfg))
    assert len(got["inv_freq"]) == got["head_dim"] // 2
    kind = (cfg.get("rope_scaling") or {}).get("type") or (cfg.get("rope_scaling") or {}).get("rope_type")
    if kind in ("dynamic", "longrope"):  # length-dependent: past the original length too
        assert_agree(ours(capsys, tmp_path, cfg, LONG), *transformers_rope(cfg, LONG))


@pytest.mark.parametrize("name", REMOTE_CODE)
def test_yarn_mistral_is_transformers_with_the_remote_codes_constants(name, capsys, tmp_path):
    """By design: the authors' remote code (auto_map) runs beta 128 / 2 and 0.07 ln(s) + 1; transformers
    without it silently runs 32 / 1 / 0.1 (a disagreement of transformers with the released model)."""
    cfg = BY_NAME[name]
    got = ours(capsys, tmp_path, cfg)
    s = cfg["rope_scaling"]["factor"]
    remote = dict(cfg, rope_scaling=dict(cfg["rope_scaling"], beta_fast=128.0, beta_slow=2.0,
                                         attention_factor=0.07 * math.log(s) + 1))
    assert_agree(got, *transformers_rope(remote))
    plain_inv, plain_factor = transformers_rope(cfg)
    assert abs(got["attention_factor"] - plain_factor) > 0.01
    assert (torch.tensor(got["inv_freq"]) - plain_inv.double()).abs().max() > 1e-3


@pytest.mark.parametrize("name, factor", [("DeepSeek-V2-Lite", 1.5896), ("DeepSeek-V3", 1.8739)])
def test_deepseek_softmax_factor_is_its_attentions(name, factor, capsys, tmp_path):
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import yarn_apply_mscale

    cfg = BY_NAME[name]
    got = ours(capsys, tmp_path, cfg)
    assert got["softmax_factor"] == pytest.approx(yarn_apply_mscale(transformers_config(cfg).rope_parameters, 1.0),
                                                  rel=1e-9)
    assert got["softmax_factor"] == pytest.approx(factor, abs=1e-4) and got["attention_factor"] == 1.0
    rope_command(["--config", str(tmp_path / "config.json")])
    out = capsys.readouterr().out
    assert "DeepSeek's attention also multiplies its softmax scale" in out and f"{factor:.4f}" in out


def test_every_architecture_is_explained_but_only_llama_weights_load(capsys, tmp_path):
    for name in ("Qwen2.5-7B-Instruct-YaRN", "gpt-oss-20b", "DeepSeek-V3", "Phi-3.5-mini-instruct-longrope"):
        (tmp_path / "config.json").write_text(json.dumps(BY_NAME[name]))
        rope_command(["--config", str(tmp_path / "config.json")])
        out = capsys.readouterr().out
        assert "this explains its RoPE only; load() runs Llama-architecture weights" in out
        with pytest.raises(CheckpointError, match=r"model_type '\w+'; only Llama-architecture checkpoints"):
            import yarn_minimal
            yarn_minimal.load(tmp_path)


def test_dynamic_and_longrope_say_how_they_differ_from_the_paper(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(BY_NAME["HF-dynamic-factor-2"]))
    rope_command(["--config", str(tmp_path / "config.json"), "--seq-len", "8192"])
    out = capsys.readouterr().out
    assert "s = a l/L - (a - 1)" in out and "at l = 8192 that is 3 against 2" in out
    with pytest.raises(CheckpointError, match="dynamic with factor 2: transformers then uses"):
        rope_from_hf(BY_NAME["HF-dynamic-factor-2"], CONFIG)  # load() does not run it
    (tmp_path / "config.json").write_text(json.dumps(BY_NAME["Phi-3.5-mini-instruct-longrope"]))
    rope_command(["--config", str(tmp_path / "config.json"), "--seq-len", "5000"])
    out = capsys.readouterr().out
    assert "LongRoPE is no method of the paper" in out and "long_factor" in out
    with pytest.raises(CheckpointError, match="type 'longrope' is not supported: LongRoPE.*cannot run it"):
        rope_from_hf(BY_NAME["Phi-3.5-mini-instruct-longrope"], CONFIG)


# ---------------------------------------------------------------------------------------
# The project's own disagreements (issue 21), each failing on the behaviour before the fix
# ---------------------------------------------------------------------------------------

def test_llama3_window_is_max_position_embeddings_and_survives_hf_export():
    from yarn_minimal.formats.hf import hf_config
    from yarn_minimal.model import ModelArgs, Transformer

    rope, provenance, _ = rope_from_hf(BY_NAME["Llama-3.1-8B"], CONFIG)
    assert rope.window == 131072 and provenance["extended_length"] == "max_position_embeddings"  # was 65536
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not warn_beyond_window(rope, 100000, "sequence")  # warned past 65536 before
    with pytest.warns(UserWarning, match="sequence 140000 exceeds the window .* 131072 tokens the checkpoint states"):
        warn_beyond_window(rope, 140000, "sequence")
    with torch.device("meta"):
        model = Transformer(ModelArgs(dim=256, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=64, rope=rope))
    exported = hf_config(model, torch.float32)
    assert exported["max_position_embeddings"] == 131072  # was 65536
    assert rope_from_hf(exported, CONFIG)[0] == rope  # and reads back the same
    # rope.json (this project's layout) keeps it too: every RopeConfig field is written
    assert RopeConfig(**json.loads(json.dumps(rope.__dict__))) == rope


def yarn_without_inner_original(**top):
    return {"model_type": "llama", "hidden_size": 4096, "num_attention_heads": 32, "max_position_embeddings": 65536,
            "rope_theta": 10000.0, "rope_scaling": {"type": "yarn", "factor": 16.0}, **top}


def test_top_level_original_max_position_embeddings_is_read_as_transformers_reads_it(capsys, tmp_path):
    cfg = yarn_without_inner_original(original_max_position_embeddings=4096)
    rope, provenance, _ = rope_from_hf(cfg, CONFIG)
    assert rope.original_length == 4096 and provenance["original_length"] == "original_max_position_embeddings"  # was 65536
    assert_agree(ours(capsys, tmp_path, cfg), *transformers_rope(cfg))
    # both places, different: the top level wins (as transformers), and a LoudNote names both values
    cfg["rope_scaling"]["original_max_position_embeddings"] = 8192
    rope, _, notes = rope_from_hf(cfg, CONFIG)
    assert rope.original_length == 4096
    assert_agree(ours(capsys, tmp_path, cfg), *transformers_rope(cfg))
    loud = [n for n in notes if type(n).__name__ == "LoudNote"]
    assert len(loud) == 1 and "4096 at the top level of config.json and 8192 in rope_scaling" in loud[0]


def test_a_conflicting_original_length_is_a_warning_when_loading(tmp_path, tokenizer_path):
    import yarn_minimal
    from test_real_configs import mistral_folder

    folder = mistral_folder(tmp_path, tokenizer_path, {"type": "yarn", "factor": 4.0,
                                                       "original_max_position_embeddings": 8192}, max_pos=32768)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(cfg, original_max_position_embeddings=4096)))
    with pytest.warns(UserWarning, match="original_max_position_embeddings is 4096 at the top level of config.json "
                                         "and 8192 in rope_scaling"):
        model, _ = yarn_minimal.load(folder)
    assert model.rope.original_length == 4096


def test_yarn_without_factor_is_refused_as_transformers_refuses_it(capsys, tmp_path):
    cfg = yarn_without_inner_original()
    del cfg["rope_scaling"]["factor"]
    with pytest.raises(KeyError, match="factor"):  # transformers
        transformers_rope(cfg)
    with pytest.raises(CheckpointError, match="rope_scaling of type 'yarn' has no 'factor'; transformers refuses it too"):
        rope_from_hf(cfg, CONFIG)  # was: s = max_position_embeddings / L, silently


def one_line(capsys, tmp_path, cfg: dict, words: str):
    """`python -m yarn_minimal rope --config` stops with one line naming the file and the key (not
    a traceback), as the command runs it (cli.run_main)."""
    from test_bad_values import one_error_line
    from yarn_minimal.__main__ import main

    (tmp_path / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(main, ["rope", "--config", str(tmp_path / "config.json")], capsys)
    one_error_line(code, err, "config.json: ", words)


@pytest.mark.parametrize("change, words", [
    # ZeroDivisionError before
    ({"original_max_position_embeddings": 0}, "rope_scaling: original_max_position_embeddings is 0; expected a positive integer"),
    # OverflowError before
    ({"factor": 1e308}, "rope_scaling: factor: s L = 1e+308 x 4096 is not a finite number of tokens"),
    ({"original_max_position_embeddings": 131072}, "rope_scaling: original_max_position_embeddings is 131072, larger than "
                                                   "max_position_embeddings 65536"),
    ({"factor": "16"}, 'rope_scaling: factor is "16"; expected a positive number'),
    ({"truncate": 0}, "rope_scaling: truncate is 0; expected true or false"),
    ({"beta_fast": math.inf}, "rope_scaling: beta_fast is Infinity; expected a positive number"),
    ({"mscale": -1}, "rope_scaling: mscale is -1; expected a positive number"),
])
def test_bad_rope_values_are_one_line(change, words, capsys, tmp_path):
    cfg = BY_NAME["Yarn-Llama-2-7b-64k"]
    one_line(capsys, tmp_path, dict(cfg, rope_scaling=dict(cfg["rope_scaling"], **change)), words)


@pytest.mark.parametrize("change, words", [
    ({"original_max_position_embeddings": -1}, "original_max_position_embeddings is -1; expected a positive integer"),
    ({"original_max_position_embeddings": 262144}, "original_max_position_embeddings is 262144, larger than max"),
    ({"head_dim": 7}, "head_dim gives a rotary dimension of 7; expected an even number"),
    ({"partial_rotary_factor": 2}, "partial_rotary_factor is 2; expected a number in (0, 1]"),
    ({"rope_scaling": {"type": "longrope", "short_factor": [1.0] * 3, "long_factor": [1.0] * 3}},
     "rope_scaling: short_factor is [1.0, 1.0, 1.0]; expected a list of 48 positive numbers"),
    ({"rope_scaling": {"type": "longrope", "short_factor": [1.0] * 48, "long_factor": [math.nan] * 48}},
     "rope_scaling: long_factor is [NaN, NaN"),
    ({"max_position_embeddings": 0}, "max_position_embeddings is 0; expected a positive integer"),
    ({"rope_theta": math.nan}, "rope_theta is NaN; expected a positive number"),
])
def test_bad_values_of_other_architectures_are_one_line(change, words, capsys, tmp_path):
    one_line(capsys, tmp_path, {**BY_NAME["Phi-3.5-mini-instruct-longrope"], **change}, words)


def test_explain_config_is_what_load_reads_for_llama_configs(tmp_path):
    """For a Llama-architecture config, rope --config explains the RopeConfig load() builds."""
    for name in ("Yarn-Llama-2-7b-64k", "Llama-3.1-8B", "CodeLlama-7b", "Yarn-Mistral-7b-64k"):
        (tmp_path / "config.json").write_text(json.dumps(BY_NAME[name]))
        rope = rope_from_hf(BY_NAME[name], CONFIG)[0]
        explained = explain_config(tmp_path)
        assert explained.rope == rope and explained.window == rope.window
        assert hf_rope_scaling(rope, 128)[2] == rope.window
