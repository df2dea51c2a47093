"""One tokenizer interface, two backends.

- `SentencePieceTokenizer`: Meta's `tokenizer.model` (Llama 2, and this project's demo model).
- `HFTokenizer`: a Hugging Face `tokenizer.json`, read with the `tokenizers` library (Llama 3,
  SmolLM, Mistral's newer releases, and the vocabulary stored in a GGUF file).

Both give ids without special tokens; BOS/EOS are added only where the caller asks, from ids the
checkpoint states (sentencepiece's own header, tokenizer_config.json, generation_config.json or
GGUF metadata). The tokenizer never guesses them: an id it was not given is None.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional


class Tokenizer:
    """encode/decode with explicit BOS/EOS. Subclasses set path, vocab_size, bos_id, eos_id and
    implement _encode, decode and save."""

    path: Path                 # the file it was read from (shown in error messages)
    vocab_size: int
    bos_id: Optional[int]
    eos_id: Optional[int]

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def save(self, folder: Path) -> None:
        """Write this tokenizer's files into a model folder (so that `load` finds them there)."""
        raise NotImplementedError

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        if bos and self.bos_id is None:
            raise ValueError(f"{self.path}: this tokenizer has no BOS token; encode with bos=False")
        if eos and self.eos_id is None:
            raise ValueError(f"{self.path}: this tokenizer has no EOS token; encode with eos=False")
        return ([self.bos_id] if bos else []) + self._encode(text) + ([self.eos_id] if eos else [])

    def __len__(self) -> int:
        return self.vocab_size


class SentencePieceTokenizer(Tokenizer):
    """Meta's tokenizer.model; BOS and EOS come from the model's own header (1 and 2 for Llama 2)."""

    def __init__(self, model_path: str | os.PathLike):
        from sentencepiece import SentencePieceProcessor

        self.path = Path(model_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: tokenizer model not found")
        self.sp = SentencePieceProcessor()
        try:
            self.sp.Load(str(self.path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{self.path}: not a readable sentencepiece model ({e})") from None
        self.vocab_size = self.sp.vocab_size()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None  # -1: the model has none
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None

    def _encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))

    def save(self, folder: Path) -> None:
        shutil.copyfile(self.path, Path(folder) / "tokenizer.model")


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` (from tokenizer.json, or built from GGUF metadata) with the BOS and
    EOS ids the checkpoint states. Special tokens are never added by the backend's own
    post-processor: encode() adds BOS/EOS itself, as for sentencepiece."""

    def __init__(self, tok, bos_id: Optional[int], eos_id: Optional[int], path: str | os.PathLike):
        self.tok, self.path = tok, Path(path)
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id = bos_id, eos_id

    @classmethod
    def from_file(cls, path: str | os.PathLike, bos_id: Optional[int], eos_id: Optional[int]) -> "HFTokenizer":
        from tokenizers import Tokenizer as Backend

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: tokenizer.json not found")
        try:
            tok = Backend.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception on malformed JSON
            raise ValueError(f"{path}: not a readable Hugging Face tokenizer.json ({e})") from None
        return cls(tok, bos_id, eos_id, path)

    def _encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def save(self, folder: Path) -> None:
        self.tok.save(str(Path(folder) / "tokenizer.json"))
