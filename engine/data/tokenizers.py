"""Tokenizers: a byte-level one (always available) and Hugging Face `tokenizer.json` files."""
from __future__ import annotations

import numpy as np


class ByteTokenizer:
    """UTF-8 bytes 0..255, then BOS, EOS and PAD: a 259-token vocabulary that needs no files."""

    vocab_size = 259
    bos_id, eos_id, pad_id = 256, 257, 258

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A `tokenizer.json` file read by the `tokenizers` package (optional dependency)."""

    EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eot_id|>")

    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise RuntimeError(f"--tokenizer {path}: reading tokenizer.json files needs the 'tokenizers' package; "
                               "pip install tokenizers, or use --tokenizer byte") from None
        self._tok = Tokenizer.from_file(path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        ids = [self._tok.token_to_id(name) for name in self.EOS_NAMES]
        ids = [i for i in ids if i is not None]
        if not ids:
            raise RuntimeError(f"--tokenizer {path}: no end-of-document token among {self.EOS_NAMES}; "
                               "add one to the tokenizer")
        self.eos_id = ids[0]

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])


def build_tokenizer(spec: str):
    return ByteTokenizer() if spec == "byte" else HFTokenizer(spec)
