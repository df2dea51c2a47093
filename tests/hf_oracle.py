"""Hugging Face transformers as an independent oracle: the same weights in HF's layout.

Meta checkpoints rotate interleaved pairs (2i, 2i+1); HF's Llama rotates split halves
(i, i + D/2). HF's converter permutes the rows of wq and wk to match; we do the same here."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def permute_for_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    out_dim, in_dim = w.shape
    head_dim = out_dim // n_heads
    return w.view(n_heads, head_dim // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def hf_rope_parameters(rope, max_position_embeddings):
    """The HF rope_parameters equivalent to a RopeConfig (where one exists)."""
    params = {"rope_theta": rope.base}
    if rope.method == "none":
        params["rope_type"] = "default"
    elif rope.method == "pi" and not rope.dynamic:
        params.update(rope_type="linear", factor=rope.scale)
    elif rope.method == "ntk" and rope.dynamic and rope.scale == 1:
        # HF's dynamic NTK with factor 1 is the paper's Dynamic NTK; L = max_position_embeddings
        assert max_position_embeddings == rope.original_length
        params.update(rope_type="dynamic", factor=1.0)
    elif rope.method == "yarn" and not rope.dynamic and rope.ramp == "code":
        params.update(rope_type="yarn", factor=rope.scale, original_max_position_embeddings=rope.original_length,
                      beta_fast=rope.beta, beta_slow=rope.alpha, truncate=rope.truncate)
        if rope.attention_factor is not None:
            params["attention_factor"] = rope.attention_factor
    else:
        raise ValueError(f"no HF equivalent for {rope}")
    return params


def hf_config(args, max_position_embeddings=None):
    max_pos = max_position_embeddings or args.rope.original_length
    return LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.ffn_hidden_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads, rms_norm_eps=args.norm_eps,
        max_position_embeddings=max_pos, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
        rope_parameters=hf_rope_parameters(args.rope, max_pos), torch_dtype="float32")


def hf_state_dict(meta_state: dict, args) -> dict:
    """Meta key names and layout -> HF LlamaForCausalLM key names and layout."""
    sd = {"model.embed_tokens.weight": meta_state["tok_embeddings.weight"],
          "model.norm.weight": meta_state["norm.weight"],
          "lm_head.weight": meta_state["output.weight"]}
    for i in range(args.n_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        sd[q + "self_attn.q_proj.weight"] = permute_for_hf(meta_state[p + "attention.wq.weight"], args.n_heads)
        sd[q + "self_attn.k_proj.weight"] = permute_for_hf(meta_state[p + "attention.wk.weight"], args.n_kv_heads)
        sd[q + "self_attn.v_proj.weight"] = meta_state[p + "attention.wv.weight"]
        sd[q + "self_attn.o_proj.weight"] = meta_state[p + "attention.wo.weight"]
        sd[q + "mlp.gate_proj.weight"] = meta_state[p + "feed_forward.w1.weight"]
        sd[q + "mlp.down_proj.weight"] = meta_state[p + "feed_forward.w2.weight"]
        sd[q + "mlp.up_proj.weight"] = meta_state[p + "feed_forward.w3.weight"]
        sd[q + "input_layernorm.weight"] = meta_state[p + "attention_norm.weight"]
        sd[q + "post_attention_layernorm.weight"] = meta_state[p + "ffn_norm.weight"]
    return sd


def hf_model(model, max_position_embeddings=None) -> LlamaForCausalLM:
    """A LlamaForCausalLM holding the same weights as our Transformer."""
    cfg = hf_config(model.args, max_position_embeddings)
    cfg._attn_implementation = "eager"
    hf = LlamaForCausalLM(cfg).eval()
    missing, unexpected = hf.load_state_dict(hf_state_dict(model.state_dict(), model.args), strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return hf
