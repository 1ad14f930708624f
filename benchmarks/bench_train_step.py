"""One training step (forward, backward, AdamW step) of ``engine``'s Llama vs ``transformers.LlamaForCausalLM``.

Both models get the same configuration, the same weights (ours copied into Hugging Face's), the same batch, the
same loss (token-mean ``F.cross_entropy`` on the logits, computed outside the model; HF gets input ids only, so
its internal loss and KV cache are not used) and the same optimizer (``torch.optim.AdamW(fused=True)``, or
``foreach=True`` where this torch has no fused CPU kernel). The losses are checked to agree before anything is
timed, so both sides do equal work.

Timing is interleaved: each repeat times ``--steps-per-repeat`` steps of one model and then of the other (the
order alternates from repeat to repeat), so machine noise hits both equally. The figure to read is the median of
the per-repeat ratios ours / HF (<= 1.0 means we are at least as fast). Two secondary views for a shared machine:
the "min" row (best step of each side, and their ratio) and the process-CPU-time columns (time the process was
descheduled does not count); and the "quiet pairs" row, the median over the pairs in which both steps ran within
25% of their side's fastest step (pairs visibly slowed by other jobs left out).

Two entry points:

    python benchmarks/bench_train_step.py [--model tiny] [--micro-batch-size 8] [--seq-length 256] \
        [--repeats 10] [--json] [--profile DIR]
    pytest benchmarks/ --benchmark-only        # the test_* functions below (pytest-benchmark)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys

import torch
import torch.nn.functional as F

try:
    import engine  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.models.llama import Llama, ModelConfig, preset  # noqa: E402
from ab import add_timing_args, profile, run_ab  # noqa: E402

LOSS_TOLERANCE = 1e-4
QUIET_SLACK = 1.25  # a pair is "quiet" when both of its steps are within 25% of that side's fastest step
SEED = 1234
ADAMW_KWARGS = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


# ---------------------------------------------------------------------------------------------------------
# Building the two models.

def hf_config(cfg: ModelConfig):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.seq_length,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        attention_bias=False,
        attention_dropout=cfg.dropout,
        mlp_bias=False,
        tie_word_embeddings=cfg.tie_embeddings,
        use_cache=False,
    )


def hf_state_dict(ours: Llama) -> dict[str, torch.Tensor]:
    """Our parameters under Hugging Face LLaMA names."""
    sd = ours.state_dict()
    vocab = ours.cfg.vocab_size  # rows past it, if any, are tensor-parallel vocabulary padding
    out = {"model.embed_tokens.weight": sd["embedding.weight"][:vocab], "model.norm.weight": sd["norm.weight"]}
    out["lm_head.weight"] = (sd["head.weight"] if "head.weight" in sd else sd["embedding.weight"])[:vocab]
    ours_to_hf = {
        "attn.wq": "self_attn.q_proj", "attn.wk": "self_attn.k_proj", "attn.wv": "self_attn.v_proj",
        "attn.wo": "self_attn.o_proj", "mlp.w_gate": "mlp.gate_proj", "mlp.w_up": "mlp.up_proj",
        "mlp.w_down": "mlp.down_proj", "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
    }
    for i in ours.layers:
        for src, dst in ours_to_hf.items():
            out[f"model.layers.{i}.{dst}.weight"] = sd[f"layers.{i}.{src}.weight"]
    return out


def build_models(cfg: ModelConfig, seed: int = SEED):
    """(ours, hf): fp32, train mode, identical weights."""
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    ours = Llama(cfg)
    ours.init_weights(seed)
    hf = LlamaForCausalLM._from_config(hf_config(cfg), attn_implementation="sdpa", dtype=torch.float32)
    missing, unexpected = hf.load_state_dict({k: v.clone() for k, v in hf_state_dict(ours).items()}, strict=False)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"weight mapping mismatch: missing={missing} unexpected={unexpected}")
    if hf.config._attn_implementation != "sdpa":
        raise RuntimeError(f"HF attention implementation is {hf.config._attn_implementation!r}, expected 'sdpa'")
    n_ours = sum(p.numel() for p in ours.parameters())
    n_hf = sum(p.numel() for p in hf.parameters())
    if n_ours != n_hf:
        raise RuntimeError(f"parameter counts differ: ours {n_ours}, HF {n_hf}")
    return ours.float().train(), hf.float().train()


def fused_adamw_available() -> bool:
    try:
        p = torch.nn.Parameter(torch.zeros(4))
        p.grad = torch.ones(4)
        torch.optim.AdamW([p], fused=True).step()
        return True
    except (RuntimeError, NotImplementedError):
        return False


def make_optimizer(model: torch.nn.Module, impl: str) -> torch.optim.Optimizer:
    flag = {"fused": {"fused": True}, "foreach": {"foreach": True}}[impl]
    return torch.optim.AdamW(model.parameters(), **ADAMW_KWARGS, **flag)


def make_batch(cfg: ModelConfig, micro_batch_size: int, seq_length: int, seed: int = SEED):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (micro_batch_size, seq_length + 1), generator=gen)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


# ---------------------------------------------------------------------------------------------------------
# The step: identical for both sides except for how the logits are obtained.

def ours_logits(model: Llama, x: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    vocab = model.cfg.vocab_size
    return logits if logits.shape[-1] == vocab else logits[..., :vocab]  # drop vocabulary padding, if any


def hf_logits(model, x: torch.Tensor) -> torch.Tensor:
    return model(input_ids=x, use_cache=False).logits


def lm_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))


def make_step(model, logits_fn, optimizer, x, y):
    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = lm_loss(logits_fn(model, x), y)
        loss.backward()
        optimizer.step()
        return loss.item()
    return step


class Pair:
    """Both models, their optimizers and one batch, checked to compute the same loss."""

    def __init__(self, cfg: ModelConfig, micro_batch_size: int, seq_length: int, optimizer: str | None = None):
        self.cfg = dataclasses.replace(cfg, seq_length=max(cfg.seq_length, seq_length))
        self.micro_batch_size, self.seq_length = micro_batch_size, seq_length
        self.optimizer = optimizer or ("fused" if fused_adamw_available() else "foreach")
        self.ours, self.hf = build_models(self.cfg)
        self.x, self.y = make_batch(self.cfg, micro_batch_size, seq_length)
        with torch.no_grad():
            self.loss_ours = lm_loss(ours_logits(self.ours, self.x), self.y).item()
            self.loss_hf = lm_loss(hf_logits(self.hf, self.x), self.y).item()
        self.loss_diff = abs(self.loss_ours - self.loss_hf)
        if not self.loss_diff <= LOSS_TOLERANCE:
            raise AssertionError(f"losses differ: ours {self.loss_ours:.6f}, HF {self.loss_hf:.6f} "
                                 f"(|diff| {self.loss_diff:.2e} > {LOSS_TOLERANCE:.0e}); not comparing equal work")
        self.step_ours = make_step(self.ours, ours_logits, make_optimizer(self.ours, self.optimizer), self.x, self.y)
        self.step_hf = make_step(self.hf, hf_logits, make_optimizer(self.hf, self.optimizer), self.x, self.y)

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch_size * self.seq_length


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def run(pair: Pair, repeats: int, steps_per_repeat: int, warmup: int) -> dict:
    """`warmup` untimed steps of each side (ours first), then `repeats` rounds of steps_per_repeat steps of one side
    and then of the other (ours first in even rounds), every step timed (benchmarks/ab.py). A row is a round: the
    mean wall-clock and process CPU time per step of each side (CPU time leaves out the time the process was
    descheduled, so it is less sensitive to other jobs on a shared machine, though thread spin-waits and cache
    sharing still count), and each side's last loss."""
    load_before = load_average()
    res = run_ab({"ours": pair.step_ours, "hf": pair.step_hf}, repeats, warmup, calls_per_repeat=steps_per_repeat,
                 keep_values=True)
    warm_losses = list(zip(res.warmup_values["ours"], res.warmup_values["hf"]))
    wall = {side: res.round_means(side) for side in ("ours", "hf")}
    cpu = {side: res.round_means(side, cpu=True) for side in ("ours", "hf")}
    last = steps_per_repeat - 1
    rows = [{"repeat": r, "ours_ms": 1e3 * wall["ours"][r], "hf_ms": 1e3 * wall["hf"][r],
             "ratio": wall["ours"][r] / wall["hf"][r], "ours_cpu_ms": 1e3 * cpu["ours"][r],
             "hf_cpu_ms": 1e3 * cpu["hf"][r], "cpu_ratio": cpu["ours"][r] / cpu["hf"][r],
             "loss_ours": res.values["ours"][r * steps_per_repeat + last],
             "loss_hf": res.values["hf"][r * steps_per_repeat + last]} for r in range(repeats)]
    med_ours = statistics.median(row["ours_ms"] for row in rows)
    med_hf = statistics.median(row["hf_ms"] for row in rows)
    min_ours, min_hf = min(row["ours_ms"] for row in rows), min(row["hf_ms"] for row in rows)
    # Pairs in which neither side was visibly slowed by other jobs: both steps within QUIET_SLACK of their best.
    quiet = [row for row in rows if row["ours_ms"] <= QUIET_SLACK * min_ours and row["hf_ms"] <= QUIET_SLACK * min_hf]
    return {
        "config": dataclasses.asdict(pair.cfg),
        "micro_batch_size": pair.micro_batch_size,
        "seq_length": pair.seq_length,
        "parameters": sum(p.numel() for p in pair.ours.parameters()),
        "optimizer": f"torch.optim.AdamW({pair.optimizer}=True)",
        "initial_loss_ours": pair.loss_ours,
        "initial_loss_hf": pair.loss_hf,
        "initial_loss_abs_diff": pair.loss_diff,
        "max_loss_abs_diff_during_run": max([abs(a - b) for a, b in warm_losses]
                                            + [abs(row["loss_ours"] - row["loss_hf"]) for row in rows]),
        "repeats": repeats,
        "steps_per_repeat": steps_per_repeat,
        "warmup_steps": warmup,
        "rows": rows,
        "median_ours_ms": med_ours,
        "median_hf_ms": med_hf,
        "median_ratio": statistics.median(row["ratio"] for row in rows),
        "median_ours_cpu_ms": statistics.median(row["ours_cpu_ms"] for row in rows),
        "median_hf_cpu_ms": statistics.median(row["hf_cpu_ms"] for row in rows),
        "median_cpu_ratio": statistics.median(row["cpu_ratio"] for row in rows),
        "min_ours_ms": min_ours,
        "min_hf_ms": min_hf,
        "quiet_pairs": len(quiet),
        "quiet_median_ratio": statistics.median(row["ratio"] for row in quiet) if quiet else None,
        "quiet_median_ours_ms": statistics.median(row["ours_ms"] for row in quiet) if quiet else None,
        "quiet_median_hf_ms": statistics.median(row["hf_ms"] for row in quiet) if quiet else None,
        "tokens_per_s_ours": pair.tokens_per_step / (med_ours / 1e3),
        "tokens_per_s_hf": pair.tokens_per_step / (med_hf / 1e3),
        "environment": environment(),
        "load_average_1min": {"before": load_before, "after": load_average()},
    }


