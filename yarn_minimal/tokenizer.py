"""One tokenizer interface, two backends.

- `SentencePieceTokenizer`: Meta's `tokenizer.model` (Llama 2, and this project's demo model).
- `HFTokenizer`: a Hugging Face `tokenizer.json`, read with the `tokenizers` library (Llama 3,
  SmolLM, Mistral's newer releases, and the vocabulary stored in a GGUF file).

Both give ids without special tokens; BOS/EOS are added only where the caller asks, from ids the
checkpoint states (sentencepiece's own header, tokenizer_config.json, generation_config.json or
GGUF metadata). The tokenizer never guesses them: an id it was not given is None.

`open_tokenizer(folder)` finds a model folder's tokenizer (`open_tokenizer(folder, path)` reads the
file given) and reads those statements:

    bos_id    tokenizer_config.json's bos_token (a string or {"content": ...}, turned into an id by
              the tokenizer), else generation_config.json's bos_token_id, else config.json's.
              The tokenizer's own file wins because it is what transformers' tokenizer prepends.
    eos_id    the same order for eos_token / eos_token_id: the id encode(eos=True) appends.
    eos_ids   every id that ends generation: generation_config.json's eos_token_id (else
              config.json's), which may be a list (Llama 3.1 Instruct: <|end_of_text|>, <|eom_id|>,
              <|eot_id|>) and is what transformers' generate() stops at, plus eos_id (a chat
              model's end-of-turn token). Generation stops at any of them.
    add_bos   whether the checkpoint's own encoding starts with BOS: tokenizer_config.json's
              add_bos_token when present (Llama 2: true), else what the tokenizer.json
              post-processor does (Llama 3: adds <|begin_of_text|>; SmolLM2: adds nothing), and
              true for a bare sentencepiece model (Meta's Llama 2 code always adds BOS).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Optional, Sequence


class Tokenizer:
    """encode/decode with explicit BOS/EOS. Subclasses set path, vocab_size, bos_id, eos_id and
    implement _encode, decode, piece and save."""

    kind: str                  # what it was read from: "sentencepiece", "tokenizer.json" or "gguf"
    path: Path                 # the file it was read from (shown in error messages)
    vocab_size: int
    bos_id: Optional[int]
    eos_id: Optional[int]
    eos_ids: tuple[int, ...] = ()  # every id that ends generation (eos_id first); see open_tokenizer
    add_bos: bool = True           # the checkpoint's own default for encode(bos=...); see open_tokenizer

    def set_special_tokens(self, bos_id: Optional[int], eos_id: Optional[int], eos_ids: Sequence[int] = (),
                           add_bos: Optional[bool] = None) -> None:
        """BOS/EOS as the checkpoint states them; eos_ids always includes eos_id."""
        self.bos_id, self.eos_id = bos_id, eos_id
        self.eos_ids = tuple(dict.fromkeys(([eos_id] if eos_id is not None else []) + [int(i) for i in eos_ids]))
        self.add_bos = self._own_add_bos() if add_bos is None else add_bos
        if self.add_bos and self.bos_id is None:
            raise ValueError(f"{self.path}: the checkpoint asks for BOS at the start (add_bos_token) but states no BOS token")

    def _own_add_bos(self) -> bool:
        """Whether this tokenizer adds BOS when no config says (see open_tokenizer)."""
        return self.bos_id is not None

    def max_id(self) -> int:
        """The largest id encode() can return (the embedding needs max_id() + 1 rows)."""
        return self.vocab_size - 1

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def piece(self, i: int) -> Optional[str]:
        """The token string of id i (None for an id with no token)."""
        raise NotImplementedError

    def vocab_digest(self) -> str:
        """SHA-256 of every id's token string, 0..max_id(): equal digests mean every id stands for
        the same token, whichever file the vocabulary was read from (a sentencepiece model and the
        same vocabulary in a GGUF file; a GGUF file and the tokenizer.json transformers writes from
        it). A prepared dataset records it; train.py compares it with the model's tokenizer."""
        pieces = [self.piece(i) for i in range(self.max_id() + 1)]
        return hashlib.sha256(json.dumps(pieces, ensure_ascii=False).encode()).hexdigest()

    def save(self, folder: Path) -> None:
        """Write this tokenizer's files into a model folder (so that `load` finds them there)."""
        raise NotImplementedError

    def encode(self, text: str, bos: Optional[bool] = None, eos: bool = False) -> list[int]:
        """ids of text; BOS first when bos (None: the checkpoint's own add_bos), EOS last when eos."""
        bos = self.add_bos if bos is None else bos
        if bos and self.bos_id is None:
            raise ValueError(f"{self.path}: this tokenizer has no BOS token; encode with bos=False")
        if eos and self.eos_id is None:
            raise ValueError(f"{self.path}: this tokenizer has no EOS token; encode with eos=False")
        return ([self.bos_id] if bos else []) + self._encode(text) + ([self.eos_id] if eos else [])

    def __len__(self) -> int:
        return self.vocab_size


