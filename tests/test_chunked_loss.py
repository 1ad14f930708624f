"""The fused, chunked head + cross-entropy (engine.parallel.cross_entropy.chunked_head_cross_entropy) against the
plain path, F.linear then F.cross_entropy: the summed loss and the gradients of the hidden states and the head
weight, fp32 to 1e-6, for chunk sizes that do and do not divide the tokens, ignored targets, padded vocabulary
rows, a scaled incoming gradient and no-grad evaluation; bf16 against the plain bf16 path; and the whole model
(Llama.head_loss) against its logits path. The tensor-parallel cases run in tests/test_parallel_layers.py."""
import pytest
import torch
import torch.nn.functional as F

from engine.models.llama import Llama, ModelConfig, Parallelism
from engine.parallel.cross_entropy import chunked_head_cross_entropy
from engine.parallel.recompute import SavedTensorCounter


def _inputs(dtype=torch.float32, tokens=30, hidden=16, rows=23, vocab=20):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(3, tokens // 3, hidden, generator=gen).to(dtype).requires_grad_()
    w = (torch.randn(rows, hidden, generator=gen) * 0.5).to(dtype).requires_grad_()
    target = torch.randint(0, vocab, (3, tokens // 3), generator=gen)
    target[0, :4] = -100
    target[2, -1] = -100
    return h, w, target, vocab


def _plain(h, w, target, vocab):
    logits = F.linear(h, w)[..., :vocab].float()  # rows past vocab are padding
    return F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum")


@pytest.mark.parametrize("chunk", [1, 7, 10, 30, 1000])
def test_matches_plain_fp32(chunk):
    h, w, target, vocab = _inputs()
    expected = _plain(h, w, target, vocab)
    (expected * 0.37).backward()
    grads = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    loss = chunked_head_cross_entropy(h, w, target, chunk, vocab_size=vocab)
    (loss * 0.37).backward()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(h.grad, grads[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(w.grad, grads[1], rtol=1e-6, atol=1e-7)
    assert w.grad[vocab:].abs().max() == 0  # padded rows get no gradient


def test_no_grad_keeps_nothing():
    h, w, target, vocab = _inputs()
    with torch.no_grad(), SavedTensorCounter() as counter:
        loss = chunked_head_cross_entropy(h, w, target, 7, vocab_size=vocab)
    torch.testing.assert_close(loss, _plain(h, w, target, vocab).detach(), rtol=1e-6, atol=0)
    assert counter.bytes == 0


def test_bf16_matches_plain_bf16():
    """In bf16 the matmuls run in bf16 as autograd's would; the weight gradient is summed over chunks in fp32."""
    h, w, target, vocab = _inputs(torch.bfloat16, tokens=300, hidden=64, rows=64, vocab=64)
    expected = _plain(h, w, target, vocab)
    expected.backward()
    grads = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    loss = chunked_head_cross_entropy(h, w, target, 64, vocab_size=vocab)
    loss.backward()
    assert h.grad.dtype == w.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, expected, rtol=1e-3, atol=0)
    torch.testing.assert_close(h.grad, grads[0], rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(w.grad, grads[1], rtol=2e-2, atol=2e-2)


def test_rejects_bad_chunk():
    h, w, target, vocab = _inputs()
    with pytest.raises(ValueError, match="chunk"):
        chunked_head_cross_entropy(h, w, target, 0, vocab_size=vocab)


@pytest.mark.parametrize("tie", [False, True])
def test_model_head_loss(tie):
    """forward(targets=) (Llama.head_loss) with and without chunks, and forward(labels=), give the same loss and
    every gradient."""
    cfg = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_heads=4, num_kv_heads=2, vocab_size=50,
                      seq_length=24, tie_embeddings=tie)
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    targets = torch.cat([ids[:, 1:], ids.new_full((2, 1), -100)], dim=1)
    results = []
    for chunk in (0, 5):
        model = Llama(cfg, parallelism=Parallelism(loss_chunk_tokens=chunk))
        model.init_weights(3)
        loss = model(ids, targets=targets)
        loss.backward()
        with torch.no_grad():
            mean = model(ids, labels=ids)
        results.append((loss.detach(), mean, {n: p.grad for n, p in model.named_parameters()}))
    (loss0, mean0, grads0), (loss1, mean1, grads1) = results
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=0)
    torch.testing.assert_close(mean1, mean0, rtol=1e-6, atol=0)
    torch.testing.assert_close(mean0, loss0 / 46, rtol=1e-6, atol=0)
    for name in grads0:
        # summation order differs (per chunk, then over chunks): entries that cancel to near zero get an
        # absolute floor of 1e-6 x the tensor's largest
        atol = 1e-6 * grads0[name].abs().max().item()
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-5, atol=atol, msg=lambda m: f"{name}: {m}")
