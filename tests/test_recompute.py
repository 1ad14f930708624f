"""Recomputation replays every random stream: with dropout on, full and selective recomputation give
bit-identical losses and gradients to no recomputation; the RNG tracker's streams behave as documented."""
import pytest
import torch

from engine.models.llama import Llama, ModelConfig, Parallelism
from engine.parallel.random import RNGTracker

CFG = ModelConfig(num_layers=3, hidden_size=32, ffn_hidden_size=64, num_heads=4, num_kv_heads=2, vocab_size=50,
                  seq_length=16, dropout=0.2)


def loss_and_grads(recompute, recompute_layers=None):
    torch.manual_seed(0)
    rng = RNGTracker(seed=0)
    model = Llama(CFG, parallelism=Parallelism(rng=rng, recompute=recompute, recompute_layers=recompute_layers))
    model.init_weights(1)
    ids = torch.randint(0, CFG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    loss = model(ids).logsumexp(-1).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, rng.get_states()


@pytest.mark.parametrize("mode,layers", [("full", None), ("full", 1), ("selective", None)])
def test_recompute_is_bit_identical_with_dropout(mode, layers):
    ref_loss, ref_grads, ref_states = loss_and_grads("none")
    loss, grads, states = loss_and_grads(mode, layers)
    assert torch.equal(loss, ref_loss)
    for name in ref_grads:
        assert torch.equal(grads[name], ref_grads[name]), name
    for name in ref_states:  # the streams end where they would have without recomputation
        assert torch.equal(states[name], ref_states[name]), name


def test_tracker_streams():
    torch.manual_seed(7)
    a, b = RNGTracker(seed=3, tp_rank=0), RNGTracker(seed=3, tp_rank=1)
    with a.fork():
        x = torch.rand(4)
    with b.fork():
        y = torch.rand(4)
    assert not torch.equal(x, y)  # different per tp rank
    before = torch.get_rng_state()
    with a.fork():
        torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)  # forking leaves the default stream alone
    saved = a.get_states()
    with a.fork():
        first = torch.rand(4)
    a.set_states(saved)
    with a.fork():
        assert torch.equal(torch.rand(4), first)  # states round-trip (checkpoints)
    assert torch.equal(RNGTracker(seed=3, tp_rank=0).get_states()["tp"], RNGTracker(seed=3).get_states()["tp"])
