"""The pieces ZeroOptimizer is built from, each against a plain reference on a toy module.

- FlatLayout (one process, no collectives): buckets are padded to dp, contiguous and in backward order, deferred
  parameters sit in buckets of their own, the dp ranks' owned ranges partition every bucket, and the pieces of
  all ranks cover every parameter element exactly once, as views of the parameter storage.
- GradSync (4 gloo ranks: dp 2 x a second "model-parallel" axis of 2): after a step of 3 micro-batches, with one
  parameter that gets no gradient and one whose gradient is a partial sum over the other axis, the gradient each
  rank owns equals a plain all-reduce of the locally accumulated autograd gradients, at every stage, mean and sum.
- ParamGather (2 gloo ranks): a ZeRO-3 unit is released until its forward, gathered for it (equal to a plain
  all-gather of the shards) and released after; the ZeRO-1/2 gather of updated shards equals a plain all-gather.
"""

import torch
import torch.distributed as dist
from torch import nn

import distributed
from engine.optim.zero.gather import ParamGather
from engine.optim.zero.grads import GradSync
from engine.optim.zero.layout import FlatLayout, layout_buckets, layout_units

MICRO = 3


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(5, 12)
        self.layers = nn.ModuleList(nn.Linear(12, 12) for _ in range(3))
        self.gain = nn.Parameter(torch.ones(12))  # stands for a sequence-parallel norm gain: a partial sum
        self.spare = nn.Linear(12, 12)  # takes no part in the forward
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        h = self.embed(x)
        for layer in self.layers:
            h = torch.tanh(layer(h))
        return self.head(h * self.gain)


def named(model):
    return [(n, p) for n, p in model.named_parameters()]


def units(model):
    rest = ["embed.weight", "embed.bias", "gain", "spare.weight", "spare.bias", "head.weight", "head.bias"]
    return [(model, model, rest, [])] + [(layer, layer, [f"layers.{i}.weight", f"layers.{i}.bias"], [])
                                         for i, layer in enumerate(model.layers)]


