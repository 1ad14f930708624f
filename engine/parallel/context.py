"""Context parallelism: ring attention over a cp group, exact against dense causal attention.

Layout (causal load balancing): a sequence of length S is cut into 2*cp chunks and cp rank r holds chunks r and
2*cp-1-r, in that order. Early chunks see few keys and late chunks many, so pairing them gives every rank the
same causal work. `shard_sequence` / `unshard_sequence` move between the full and the sharded layout.

Ring: each rank keeps its queries; the k/v blocks (with their segment ids) travel around the group, rank r
sending to r+1 and receiving from r-1. At step i rank r holds the block of rank (r - i) % cp; the transfer of the
next block is started before the current block is computed and waited for after it. Partial outputs are merged
with the log-sum-exp rule. The backward pass circulates k/v the same way, together with the fp32 dK/dV
accumulators of the block being held: each rank adds its contribution and passes the accumulator on, so after cp
steps (one extra hop) every block's gradient is back at its owner.

Each (queries, k/v block) pair is computed in query tiles (each half of the shard on its own, at most
TILE_ELEMENTS scores per tile), and every tile is trimmed with the positions (known on the host from the layout,
no device sync): keys no query of the tile sees are left out, and a tile that sees all its keys gets no mask.
With load balancing an off-diagonal step is then half a block without a mask, and the diagonal step three
quarters of one.

`block_attention` / `block_attention_backward` are the only compute: on CPU aten's fused flash-attention kernels
(`_scaled_dot_product_flash_attention_for_cpu` and its backward, which return / take the log-sum-exp), elsewhere or
with FAST_CPU_KERNEL off a plain-torch kernel (the reference). A fused kernel for another device
(flash-attention's varlen) can slot in the same way.
"""
from __future__ import annotations

import itertools
import time

import torch
import torch.distributed as dist

# Set to {"compute": 0.0, "wait": 0.0} to accumulate the seconds spent in block compute and waiting on the ring's
# transfers (host wall time, meaningful on CPU; benchmarks only).
TIMINGS: dict | None = None
# Queries are processed in tiles whose score matrix (batch x query heads x rows x keys) holds at most this many
# elements, which bounds the memory of long sequences (64 MiB of fp32 scores per tile).
TILE_ELEMENTS = 1 << 24
# Use aten's fused CPU flash-attention kernels for CPU tensors (2.47x faster ring attention fwd+bwd at cp 1, S 4096,
# fp32, 1 thread). They agree with the plain-torch kernel to fp32 rounding (~1e-6 on gradients of order 1-10);
# False: the plain kernel everywhere (the reference). Before torch 2.5 the kernels take no GQA (they abort) and give
# NaN for a row that sees no key, so the plain kernel runs there.
FAST_CPU_KERNEL = torch.__version__ >= (2, 5)


def shard_positions(seq_len: int, cp: int, cp_rank: int) -> torch.Tensor:
    """The global token positions cp rank `cp_rank` holds, in order: chunks cp_rank and 2*cp-1-cp_rank."""
    if seq_len % (2 * cp):
        raise ValueError(f"sequence length {seq_len} is not divisible by 2 x cp = {2 * cp}; pick a sequence "
                         f"length that is a multiple of {2 * cp}")
    if cp == 1:
        return torch.arange(seq_len)
    c = seq_len // (2 * cp)
    first, second = cp_rank * c, (2 * cp - 1 - cp_rank) * c
    return torch.cat([torch.arange(first, first + c), torch.arange(second, second + c)])


def shard_sequence(x: torch.Tensor, cp: int, cp_rank: int, dim: int = 1) -> torch.Tensor:
    """This rank's part of a full-sequence tensor (sequence along `dim`)."""
    if cp == 1:
        return x
    seq_len = x.shape[dim]
    if seq_len % (2 * cp):
        raise ValueError(f"sequence length {seq_len} is not divisible by 2 x cp = {2 * cp}")
    c = seq_len // (2 * cp)
    return torch.cat([x.narrow(dim, cp_rank * c, c), x.narrow(dim, (2 * cp - 1 - cp_rank) * c, c)], dim)


def unshard_sequence(parts: list, cp: int, dim: int = 1) -> torch.Tensor:
    """The full-sequence tensor from the parts of cp ranks 0..cp-1 (the inverse of shard_sequence)."""
    if len(parts) != cp:
        raise ValueError(f"{len(parts)} parts for cp = {cp}")
    if cp == 1:
        return parts[0]
    halves = [p.chunk(2, dim) for p in parts]
    chunks = [h[0] for h in halves] + [h[1] for h in reversed(halves)]
    return torch.cat(chunks, dim)


