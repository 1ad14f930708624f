"""Intra-document attention masking (Llama 3): the document layout of a packed micro-batch.

A packed sample is a run of consecutive tokens of the corpus, where every document is followed by the EOS token.
A document starts at the sample's first token and right after every EOS (the EOS belongs to the document it ends).
A sample may start in the middle of a document: its leading tokens are then a document of their own, at
positions from 0, as Megatron's reset_position_ids and Llama 3 do. With document masking a token attends only to
the earlier tokens of its own document, and its rotary position is its offset from its document's start.

`DocumentMask.from_tokens(input_ids, eos_id)` derives the layout once per micro-batch, from the token ids the
first pipeline stage embeds; the same object goes to every stage's `Llama.forward(..., documents=...)` (a later
stage holds hidden states, not token ids) and is shared by all layers. It carries the layout in the forms the
attention implementations want: per-token segment ids and positions, the boolean [b, 1, s, s] mask (SDPA),
per-row document lengths (per-document SDPA) and flash-attention varlen's cu_seqlens / max_seqlen.
"""
from __future__ import annotations

from itertools import pairwise

import torch

# Attention over document spans: "segments" runs causal SDPA per document span; "sdpa" runs SDPA once with the
# boolean block mask. benchmarks/bench_document_mask.py (fp32 fwd+bwd, 2 CPU threads, b=4 h=8 d=64 s=2048, 14
# documents of 85-1280 tokens): segments 0.52x the time of plain causal SDPA, the block mask 1.77x; at s=256 with
# 30 documents of 3-153 tokens 0.66x and 0.94x. Segments is the default.
IMPLEMENTATIONS = ("segments", "sdpa")
DEFAULT_IMPL = "segments"


class DocumentMask:
    """The document layout of a micro-batch [b, s].

    segment_ids [b, s]: the document index of each token within its row (0, 1, ...; non-decreasing).
    positions [b, s]: each token's offset from its document's first token (RoPE positions).
    cu_seqlens: int32 [n + 1], the start of each of the n documents in the flattened b * s tokens, then b * s
    (flash-attention varlen's layout: rows never share a document, since every row starts one).
    max_seqlen: the longest document. lengths: per row, the lengths of its documents in order.
    single: True when every row is one document (plain causal attention, the default path, applies).
    impl: how attention uses it, one of IMPLEMENTATIONS.
    """

    def __init__(self, starts: torch.Tensor, impl: str = DEFAULT_IMPL):
        """starts: boolean [b, s], True where a document starts (column 0 is always a start)."""
        if impl not in IMPLEMENTATIONS:
            raise ValueError(f"DocumentMask: impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
        if starts.dim() != 2 or starts.dtype != torch.bool:
            raise ValueError("DocumentMask: starts must be a boolean [batch, seq] tensor")
        starts = starts.clone()
        starts[:, 0] = True
        b, s = starts.shape
        self.impl = impl
        self.segment_ids = starts.long().cumsum(1) - 1
        index = torch.arange(s, device=starts.device).expand(b, s)
        self.positions = index - torch.where(starts, index, 0).cummax(1).values
        flat = starts.flatten().nonzero().squeeze(1)
        total = torch.tensor([b * s], device=starts.device)
        self.cu_seqlens = torch.cat([flat, total]).to(torch.int32)
        # the one host copy: the lengths drive Python control flow (and a varlen kernel needs max_seqlen on the host)
        bounds = self.cu_seqlens.tolist()
        self.max_seqlen = max(e - a for a, e in pairwise(bounds))
        self.lengths: list[list[int]] = [[] for _ in range(b)]
        for a, e in pairwise(bounds):
            self.lengths[a // s].append(e - a)
        self.single = len(bounds) - 1 == b
        self._mask = None

    @classmethod
    def from_tokens(cls, input_ids: torch.Tensor, eos_id: int, impl: str = DEFAULT_IMPL) -> DocumentMask:
        """The layout of input_ids [b, s]: a document starts at column 0 and after every eos_id."""
        starts = torch.zeros(input_ids.shape, dtype=torch.bool, device=input_ids.device)
        starts[:, 1:] = input_ids[:, :-1] == eos_id
        return cls(starts, impl)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.segment_ids.shape)

    @property
    def mask(self) -> torch.Tensor:
        """Boolean [b, 1, s, s]: query i may attend key j when j <= i and both are in the same document. Built on
        first use (only the sdpa implementation needs it) and kept for the other layers."""
        if self._mask is None:
            seg = self.segment_ids
            s = seg.shape[1]
            causal = torch.ones(s, s, dtype=torch.bool, device=seg.device).tril()
            self._mask = ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]
        return self._mask

    def to(self, device, non_blocking: bool = False) -> DocumentMask:
        """The same layout with its tensors on `device`; non_blocking: from host memory through pinned copies, so
        that the host does not wait for the device."""
        device = torch.device(device)

        def move(t: torch.Tensor) -> torch.Tensor:
            if non_blocking and t.device.type == "cpu" and device.type == "cuda":
                t = t.pin_memory()
            return t.to(device, non_blocking=non_blocking)
        out = object.__new__(DocumentMask)
        out.__dict__.update(self.__dict__)
        for name in ("segment_ids", "positions", "cu_seqlens"):
            setattr(out, name, move(getattr(self, name)))
        out._mask = None if self._mask is None else move(self._mask)
        return out

    def __repr__(self) -> str:
        b, s = self.shape
        return (f"DocumentMask(batch={b}, seq={s}, documents={len(self.cu_seqlens) - 1}, "
                f"max_seqlen={self.max_seqlen}, impl={self.impl!r})")