def test_layout_buckets_and_pieces_cover_every_parameter_once():
    dp, deferred = 4, {"gain"}
    for bucket_numel in (1, 100, 10_000):
        reference = dict(named(Toy()))
        buckets = layout_buckets(list(reversed(named(Toy()))), dp, bucket_numel, deferred)
        assert [n for b in buckets if b.deferred for n in b.names] == ["gain"] and buckets[0].deferred
        order = [n for b in buckets if not b.deferred for n in b.names]
        assert order == [n for n, _ in reversed(named(Toy())) if n != "gain"]  # backward order
        start = 0
        for b in buckets:
            assert b.start == start and b.size % dp == 0 and b.offsets[0] == b.start
            assert b.offsets[-1] + b.params[-1].numel() <= b.start + b.size < b.offsets[-1] + b.params[-1].numel() + dp
            start += b.size
        covered = {n: torch.zeros(p.numel(), dtype=torch.int64) for n, p in reference.items()}
        for rank in range(dp):
            model = Toy()
            layout = FlatLayout(layout_buckets(list(reversed(named(model))), dp, bucket_numel, deferred), dp, rank,
                                shard_optimizer=True, shard_params=False)
            ranges = [layout.owned(b) for b in layout.buckets]
            assert all(hi - lo == b.size // dp for (lo, hi), b in zip(ranges, layout.buckets))
            for n, p in model.named_parameters():  # views of the flat buffer, values kept
                assert p.untyped_storage().data_ptr() == layout.param_buffer.untyped_storage().data_ptr()
                assert torch.equal(p, reference[n])
            grads = torch.zeros(layout.total)
            for pc in layout.pieces(lambda lo, hi, b, grads=grads: grads[lo:hi]):
                covered[pc.name][pc.lo:pc.hi] += 1
                assert torch.equal(pc.shard.reshape(-1), reference[pc.name].reshape(-1)[pc.lo:pc.hi])
        assert all(bool((c == 1).all()) for c in covered.values()), bucket_numel


def test_stage3_units_get_one_bucket_each_and_one_for_their_deferred_parameters():
    model = Toy()
    buckets = layout_units(units(model), dict(named(model)), 2, {"gain"})
    assert [(b.names, b.deferred) for b in buckets][:2] == [
        (["embed.weight", "embed.bias", "spare.weight", "spare.bias", "head.weight", "head.bias"], False),
        (["gain"], True)]
    assert [b.names for b in buckets[2:]] == [[f"layers.{i}.weight", f"layers.{i}.bias"] for i in range(3)]
    layout = FlatLayout(buckets, 2, 1, shard_optimizer=True, shard_params=True)
    for b in layout.buckets:  # this rank's persistent shard is the second half of the padded bucket
        full = torch.cat([p.detach().reshape(-1) for p in b.params])
        expected = torch.cat([full, torch.zeros(b.size - full.numel())])[b.size // 2:]
        assert torch.equal(b.shard, expected)


def _local_batches(rank):
    g = torch.Generator().manual_seed(100 + rank)
    return [(torch.randn(4, 5, generator=g), torch.randn(4, 3, generator=g)) for _ in range(MICRO)]


def _grad_sync(rank, world):
    dp_rank, mp_rank = rank % 2, rank // 2
    dp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    mp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    dp_group, mp_group = dp_groups[mp_rank], mp_groups[dp_rank]
    batches = _local_batches(rank)
    # the reference: plain autograd, summed locally over the micro-batches, then plain all-reduces
    dense = Toy()
    for x, y in batches:
        nn.functional.mse_loss(dense(x), y).backward()
    expected = {}
    for n, p in dense.named_parameters():
        g = torch.zeros_like(p) if p.grad is None else p.grad.clone()
        if n == "gain":
            dist.all_reduce(g, group=mp_group)
        dist.all_reduce(g, group=dp_group)
        expected[n] = g.reshape(-1)
    for stage in (0, 1, 2, 3):
        for mean in (False, True):
            model = Toy()
            nmd = named(model)
            buckets = layout_units(units(model), dict(nmd), 2, {"gain"}) if stage == 3 else \
                layout_buckets(list(reversed(nmd)), 2, 150, {"gain"})
            layout = FlatLayout(buckets, 2, dp_rank, shard_optimizer=stage >= 1, shard_params=False)
            sync = GradSync(layout, dp_group, shard_grads=stage >= 2, mean=mean, partial_groups={"gain": mp_group},
                            on_backward_end=lambda: None)
            sync.zero()
            sync.arm(MICRO)
            for x, y in batches:
                nn.functional.mse_loss(model(x), y).backward()
            sync.finish()
            scale = 0.5 if mean else 1.0
            for b in layout.buckets:
                lo, hi = layout.owned(b)
                for n, p, off in zip(b.names, b.params, b.offsets):
                    a, z = max(lo, off), min(hi, off + p.numel())
                    if a < z:
                        got = sync.view(a, z, b)
                        want = scale * expected[n][a - off:z - off]
                        assert torch.allclose(got, want, rtol=1e-6, atol=1e-7), (stage, mean, n)


def test_grad_sync_equals_a_plain_all_reduce_at_every_stage():
    distributed.run(_grad_sync, world=4)


def _param_gather(rank, world):
    group = dist.group.WORLD
    model = Toy()
    unit_list = units(model)
    layout = FlatLayout(layout_units(unit_list, dict(named(model)), world, set()), world, rank,
                        shard_optimizer=True, shard_params=True)
    gather = ParamGather(layout, group)
    gather.install_unit_hooks(unit_list, [0] * len(unit_list))
    layer, bucket = model.layers[1], layout.buckets[2]
    assert bucket.names == ["layers.1.weight", "layers.1.bias"]
    assert layer.weight.untyped_storage().nbytes() == 0  # released until its forward
    shards = [torch.empty_like(bucket.shard) for _ in range(world)]
    dist.all_gather(shards, bucket.shard)
    seen = {}
    layer.register_forward_hook(lambda m, a, out: seen.update(w=m.weight.detach().clone(), b=m.bias.detach().clone()),
                                prepend=True)  # before the release
    model(torch.randn(2, 5))
    full = torch.cat(shards)
    assert torch.equal(torch.cat([seen["w"].reshape(-1), seen["b"]]), full[:layer.weight.numel() + 12])
    assert all(p.untyped_storage().nbytes() == 0 for b in layout.buckets for p in b.params)  # released after
    # stages 1-2: every rank updates its shard, the gathers leave every rank with all the updated shards
    model = Toy()
    layout = FlatLayout(layout_buckets(list(reversed(named(model))), world, 100, set()), world, rank,
                        shard_optimizer=True, shard_params=False)
    gather = ParamGather(layout, group)
    for b in layout.buckets:
        lo, hi = layout.owned(b)
        layout.param_buffer[lo:hi] = torch.arange(lo, hi, dtype=torch.float32) * (rank + 1)
    gather.gather_updated(async_op=True)
    gather.wait_all()
    expected = torch.zeros(layout.total)
    for b in layout.buckets:
        for r in range(world):
            lo, hi = b.start + r * b.size // world, b.start + (r + 1) * b.size // world
            expected[lo:hi] = torch.arange(lo, hi, dtype=torch.float32) * (r + 1)
    assert torch.equal(layout.param_buffer, expected)


def test_param_gather_equals_a_plain_all_gather():
    distributed.run(_param_gather, world=2)


def test_the_layout_refuses_mixed_dtypes_and_unknown_unit_names():
    import pytest
    model = Toy()
    model.head.to(torch.float64)
    with pytest.raises(ValueError, match="share one dtype"):
        FlatLayout(layout_buckets(list(reversed(named(model))), 2, 100, set()), 2, 0, shard_optimizer=True,
                   shard_params=False)
    model = Toy()
    layout = FlatLayout(layout_buckets(list(reversed(named(model))), 2, 100, set()), 2, 0, shard_optimizer=True,
                        shard_params=False)
    with pytest.raises(ValueError, match="not trainable parameters"):
        layout.buckets_holding(["embed.weight", "embed.wieght"])
