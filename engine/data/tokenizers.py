"""Tokenizers: a byte-level one (always available) and Hugging Face `tokenizer.json` files."""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np


class ByteTokenizer:
    """UTF-8 bytes 0..255, then BOS, EOS and PAD: a 259-token vocabulary that needs no files."""

    vocab_size = 259
    bos_id, eos_id, pad_id = 256, 257, 258
    fingerprint = "byte"  # what names its tokenization (engine.data.cache)

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8).astype(np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


def _special_token_text(value) -> str | None:
    """tokenizer_config.json writes a special token as a string or as {"content": ...} (AddedToken)."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


class HFTokenizer:
    """A `tokenizer.json` file read by the `tokenizers` package (optional dependency). The end-of-document token
    is `eos_token` when given (--eos-token), else the `eos_token` of a `tokenizer_config.json` beside the file
    (Hugging Face's convention), else the first of the common names in EOS_NAMES the vocabulary holds."""

    EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "[EOS]", "<|im_end|>")

    def __init__(self, path: str, eos_token: str | None = None):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise RuntimeError(f"--tokenizer {path}: reading tokenizer.json files needs the 'tokenizers' package; "
                               "pip install tokenizers, or use --tokenizer byte") from None
        try:
            self._tok = Tokenizer.from_file(path)
            # A saved padding would pad every document of a batch to the longest, a saved truncation cut documents:
            # the data path wants each document's own ids, whole.
            self._tok.no_padding()
            self._tok.no_truncation()
            with open(path, "rb") as fh:
                digest = hashlib.sha256(fh.read()).hexdigest()
        except Exception as exc:  # noqa: BLE001 - the Rust library raises a bare Exception for any parse error
            raise ValueError(f"--tokenizer {path}: not a readable tokenizer.json ({str(exc)[:120]}); give the "
                             "tokenizer.json a Hugging Face tokenizer was saved with") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        config = self._config(path)
        named_by = "--eos-token" if eos_token else "tokenizer_config.json's eos_token"
        eos_token = eos_token or _special_token_text(config.get("eos_token"))
        if eos_token:
            self.eos_id = self._tok.token_to_id(eos_token)
            if self.eos_id is None:
                raise ValueError(f"--tokenizer {path}: {named_by} {eos_token!r} is not in its vocabulary; name a "
                                 "token it has with --eos-token")
        else:
            ids = [i for i in (self._tok.token_to_id(name) for name in self.EOS_NAMES) if i is not None]
            if not ids:
                raise ValueError(f"--tokenizer {path}: no end-of-document token among {', '.join(self.EOS_NAMES)}; "
                                 "name the one it has with --eos-token TEXT")
            self.eos_id = ids[0]
        bos = _special_token_text(config.get("bos_token"))
        self.bos_id = self._tok.token_to_id(bos) if bos else None
        self.fingerprint = f"tokenizer.json sha256 {digest}, eos {self.eos_id}"

    @staticmethod
    def _config(path: str) -> dict:
        """tokenizer_config.json beside tokenizer.json ({} when there is none)."""
        config_path = os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer_config.json")
        if not os.path.isfile(config_path):
            return {}
        try:
            with open(config_path, encoding="utf-8") as fh:
                config = json.load(fh)
        except (OSError, ValueError) as exc:
            raise ValueError(f"--tokenizer: {config_path} is not readable JSON ({exc}); fix or remove it") from None
        return config if isinstance(config, dict) else {}

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Encodes on every core (the tokenizers library's threads; TOKENIZERS_PARALLELISM=false turns them off)."""
        return [np.asarray(e.ids, dtype=np.int32) for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])


def build_tokenizer(spec: str, eos_token: str | None = None):
    """'byte' or a tokenizer.json path; eos_token (--eos-token) names the end-of-document token of the latter."""
    if spec == "byte":
        if eos_token is not None:
            raise ValueError("--eos-token: only for a tokenizer.json (--tokenizer byte has its own EOS id 257)")
        return ByteTokenizer()
    return HFTokenizer(spec, eos_token)
