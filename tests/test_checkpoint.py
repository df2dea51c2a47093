"""checkpoint.py against the real layouts, at tiny sizes with random weights.

Oracles: transformers' LlamaForCausalLM holding the same weights (built by hf_oracle from the
full state dict before we split it into shards), and transformers' own save_pretrained /
from_pretrained for the Hugging Face layout. Tokens run past the original context L, so that
every RoPE extension method is exercised."""
import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import yarn_minimal
from yarn_minimal import training
from hf_oracle import hf_model
from yarn_minimal import CheckpointError, RopeConfig
from yarn_minimal.__main__ import main as checkpoint_main
from yarn_minimal.checkpoint import SHARD_DIM
from yarn_minimal.files import OutputError
from yarn_minimal.model import ModelArgs, Transformer
from yarn_minimal.tokenizer import SentencePieceTokenizer

L = 16  # original context of the tiny models
T = 3 * L + 5
TOL = 1e-4


def random_model(vocab_size, rope=RopeConfig(original_length=L), seed=0, **kw) -> Transformer:
    kw = dict(dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32), **kw)
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(vocab_size=vocab_size, rope=rope, **kw))
    training.init_weights(model, std=0.1, seed=seed)
    with torch.no_grad():  # random norm weights, so that a swapped or dropped norm would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model.eval()


def tokens_for(vocab_size, seed=1):
    return torch.randint(0, vocab_size, (1, T), generator=torch.Generator().manual_seed(seed))


def write_meta_shards(model: Transformer, folder, n_shards: int, params_extra=None):
    """Meta's raw layout: split the full state dict the way model-parallel ranks hold it
    (column-parallel weights along dim 0, row-parallel wo/w2 and the embedding along dim 1,
    norms replicated), one consolidated.NN.pth per rank, plus a stray rope.freqs as some
    downloads carry. The split rule is written here from Meta's layer types, not imported."""
    folder.mkdir(parents=True)
    split = {"tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "wo": 1, "w2": 1}
    shards = [{} for _ in range(n_shards)]
    for key, t in model.state_dict().items():
        dim = split.get(key.split(".")[-2])
        parts = t.chunk(n_shards, dim=dim) if dim is not None else [t] * n_shards
        for shard, part in zip(shards, parts):
            shard[key] = part.clone()
    for i, shard in enumerate(shards):
        shard["rope.freqs"] = torch.randn(8)
        torch.save(shard, folder / f"consolidated.{i:02d}.pth")
    a = model.args
    params = dict(dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads, vocab_size=-1,
                  multiple_of=a.multiple_of, ffn_dim_multiplier=a.ffn_dim_multiplier, norm_eps=a.norm_eps)
    params.update(params_extra or {})
    (folder / "params.json").write_text(json.dumps(params))


def meta_download(tmp_path, tokenizer_path, model, n_shards, name="llama-2-tiny"):
    """Meta's download: the model folder, and tokenizer.model in its parent."""
    shutil.copy(tokenizer_path, tmp_path / "tokenizer.model")
    write_meta_shards(model, tmp_path / name, n_shards)
    return tmp_path / name


def test_shard_rule_matches_test_copy():
    # the rule in the notes: concat wq,wk,wv,w1,w3,output on dim 0; wo,w2 and tok_embeddings on dim 1
    assert SHARD_DIM == {"tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0,
                         "wo": 1, "w2": 1}


# ---------------------------------------------------------------------------------------
# Meta layout: 1 shard (7B), 2 shards (13B), one KV head per shard (70B), against transformers
# ---------------------------------------------------------------------------------------

META_CASES = {
    "7b-style-1-shard": dict(n_shards=1, kw=dict(n_kv_heads=4)),
    "13b-style-2-shards": dict(n_shards=2, kw=dict(n_kv_heads=4)),
    # 70B: GQA, one KV head per shard, multiple_of and ffn_dim_multiplier (hidden 240, not 192)
    "70b-style-gqa": dict(n_shards=2, kw=dict(n_kv_heads=2, multiple_of=48, ffn_dim_multiplier=1.3)),
}


@pytest.mark.parametrize("name", META_CASES)
def test_meta_layout_matches_transformers(name, tmp_path, tokenizer_path):
    case = META_CASES[name]
    vocab = SentencePieceTokenizer(tokenizer_path).vocab_size
    ref = random_model(vocab, **case["kw"])
    if name == "70b-style-gqa":
        assert ref.args.ffn_hidden_dim == 240 and ref.args.n_kv_heads == case["n_shards"]
    hf = hf_model(ref)
    folder = meta_download(tmp_path, tokenizer_path, ref, case["n_shards"])
    assert len(list(folder.glob("consolidated.*.pth"))) == case["n_shards"]
    del ref
    model, tok = yarn_minimal.load(folder)
    assert tok.vocab_size == vocab and model.args.vocab_size == vocab  # vocab_size -1: from the tokenizer
    assert model.rope == RopeConfig()  # raw Llama 2: plain RoPE, L = 4096
    tokens = tokens_for(vocab)
    with torch.no_grad():
        ours, ref_logits = model(tokens), hf(tokens).logits
    assert (ours - ref_logits).abs().max().item() <= TOL


def test_meta_layout_loads_into_requested_dtype(tmp_path, tokenizer_path):
    vocab = SentencePieceTokenizer(tokenizer_path).vocab_size
    ref = random_model(vocab)
    folder = meta_download(tmp_path, tokenizer_path, ref, 2)
    model, _ = yarn_minimal.load(folder, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in model.parameters())
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v.to(torch.bfloat16)), k