def environment() -> dict:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads(),
            "machine": platform.machine(), "cpu_count": os.cpu_count()}


def _load(result: dict, when: str) -> str:
    value = result.get("load_average_1min", {}).get(when)
    return "n/a" if value is None else f"{value:.2f}"


def format_table(result: dict) -> str:
    cfg = result["config"]
    lines = [
        f"model: layers={cfg['num_layers']} hidden={cfg['hidden_size']} heads={cfg['num_heads']} "
        f"kv_heads={cfg['num_kv_heads']} ffn={cfg['ffn_hidden_size']} vocab={cfg['vocab_size']} "
        f"({result['parameters'] / 1e6:.2f}M params); micro batch {result['micro_batch_size']}, "
        f"seq {result['seq_length']}; fp32; {result['optimizer']}; {result['environment']['threads']} threads",
        f"initial loss: ours {result['initial_loss_ours']:.6f}, HF {result['initial_loss_hf']:.6f} "
        f"(|diff| {result['initial_loss_abs_diff']:.1e}); max |diff| during the run "
        f"{result['max_loss_abs_diff_during_run']:.1e}",
        f"{result['repeats']} interleaved repeats x {result['steps_per_repeat']} steps, "
        f"{result['warmup_steps']} warm-up steps each; 1-min load average {_load(result, 'before')} before, "
        f"{_load(result, 'after')} after (a load well above the core count means the machine was shared)",
        "",
        "| repeat | ours ms/step | HF ms/step | ratio ours/HF | ours CPU ms | HF CPU ms | CPU ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(f"| {row['repeat']} | {row['ours_ms']:.1f} | {row['hf_ms']:.1f} | {row['ratio']:.3f} | "
                     f"{row['ours_cpu_ms']:.1f} | {row['hf_cpu_ms']:.1f} | {row['cpu_ratio']:.3f} |")
    lines.append(f"| **median** | **{result['median_ours_ms']:.1f}** | **{result['median_hf_ms']:.1f}** | "
                 f"**{result['median_ratio']:.3f}** | {result['median_ours_cpu_ms']:.1f} | "
                 f"{result['median_hf_cpu_ms']:.1f} | {result['median_cpu_ratio']:.3f} |")
    lines.append(f"| min | {result['min_ours_ms']:.1f} | {result['min_hf_ms']:.1f} | "
                 f"{result['min_ours_ms'] / result['min_hf_ms']:.3f} | | | |")
    if result["quiet_pairs"]:
        lines.append(f"| quiet pairs ({result['quiet_pairs']}) | {result['quiet_median_ours_ms']:.1f} | "
                     f"{result['quiet_median_hf_ms']:.1f} | {result['quiet_median_ratio']:.3f} | | | |")
    else:
        lines.append("| quiet pairs (0) | | | n/a | | | |")
    lines += ["", f"tokens/s (median step): ours {result['tokens_per_s_ours']:,.0f}, "
                  f"HF {result['tokens_per_s_hf']:,.0f}"]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="engine preset to start from (default: tiny)")
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=256)
    add_timing_args(p, repeats=10, warmup=2, with_json=False, repeats_help="interleaved ours/HF pairs (default: 10)",
                    warmup_help="untimed steps per side first (default: 2)")
    p.add_argument("--steps-per-repeat", type=int, default=1, help="steps timed per side per repeat (default: 1)")
    for flag in ("num-layers", "hidden-size", "ffn-hidden-size", "num-heads", "num-kv-heads", "vocab-size"):
        p.add_argument(f"--{flag}", type=int, default=None, help="override the preset")
    p.add_argument("--optimizer", choices=["fused", "foreach"], default=None,
                   help="AdamW implementation (default: fused when this torch supports it on CPU, else foreach)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> ModelConfig:
    cfg = preset(args.model)
    overrides = {name: getattr(args, name) for name in ("num_layers", "hidden_size", "ffn_hidden_size",
                                                          "num_heads", "num_kv_heads", "vocab_size")
                 if getattr(args, name) is not None}
    cfg = dataclasses.replace(cfg, **overrides, seq_length=args.seq_length)
    errors = cfg.validate()
    if errors:
        raise SystemExit("\n".join(f"{flag}: {msg}" for flag, msg in errors))
    return cfg


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    if args.optimizer == "fused" and not fused_adamw_available():
        raise SystemExit("torch.optim.AdamW(fused=True) does not run on CPU in this torch; use --optimizer foreach")
    if args.optimizer is None and not fused_adamw_available():
        print("note: fused AdamW is unavailable on CPU in this torch; using foreach=True", file=sys.stderr)
    pair = Pair(config_from_args(args), args.micro_batch_size, args.seq_length, args.optimizer)
    result = run(pair, args.repeats, args.steps_per_repeat, args.warmup)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    if args.profile:  # after the timing (the profiled steps train both models on)
        for side, step in (("ours", pair.step_ours), ("hf", pair.step_hf)):
            print(f"profile of {side}: {profile(step, 3, args.profile, f'train_step_{side}')}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------------------
# pytest-benchmark: `pytest benchmarks/ --benchmark-only`. One benchmark per side, identical settings, sized to
# finish in about a minute on a 2-core CPU. The module-scoped `pair` fixture checks the losses agree first.

PYTEST_MICRO_BATCH_SIZE = 4
PYTEST_SEQ_LENGTH = 128
PYTEST_ROUNDS = 15
PYTEST_WARMUP_ROUNDS = 2

try:
    import pytest
except ImportError:  # the script does not need pytest
    pytest = None

if pytest is not None:
    @pytest.fixture(scope="module")
    def pair() -> Pair:
        pytest.importorskip("transformers")
        cfg = dataclasses.replace(preset("tiny"), seq_length=PYTEST_SEQ_LENGTH)
        return Pair(cfg, PYTEST_MICRO_BATCH_SIZE, PYTEST_SEQ_LENGTH)

    def _bench(benchmark, pair: Pair, step) -> None:
        benchmark.group = (f"train step: tiny, mb {pair.micro_batch_size}, seq {pair.seq_length}, fp32, "
                           f"AdamW {pair.optimizer}")
        benchmark.extra_info.update(tokens_per_step=pair.tokens_per_step, optimizer=pair.optimizer,
                                    initial_loss_abs_diff=pair.loss_diff)
        loss = benchmark.pedantic(step, rounds=PYTEST_ROUNDS, warmup_rounds=PYTEST_WARMUP_ROUNDS, iterations=1)
        assert loss == loss  # not NaN

    def test_train_step_engine(benchmark, pair):
        _bench(benchmark, pair, pair.step_ours)

    def test_train_step_hf(benchmark, pair):
        _bench(benchmark, pair, pair.step_hf)


if __name__ == "__main__":
    sys.exit(main())
