"""A Hugging Face transformers LlamaForCausalLM trained with the engine's tensor parallelism and ZeRO optimizer.

    python examples/embed_hf_llama.py                                         # one process
    torchrun --nproc_per_node 4 examples/embed_hf_llama.py --tp 2 --zero-stage 2

The model is built from a small LlamaConfig (random weights, the same on every rank) and split with the tp plan
transformers ships for it (config.base_model_tp_plan). The data is the built-in corpus: bytes of the Python
standard library's sources, folded into a 128-token vocabulary. Groups, clipping and the LR schedule are those of
examples/embed_plain_loop.py.
"""
import os
import sys

import torch

try:
    import transformers
except ImportError:
    sys.exit("examples/embed_hf_llama.py needs transformers: pip install transformers")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a clone, uninstalled

from embed_plain_loop import finish, log_step, parse_args, setup, warmup_cosine  # noqa: E402
from engine.data.datasets import stdlib_sources  # noqa: E402
from engine.optim import FusedAdamW, ZeroOptimizer  # noqa: E402
from engine.parallel import parallelize  # noqa: E402

VOCAB, SEQ = 128, 32


def small_llama():
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)  # the same initial weights on every rank
    return transformers.LlamaForCausalLM(config)


def corpus_tokens(limit=200_000):
    data = b""
    for path in stdlib_sources():  # sorted: every rank reads the same files
        with open(path, "rb") as fh:
            data += fh.read()
        if len(data) >= limit:
            break
    return torch.tensor(list(data[:limit]), dtype=torch.long) % VOCAB


def global_batch(tokens, step, size):
    """`size` windows of SEQ tokens at offsets drawn from `step` (the same global batch at any world size)."""
    starts = torch.randint(0, len(tokens) - SEQ, (size,), generator=torch.Generator().manual_seed(step))
    return torch.stack([tokens[s:s + SEQ] for s in starts.tolist()])


def main():
    args = parse_args(__doc__, zero_stage=2, steps=10)
    device, tp_group, dp_group, dp, dp_rank = setup(args)

    model = small_llama().to(device)
    if args.tp > 1:
        # q/k/v, gate/up colwise; o/down rowwise. The embedding and lm_head (outside model.model: named as
        # replicated, so that the gradient norm counts its copies once) stay whole on every tp rank.
        parallelize(model.model, tp_group, model.config.base_model_tp_plan, replicated=(model.lm_head,))
    opt = ZeroOptimizer(model, FusedAdamW, stage=args.zero_stage, group=dp_group, lr=args.lr, betas=(0.9, 0.95),
                        weight_decay=0.1, no_weight_decay=lambda name, p: p.ndim < 2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(max(1, args.steps // 10), args.steps))

    tokens = corpus_tokens()
    per_rank = args.global_batch // dp
    history = {"loss": [], "grad_norm": []}
    for step in range(args.steps):
        ids = global_batch(tokens, step, args.global_batch)[dp_rank * per_rank:(dp_rank + 1) * per_rank].to(device)
        loss = model(input_ids=ids, labels=ids).loss  # transformers shifts the labels itself
        loss.backward()
        norm = opt.clip_grad_norm_(args.clip, model_parallel_group=tp_group)  # over dp and tp, replicas once
        opt.step()
        sched.step()
        opt.zero_grad()
        log_step(history, step, loss, norm, dp_group, sched)
    finish(history, args.json)


if __name__ == "__main__":
    main()
