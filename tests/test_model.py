"""model.py against Hugging Face's LlamaForCausalLM holding the same weights."""
import pytest
import torch
import torch.nn.functional as F

from hf_oracle import hf_model
import yarn_minimal.attention as attention_module
import yarn_minimal.model as m
from yarn_minimal import fast, training
from yarn_minimal.attention import attention
from yarn_minimal.fast import rope_op
from yarn_minimal.loss import cross_entropy
from yarn_minimal.model import KVCache, ModelArgs, Transformer
from yarn_minimal.rope import RopeConfig, yarn_attention_factor

L = 16  # a tiny original context, so that short test sequences go well beyond it


def tiny_model(rope=RopeConfig(original_length=L), n_layers=2, seed=0, **kw) -> Transformer:
    args = ModelArgs(dim=64, n_layers=n_layers, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=32,
                     rope=rope, **kw)
    torch.manual_seed(seed)
    model = Transformer(args)
    training.init_weights(model, std=0.1)
    with torch.no_grad():  # random norm weights, so that a swapped norm would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model.eval()


ROPES = {
    "none": RopeConfig(original_length=L),
    "linear": RopeConfig(method="pi", scale=4.0, original_length=L),
    "dynamic": RopeConfig(method="ntk", dynamic=True, original_length=L),
    "yarn": RopeConfig(method="yarn", scale=4.0, original_length=L),
    "yarn-noninteger": RopeConfig(method="yarn", scale=2.5, original_length=L),
}