def test_norm_eps_1e6_warns(tmp_path, tokenizer_path):
    vocab = SentencePieceTokenizer(tokenizer_path).vocab_size
    folder = tmp_path / "m"
    shutil.copy(tokenizer_path, tmp_path / "tokenizer.model")
    write_meta_shards(random_model(vocab), folder, 1, params_extra=dict(norm_eps=1e-6))
    with pytest.warns(UserWarning, match="norm_eps is 1e-6"):
        yarn_minimal.load(folder)


# ---------------------------------------------------------------------------------------
# Hugging Face layout written by transformers' own save_pretrained
# ---------------------------------------------------------------------------------------

def hf_folder(tmp_path, tokenizer_path, rope_parameters, max_position_embeddings=L, sharded=False,
              intermediate_size=160, seed=0):
    """A LlamaForCausalLM with random weights, saved by transformers itself."""
    vocab = SentencePieceTokenizer(tokenizer_path).vocab_size
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=intermediate_size, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                      max_position_embeddings=max_position_embeddings, tie_word_embeddings=False,
                      rope_parameters=dict(rope_parameters), initializer_range=0.1)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    folder = tmp_path / "hf"
    model.save_pretrained(folder, max_shard_size="40KB" if sharded else "1GB")
    shutil.copy(tokenizer_path, folder / "tokenizer.model")
    return folder


def transformers_logits(folder, tokens):
    hf = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(tokens).logits


HF_ROPES = {
    "default": ({"rope_type": "default", "rope_theta": 10000.0}, L),
    "linear": ({"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}, L),
    "dynamic": ({"rope_type": "dynamic", "factor": 1.0, "rope_theta": 10000.0}, L),
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": L, "rope_theta": 10000.0}, 4 * L),
    "yarn-betas-untruncated": ({"rope_type": "yarn", "factor": 2.5, "original_max_position_embeddings": L,
                                "beta_fast": 16, "beta_slow": 2, "truncate": False, "rope_theta": 5e5}, 40),
    "yarn-mscale": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": L, "mscale": 1.0,
                     "mscale_all_dim": 0.5, "rope_theta": 10000.0}, 4 * L),
    "yarn-attention-factor": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": L,
                               "attention_factor": 1.3, "rope_theta": 10000.0}, 4 * L),
}


@pytest.mark.parametrize("name, sharded", [(name, False) for name in HF_ROPES] + [("yarn", True)],
                         ids=list(HF_ROPES) + ["yarn-sharded"])
def test_hf_layout_matches_transformers(name, sharded, tmp_path, tokenizer_path):
    rope_parameters, max_pos = HF_ROPES[name]
    folder = hf_folder(tmp_path, tokenizer_path, rope_parameters, max_pos, sharded=sharded)
    if sharded:
        assert (folder / "model.safetensors.index.json").is_file() and len(list(folder.glob("*.safetensors"))) > 1
    else:
        assert (folder / "model.safetensors").is_file()
    model, tok = yarn_minimal.load(folder)
    tokens = tokens_for(tok.vocab_size)
    with torch.no_grad():
        ours = model(tokens)
    assert (ours - transformers_logits(folder, tokens)).abs().max().item() <= TOL


