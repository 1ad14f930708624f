"""Text generation with a KV cache from an engine checkpoint of any layout.

    python -m engine.generate CKPT_DIR --prompt TEXT [--max-new-tokens N] [--temperature T] [--top-k K]
                              [--seed S] [--tokenizer byte|PATH/tokenizer.json] [--device cpu|cuda]
                              [--dtype fp32|bf16|fp16]

prints the prompt followed by its continuation. Temperature 0 is greedy decoding.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from engine.models.llama import PRECISION_DTYPES, KVCache, Llama
from engine.training import checkpoint as ckpt


class GenerateError(ValueError):
    pass


def sample(logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> int:
    """The next token from one position's logits [vocab]: argmax at temperature 0, else a draw from
    softmax(logits / temperature) over the top_k most likely tokens (all when None)."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits.float().cpu() / temperature  # drawn on the CPU: a seed gives the same draws on any device
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))


@torch.no_grad()
def generate(model: Llama, prompt_ids, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             eos_id: int | None = None, generator: torch.Generator | None = None) -> list[int]:
    """The tokens that continue prompt_ids (a sequence of ints), decoded with a KV cache: up to max_new_tokens,
    ending early with eos_id (included) or when the model's context (seq_length) is full."""
    prompt = [int(i) for i in prompt_ids]
    limit = model.cfg.seq_length
    if not prompt:
        raise GenerateError("the prompt is empty: give at least one token")
    if len(prompt) > limit:
        raise GenerateError(f"the prompt is {len(prompt)} tokens long, more than the model's context "
                            f"(seq_length {limit})")
    if temperature < 0:
        raise GenerateError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise GenerateError(f"top_k must be >= 1, got {top_k}")
    device = model.rope_cos.device
    cache = KVCache(model.cfg, batch=1, device=device, dtype=model.head_weight().dtype)
    new: list[int] = []
    inputs = prompt
    while len(new) < max_new_tokens:
        logits = model(torch.tensor([inputs], device=device), cache=cache)[0, -1]
        token = sample(logits, temperature, top_k, generator)
        new.append(token)
        # the sampled token needs no position of its own until it is fed back in
        if token == eos_id or cache.length == limit:
            break
        inputs = [token]
    return new


def _tokenizer(meta: dict, step_dir: str, override: str | None, vocab_size: int):
    """--tokenizer, else the one the checkpoint's run trained with (and its --eos-token, where it recorded one)."""
    data = (meta.get("config") or {}).get("data") or {}
    spec, eos_token = (override, None) if override is not None else (data.get("tokenizer"), data.get("eos_token"))
    if spec is None:  # a converted checkpoint records no run config
        if vocab_size != 259:
            raise GenerateError(f"{step_dir} records no tokenizer; pass --tokenizer PATH/tokenizer.json")
        spec = "byte"
    if spec != "byte" and not os.path.isfile(spec):
        raise GenerateError(f"tokenizer {spec!r} is neither 'byte' nor an existing tokenizer.json file; "
                            "pass --tokenizer")
    from engine.data.tokenizers import build_tokenizer
    try:
        return build_tokenizer(spec) if eos_token is None else build_tokenizer(spec, eos_token)
    except (RuntimeError, ValueError) as exc:  # its messages name the file and the fix
        raise GenerateError(str(exc)) from None
    except Exception as exc:  # the tokenizers package raises a plain Exception for a malformed file
        raise GenerateError(f"--tokenizer {spec}: cannot read it ({exc})") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt_dir", metavar="CKPT_DIR", help="a --save directory (uses `latest`) or a step_* dir")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most [64]")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; 0: greedy [1.0]")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the K most likely tokens [all]")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampling [random]")
    parser.add_argument("--tokenizer", default=None,
                        help="'byte' or PATH/tokenizer.json [the one the checkpoint was trained with]")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="[cuda when available]")
    parser.add_argument("--dtype", choices=list(PRECISION_DTYPES), default=None,
                        help="parameters, activations and KV cache [bf16 on cuda, fp32 on cpu]")
    args = parser.parse_args(argv)
    try:
        if args.max_new_tokens < 0:
            raise GenerateError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cuda" and not torch.cuda.is_available():
            raise GenerateError("--device cuda: CUDA is not available here; use --device cpu")
        if not os.path.isdir(args.ckpt_dir):
            raise GenerateError(f"{args.ckpt_dir} is not a directory")
        step_dir = ckpt.resolve(args.ckpt_dir)
        if step_dir is None:
            raise GenerateError(f"{args.ckpt_dir}: no engine checkpoint here (neither meta.json nor a 'latest' "
                                "file)")
        meta = ckpt.CheckpointReader(step_dir).meta
        vocab_size = meta["model_config"]["vocab_size"]
        tokenizer = _tokenizer(meta, step_dir, args.tokenizer, vocab_size)
        prompt = tokenizer.encode(args.prompt)
        if len(prompt) and int(prompt.max()) >= vocab_size:
            raise GenerateError(f"the prompt has token id {int(prompt.max())}, outside the model's vocabulary "
                                f"({vocab_size}); the tokenizer does not match this checkpoint")
        from engine import load_model
        dtype = PRECISION_DTYPES[args.dtype or ("bf16" if device == "cuda" else "fp32")]
        model = load_model(step_dir, device, dtype)
        generator = torch.Generator()
        if args.seed is None:
            generator.seed()
        else:
            generator.manual_seed(args.seed)
        new = generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k,
                       eos_id=tokenizer.eos_id, generator=generator)
    except (GenerateError, ckpt.CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if new and new[-1] == tokenizer.eos_id:
        new = new[:-1]
    elif len(new) < args.max_new_tokens:
        print(f"note: stopped at the end of the model's context (seq_length {model.cfg.seq_length})",
              file=sys.stderr)
    print(tokenizer.decode(list(prompt) + new))
    return 0


if __name__ == "__main__":
    sys.exit(main())