def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [b, hq, sq, d] against one k/v block [b, hkv, sk, d] (hq a multiple of hkv; query head h
    uses kv head h // (hq/hkv)). mask: None (every key visible) or bool broadcastable to [b, 1, sq, sk], True =
    visible. Returns (out [b, hq, sq, d], lse [b, hq, sq]), both fp32; a row that sees no key gets lse -inf and
    out 0."""
    if FAST_CPU_KERNEL and q.device.type == "cpu":
        return _cpu_flash_attention(q, k, v, mask, scale)
    return _plain_attention(q, k, v, mask, scale)


def block_attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             lse: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor | None,
                             scale: float, out: torch.Tensor | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one block of block_attention (flash-attention style): lse [b, hq, sq] is the log-sum-exp
    over ALL keys of the rows, delta = rowsum(dout * out) with the final out. out (optional): that final out
    [b, hq, sq, d]; fused kernels that form delta themselves from (dout, out) need it, and without it the plain
    kernel runs. Returns fp32 (dq, dk, dv); dk/dv are summed over the query heads that share a kv head."""
    if FAST_CPU_KERNEL and q.device.type == "cpu" and out is not None:
        return _cpu_flash_attention_backward(dout, q, k, v, out, lse, mask, scale)
    return _plain_attention_backward(dout, q, k, v, lse, delta, mask, scale)


def _additive(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A bool visibility mask as the fp32 additive mask aten's CPU flash kernels take (0 visible, -inf not)."""
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, float("-inf"))


def _cpu_flash_attention(q, k, v, mask, scale):
    """block_attention with aten's fused CPU kernel, in fp32 (it handles GQA itself, kv head h // (hq/hkv)). A
    row whose mask is all False comes back with out 0 and lse 0; its lse is set to -inf here for the merge."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.float(), k.float(), v.float(), 0.0, False, attn_mask=_additive(mask), scale=scale)
    if mask is not None:
        lse = lse.masked_fill(~mask.any(-1), float("-inf"))
    return out, lse


def _cpu_flash_attention_backward(dout, q, k, v, out, lse, mask, scale):
    """block_attention_backward with aten's fused CPU kernel: it forms P = exp(s * scale + mask - lse) from the
    lse given and delta = rowsum(dout * out) from the out given, so the final lse and out give this block's part
    of the gradients. lse -inf (a row that sees nothing at all) becomes 0, where every score is masked."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout.float(), q.float(), k.float(), v.float(), out.float(), _finite(lse.float()), 0.0, False,
        attn_mask=_additive(mask), scale=scale)


def _plain_attention(q, k, v, mask, scale):
    """block_attention in plain torch (any device; the reference)."""
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    g = hq // hkv
    # queries grouped by their kv head: one matmul per kv head, no expanded copy of k/v
    qg = q.float().reshape(b, hkv, g * sq, d)
    s = torch.matmul(qg, k.float().transpose(-1, -2)).mul_(scale).view(b, hkv, g, sq, sk)
    if mask is not None:
        s.masked_fill_(~mask.unsqueeze(2), float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - _finite(lse).unsqueeze(-1))
    out = torch.matmul(p.view(b, hkv, g * sq, sk), v.float())
    return out.view(b, hq, sq, d), lse.view(b, hq, sq)


def _plain_attention_backward(dout, q, k, v, lse, delta, mask, scale):
    """block_attention_backward in plain torch (any device; the reference)."""
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    g = hq // hkv
    qg = q.float().reshape(b, hkv, g * sq, d)
    kf, vf = k.float(), v.float()
    dog = dout.float().reshape(b, hkv, g * sq, d)
    s = torch.matmul(qg, kf.transpose(-1, -2)).mul_(scale).view(b, hkv, g, sq, sk)
    if mask is not None:
        s.masked_fill_(~mask.unsqueeze(2), float("-inf"))
    p = torch.exp(s - _finite(lse).view(b, hkv, g, sq, 1)).view(b, hkv, g * sq, sk)
    dv = torch.matmul(p.transpose(-1, -2), dog)
    dp = torch.matmul(dog, vf.transpose(-1, -2))
    ds = p.mul_(dp.sub_(delta.reshape(b, hkv, g * sq, 1))).mul_(scale)
    dq = torch.matmul(ds, kf).view(b, hq, sq, d)
    dk = torch.matmul(ds.transpose(-1, -2), qg)
    return dq, dk, dv