def test_released_yarn_config(tmp_path, tokenizer_path):
    """Yarn-Llama-2-7b-64k's config.json form (transformers v4 era): rope_scaling with "type",
    "finetuned": true, no rope_theta, max_position_embeddings = factor * L."""
    folder = hf_folder(tmp_path, tokenizer_path, {"rope_type": "default", "rope_theta": 10000.0}, 4 * L)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg.pop("rope_theta", None)
    cfg["rope_scaling"] = {"factor": 4.0, "finetuned": True, "original_max_position_embeddings": L, "type": "yarn"}
    (folder / "config.json").write_text(json.dumps(cfg))
    model, tok = yarn_minimal.load(folder)
    assert model.rope == RopeConfig(method="yarn", scale=4.0, original_length=L)
    tokens = tokens_for(tok.vocab_size)
    with torch.no_grad():
        ours = model(tokens)
    oracle = transformers_logits(folder, tokens)
    assert (ours - oracle).abs().max().item() <= TOL
    # and the YaRN setting matters at this length: plain RoPE gives other logits
    model.set_rope(RopeConfig(original_length=L))
    with torch.no_grad():
        assert (model(tokens) - oracle).abs().max().item() > 1e-2


def test_hf_pytorch_bin_fallback_and_inv_freq(tmp_path, tokenizer_path):
    """Older folders: pytorch_model.bin (no safetensors) with rotary_emb.inv_freq buffers."""
    folder = hf_folder(tmp_path, tokenizer_path, HF_ROPES["linear"][0], L)
    from safetensors.torch import load_file
    state = load_file(folder / "model.safetensors")
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    torch.save(state, folder / "pytorch_model.bin")
    tokens = tokens_for(SentencePieceTokenizer(tokenizer_path).vocab_size)
    oracle = transformers_logits(folder, tokens)
    (folder / "model.safetensors").unlink()
    model, _ = yarn_minimal.load(folder)
    with torch.no_grad():
        assert (model(tokens) - oracle).abs().max().item() <= TOL


def test_rope_argument_overrides_config(tmp_path, tokenizer_path):
    folder = hf_folder(tmp_path, tokenizer_path, HF_ROPES["yarn"][0], 4 * L)
    rope = RopeConfig(method="pi", scale=2.0, original_length=L)
    model, _ = yarn_minimal.load(folder, rope=rope)
    assert model.rope == rope


