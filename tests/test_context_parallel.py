"""Context parallelism: the load-balanced sequence layout and ring attention against dense attention.

Ring attention runs on real gloo groups (cp 2 and 4, and two interleaved cp-2 groups in a world of 4, as the
topology lays them out next to tp 2); every rank builds the same full q/k/v, takes its shard, and the unsharded
output and input gradients must equal a float64 dense reference computed on the full sequence (fp32: rtol 1e-5, atol 2e-6;
bf16: rtol/atol 2e-2)."""
import pytest
import torch
import torch.distributed as dist

import distributed
from engine.parallel import context
from engine.parallel.context import (block_attention, block_attention_backward, ring_attention, shard_positions,
                                     shard_sequence, unshard_sequence)

# name: (batch, query heads, kv heads, sequence length, head dim, documents per batch row or None, dtype)
CASES = {
    "causal": (1, 4, 4, 32, 16, None, torch.float32),
    "gqa": (1, 4, 2, 32, 16, None, torch.float32),
    "batch2": (2, 4, 2, 32, 16, None, torch.float32),
    # uneven documents crossing chunk (6 or 12 tokens) and rank boundaries, some of length 1
    "segments": (2, 4, 2, 48, 16, [[1, 7, 1, 13, 2, 1, 9, 14], [5, 1, 1, 30, 11]], torch.float32),
    "bf16": (2, 4, 2, 48, 16, [[3, 1, 20, 24], [48]], torch.bfloat16),
}


def make_inputs(case: str, seed: int = 0):
    """The full-sequence q, k, v, upstream gradient and segment ids of a case (the same on every rank)."""
    b, hq, hkv, s, d, docs, dtype = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    q, dout = (torch.randn(b, hq, s, d, generator=gen).to(dtype) for _ in range(2))
    k, v = (torch.randn(b, hkv, s, d, generator=gen).to(dtype) for _ in range(2))
    seg = None
    if docs is not None:
        seg = torch.stack([torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row)) for row in docs])
        assert seg.shape == (b, s)
    return q, k, v, dout, seg


def dense_reference(q, k, v, dout, seg):
    """Plain causal (+ same-segment) softmax attention on the whole sequence in float64: (out, dq, dk, dv)."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    g = q.shape[1] // k.shape[1]
    s = q.shape[2]
    mask = torch.ones(s, s, dtype=torch.bool).tril()[None, None]
    if seg is not None:
        mask = mask & (seg[:, None, :, None] == seg[:, None, None, :])
    scores = q @ k.repeat_interleave(g, 1).transpose(-1, -2) * q.shape[-1] ** -0.5
    out = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v.repeat_interleave(g, 1)
    out.backward(dout.double())
    return out.detach(), q.grad, k.grad, v.grad


def tolerances(dtype):
    # fp32 atol 2e-6: gradients of order 1-10 whose exact value is 0 (a document's first token) come out ~1e-6 from
    # either kernel's rounding against the float64 reference
    return {"rtol": 1e-5, "atol": 2e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}


def run_case(case: str, group, cp: int, cp_rank: int, seed: int = 0):
    """Ring attention on this rank's shard; returns (unsharded [out, dq, dk, dv], dense reference)."""
    q, k, v, dout, seg = make_inputs(case, seed)
    expected = dense_reference(q, k, v, dout, seg)
    ql, kl, vl = (shard_sequence(t, cp, cp_rank, dim=2).requires_grad_() for t in (q, k, v))
    seg_l = None if seg is None else shard_sequence(seg, cp, cp_rank, dim=1)
    out = ring_attention(ql, kl, vl, group, segment_ids=seg_l)
    assert out.dtype == q.dtype and out.shape == ql.shape
    out.backward(shard_sequence(dout, cp, cp_rank, dim=2))
    got = []
    for t in (out.detach(), ql.grad, kl.grad, vl.grad):
        if cp > 1:
            parts = [torch.empty_like(t) for _ in range(cp)]
            dist.all_gather(parts, t.contiguous(), group=group)
        else:
            parts = [t]
        got.append(unshard_sequence(parts, cp, dim=2))
    return got, expected


def check_case(case, group, cp, cp_rank, seed=0):
    got, expected = run_case(case, group, cp, cp_rank, seed)
    tol = tolerances(CASES[case][-1])
    for name, g, e in zip(("out", "dq", "dk", "dv"), got, expected):
        torch.testing.assert_close(g.double(), e, **tol, msg=lambda m, name=name: f"cp {cp} {case} {name}: {m}")


# ---------------------------------------------------------------------------------------------------- layout

