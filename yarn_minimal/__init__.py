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
import sys


def _runpy_is_starting_one_of_our_modules() -> bool:
    """`python -m yarn_minimal.rope` (likewise .checkpoint and .data) imports this package, then
    runs the module's file as __main__. Importing the API here too would first run that file as
    yarn_minimal.rope, and runpy would warn about the second run. sys.argv[0] is "-m" only while
    runpy imports the package of the module it is about to run; sys.orig_argv says which one."""
    argv = sys.orig_argv
    return sys.argv[:1] == ["-m"] and "-m" in argv and argv[argv.index("-m") + 1].startswith(f"{__name__}.")


if not _runpy_is_starting_one_of_our_modules():
    from .checkpoint import CheckpointError, load, load_tokenizer, save
    from .generation import GenerationConfig, GenerationStats, generate, stream
    from .model import KVCache, ModelArgs, Transformer
    from .rope import RopeConfig
    from .tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer, open_tokenizer

__all__ = ["RopeConfig", "ModelArgs", "Transformer", "KVCache", "Tokenizer", "SentencePieceTokenizer",
           "HFTokenizer", "open_tokenizer", "load", "load_tokenizer", "save", "CheckpointError", "generate", "stream",
           "GenerationConfig", "GenerationStats"]
