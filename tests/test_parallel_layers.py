"""Tensor- and sequence-parallel pieces against their dense references on real process groups (tp = 2 and 4,
fp32, rtol 1e-5): mappings (eager, and compiled against eager), ColumnParallelLinear, RowParallelLinear,
VocabParallelEmbedding, vocab-parallel cross-entropy (plain and fused with the head in chunks), and the whole LLaMA
(outputs, input gradients, weight gradients). All checks run inside one
spawned group of 4 processes."""
import torch
import torch.distributed as dist
import torch.nn.functional as F

import distributed
from conftest import shard_blocks
from engine.models.llama import Llama, ModelConfig, Parallelism
from engine.optim import clip_grad_norm_
from engine.parallel import mappings
from engine.parallel.cross_entropy import vocab_parallel_cross_entropy
from engine.parallel.layers import ColumnParallelLinear, RowParallelLinear, TPContext, VocabParallelEmbedding
from engine.parallel.random import RNGTracker
from engine.parallel.topology import Topology

RTOL = 1e-5


def _close(actual, expected, what):
    """rtol 1e-5, with an absolute floor of 1e-5 x the tensor's largest value: summation order differs
    between the sharded and the dense computation, so entries that cancel to near zero cannot match relatively."""
    atol = RTOL * max(expected.abs().max().item(), 1e-3) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=atol, msg=lambda m: f"{what}: {m}")


def _device():
    """The device the backend actually in use works on (run(..., backend="auto") picks NCCL only with a GPU per
    rank)."""
    return torch.device("cuda", dist.get_rank()) if dist.get_backend() == "nccl" else torch.device("cpu")


def check_mappings(tp: TPContext, dev):
    x = torch.randn(2, 8, 8, device=dev)
    dist.broadcast(x, src=0)  # every rank starts from the same full tensor
    r, n = tp.rank, tp.size
    # gather_seq / reduce_scatter_seq are conjugate: forward all-gather, backward reduce-scatter
    shard = x.chunk(n, 1)[r].clone().requires_grad_()
    full = mappings.gather_seq(shard, tp.group)
    _close(full, x, "gather_seq forward")
    (full * (r + 1)).sum().backward()
    _close(shard.grad, torch.full_like(shard, n * (n + 1) / 2), "gather_seq backward (reduce-scatter)")
    y = x.clone().requires_grad_()
    out = mappings.reduce_scatter_seq(y * (r + 1), tp.group)
    _close(out, x.chunk(n, 1)[r] * n * (n + 1) / 2, "reduce_scatter_seq forward")
    out.sum().backward()
    _close(y.grad, torch.full_like(x, r + 1), "reduce_scatter_seq backward (all-gather)")
    # copy_to_tp / reduce_from_tp
    y = x.clone().requires_grad_()
    mappings.copy_to_tp(y, tp.group).mul(r + 1).sum().backward()
    _close(y.grad, torch.full_like(x, n * (n + 1) / 2), "copy_to_tp backward")
    y = x.clone().requires_grad_()
    red = mappings.reduce_from_tp(y, tp.group)
    _close(red, x * n, "reduce_from_tp forward")
    red.sum().backward()
    _close(y.grad, torch.ones_like(x), "reduce_from_tp backward")
    # scatter_to_tp / gather_from_tp along the last dimension
    y = x.clone().requires_grad_()
    part = mappings.scatter_to_tp(y, tp.group)
    _close(part, x.chunk(n, -1)[r], "scatter_to_tp forward")
    (part * (r + 1)).sum().backward()  # backward all-gathers every rank's slice of the gradient
    expected = torch.cat([torch.full_like(c, i + 1.0) for i, c in enumerate(x.chunk(n, -1))], dim=-1)
    _close(y.grad, expected, "scatter_to_tp backward")
    shard = x.chunk(n, -1)[r].clone().requires_grad_()
    whole = mappings.gather_from_tp(shard, tp.group)
    _close(whole, x, "gather_from_tp forward")
    (whole * 3).sum().backward()
    _close(shard.grad, torch.full_like(shard, 3.0), "gather_from_tp backward")