def test_hf_intermediate_size_round_trips_into_params(tmp_path, tokenizer_path):
    """HF states intermediate_size directly; a width Meta's default formula would not give
    (160 here, where multiple_of=256 would give 256) must load and save back as Meta's fields."""
    folder = hf_folder(tmp_path, tokenizer_path, HF_ROPES["default"][0], L, intermediate_size=160)
    model, tok = yarn_minimal.load(folder)
    assert model.args.ffn_hidden_dim == 160 and model.layers[0].feed_forward.w1.weight.shape == (160, 64)
    yarn_minimal.save(model, tok, tmp_path / "meta")
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    # Meta's formula, recomputed here from the written fields
    h = int(2 * 4 * params["dim"] / 3)
    if params["ffn_dim_multiplier"]:
        h = int(params["ffn_dim_multiplier"] * h)
    assert params["multiple_of"] * -(-h // params["multiple_of"]) == 160


# ---------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------

SAVE_HF_ROPES = {
    "none": RopeConfig(original_length=L),
    "pi": RopeConfig(method="pi", scale=4.0, original_length=L),
    "ntk-static": RopeConfig(method="ntk", scale=4.0, original_length=L),  # written as rope_theta = b'
    "dynamic-ntk": RopeConfig(method="ntk", dynamic=True, original_length=L),
    "yarn": RopeConfig(method="yarn", scale=4.0, original_length=L, alpha=2.0, beta=16.0),
    "yarn-attention-factor": RopeConfig(method="yarn", scale=4.0, original_length=L, attention_factor=1.25,
                                        truncate=False),
}


@pytest.mark.parametrize("name", SAVE_HF_ROPES)
def test_meta_to_hf_loads_in_transformers(name, tmp_path, tokenizer_path):
    tok = SentencePieceTokenizer(tokenizer_path)
    model = random_model(tok.vocab_size, rope=SAVE_HF_ROPES[name])
    yarn_minimal.save(model, tok, tmp_path / "hf", format="hf")
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["checksums.json", "config.json", "model.safetensors",
                                                                 "tokenizer.model", "tokenizer_config.json"]
    tokens = tokens_for(tok.vocab_size)
    with torch.no_grad():
        ours = model(tokens)
    assert (ours - transformers_logits(tmp_path / "hf", tokens)).abs().max().item() <= TOL
    # and back: our loader reads what we wrote, same weights
    back, _ = yarn_minimal.load(tmp_path / "hf")
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_hf_rope_scaling_keys_for_serving_tools(tmp_path, tokenizer_path):
    tok = SentencePieceTokenizer(tokenizer_path)
    model = random_model(tok.vocab_size, rope=RopeConfig(method="yarn", scale=16.0, original_length=L))
    yarn_minimal.save(model, tok, tmp_path / "hf", format="hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["rope_scaling"] == {"rope_type": "yarn", "type": "yarn", "factor": 16.0,
                                   "original_max_position_embeddings": L, "beta_fast": 32.0, "beta_slow": 1.0}
    assert cfg["max_position_embeddings"] == 16 * L and cfg["rope_theta"] == 10000.0


@pytest.mark.parametrize("rope", [
    RopeConfig(method="yarn", dynamic=True, original_length=L),
    RopeConfig(method="yarn", scale=4.0, original_length=L, ramp="paper"),
    RopeConfig(method="ntk-by-parts", scale=4.0, original_length=L),
    RopeConfig(method="pi", dynamic=True, original_length=L),
    RopeConfig(method="ntk", dynamic=True, scale=2.0, original_length=L),
], ids=["dynamic-yarn", "paper-ramp", "ntk-by-parts", "dynamic-pi", "dynamic-ntk-s0"])
def test_save_hf_refuses_rope_without_equivalent(rope, tmp_path, tokenizer_path):
    tok = SentencePieceTokenizer(tokenizer_path)
    model = random_model(tok.vocab_size, rope=rope)
    with pytest.raises(CheckpointError, match="no Hugging Face rope_scaling equivalent"):
        yarn_minimal.save(model, tok, tmp_path / "hf", format="hf")
    assert not (tmp_path / "hf").exists()  # nothing half-written


def test_sharded_meta_save_meta_round_trip(tmp_path, tokenizer_path):
    """Merged shards -> save meta -> load: identical tensors and rope settings."""
    vocab = SentencePieceTokenizer(tokenizer_path).vocab_size
    ref = random_model(vocab, n_kv_heads=2)
    folder = meta_download(tmp_path, tokenizer_path, ref, 2)
    rope = RopeConfig(method="yarn", scale=8.0, original_length=L, dynamic=True, ramp="paper", alpha=2.0)
    model, tok = yarn_minimal.load(folder, rope=rope)
    yarn_minimal.save(model, tok, tmp_path / "own")
    assert not list((tmp_path / "own").glob("*.tmp"))
    back, _ = yarn_minimal.load(tmp_path / "own")
    assert back.rope == rope
    for k, v in ref.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_convert_cli(tmp_path, tokenizer_path, capsys):
    vocab = SentencePieceTokenizer(tokenizer_path).vocab_size
    ref = random_model(vocab)
    folder = meta_download(tmp_path, tokenizer_path, ref, 2)
    checkpoint_main(["convert", str(folder), str(tmp_path / "hf"), "--format", "hf", "--dtype", "float32"])
    tokens = tokens_for(vocab)
    with torch.no_grad():
        assert (ref(tokens) - transformers_logits(tmp_path / "hf", tokens)).abs().max().item() <= TOL
    checkpoint_main(["convert", str(tmp_path / "hf"), str(tmp_path / "same"), "--format", "meta"])  # keeps float32
    assert torch.load(tmp_path / "same" / "consolidated.00.pth")["output.weight"].dtype == torch.float32
    checkpoint_main(["convert", str(tmp_path / "hf"), str(tmp_path / "bf16"), "--format", "meta", "--dtype", "bfloat16"])
    assert torch.load(tmp_path / "bf16" / "consolidated.00.pth")["output.weight"].dtype == torch.bfloat16
    with pytest.raises(SystemExit):
        checkpoint_main(["convert", "--help"])
    assert "--format" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------
# Bad input: one clear message naming the file or key
# ---------------------------------------------------------------------------------------

@pytest.fixture
def meta_folder(tmp_path, tokenizer_path):
    return meta_download(tmp_path, tokenizer_path, random_model(SentencePieceTokenizer(tokenizer_path).vocab_size), 2)


@pytest.fixture
def hf_dir(tmp_path, tokenizer_path):
    return hf_folder(tmp_path, tokenizer_path, HF_ROPES["default"][0], L)


def test_bad_no_config_files(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no params.json.*no config.json"):
        yarn_minimal.load(tmp_path / "empty")


def test_bad_no_weight_files(meta_folder, hf_dir):
    for f in meta_folder.glob("consolidated.*.pth"):
        f.unlink()
    with pytest.raises(CheckpointError, match=r"no consolidated\.\*\.pth"):
        yarn_minimal.load(meta_folder)
    (hf_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="hf: no weight files"):
        yarn_minimal.load(hf_dir)


def test_bad_index_lists_missing_file(tmp_path, tokenizer_path):
    folder = hf_folder(tmp_path, tokenizer_path, HF_ROPES["default"][0], L, sharded=True)
    victim = sorted(folder.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"{victim.name}: listed in model.safetensors.index.json but missing"):
        yarn_minimal.load(folder)


def test_bad_shard_count(meta_folder):
    shutil.copy(meta_folder / "consolidated.01.pth", meta_folder / "consolidated.02.pth")
    with pytest.raises(CheckpointError, match="3 consolidated.*n_heads = 4, which 3 does not divide"):
        yarn_minimal.load(meta_folder)


def test_bad_tensor_shape_meta(meta_folder):
    shard = torch.load(meta_folder / "consolidated.01.pth")
    shard["layers.1.feed_forward.w2.weight"] = torch.zeros(64, 50)
    torch.save(shard, meta_folder / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match=r"consolidated\.01\.pth: tensor layers\.1\.feed_forward\.w2\.weight "
                                              r"has shape \(64, 50\), expected \(64, 96\)"):
        yarn_minimal.load(meta_folder)


def test_bad_tensor_shape_hf(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["intermediate_size"] = 192
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor model\.layers\.0\.mlp\.\w+_proj\.weight "
                                              r"has shape \(\d+, \d+\), expected \(\d+, \d+\)"):
        yarn_minimal.load(hf_dir)


def test_bad_missing_key(meta_folder):
    for i in range(2):
        shard = torch.load(meta_folder / f"consolidated.{i:02d}.pth")
        del shard["layers.0.ffn_norm.weight"]
        torch.save(shard, meta_folder / f"consolidated.{i:02d}.pth")
    with pytest.raises(CheckpointError, match=r"consolidated\.00\.pth: keys do not match.*missing \['layers\.0\.ffn_norm"):
        yarn_minimal.load(meta_folder)


@pytest.mark.parametrize("layout", ["meta", "hf"])
def test_bad_truncated_file(layout, meta_folder, hf_dir):
    path = meta_folder / "consolidated.01.pth" if layout == "meta" else hf_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{path.name}: cannot be read"):
        yarn_minimal.load(meta_folder if layout == "meta" else hf_dir)


def test_bad_missing_tokenizer(meta_folder, hf_dir):
    (meta_folder.parent / "tokenizer.model").unlink()
    with pytest.raises(CheckpointError, match="no tokenizer; looked for tokenizer.model and tokenizer.json in the folder and tokenizer.model in its parent"):
        yarn_minimal.load(meta_folder)
    (hf_dir / "tokenizer.model").unlink()
    with pytest.raises(CheckpointError, match="hf: no tokenizer; looked for tokenizer.model and tokenizer.json"):
        yarn_minimal.load(hf_dir)


def test_bad_tokenizer_size(meta_folder):
    params = json.loads((meta_folder / "params.json").read_text())
    params["vocab_size"] = 300  # fewer rows than ids; more rows (a padded embedding) is allowed
    (meta_folder / "params.json").write_text(json.dumps(params))
    with pytest.raises(CheckpointError, match=r"tokenizer\.model: tokenizer has ids up to 383 \(384 pieces\), but "
                                              r".*params\.json gives the model's embedding 300 rows; expected at least 384"):
        yarn_minimal.load(meta_folder)


@pytest.mark.parametrize("scaling, needle", [
    ({"rope_type": "longrope", "factor": 8.0}, "config.json: rope_scaling type 'longrope' is not supported"),
    ({"type": "dynamic", "factor": 2.0}, "config.json: rope_scaling dynamic with factor 2"),
    ({"type": "linear"}, "config.json: rope_scaling of type 'linear' has no 'factor'"),
    ({"type": "yarn", "factor": 0.5, "original_max_position_embeddings": L}, "config.json: rope_scaling: .*scale"),
])
def test_bad_rope_scaling(scaling, needle, hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["rope_scaling"] = scaling
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=needle):
        yarn_minimal.load(hf_dir)


def test_bad_params_json(meta_folder):
    (meta_folder / "params.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="params.json: not valid JSON"):
        yarn_minimal.load(meta_folder)


def test_save_refuses_folder_with_other_shards(meta_folder, tokenizer_path):
    model, tok = yarn_minimal.load(meta_folder)
    with pytest.raises(OutputError, match="consolidated.01.pth.*not a checkpoint this project saved"):
        yarn_minimal.save(model, tok, meta_folder, overwrite=True)  # a download is never replaced