@pytest.mark.parametrize("cp", [1, 2, 3, 4, 8])
def test_shard_positions_and_sequence(cp):
    seq_len = 2 * cp * 5
    full = torch.arange(seq_len)
    held = torch.cat([shard_positions(seq_len, cp, r) for r in range(cp)])
    assert sorted(held.tolist()) == full.tolist()  # a partition of the sequence
    c = seq_len // (2 * cp)
    for r in range(cp):
        pos = shard_positions(seq_len, cp, r)
        assert pos.tolist() == list(range(r * c, (r + 1) * c)) + list(range((2 * cp - 1 - r) * c, (2 * cp - r) * c))
        assert torch.equal(shard_sequence(full, cp, r, dim=0), pos)
    x = torch.randn(2, seq_len, 3)
    parts = [shard_sequence(x, cp, r, dim=1) for r in range(cp)]
    assert all(p.shape == (2, seq_len // cp, 3) for p in parts)
    assert torch.equal(unshard_sequence(parts, cp, dim=1), x)
    y = torch.randn(2, 3, seq_len, 4)
    assert torch.equal(unshard_sequence([shard_sequence(y, cp, r, dim=2) for r in range(cp)], cp, dim=2), y)


def test_sequence_length_must_divide():
    with pytest.raises(ValueError, match="divisible by 2 x cp = 4"):
        shard_positions(10, 2, 0)
    with pytest.raises(ValueError, match="divisible by 2 x cp = 8"):
        shard_sequence(torch.zeros(1, 12), 4, 0)


@pytest.mark.parametrize("cp", [2, 4, 8])
@pytest.mark.parametrize("tile", [None, 3])
def test_load_balance(cp, tile, monkeypatch):
    """Every rank has the same number of visible causal (query, key) pairs, and the trimmed pieces ring
    attention computes have the same total area on every rank; the pieces cover every visible pair once."""
    if tile is not None:
        monkeypatch.setattr(context, "TILE_ELEMENTS", tile)  # 3 x (b * hq * keys) = 3 rows per tile
    seq_len = 2 * cp * 8
    s, c = seq_len // cp, seq_len // (2 * cp)
    pairs, areas = [], []
    for r in range(cp):
        qpos = shard_positions(seq_len, cp, r)
        pairs.append(int((qpos + 1).sum()))
        area, covered = 0, 0
        for i in range(cp):
            kpos = shard_positions(seq_len, cp, (r - i) % cp)
            for rows, cols, full in context._pieces(qpos, kpos, True, s):
                area += (rows.stop - rows.start) * (cols.stop - cols.start)
                visible = kpos[cols][None, :] <= qpos[rows][:, None]
                assert not full or visible.all()
                covered += int(visible.sum())
        assert covered == pairs[-1]
        areas.append(area)
    assert len(set(pairs)) == 1 and pairs[0] * cp == seq_len * (seq_len + 1) // 2
    assert len(set(areas)) == 1
    if tile is None:  # one tile per half: the diagonal step is three chunk x chunk squares, the others two
        assert areas[0] == 3 * c * c + (cp - 1) * 2 * c * c
    else:
        assert areas[0] < 3 * c * c + (cp - 1) * 2 * c * c

# ------------------------------------------------------------------------------------------------ block kernel

def test_block_attention_rows_without_keys():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    mask = torch.rand(1, 1, 5, 6) > 0.5
    mask[..., 2, :] = False  # a row that sees nothing
    mask[..., 3, :] = True
    out, lse = block_attention(q, k, v, mask, 0.3)
    assert torch.isneginf(lse[..., 2]).all() and torch.equal(out[..., 2, :], torch.zeros(1, 4, 8))
    assert torch.isfinite(out).all()
    dq, dk, dv = block_attention_backward(torch.randn(1, 4, 5, 8), q, k, v, lse, torch.zeros(1, 4, 5), mask, 0.3)
    assert all(torch.isfinite(t).all() for t in (dq, dk, dv))
    assert torch.equal(dq[..., 2, :], torch.zeros(1, 4, 8))


def test_block_attention_backward_matches_autograd():
    """One block holding every key: the kernel's backward equals autograd through plain softmax attention."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 4, 7, 8, dtype=torch.float64) for _ in range(3))
    k, v = k[:, :2], v[:, :2]
    mask = torch.rand(2, 1, 7, 7) > 0.3
    mask[..., torch.arange(7), torch.arange(7)] = True
    dout = torch.randn(2, 4, 7, 8, dtype=torch.float64)
    out, lse = block_attention(q, k, v, mask, 0.4)
    qa, ka, va = (t.clone().requires_grad_() for t in (q, k, v))
    s = (qa @ ka.repeat_interleave(2, 1).transpose(-1, -2) * 0.4).masked_fill(~mask, float("-inf"))
    ref = s.softmax(-1) @ va.repeat_interleave(2, 1)
    ref.backward(dout)
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    grads = block_attention_backward(dout, q, k, v, lse, (dout * out).sum(-1), mask, 0.4)
    for g, e in zip(grads, (qa.grad, ka.grad, va.grad)):
        torch.testing.assert_close(g.double(), e, rtol=1e-5, atol=1e-6)


# (torch.__version__ compares with tuples)
FUSED_CPU_KERNELS = pytest.mark.skipif(torch.__version__ < (2, 5), reason="aten's fused CPU attention kernels are "
                                       "used from torch 2.5 (before, they take no GQA and give NaN rows)")


@FUSED_CPU_KERNELS
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hkv", [4, 2, 1])
def test_cpu_flash_kernel_matches_plain(hkv, dtype, monkeypatch):
    """aten's fused CPU kernels (the fast path) against the plain-torch kernel on random blocks with GQA, fully
    masked rows, rows with one visible key, a per-batch mask and no mask; the backward gets a larger "final" lse
    and a foreign "final" out, as the ring passes them."""
    torch.manual_seed(2)
    b, hq, sq, sk, d = 2, 4, 19, 33, 16
    q, dout = (torch.randn(b, hq, sq, d).to(dtype) for _ in range(2))
    k, v = (torch.randn(b, hkv, sk, d).to(dtype) for _ in range(2))
    mask = torch.rand(b, 1, sq, sk) > 0.4
    mask[0, :, 3] = False  # sees nothing
    mask[:, :, 5] = False
    mask[:, :, 5, 7] = True  # sees one key
    for m in (mask, mask[:1], None):
        results = []
        others, final_out = torch.randn(b, hq, sq), torch.randn(b, hq, sq, d).to(dtype)
        for fast in (True, False):
            monkeypatch.setattr(context, "FAST_CPU_KERNEL", fast)
            out, lse = block_attention(q, k, v, m, 0.3)
            final_lse = torch.logaddexp(lse, others)  # with other blocks' keys
            delta = (dout.float() * final_out.float()).sum(-1)
            grads = block_attention_backward(dout, q, k, v, final_lse, delta, m, 0.3, out=final_out)
            results.append((out, lse, *grads))
        for name, f, p in zip(("out", "lse", "dq", "dk", "dv"), *results):
            assert f.dtype == torch.float32 and f.shape == p.shape
            assert torch.equal(torch.isneginf(f), torch.isneginf(p)), name
            torch.testing.assert_close(f, p, rtol=1e-5, atol=2e-6, msg=lambda e, name=name: f"{name}: {e}")
        if m is not None:
            assert torch.isneginf(results[0][1][0, :, 3]).all() and not results[0][0][0, :, 3].any()
            assert not results[0][2][0, :, 3].any()  # no gradient through a row that sees nothing


@pytest.mark.parametrize("fast", [pytest.param(True, marks=FUSED_CPU_KERNELS), False])
@pytest.mark.parametrize("case", list(CASES))
def test_ring_attention_cp1_kernels(case, fast, monkeypatch):
    """Ring attention on one rank against the dense reference with either CPU kernel."""
    monkeypatch.setattr(context, "FAST_CPU_KERNEL", fast)
    check_case(case, None, 1, 0)


# ------------------------------------------------------------------------------------------------ ring attention

@pytest.mark.parametrize("tile", [None, 100])
@pytest.mark.parametrize("case", list(CASES))
def test_ring_attention_cp1(case, tile, monkeypatch):
    """group None: the same computation on one rank (the reference path), also in small query tiles."""
    if tile is not None:
        monkeypatch.setattr(context, "TILE_ELEMENTS", tile)
    check_case(case, None, 1, 0)


def _ring_body(rank, world):
    for case in CASES:
        check_case(case, dist.group.WORLD, world, rank)


@pytest.mark.parametrize("world", [2, 4])
def test_ring_attention_matches_dense(world):
    distributed.run(_ring_body, world)


def _two_groups_body(rank, world):
    # cp groups as the topology lays them out next to tp 2: {0, 2} and {1, 3}
    groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    index = rank % 2
    group = groups[index]
    assert dist.get_rank(group) == rank // 2
    for case in ("gqa", "segments"):
        check_case(case, group, 2, rank // 2, seed=index)  # different data in the two groups


def test_ring_attention_two_cp_groups():
    distributed.run(_two_groups_body, 4)


def _small_tiles_body(rank, world):
    context.TILE_ELEMENTS = 200  # tiles of a few query rows
    context.TIMINGS = {"compute": 0.0, "wait": 0.0}
    for case in CASES:
        check_case(case, dist.group.WORLD, world, rank)
    assert context.TIMINGS["compute"] > 0 and context.TIMINGS["wait"] >= 0


def test_ring_attention_small_tiles_and_timings():
    distributed.run(_small_tiles_body, 2)


def test_validation():
    q = torch.zeros(1, 3, 8, 4)
    with pytest.raises(ValueError, match="not a multiple of kv heads"):
        ring_attention(q, torch.zeros(1, 2, 8, 4), torch.zeros(1, 2, 8, 4))
    with pytest.raises(ValueError, match="segment_ids"):
        ring_attention(q, q, q, segment_ids=torch.zeros(1, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="expects q"):
        ring_attention(q, q[:, :, :4], q)