# --compile: the ring's transfers, trimmed tiles and data-dependent masks stay eager (one graph before the attention
# core and one after it, instead of a trace broken at every transfer)
@torch.compiler.disable
def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group=None,
                   segment_ids: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Causal attention of this rank's queries against the whole sequence, spread over the cp `group`.

    q [b, hq, s_local, d], k/v [b, hkv, s_local, d]: this rank's tokens in the load-balanced layout
    (shard_sequence with the group's size and this rank's index in it); the group's size and rank define the
    global positions. segment_ids [b, s_local] (optional, any integer dtype): a token attends only to keys of the
    same segment (document), in addition to key position <= query position. group None or of size 1: the same
    computation on one rank. Returns out [b, hq, s_local, d] in q's dtype."""
    if q.dim() != 4 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"ring_attention expects q [b, hq, s, d] and k, v [b, hkv, s, d]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} are not a multiple of kv heads {k.shape[1]}")
    if segment_ids is not None and segment_ids.shape != (q.shape[0], q.shape[2]):
        raise ValueError(f"segment_ids must be [b, s_local] = {(q.shape[0], q.shape[2])}; "
                         f"got {tuple(segment_ids.shape)}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _RingAttention.apply(q, k, v, group, segment_ids, scale)


def _finite(lse: torch.Tensor) -> torch.Tensor:
    """lse with -inf (rows that see nothing) replaced by 0, so exp(s - lse) is 0 there instead of nan."""
    return lse.masked_fill(lse == float("-inf"), 0.0)


def _ring(group) -> tuple[int, int, list[int]]:
    """(cp, this rank's index in the group, the group's global ranks in group order)."""
    if group is None or dist.get_world_size(group) == 1:
        return 1, 0, [0]
    return dist.get_world_size(group), dist.get_rank(group), dist.get_process_group_ranks(group)


def _exchange(tensors: list, group, cp: int, rank: int, peers: list[int]):
    """Starts sending `tensors` to the next rank of the ring and receiving as many from the previous one;
    returns (requests, receive buffers)."""
    recv = [torch.empty_like(t) for t in tensors]
    nxt, prv = peers[(rank + 1) % cp], peers[(rank - 1) % cp]
    ops = [dist.P2POp(dist.isend, t, nxt, group) for t in tensors]
    ops += [dist.P2POp(dist.irecv, t, prv, group) for t in recv]
    return dist.batch_isend_irecv(ops), recv


def _wait(reqs) -> None:
    start = time.perf_counter()
    for r in reqs:
        r.wait()
    if TIMINGS is not None:
        TIMINGS["wait"] += time.perf_counter() - start


def _box(qpos: torch.Tensor, kpos: torch.Tensor):
    """(row slice, column slice, fully visible) of the part of a (queries, keys) block that causality leaves,
    from host positions; None when no query sees any key."""
    rows = (qpos >= kpos.min()).nonzero()
    if rows.numel() == 0:
        return None
    cols = (kpos <= qpos.max()).nonzero()
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    full = bool(qpos[r0:r1].min() >= kpos[c0:c1].max())
    return slice(r0, r1), slice(c0, c1), full


def _pieces(qpos: torch.Tensor, kpos: torch.Tensor, halves: bool, keys_per_row: int) -> list:
    """The boxes (rows, cols, fully visible) to compute for one (queries, keys) block: the queries in tiles whose
    score matrices hold at most TILE_ELEMENTS (keys_per_row = batch x query heads x keys), each half of a
    load-balanced shard tiled on its own, and every tile trimmed by causality with _box."""
    s = qpos.numel()
    rows_per_tile = max(1, TILE_ELEMENTS // max(1, keys_per_row))
    bounds = [0, s // 2, s] if halves else [0, s]
    pieces = []
    for a, b in itertools.pairwise(bounds):
        n = -(-(b - a) // rows_per_tile)
        edges = [a + (b - a) * j // n for j in range(n + 1)]
        for r0, r1 in itertools.pairwise(edges):
            box = _box(qpos[r0:r1], kpos)
            if box is not None:
                rows, cols, full = box
                pieces.append((slice(r0 + rows.start, r0 + rows.stop), cols, full))
    return pieces


def _block_mask(qpos, kpos, full, qseg, kseg, device):
    """The visibility mask of a box, [1 or b, 1, sq, sk], or None when everything is visible."""
    mask = None
    if not full:
        mask = (kpos.to(device).unsqueeze(0) <= qpos.to(device).unsqueeze(1))[None, None]
    if qseg is not None:
        same = (qseg.unsqueeze(-1) == kseg.unsqueeze(-2)).unsqueeze(1)
        mask = same if mask is None else mask & same
    return mask


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, segment_ids, scale):
        cp, rank, peers = _ring(group)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        seg = None if segment_ids is None else segment_ids.contiguous()
        b, hq, s, _ = q.shape
        qpos = shard_positions(s * cp, cp, rank)
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
        block = [k, v] if seg is None else [k, v, seg]
        for i in range(cp):
            reqs = _exchange(block, group, cp, rank, peers) if i < cp - 1 else None
            start = time.perf_counter()
            kpos = shard_positions(s * cp, cp, (rank - i) % cp)
            for rows, cols, full in _pieces(qpos, kpos, cp > 1, b * hq * s):
                mask = _block_mask(qpos[rows], kpos[cols], full, None if seg is None else seg[:, rows],
                                   None if seg is None else block[2][:, cols], q.device)
                o_b, lse_b = block_attention(q[:, :, rows], block[0][:, :, cols], block[1][:, :, cols], mask, scale)
                _merge(out[:, :, rows], lse[:, :, rows], o_b, lse_b)
            if TIMINGS is not None:
                TIMINGS["compute"] += time.perf_counter() - start
            if reqs is not None:
                _wait(reqs[0])
                block = reqs[1]
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, seg)
        ctx.group, ctx.scale = group, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, seg = ctx.saved_tensors
        group, scale = ctx.group, ctx.scale
        cp, rank, peers = _ring(group)
        dout = dout.contiguous()
        b, hq, s, _ = q.shape
        qpos = shard_positions(s * cp, cp, rank)
        delta = (dout.float() * out.float()).sum(-1)
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        block = [k, v] if seg is None else [k, v, seg]
        grad_reqs = None
        for i in range(cp):
            reqs = _exchange(block, group, cp, rank, peers) if i < cp - 1 else None
            start = time.perf_counter()
            kpos = shard_positions(s * cp, cp, (rank - i) % cp)
            dkv = [torch.zeros(k.shape, dtype=torch.float32, device=k.device) for _ in range(2)]
            for rows, cols, full in _pieces(qpos, kpos, cp > 1, b * hq * s):
                mask = _block_mask(qpos[rows], kpos[cols], full, None if seg is None else seg[:, rows],
                                   None if seg is None else block[2][:, cols], q.device)
                dq_b, dk_b, dv_b = block_attention_backward(dout[:, :, rows], q[:, :, rows], block[0][:, :, cols],
                                                            block[1][:, :, cols], lse[:, :, rows],
                                                            delta[:, :, rows], mask, scale,
                                                            out=out[:, :, rows])
                dq[:, :, rows] += dq_b
                dkv[0][:, :, cols] += dk_b
                dkv[1][:, :, cols] += dv_b
            if TIMINGS is not None:
                TIMINGS["compute"] += time.perf_counter() - start
            # add the gradients the other ranks have accumulated for the block held now (the previous rank sent
            # them after its compute one step ago), then pass them on
            if grad_reqs is not None:
                _wait(grad_reqs[0])
                dkv[0] += grad_reqs[1][0]
                dkv[1] += grad_reqs[1][1]
            if cp > 1:
                grad_reqs = _exchange(dkv, group, cp, rank, peers)
            if reqs is not None:
                _wait(reqs[0])
                block = reqs[1]
        if cp > 1:  # the last hop brings this rank's own block's gradients home
            _wait(grad_reqs[0])
            dkv = grad_reqs[1]
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None


def _merge(out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> None:
    """out, lse (views into the running result) <- the log-sum-exp merge of themselves and one block's
    (out_b, lse_b); rows that have seen nothing so far keep lse -inf and out 0."""
    new = torch.logaddexp(lse, lse_b)
    safe = _finite(new)
    out.mul_(torch.exp(lse - safe).unsqueeze(-1)).add_(out_b * torch.exp(lse_b - safe).unsqueeze(-1))
    lse.copy_(new)
