"""Intra-document attention masking (--document-mask) at cp 1.

The packed model with a DocumentMask must equal running every document as its own sequence (positions from 0,
causal), in loss and in every parameter gradient; both attention implementations must agree; a batch without
document boundaries must take the default path bit for bit; tensor + sequence parallelism (tp 2) and both
recompute modes must give the dense model's numbers.

Convention under test: a document starts at a sample's first token and after every EOS (the EOS ends its
document), so a sample that starts mid-document begins with a document at position 0.
"""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import distributed
from conftest import shard_blocks
from engine.models.documents import DocumentMask
from engine.models.llama import KVCache, Llama, ModelConfig, Parallelism, attention_core, document_attention
from engine.parallel.cross_entropy import vocab_parallel_cross_entropy
from engine.parallel.layers import TPContext
from engine.parallel.random import RNGTracker

EOS = 1
RTOL = 1e-5
CFG = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_heads=4, num_kv_heads=2, vocab_size=37,
                  seq_length=32)
# documents of the token stream, in order (EOS last in each); the samples start 3 tokens into the first one
LENGTHS = [10, 1, 1, 12, 3, 20, 1, 9, 5, 2, 30, 1, 1, 4, 17, 8, 1, 6, 40, 3]


def _close(actual, expected, what):
    """rtol 1e-5 with an absolute floor of 1e-5 x the tensor's largest value (sums run in another order)."""
    atol = RTOL * max(expected.abs().max().item(), 1e-3)
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=atol, msg=lambda m: f"{what}: {m}")


def packed_batch(batch=3, seq=32, lengths=LENGTHS, offset=3, seed=0):
    """(inputs, targets) [batch, seq] of consecutive samples of seq + 1 tokens cut from a stream of documents,
    as the data layer packs them (neighbouring samples share one token)."""
    gen = torch.Generator().manual_seed(seed)
    stream = torch.randint(2, CFG.vocab_size, (sum(lengths),), generator=gen)
    stream[torch.tensor(lengths).cumsum(0) - 1] = EOS
    stream = stream[offset:]
    assert len(stream) >= batch * seq + 1
    samples = torch.stack([stream[i * seq:(i + 1) * seq + 1] for i in range(batch)])
    return samples[:, :-1], samples[:, 1:]


def _model(seed=5, **par):
    model = Llama(CFG, parallelism=Parallelism(**par))
    model.init_weights(seed)
    return model


