"""A thin sentencepiece wrapper with Llama 2's conventions (BOS = 1, EOS = 2)."""
from __future__ import annotations

import os
from pathlib import Path

from sentencepiece import SentencePieceProcessor


class Tokenizer:
    def __init__(self, model_path: str | os.PathLike):
        self.path = Path(model_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: tokenizer model not found")
        self.sp = SentencePieceProcessor()
        try:
            self.sp.Load(str(self.path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{self.path}: not a readable sentencepiece model ({e})") from None
        self.vocab_size: int = self.sp.vocab_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))

    def __len__(self) -> int:
        return self.vocab_size