@pytest.mark.parametrize("name", ROPES)
def test_logits_match_transformers(name):
    model = tiny_model(ROPES[name])
    hf = hf_model(model, max_position_embeddings=L)
    tokens = torch.randint(0, 96, (2, 3 * L + 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(tokens)
        ref = hf(tokens).logits
    assert ours.shape == (2, 3 * L + 5, 96)
    assert (ours - ref).abs().max().item() <= 1e-4


def test_ffn_width_of_llama2_sizes():
    # notes: 11008 / 13824 / 28672 for 7B / 13B / 70B
    assert ModelArgs(dim=4096, n_heads=32).ffn_hidden_dim == 11008
    assert ModelArgs(dim=5120, n_heads=40).ffn_hidden_dim == 13824
    assert ModelArgs(dim=8192, n_heads=64, n_kv_heads=8, multiple_of=4096,
                     ffn_dim_multiplier=1.3).ffn_hidden_dim == 28672


@pytest.mark.parametrize("kwargs, needle", [
    (dict(dim=64, n_heads=5), "n_heads"), (dict(dim=64, n_heads=4, n_kv_heads=3), "n_kv_heads"),
    (dict(dim=60, n_heads=4), "head_dim"),
])
def test_bad_model_args(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        ModelArgs(**kwargs)


def test_loss_equals_full_cross_entropy():
    model = tiny_model()
    tokens = torch.randint(0, 96, (2, 40))
    targets = torch.randint(0, 96, (2, 40))
    targets[0, :5] = -100
    with torch.no_grad():
        ref = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten(), ignore_index=-100)
    loss = cross_entropy(model.output, model.hidden_states(tokens), targets, chunk_size=7)
    torch.testing.assert_close(loss, ref)
    # gradients flow through the chunked loss (tests/test_loss.py checks their values)
    model.train()
    model(tokens, targets=targets).backward()
    assert model.output.weight.grad is not None and model.layers[0].attention.wq.weight.grad.abs().sum() > 0


def naive_causal_attention(q, k, v):
    """softmax(q k^T / sqrt(D)) v with explicit scores and mask; queries are the last Tq positions."""
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    Tq, Tk = q.shape[1], k.shape[1]
    mask = torch.arange(Tk)[None, :] <= torch.arange(Tk - Tq, Tk)[:, None]
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


@pytest.mark.parametrize("Tq, Tk", [(9, 9), (1, 9), (4, 11)])
def test_attention_kernel_paths(Tq, Tk):
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, Tq, 4, 8, generator=g), torch.randn(2, Tk, 2, 8, generator=g), torch.randn(2, Tk, 2, 8, generator=g)
    torch.testing.assert_close(attention(q, [(k, v)]), naive_causal_attention(q, k, v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("Tq, Tk, cut", [(1, 29, [10, 20]), (4, 29, [8, 16]), (4, 29, [24]), (7, 10, [2])])
def test_attention_over_blocks_merges_softmax_by_log_sum_exp(Tq, Tk, cut):
    # Keys in blocks (the block that ends with the queries first, then the earlier ones, as the
    # pre-RoPE cache hands them over), merged through their log-sum-exp, against one softmax
    # over all keys written out by hand.
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(2, Tq, 4, 8, generator=g), torch.randn(2, Tk, 2, 8, generator=g), torch.randn(2, Tk, 2, 8, generator=g)
    q = q * 3  # peaked softmaxes, so that a wrong weight between blocks shows
    edges = [0, *cut, Tk]
    spans = [(edges[-2], Tk)] + list(zip(edges[:-2], edges[1:-1]))
    blocks = ((k[:, a:b], v[:, a:b]) for a, b in spans)
    torch.testing.assert_close(attention(q, blocks), naive_causal_attention(q, k, v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("Tq, Tk", [(1, 29), (4, 29), (7, 7), (7, 10)])
@pytest.mark.parametrize("tile_scores", [1 << 24, 40])
def test_both_log_sum_exp_kernels_against_scores_written_out(Tq, Tk, tile_scores, monkeypatch):
    # One causal block, aligned bottom-right: ATen's CPU flash kernel (attention_with_lse on the
    # CPU) and the tiles that GPUs without flash-attn use, against explicit scores. A small
    # tile_scores splits the queries into tiles.
    monkeypatch.setattr(attention_module, "SCORES_PER_TILE", tile_scores)
    g = torch.Generator().manual_seed(3)
    q, k, v = 3 * torch.randn(2, Tq, 4, 8, generator=g), torch.randn(2, Tk, 2, 8, generator=g), torch.randn(2, Tk, 2, 8, generator=g)
    scores = torch.einsum("bqhd,bkhd->bqhk", q, k.repeat_interleave(2, dim=2)) / 8 ** 0.5
    scores = scores.masked_fill(torch.arange(Tk) > torch.arange(Tk - Tq, Tk)[:, None, None], float("-inf"))
    for kernel in (attention_module.attention_with_lse, attention_module.attention_with_lse_tiles):
        out, lse = kernel(q, k, v, causal=True)
        torch.testing.assert_close(out, naive_causal_attention(q, k, v), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse, scores.logsumexp(-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["none", "linear", "yarn"])
def test_static_cache_decoding_equals_full_forward(name):
    model = tiny_model(ROPES[name])
    tokens = torch.randint(0, 96, (1, 3 * L + 2), generator=torch.Generator().manual_seed(2))
    cache = KVCache(model.args, 1, tokens.shape[1])
    with torch.no_grad():
        model(tokens[:, :5], cache=cache)
        for t in range(5, tokens.shape[1]):
            step = model(tokens[:, t:t + 1], cache=cache)[:, -1]
            full = model(tokens[:, :t + 1], last_only=True)[:, -1]
            assert (step - full).abs().max().item() <= 1e-4, t


@pytest.mark.parametrize("method", ["pi", "ntk", "ntk-by-parts", "yarn"])
def test_dynamic_pre_rope_cache_is_exact_and_rotated_cache_is_stale(method):
    # One layer: its keys depend only on the embeddings, so a pre-RoPE cache re-rotated at the
    # current s reproduces the full forward exactly; caching rotated keys does not (Sec. 3.3).
    model = tiny_model(RopeConfig(method=method, dynamic=True, original_length=L), n_layers=1)
    tokens = torch.randint(0, 96, (1, 3 * L), generator=torch.Generator().manual_seed(3))
    pre, rot = KVCache(model.args, 1, 3 * L), KVCache(model.args, 1, 3 * L, mode="rotated")
    worst_rot = 0.0
    with torch.no_grad():
        model(tokens[:, :4], cache=pre)
        model(tokens[:, :4], cache=rot)
        for t in range(4, 3 * L):
            full = model(tokens[:, :t + 1], last_only=True)[:, -1]
            assert (model(tokens[:, t:t + 1], cache=pre)[:, -1] - full).abs().max().item() <= 1e-4, t
            err = (model(tokens[:, t:t + 1], cache=rot)[:, -1] - full).abs().max().item()
            if t < L:
                assert err <= 1e-4  # below L, s = 1 throughout: nothing goes stale
            worst_rot = max(worst_rot, err)
    assert worst_rot > 1e-2


def test_rope_op_and_its_gradient():
    # model.rotate_pairs' fused twin is one custom op with its own backward (the opposite
    # rotation); against autograd through Eq. 5 written as a complex product
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 3, 8, generator=g, requires_grad=True)
    angles = torch.rand(5, 4, generator=g) * 6
    rot = torch.polar(torch.full_like(angles, 1.2), angles)
    upstream = torch.randn(2, 5, 3, 8, generator=g)
    (grad,) = torch.autograd.grad((m.rotate_pairs.op(x, rot) * upstream).sum(), x)
    ref = torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * rot[:, None]).flatten(-2)
    (ref_grad,) = torch.autograd.grad((ref * upstream).sum(), x)
    torch.testing.assert_close(m.rotate_pairs.op(x, rot), ref)
    torch.testing.assert_close(grad, ref_grad)
    # the real-valued form compiled for CUDA, run eagerly here, and bf16 in / bf16 out
    torch.testing.assert_close(rope_op._rotate_pairs_real(x, rot), ref.detach())
    xb = x.detach().bfloat16()
    assert m.rotate_pairs.op(xb, rot).dtype == torch.bfloat16
    torch.testing.assert_close(m.rotate_pairs.op(xb, rot), rope_op._rotate_pairs_real(xb, rot), atol=0, rtol=2 ** -7)  # 1 bf16 ulp


@pytest.mark.parametrize("end", [1, 63, 64, 6001, 131072])
def test_rotation_table_equals_cos_sin_of_every_position(end):
    # fast.rotation_table factors e^{i m h} into two small tables; against rope_tables' cos and
    # sin of every position (float64 angles), the direct computation (model.rotation_table)
    rope = RopeConfig(method="yarn", scale=32.0, original_length=4096)
    cos, sin = m.rope_tables(rope, 128, torch.arange(end), 32.0)
    assert torch.equal(m.rotation_table(rope, 128, end, 32.0), torch.complex(cos, sin))
    table = fast.rotation_table(rope, 128, end, 32.0)
    assert table.shape == (end, 64) and table.dtype == torch.complex64
    assert (table - torch.complex(cos, sin)).abs().max().item() <= 4e-7 * yarn_attention_factor(32.0)