def _row_documents(row: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of the documents of one row of input ids, by the convention (independent of DocumentMask)."""
    spans, start = [], 0
    for i, token in enumerate(row.tolist()):
        if token == EOS and i + 1 < len(row):
            spans.append((start, i + 1))
            start = i + 1
    return spans + [(start, len(row))]


def test_layout_from_tokens():
    ids = torch.tensor([[5, 1, 7, 1, 1, 3, 4, 1],    # partial leading document, lengths 1 and 2 in between
                        [6, 6, 6, 6, 6, 6, 6, 1]])   # one document (its EOS is the row's last token)
    docs = DocumentMask.from_tokens(ids, EOS)
    assert docs.segment_ids.tolist() == [[0, 0, 1, 1, 2, 3, 3, 3], [0] * 8]
    assert docs.positions.tolist() == [[0, 1, 0, 1, 0, 0, 1, 2], list(range(8))]
    assert docs.cu_seqlens.tolist() == [0, 2, 4, 5, 8, 16] and docs.cu_seqlens.dtype == torch.int32
    assert docs.lengths == [[2, 2, 1, 3], [8]] and docs.max_seqlen == 8 and not docs.single
    i, j = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    for r in range(2):
        seg = docs.segment_ids[r]
        assert torch.equal(docs.mask[r, 0], (j <= i) & (seg[i] == seg[j]))
    assert DocumentMask.from_tokens(ids[1:], EOS).single
    moved = docs.to("cpu")
    assert torch.equal(moved.positions, docs.positions) and moved.lengths == docs.lengths
    with pytest.raises(ValueError, match="impl"):
        DocumentMask.from_tokens(ids, EOS, impl="flex")


def _reference(model: Llama, inputs, targets):
    """Summed token loss with every document run as its own sequence (its own forward, positions from 0)."""
    total = torch.zeros(())
    for r in range(inputs.shape[0]):
        for a, e in _row_documents(inputs[r]):
            logits = model(inputs[r:r + 1, a:e])[0, :, :CFG.vocab_size]
            total = total + F.cross_entropy(logits, targets[r, a:e], reduction="sum")
    return total


@pytest.mark.parametrize("impl", ["segments", "sdpa"])
@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_packed_equals_documents_run_alone(impl, recompute):
    inputs, targets = packed_batch()
    lengths = [e - a for r in range(inputs.shape[0]) for a, e in _row_documents(inputs[r])]
    assert 1 in lengths and inputs[0, 0] != EOS and len(set(lengths)) > 5  # uneven, some of length 1
    ref_model, model = _model(), _model(recompute=recompute)
    n = targets.numel()
    ref_loss = _reference(ref_model, inputs, targets) / n
    ref_loss.backward()
    logits = model(inputs, documents=DocumentMask.from_tokens(inputs, EOS, impl=impl))
    loss = F.cross_entropy(logits[..., :CFG.vocab_size].flatten(0, 1), targets.flatten(), reduction="sum") / n
    loss.backward()
    _close(loss, ref_loss.detach(), "loss")
    ref_params = dict(ref_model.named_parameters())
    for name, p in model.named_parameters():
        _close(p.grad, ref_params[name].grad, f"gradient of {name}")


def test_implementations_agree():
    inputs, _ = packed_batch(batch=4, seed=1)
    a, b = (DocumentMask.from_tokens(inputs, EOS, impl=impl) for impl in ("segments", "sdpa"))
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(4, 4, 32, 16, generator=gen, requires_grad=True)
    kv = [torch.randn(4, 2, 32, 16, generator=gen, requires_grad=True) for _ in range(2)]
    grad = torch.randn(4, 4, 32, 16, generator=gen)
    results = []
    for docs in (a, b):
        out = document_attention(q, *kv, 0.0, docs)
        results.append([out.detach()] + list(torch.autograd.grad(out, [q, *kv], grad)))
    for what, x, y in zip(["output", "dq", "dk", "dv"], *results):
        _close(x, y, what)
    logits = [_model()(inputs, documents=docs) for docs in (a, b)]
    _close(logits[0].detach(), logits[1].detach(), "model logits")


def test_mask_changes_the_result():
    """The equality above is not vacuous: without the mask the packed logits differ from the masked ones."""
    inputs, _ = packed_batch()
    model = _model()
    with torch.no_grad():
        plain, masked = model(inputs), model(inputs, documents=DocumentMask.from_tokens(inputs, EOS))
    row = _row_documents(inputs[0])
    first = row[0][1]  # the first document sees nothing before it either way
    _close(masked[0, :first], plain[0, :first], "leading document")
    assert (plain[0, first:] - masked[0, first:]).abs().max() > 1e-3


@pytest.mark.parametrize("impl", ["segments", "sdpa"])
def test_no_boundaries_is_the_default_path(impl):
    inputs, targets = packed_batch(lengths=[200], offset=0)
    inputs[1, -1] = EOS  # an EOS as a row's last input starts nothing inside the row
    docs = DocumentMask.from_tokens(inputs, EOS, impl=impl)
    assert docs.single
    runs = []
    for documents in (None, docs):
        model = _model()
        logits = model(inputs, documents=documents)
        F.cross_entropy(logits[..., :CFG.vocab_size].flatten(0, 1), targets.flatten()).backward()
        runs.append((logits.detach(), [p.grad for p in model.parameters()]))
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(x, y) for x, y in zip(runs[0][1], runs[1][1]))


def test_rejected_combinations():
    inputs, _ = packed_batch()
    docs = DocumentMask.from_tokens(inputs, EOS)
    model = _model()
    with pytest.raises(ValueError, match="documents"):
        model(inputs, attention_mask=torch.ones_like(inputs), documents=docs)
    with pytest.raises(ValueError, match="documents"):
        model(inputs[:1], cache=KVCache(CFG), documents=docs)
    with pytest.raises(ValueError, match="documents"):
        model(inputs[:2], documents=docs)
    q = torch.randn(3, 4, 32, 16)
    assert torch.equal(document_attention(q, q, q, 0.0, DocumentMask.from_tokens(torch.zeros(3, 32).long(), EOS)),
                       attention_core(q, q, q, 0.0))


def _tp_worker(rank, world):
    group = dist.new_group(list(range(world)))
    inputs, targets = packed_batch()
    dense = _model()
    logits = dense(inputs, documents=DocumentMask.from_tokens(inputs, EOS))
    F.cross_entropy(logits[..., :CFG.vocab_size].flatten(0, 1), targets.flatten(), reduction="sum").backward()
    ref_logits, dense_params = logits.detach(), dict(dense.named_parameters())
    for impl, recompute in (("segments", "selective"), ("sdpa", "full"), ("segments", "none")):
        tp = TPContext(group, world, rank, sequence_parallel=True)
        model = Llama(CFG, parallelism=Parallelism(tp, RNGTracker(5, rank), recompute=recompute))
        model.init_weights(5)
        logits = model(inputs, documents=DocumentMask.from_tokens(inputs, EOS, impl=impl))
        start, real = model.vocab_start, min(logits.shape[-1], CFG.vocab_size - model.vocab_start)
        what = f"tp {world} + SP, {impl}, recompute {recompute}"
        _close(logits[..., :real].detach(), ref_logits[..., start:start + real], f"{what}: logits")
        vocab_parallel_cross_entropy(logits, targets, start, CFG.vocab_size, group).sum().backward()
        for name, p in model.named_parameters():
            grad = p.grad.clone()
            if getattr(p, "sequence_parallel", False):  # norms: each rank holds its sequence shard's part
                dist.all_reduce(grad, group=group)
            local, block = shard_blocks(p)
            _close(grad[local], dense_params[name].grad[block], f"{what}: gradient of {name}")


def test_tensor_sequence_parallel_matches_dense():
    distributed.run(_tp_worker, world=2)
