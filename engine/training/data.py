"""The trainer's data, prepared before any process group exists: the tokenizer, the training and validation
datasets of --data (one source, or a weighted blend), and checks that the token ids fit the model, so every
problem with the data is one line and exit status 2 before the job starts."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.data.blend import BlendedDataset, parse_blend
from engine.data.cache import default_cache_dir
from engine.data.datasets import load_stream, train_valid_split
from engine.data.tokenizers import build_tokenizer
from engine.training.config import Config, ConfigError


@dataclass
class Source:
    name: str             # the --data path(s), or "built-in corpus"
    weight: float | None  # its share of the blend (None: no blend)
    documents: int
    tokens: int
    train_samples: int


@dataclass
class TrainingData:
    tokenizer: object
    train: torch.utils.data.Dataset
    valid: torch.utils.data.Dataset | None
    sources: list[Source]
    blend: BlendedDataset | None  # the training set when --data is a blend (per-source sample counts)


def model_vocab_size(cfg: Config, tokenizer) -> int:
    """The model's vocabulary: --vocab-size, else the tokenizer's."""
    return cfg.model.vocab_size or tokenizer.vocab_size


def check_token_ids(stream, name: str, tokenizer, vocab_size: int, tokenizer_spec: str) -> None:
    """Raises ValueError when the data was written by another tokenizer or holds ids the model has no row for."""
    written_with = getattr(stream, "vocab_size", None)
    if written_with is not None and written_with != tokenizer.vocab_size:
        raise ValueError(f"--data {name}: was preprocessed with a {written_with}-token tokenizer, but --tokenizer "
                         f"{tokenizer_spec} has {tokenizer.vocab_size} tokens; train with the tokenizer that wrote it")
    max_id = getattr(stream, "max_id", None)
    if max_id is None and len(stream.tokens):
        max_id = int(np.max(stream.tokens))  # an index file without the header field
    if max_id is not None and max_id >= vocab_size:
        raise ValueError(f"--data {name}: holds token id {max_id}, but the model's vocabulary has {vocab_size} ids; "
                         "preprocess with the tokenizer you train with, or raise --vocab-size")


def cache_dir(spec: str) -> str | None:
    """--data-cache: 'auto' -> the user's cache directory, 'none' -> None (tokenize in memory), else the path."""
    return {"auto": default_cache_dir(), "none": None}.get(spec, spec)


def prepare_data(cfg: Config) -> TrainingData:
    """Tokenizer, datasets and the token-id check of cfg.data; raises ConfigError with one line per problem."""
    d, seq = cfg.data, cfg.model_config().seq_length
    try:
        tokenizer = build_tokenizer(d.tokenizer, d.eos_token)
        vocab = model_vocab_size(cfg, tokenizer)
        entries = parse_blend(d.data or [])
        weighted = bool(entries) and entries[0][0] is not None
        groups = [(w, [path]) for w, path in entries] if weighted else [(None, list(d.data or []))]
        sources, trains, valids = [], [], []
        for weight, paths in groups:
            name = " ".join(paths) or "built-in corpus"
            stream = load_stream(paths or None, tokenizer, cache_dir(d.data_cache), d.text_field)
            check_token_ids(stream, name, tokenizer, vocab, d.tokenizer)
            train, valid = train_valid_split(stream, seq, d.valid_fraction)
            sources.append(Source(name, weight, len(stream.doc_offsets) - 1, len(stream.tokens), len(train)))
            trains.append(train)
            valids += [valid] if valid is not None else []
    except (OSError, ValueError, RuntimeError) as exc:
        raise ConfigError(str(exc)) from None
    if not weighted:
        return TrainingData(tokenizer, trains[0], valids[0] if valids else None, sources, None)
    blend = BlendedDataset(trains, [s.weight for s in sources], cfg.run.seed)
    valid = torch.utils.data.ConcatDataset(valids) if valids else None
    return TrainingData(tokenizer, blend, valid, sources, blend)