class SentencePieceTokenizer(Tokenizer):
    """Meta's tokenizer.model; BOS and EOS come from the model's own header (1 and 2 for Llama 2)."""

    kind = "sentencepiece"

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
        self.set_special_tokens(self.sp.bos_id() if self.sp.bos_id() >= 0 else None,  # -1: the model has none
                                self.sp.eos_id() if self.sp.eos_id() >= 0 else None)

    def _encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))

    def piece(self, i: int) -> Optional[str]:
        return self.sp.id_to_piece(i)

    def save(self, folder: Path) -> None:
        """tokenizer.model, and tokenizer_config.json with BOS/EOS as pieces and add_bos_token: a
        checkpoint may state other ids or add_bos than the model's header (open_tokenizer), and
        the header alone would lose them."""
        shutil.copyfile(self.path, Path(folder) / "tokenizer.model")
        _write_tokenizer_config(self, folder)


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` (from tokenizer.json, or built from GGUF metadata) with the BOS and
    EOS ids the checkpoint states. Special tokens are never added by the backend's own
    post-processor: encode() adds BOS/EOS itself, as for sentencepiece."""

    def __init__(self, tok, bos_id: Optional[int], eos_id: Optional[int], path: str | os.PathLike,
                 eos_ids: Sequence[int] = (), add_bos: Optional[bool] = None):
        self.tok, self.path = tok, Path(path)
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.set_special_tokens(bos_id, eos_id, eos_ids, add_bos)

    @property
    def kind(self) -> str:
        return "gguf" if self.path.suffix.lower() == ".gguf" else "tokenizer.json"

    def _own_add_bos(self) -> bool:
        # what the tokenizer.json post-processor does, i.e. transformers' tokenizer by default
        return self.bos_id is not None and self.tok.encode("a", add_special_tokens=True).ids[:1] == [self.bos_id]

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

    def max_id(self) -> int:
        return max(self.tok.get_vocab(with_added_tokens=True).values())

    def piece(self, i: int) -> Optional[str]:
        return self.tok.id_to_token(i)

    def save(self, folder: Path) -> None:
        self.tok.save(str(Path(folder) / "tokenizer.json"))
        _write_tokenizer_config(self, folder)


def _write_tokenizer_config(tokenizer: Tokenizer, folder: Path) -> None:
    """tokenizer_config.json with BOS/EOS as token strings and add_bos_token, the way
    transformers writes them, so that open_tokenizer reads the same ids and add_bos back."""
    token = lambda i: None if i is None else tokenizer.piece(i)
    config = {"bos_token": token(tokenizer.bos_id), "eos_token": token(tokenizer.eos_id),
              "add_bos_token": tokenizer.add_bos}
    (Path(folder) / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


# ---------------------------------------------------------------------------------------
# A model folder's tokenizer
# ---------------------------------------------------------------------------------------

class TokenizerNotFound(FileNotFoundError):
    pass


def tokenizer_candidates(folder: Path) -> list[Path]:
    """Where a model folder's tokenizer may be, in the order tried: sentencepiece first (Meta's
    layout and Llama 2, whose HF folders carry both files), then tokenizer.json, then Meta's
    download, which keeps tokenizer.model beside the model folder."""
    return [folder / "tokenizer.model", folder / "tokenizer.json", folder.parent / "tokenizer.model"]


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _ids(value) -> list[int]:
    """An *_token_id entry: an int, a list of ints, or null."""
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list) else [value])]


def _token_id(tokenizer: Tokenizer, token, source: Path, key: str) -> Optional[int]:
    """tokenizer_config.json's bos_token / eos_token (a string or {"content": ...}) as an id."""
    if token is None:
        return None
    text = token.get("content") if isinstance(token, dict) else token
    if isinstance(tokenizer, SentencePieceTokenizer):
        i = tokenizer.sp.piece_to_id(text)
        i = None if i == tokenizer.sp.unk_id() and text != tokenizer.sp.id_to_piece(i) else i
    else:
        i = tokenizer.tok.token_to_id(text)
    if i is None:
        raise ValueError(f"{source}: {key} {text!r} is not a token of {tokenizer.path.name}")
    return i


def open_tokenizer(folder: str | os.PathLike, path: Optional[str | os.PathLike] = None) -> Tokenizer:
    """The tokenizer of a model folder, with BOS, EOS and add_bos as the folder states them
    (see the module docstring). path: the tokenizer file to read (a sentencepiece .model or a
    tokenizer.json); by default the first of tokenizer_candidates(folder), and TokenizerNotFound
    lists the files looked for when there is none."""
    folder = Path(folder)
    path = next((p for p in tokenizer_candidates(folder) if p.is_file()), None) if path is None else Path(path)
    if path is None:
        raise TokenizerNotFound(f"{folder}: no tokenizer; looked for tokenizer.model and tokenizer.json in the folder "
                                "and tokenizer.model in its parent (Meta's download keeps it there); a model needs "
                                "a sentencepiece tokenizer.model or a Hugging Face tokenizer.json")
    if path.suffix == ".model":
        tokenizer: Tokenizer = SentencePieceTokenizer(path)
    else:
        tokenizer = HFTokenizer.from_file(path, None, None)
    tok_cfg = _read_json(folder / "tokenizer_config.json")
    gen_cfg = _read_json(folder / "generation_config.json")
    model_cfg = _read_json(folder / "config.json")

    def stated(token_key: str, id_key: str, own: Optional[int]) -> tuple[Optional[int], list[int]]:
        """(the id the tokenizer uses, every id the configs list), in the order of the docstring."""
        listed = _ids(gen_cfg.get(id_key)) or _ids(model_cfg.get(id_key))
        from_tokenizer = _token_id(tokenizer, tok_cfg.get(token_key), folder / "tokenizer_config.json", token_key)
        first = next((i for i in (from_tokenizer, *listed[:1], own) if i is not None), None)
        return first, listed

    # sentencepiece's header is a statement too: it is used when no file says otherwise
    bos_id, _ = stated("bos_token", "bos_token_id", tokenizer.bos_id)
    eos_id, eos_ids = stated("eos_token", "eos_token_id", tokenizer.eos_id)
    add_bos = tok_cfg.get("add_bos_token")
    tokenizer.set_special_tokens(bos_id, eos_id, eos_ids, None if add_bos is None else bool(add_bos))
    return tokenizer
