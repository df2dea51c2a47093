"""yarn-minimal: a readable reference implementation of YaRN (arXiv 2309.00071) for Llama 2.

Public API:
    RopeConfig                      which RoPE extension method, and its parameters (rope.py)
    ModelArgs, Transformer, KVCache the Llama 2 model (model.py)
    Tokenizer                       one interface (tokenizer.py): SentencePieceTokenizer, HFTokenizer;
                                    open_tokenizer(folder) reads a model folder's, with its BOS/EOS
    load(path, rope=None, device="cpu", dtype=torch.float32, progress=False) -> (model, tokenizer)
        reads Meta's raw layout (any number of shards), Hugging Face folders, our own, and .gguf files
    save(model, tokenizer, path, format="meta" | "hf" | "gguf")
    load_tokenizer(path) -> tokenizer   a model folder's, a tokenizer.model / tokenizer.json file's (with
                                    the BOS/EOS its folder states) or a .gguf file's, without weights
    generate(model, prompt_tokens, max_new_tokens, temperature=0.0, top_p=1.0, seed=None) -> list[int]
                                    stops at the checkpoint's EOS ids (model.eos_ids) unless ignore_eos=True
    stream(...)                     the same, yielding tokens as they are made (generation.py)
    GenerationConfig, GenerationStats   a request's options (checked when made); what a run measured
"""
import importlib

# The API is imported on first use (PEP 562): `import yarn_minimal` itself loads no torch, so that
# a script (and `python -m yarn_minimal`) can make Ctrl-C quiet (ctrl_c.py) before the seconds
# that torch takes to load.
_API = {"RopeConfig": "rope", "ModelArgs": "model", "Transformer": "model", "KVCache": "model",
        "Tokenizer": "tokenizer", "SentencePieceTokenizer": "tokenizer", "HFTokenizer": "tokenizer",
        "open_tokenizer": "tokenizer", "load": "checkpoint", "load_tokenizer": "checkpoint", "save": "checkpoint",
        "CheckpointError": "checkpoint", "generate": "generation", "stream": "generation",
        "GenerationConfig": "generation", "GenerationStats": "generation"}
__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