def check_compiled_mappings(tp: TPContext, dev):
    """Each mapping inside a torch.compile'd function (as in a --compile layer) gives the eager forward and input
    gradient. The AOT autograd backend traces what inductor would compile, without generating code. (torch 2.11
    dropped reduce_scatter_seq's gradient here while the mappings used the in-place collectives.)"""
    import torch._dynamo
    r = tp.rank
    w = torch.randn(8, 8, device=dev)
    dist.broadcast(w, src=0)
    cases = {  # name: (function, its input)
        "gather_seq": (lambda x: (mappings.gather_seq(x, tp.group) @ w).sin(), (2, 8 // tp.size, 8)),
        "reduce_scatter_seq": (lambda x: mappings.reduce_scatter_seq(x @ w * (r + 1), tp.group).sin(), (2, 8, 8)),
        "scatter_seq": (lambda x: mappings.scatter_seq(x @ w, tp.group).sin(), (2, 8, 8)),
        "copy_to_tp": (lambda x: (mappings.copy_to_tp(x, tp.group) @ w).sin() * (r + 1), (2, 8, 8)),
        "reduce_from_tp": (lambda x: mappings.reduce_from_tp(x @ w * (r + 1), tp.group).sin(), (2, 8, 8)),
        "scatter_to_tp": (lambda x: mappings.scatter_to_tp(x @ w, tp.group).sin(), (2, 8, 8)),
        "gather_from_tp": (lambda x: (mappings.gather_from_tp(x, tp.group) @ w).sin(), (2, 8, 8 // tp.size)),
    }
    for name, (fn, shape) in cases.items():
        x = torch.randn(shape, device=dev)
        results = []
        for f in (fn, torch.compile(fn, backend="aot_eager", fullgraph=True)):
            y = x.clone().requires_grad_()
            out = f(y)
            (out * torch.linspace(-1, 1, out.numel(), device=dev).view_as(out)).sum().backward()
            results.append((out.detach(), y.grad))
        torch._dynamo.reset()
        _close(results[1][0], results[0][0], f"compiled {name} forward")
        _close(results[1][1], results[0][1], f"compiled {name} backward")


def check_linears(tp: TPContext, dev):
    torch.manual_seed(0)
    x = torch.randn(2, 8, 12, device=dev)
    w1, w2 = torch.randn(16, 12, device=dev), torch.randn(10, 16, device=dev)
    dense_x = x.clone().requires_grad_()
    dense_w1, dense_w2 = w1.clone().requires_grad_(), w2.clone().requires_grad_()
    ref = F.linear(F.linear(dense_x, dense_w1), dense_w2)
    ref.square().sum().backward()
    col = ColumnParallelLinear(12, 16, tp).to(dev)
    row = RowParallelLinear(16, 10, tp).to(dev)
    rows = slice(tp.rank * 16 // tp.size, (tp.rank + 1) * 16 // tp.size)
    with torch.no_grad():
        col.weight.copy_(w1[rows])
        row.weight.copy_(w2[:, rows])
    r, n = tp.rank, tp.size
    inp = (x.chunk(n, 1)[r] if tp.sequence_parallel else x).clone().requires_grad_()
    out = row(col(inp))
    expected = ref.chunk(n, 1)[r] if tp.sequence_parallel else ref
    _close(out, expected.detach(), "column -> row forward")
    out.square().sum().backward()
    grad_x = dense_x.grad.chunk(n, 1)[r] if tp.sequence_parallel else dense_x.grad
    _close(inp.grad, grad_x, "column -> row input grad")
    _close(col.weight.grad, dense_w1.grad[rows], "column weight grad")
    _close(row.weight.grad, dense_w2.grad[:, rows], "row weight grad")
    # gather_output returns the full output on every rank
    gathered = ColumnParallelLinear(12, 16, TPContext(tp.group, tp.size, tp.rank), gather_output=True).to(dev)
    with torch.no_grad():
        gathered.weight.copy_(w1[rows])
    _close(gathered(x), F.linear(x, w1), "column gather_output")


def check_embedding_and_loss(tp: TPContext, dev):
    vocab, hidden = 11, 6  # padded to a multiple of tp: the last rank holds padding rows
    torch.manual_seed(1)
    table = torch.randn(vocab, hidden, device=dev)
    ids = torch.randint(0, vocab, (2, 8), device=dev)
    emb = VocabParallelEmbedding(vocab, hidden, tp).to(dev)
    start, rows = emb.start, emb.rows
    real = max(0, min(rows, vocab - start))
    with torch.no_grad():
        emb.weight.zero_()
        emb.weight[:real] = table[start:start + real]
    dense = table.clone().requires_grad_()
    ref = F.embedding(ids, dense)
    out = emb(ids)
    r, n = tp.rank, tp.size
    _close(out, ref.chunk(n, 1)[r].detach() if tp.sequence_parallel else ref.detach(), "embedding forward")
    out.sum().backward()
    ref.chunk(n, 1)[r].sum().backward() if tp.sequence_parallel else ref.sum().backward()
    grad = dense.grad
    if tp.sequence_parallel:  # the dense reference saw only this rank's shard: sum over ranks
        dist.all_reduce(grad, group=tp.group)
    _close(emb.weight.grad[:real], grad[start:start + real], "embedding weight grad")
    assert emb.weight.grad[real:].abs().sum() == 0, "padding rows got gradient"
    # vocabulary-parallel cross-entropy == F.cross_entropy, ignore_index included
    logits = torch.randn(2, 8, vocab, device=dev)
    target = torch.randint(0, vocab, (2, 8), device=dev)
    target[0, :3] = -100
    dense_logits = logits.clone().requires_grad_()
    ref = F.cross_entropy(dense_logits.flatten(0, 1), target.flatten(), reduction="none").view(2, 8)
    (ref * torch.arange(16, device=dev).view(2, 8)).sum().backward()
    local = torch.full((2, 8, rows), 7.0, device=dev)  # padded columns hold junk that must not matter
    local[..., :real] = logits[..., start:start + real]
    local.requires_grad_()
    loss = vocab_parallel_cross_entropy(local, target, start, vocab, tp.group)
    _close(loss, ref.detach(), "vocab-parallel cross-entropy")
    (loss * torch.arange(16, device=dev).view(2, 8)).sum().backward()
    _close(local.grad[..., :real], dense_logits.grad[..., start:start + real], "cross-entropy logits grad")
    assert local.grad[..., real:].abs().sum() == 0


def check_llama(topo: Topology, sequence_parallel: bool, dev):
    cfg = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_heads=8, num_kv_heads=4,
                      vocab_size=37, seq_length=16)
    dense = Llama(cfg).to(dev)
    dense.init_weights(5)
    tp = TPContext(topo.tp_group, topo.tp, topo.tp_rank, sequence_parallel)
    model = Llama(cfg, parallelism=Parallelism(tp, RNGTracker(5, topo.tp_rank, dev))).to(dev)
    model.init_weights(5)
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3)).to(dev)
    ref_logits = dense(ids)
    F.cross_entropy(ref_logits.flatten(0, 1)[:-1], ids.flatten()[1:], reduction="sum").backward()
    logits = model(ids)
    start, rows = model.vocab_start, logits.shape[-1]
    real = max(0, min(rows, cfg.vocab_size - start))
    _close(logits[..., :real], ref_logits[..., start:start + real].detach(), "llama logits")
    targets = torch.cat([ids.flatten()[1:], ids.new_full((1,), -100)]).view(2, 16)
    vocab_parallel_cross_entropy(logits, targets, start, cfg.vocab_size, tp.group).sum().backward()
    dense_params = dict(dense.named_parameters())
    for name, p in model.named_parameters():
        full = dense_params[name]
        local, block = shard_blocks(p)
        _close(p.detach()[local], full.detach()[block], f"initial weight {name}")
        grad = p.grad.clone()
        if getattr(p, "sequence_parallel", False):
            dist.all_reduce(grad, group=tp.group)
        _close(grad[local], full.grad[block], f"gradient of {name}")
    with torch.no_grad():  # forward(labels=): the mean shifted loss, vocabulary-parallel
        _close(model(ids, labels=ids), dense(ids, labels=ids), "loss with labels")
    # the global norm over the tp group counts each replicated parameter once (once SP partial sums are summed)
    for p in model.parameters():
        if getattr(p, "sequence_parallel", False):
            dist.all_reduce(p.grad, group=tp.group)
    norm = clip_grad_norm_(list(model.parameters()), 0.0, group=tp.group)
    _close(norm, torch.nn.utils.get_total_norm([p.grad for p in dense.parameters()]), "global grad norm")


def check_chunked_loss(topo: Topology, sequence_parallel: bool, dev):
    """Llama.head_loss with the head and the vocabulary-parallel loss fused and chunked (7 tokens at a time over
    32, vocabulary 37 padded per rank): the dense summed loss and every gradient."""
    cfg = ModelConfig(num_layers=1, hidden_size=32, ffn_hidden_size=48, num_heads=8, num_kv_heads=4,
                      vocab_size=37, seq_length=16)
    dense = Llama(cfg).to(dev)
    dense.init_weights(6)
    tp = TPContext(topo.tp_group, topo.tp, topo.tp_rank, sequence_parallel)
    model = Llama(cfg, parallelism=Parallelism(tp, RNGTracker(6, topo.tp_rank, dev), loss_chunk_tokens=7)).to(dev)
    model.init_weights(6)
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(4)).to(dev)
    targets = torch.cat([ids[:, 1:], ids.new_full((2, 1), -100)], dim=1)
    ref = F.cross_entropy(dense(ids).flatten(0, 1), targets.flatten(), reduction="sum")
    ref.backward()
    loss = model(ids, targets=targets)
    _close(loss.detach(), ref.detach(), "chunked head loss")
    loss.backward()
    dense_params = dict(dense.named_parameters())
    for name, p in model.named_parameters():
        local, block = shard_blocks(p)
        grad = p.grad.clone()
        if getattr(p, "sequence_parallel", False):
            dist.all_reduce(grad, group=tp.group)
        _close(grad[local], dense_params[name].grad[block], f"chunked loss: gradient of {name}")
    with torch.no_grad():
        _close(model(ids, labels=ids), dense(ids, labels=ids), "chunked loss with labels")


def _worker(rank, world):
    dev = _device()
    for tp_size in (2, 4):
        topo = Topology(tp=tp_size, dp=world // tp_size)
        for sp in (False, True):
            tp = TPContext(topo.tp_group, topo.tp, topo.tp_rank, sp)
            check_mappings(tp, dev)
            if tp_size == 2 and not sp:
                check_compiled_mappings(tp, dev)
            check_linears(tp, dev)
            check_embedding_and_loss(tp, dev)
            check_llama(topo, sp, dev)
            check_chunked_loss(topo, sp, dev)


def test_tensor_parallel_pieces_match_dense():
    distributed.run(_worker, world=4, backend="auto")
