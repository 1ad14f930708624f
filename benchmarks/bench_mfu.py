"""Single-device bf16 training throughput (tokens/s, TFLOP/s, MFU, peak memory) of the engine's Trainer vs a compiled
plain-PyTorch LLaMA ("peer"), LLaMA shapes at seq 2048, one process.

    python benchmarks/bench_mfu.py                                     # 124m, 350m, 1b; every side; one H100/H200
    python benchmarks/bench_mfu.py --sizes 350m --sides ours-eager peer --repeats 10 --json mfu.json
    python benchmarks/bench_mfu.py --smoke --device cpu                # tiny shapes: every code path on a CPU
    python benchmarks/bench_mfu.py --help

Sizes (vocabulary 32000, RoPE theta 1e4, RMSNorm eps 1e-5, untied head, no dropout; --seq-length, default 2048):

    124m  12 layers x 768,  12 heads (MHA),        ffn 2048    134M parameters with head and embedding
    350m  24 layers x 1024, 16 heads (MHA),        ffn 2816    374M
    1b    engine.models.llama.preset("llama-1b"): 22 x 2048, 32 heads / 4 kv heads (GQA), ffn 5632   1.1B

Default batches (sized for an 80 GB H100 at seq 2048; --micro-batch-size / --global-batch-size override all sizes):
124m and 350m micro-batch 8, 1b micro-batch 4; global batch 16 everywhere (32768 tokens per optimizer step, 2 or 4
micro-batches of gradient accumulation).

Sides (--sides; default all five):

    ours-eager                the engine's Trainer, one process, --precision bf16 (bf16 parameters, fp32 gradient
                              buffers, fp32 master weights + AdamW state in the optimizer), --clip-grad 1.0, constant
                              LR, built like the CLI does (parse_config -> validate -> Trainer), fed random token ids
                              through Trainer(train_data=...) so no tokenization is timed
    ours-compile              the same with --compile (per-transformer-layer torch.compile)
    ours-compile-fused-loss   the same with --compile --loss-chunk-tokens 4096 (head matmul + cross-entropy in chunks
                              of tokens, never the whole logits)
    ours-fused                eager layers with the engine's own fused kernels instead of the compiler:
                              --fused-elementwise --loss-chunk-tokens 4096 (RMSNorm, RoPE, SwiGLU in
                              csrc/cuda/elementwise.cu; their torch reference ops on the CPU)
    peer                      nanoGPT-style plain PyTorch (PeerLlama below): fp32 parameters under
                              torch.autocast(bfloat16), torch.compile(model) of the whole model with the loss,
                              torch.optim.AdamW(fused=True) (foreach=True where fused is unavailable),
                              clip_grad_norm_(1.0), same micro-batch and gradient accumulation, constant LR,
                              N(0, 0.02) init; attention through F.scaled_dot_product_attention(is_causal=True,
                              enable_gqa=True when kv heads < heads) (the flash kernel on the GPU)

A side whose flags this engine's config does not know (or refuses with a ConfigError) is reported as
"unavailable" in one line, and a side that fails to build or to run its warm-up (an out-of-memory error, a
compile error) as "failed"; the other sides still run. Sides that run out of memory side by side are run again one
after the other. A compiled side during whose build and warm-up torch._dynamo compiled no graph is flagged.

One step = one optimizer step (all micro-batches), data transfer to the device included (both sides copy their
samples from host memory). The first call of each side is timed on its own ("first step s": for a compiled side
mostly compilation; a later side of the same size may reuse code an earlier one compiled, e.g. the compiled layers of
ours-compile); it is followed by --warmup - 1 more warm-up steps, then benchmarks/ab.py's run_ab alternates the
sides for --repeats timed steps each. tokens/s = global batch x seq / median step time; TFLOP/s and MFU use the
engine's own convention for every side alike: engine.estimate.model_flops_per_token(model_cfg, seq) (what the
Trainer reports with; Megatron's: 6 x matmul parameters incl. the LM head + the s x s attention terms, causal
masking not discounted, recomputation not counted) and engine.training.metrics.peak_tflops (dense bf16 peak by card
name: 989 for H100/H200; --peak-tflops overrides; none on CPU, so no MFU there). The ratio column is tokens/s
ours / peer: with interleaved sides the median (and quartiles) of the per-repeat paired ratios peer time / our
time; under --sequential the ratio of the medians (unpaired).

Memory (CUDA only): "peak mem" is torch.cuda.max_memory_allocated over the side's own steps (the peak statistics
are reset right before each of its steps), process-wide: when the sides alternate in one process it includes the
other sides' resident state (their parameters, optimizer states and, for ours, the persistent fp32 gradient
buffers). "alone (est.)" estimates the side's peak by itself: its peak minus what was allocated at the start of its
step that is not its own persistent state. "state" is the side's own parameters + gradients + optimizer state
(ours: bf16 parameters, fp32 gradient buffers, fp32 master weights + two moments = 18 B/parameter; peer: fp32
parameters, fp32 gradients, two moments = 16 B/parameter; the peer's gradients exist only within a step).
Sizes whose sides' states would not fit side by side (estimated state bytes of all sides above 40% of the device's
memory: the 1b size on an 80 GB card, 4 x 18 + 16 B x 1.1B = 97 GB) run their sides one after the other
(--sequential forces that for every size, --no-sequential forbids it): each side is built, warmed up, timed and
freed before the next, so its peak is its own.

Between sizes every model is freed (del, gc, torch.cuda.empty_cache) and torch._dynamo is reset (otherwise the
next size's new shapes would recompile the same code with dynamic shapes). The JSON (--json) holds everything:
per side all step times, quartiles, first-call and warm-up times, first-step loss, memory, the Trainer's own
per-step record, plus the card, torch/CUDA versions, date and the command line; it is rewritten after each size,
so a run cut short keeps what finished. Progress lines carry the elapsed time.

--smoke: CPU-sized (two tiny sizes, 2 layers x 64 hidden, seq 64, vocabulary 512: "smoke" with MHA, "smoke-gqa"
with 2 kv heads and run --sequential; micro-batch 2, global batch 4; --repeats 1 --warmup 1; loss chunks of 48
tokens), exercising every code path of the full run, compilation of every compiled side included.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback

import torch
import torch.nn.functional as F
from torch import nn

_HERE = os.path.dirname(os.path.abspath(__file__))
try:
    import engine  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(_HERE))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)  # benchmarks/ab.py

import ab  # noqa: E402
from engine.estimate import model_flops_per_token  # noqa: E402  (the Trainer's own MFU convention)
from engine.models.llama import ModelConfig, preset  # noqa: E402
from engine.training.config import ConfigError, build_parser, parse_config, validate  # noqa: E402
from engine.training.metrics import peak_tflops  # noqa: E402

GiB = 2.0 ** 30
LR, BETAS, EPS, WEIGHT_DECAY, CLIP = 3e-4, (0.9, 0.95), 1e-8, 0.1, 1.0
SEED = 1234
SIDES = ["ours-eager", "ours-compile", "ours-compile-fused-loss", "ours-fused", "peer"]
SIZES = ["124m", "350m", "1b"]
SMOKE_SIZES = ["smoke", "smoke-gqa"]
DEFAULT_BATCH = {"124m": (8, 16), "350m": (8, 16), "1b": (4, 16), "smoke": (2, 4), "smoke-gqa": (2, 4)}
STATE_BYTES_PER_PARAM = {"ours": 18, "peer": 16}  # see the docstring
SEQUENTIAL_FRACTION = 0.4  # auto --sequential above this fraction of the device's memory in all sides' states
PEER_COMPILE = True  # (the tests turn it off)
SDPA_GQA = torch.__version__ >= (2, 5)  # F.scaled_dot_product_attention(enable_gqa=...)
_T0 = time.perf_counter()


def log(text: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {text}", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Shapes and data.

def size_config(name: str, seq_length: int) -> ModelConfig:
    """The model shape of a size, at seq_length."""
    base = preset("llama-1b")  # vocabulary 32000, theta 1e4, eps 1e-5, untied
    shapes = {"124m": dict(num_layers=12, hidden_size=768, ffn_hidden_size=2048, num_heads=12, num_kv_heads=12),
              "350m": dict(num_layers=24, hidden_size=1024, ffn_hidden_size=2816, num_heads=16, num_kv_heads=16),
              "1b": {},
              "smoke": dict(num_layers=2, hidden_size=64, ffn_hidden_size=176, num_heads=4, num_kv_heads=4,
                            vocab_size=512),
              "smoke-gqa": dict(num_layers=2, hidden_size=64, ffn_hidden_size=176, num_heads=4, num_kv_heads=2,
                                vocab_size=512)}
    if name not in shapes:
        raise ValueError(f"unknown size {name!r}; one of {', '.join(shapes)}")
    return dataclasses.replace(base, **shapes[name], seq_length=seq_length)


def parameter_count(cfg: ModelConfig) -> int:
    h, kv = cfg.hidden_size, cfg.kv_dim
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * cfg.ffn_hidden_size + 2 * h
    return cfg.num_layers * per_layer + 2 * cfg.vocab_size * h + h


class RandomTokens:
    """A map-style dataset of `count` samples of seq_length + 1 uniformly random token ids (Trainer(train_data=...)
    takes it as it is; the peer reads the same tensor)."""

    def __init__(self, count: int, seq_length: int, vocab_size: int, seed: int = SEED):
        gen = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(0, vocab_size, (count, seq_length + 1), generator=gen)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.tokens[i]


# ---------------------------------------------------------------------------------------------------------------
# The peer: a nanoGPT-style LLaMA in plain PyTorch.

def peer_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split rotary embedding (as engine.models.llama.apply_rope). x [b, h, s, d]; cos, sin [s, d]."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class PeerRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class PeerAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.hidden_size, cfg.kv_dim, bias=False)
        self.wv = nn.Linear(cfg.hidden_size, cfg.kv_dim, bias=False)
        self.wo = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos[:s].to(q.dtype), sin[:s].to(q.dtype)
        q, k = peer_rope(q, cos, sin), peer_rope(k, cos, sin)
        if self.kv_heads != self.heads and not SDPA_GQA:  # torch < 2.5: no enable_gqa
            k, v = (t.repeat_interleave(self.heads // self.kv_heads, dim=1) for t in (k, v))
        gqa = dict(enable_gqa=True) if self.kv_heads != self.heads and SDPA_GQA else {}
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)
        return self.wo(y.transpose(1, 2).reshape(b, s, -1))


class PeerMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w_gate = nn.Linear(cfg.hidden_size, cfg.ffn_hidden_size, bias=False)
        self.w_up = nn.Linear(cfg.hidden_size, cfg.ffn_hidden_size, bias=False)
        self.w_down = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class PeerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm, self.attn = PeerRMSNorm(cfg.hidden_size, cfg.norm_eps), PeerAttention(cfg)
        self.mlp_norm, self.mlp = PeerRMSNorm(cfg.hidden_size, cfg.norm_eps), PeerMLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class PeerLlama(nn.Module):
    """Embedding, blocks, final RMSNorm, untied head; forward(idx, targets) -> the token-mean cross-entropy."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(PeerBlock(cfg) for _ in range(cfg.num_layers))
        self.norm = PeerRMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))
        angles = torch.outer(torch.arange(cfg.seq_length, dtype=torch.float32), inv_freq).repeat(1, 2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embedding(idx)
        for layer in self.layers:
            x = layer(x, self.cos, self.sin)
        logits = self.head(self.norm(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))


def peer_adamw(model: nn.Module) -> tuple[torch.optim.Optimizer, str]:
    """AdamW with weight decay on matrices only (as the engine), fused where this torch has the kernel."""
    params = [q for q in model.parameters() if q.requires_grad]
    groups = [{"params": [q for q in params if q.ndim >= 2], "weight_decay": WEIGHT_DECAY},
              {"params": [q for q in params if q.ndim < 2], "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS, fused=True), "fused"
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS, foreach=True), "foreach"


class PeerSide:
    """The peer's optimizer step over one global batch (gradient accumulation over micro-batches)."""

    def __init__(self, cfg: ModelConfig, data: RandomTokens, mbs: int, gbs: int, device: torch.device,
                 precision: str, compile: bool = True):
        self.data, self.mbs, self.accum, self.device = data, mbs, gbs // mbs, device
        self.autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
        self.model = PeerLlama(cfg).to(device)
        self.optimizer, self.optimizer_kind = peer_adamw(self.model)
        self.forward = torch.compile(self.model) if compile else self.model
        self.position = 0

    def __call__(self) -> torch.Tensor:
        total = torch.zeros((), device=self.device)
        for _ in range(self.accum):
            start = self.position % (len(self.data) - self.mbs + 1)
            self.position += self.mbs
            batch = self.data.tokens[start:start + self.mbs].to(self.device, non_blocking=True)
            with torch.autocast(**self.autocast):
                loss = self.forward(batch[:, :-1], batch[:, 1:]) / self.accum
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def state_bytes(self) -> int:
        """Parameters + gradients (held within a step) + optimizer state."""
        params = sum(q.numel() * q.element_size() for q in self.model.parameters())
        return 2 * params + _optimizer_bytes(self.optimizer)

    def persistent_bytes(self) -> int:
        """What stays allocated between steps: parameters + optimizer state (gradients are set to None)."""
        return sum(q.numel() * q.element_size() for q in self.model.parameters()) + _optimizer_bytes(self.optimizer)

    @staticmethod
    def first_loss(result: torch.Tensor) -> float:
        return float(result)

    def close(self) -> None:
        self.model = self.forward = self.optimizer = None


def _optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
               if torch.is_tensor(t) and t.ndim)


# ---------------------------------------------------------------------------------------------------------------
# Ours: the engine's Trainer, built like the command line builds it.

def ours_flags(side: str, loss_chunk_tokens: int) -> list[str]:
    return {"ours-eager": [], "ours-compile": ["--compile"],
            "ours-compile-fused-loss": ["--compile", "--loss-chunk-tokens", str(loss_chunk_tokens)],
            "ours-fused": ["--fused-elementwise", "--loss-chunk-tokens", str(loss_chunk_tokens)]}[side]


def unknown_flags(flags: list[str]) -> list[str]:
    """The flags the engine's command line does not define (exact names: argparse would accept a prefix)."""
    known = build_parser()._option_string_actions
    return [f for f in flags if f.startswith("--") and f not in known]


def ours_argv(cfg: ModelConfig, mbs: int, gbs: int, device: str, precision: str, workdir: str,
              peak: float | None) -> list[str]:
    argv = ["--model", "llama-1b", "--num-layers", cfg.num_layers, "--hidden-size", cfg.hidden_size,
            "--ffn-hidden-size", cfg.ffn_hidden_size, "--num-heads", cfg.num_heads, "--num-kv-heads",
            cfg.num_kv_heads, "--vocab-size", cfg.vocab_size, "--seq-length", cfg.seq_length, "--rope-theta",
            cfg.rope_theta, "--norm-eps", cfg.norm_eps, "--dropout", 0.0, "--no-tie-embeddings",
            "--tp", 1, "--pp", 1, "--dp", 1, "--device", device, "--precision", precision,
            "--micro-batch-size", mbs, "--global-batch-size", gbs, "--clip-grad", CLIP, "--lr", LR, "--min-lr", LR,
            "--beta1", BETAS[0], "--beta2", BETAS[1], "--eps", EPS, "--weight-decay", WEIGHT_DECAY,
            "--lr-decay-style", "constant", "--lr-warmup-steps", 0, "--steps", 1_000_000, "--seed", SEED,
            "--log-interval", 1_000_000, "--run-name", "bench_mfu", "--metrics-file",
            os.path.join(workdir, "metrics.jsonl"), "--plot", os.path.join(workdir, "loss.png"),
            "--save", os.path.join(workdir, "checkpoints")]
    if peak:
        argv += ["--peak-tflops", peak]
    return [str(a) for a in argv]


class OursSide:
    """The engine Trainer's optimizer step (Trainer.train_step) over one global batch."""

    def __init__(self, argv: list[str], data: RandomTokens, expected: ModelConfig):
        from engine.training.trainer import Trainer
        cfg = parse_config(argv)
        validate(cfg, 1)
        self.trainer = Trainer(cfg, train_data=data)
        got = dataclasses.replace(self.trainer.model_cfg, init_std=expected.init_std)
        if got != expected:
            self.close()
            raise RuntimeError(f"the Trainer built {got}, not the benchmark's shape {expected}")
        self.last: dict | None = None

    def __call__(self) -> dict:
        self.last = self.trainer.train_step()
        return self.last

    def state_bytes(self) -> int:
        z = self.trainer.zero
        return z.param_bytes() + z.grad_bytes() + z.optimizer_bytes()

    persistent_bytes = state_bytes  # the flat gradient buffers persist between steps

    def close(self) -> None:
        """Drops the Trainer (its parameters, buffers and optimizer state go with it)."""
        self.trainer = None

    @staticmethod
    def first_loss(result: dict) -> float:
        return float(result["loss"])


# ---------------------------------------------------------------------------------------------------------------
# Measuring.

def cuda(device: torch.device) -> bool:
    return device.type == "cuda"


class Measured:
    """Wraps a side's step: the peak-memory statistics are reset before each of its steps and read after it (host-
    side allocator counters: valid without a synchronization, so the timing is untouched)."""

    def __init__(self, step, device: torch.device):
        self.step, self.device = step, device
        self.peak = 0
        self.allocated_at_start = 0

    def __call__(self):
        if cuda(self.device):
            self.allocated_at_start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        result = self.step()
        if cuda(self.device):
            self.peak = max(self.peak, torch.cuda.max_memory_allocated(self.device))
        return result


def free_memory(device: torch.device) -> None:
    gc.collect()
    if cuda(device):
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def allocated_gib(device: torch.device) -> str:
    return f"{torch.cuda.memory_allocated(device) / GiB:.2f} GiB allocated" if cuda(device) else ""


def dynamo_counters() -> dict:
    """A copy of torch._dynamo's counters of compiled frames, graphs, graph breaks and recompilations (private API:
    diagnostics only; {} where unavailable)."""
    try:
        from torch._dynamo.utils import counters
        return {group: dict(values) for group, values in counters.items() if group in
                ("stats", "graph_break", "recompiles", "frames")}
    except Exception:  # noqa: BLE001
        return {}


def counters_since(before: dict) -> dict:
    """dynamo_counters() minus `before` (the process's counters are cumulative), zeros left out."""
    out = {}
    for group, values in dynamo_counters().items():
        delta = {k: v - before.get(group, {}).get(k, 0) for k, v in values.items()}
        delta = {k: v for k, v in delta.items() if v}
        if delta:
            out[group] = delta
    return out


def _compiled_graphs() -> int:
    """Graphs torch._dynamo has compiled in this process so far (a private counter: 0 where unavailable)."""
    try:
        from torch._dynamo.utils import counters
        return int(counters["stats"]["unique_graphs"])
    except Exception:  # noqa: BLE001
        return 0


def mfu_numbers(flops_per_token: float, tokens_per_step: int, seconds: float, peak: float | None) -> dict:
    """tokens/s, TFLOP/s and MFU of a step of `seconds` (the Trainer's arithmetic: flops_per_token x tokens / time)."""
    tflops = flops_per_token * tokens_per_step / seconds / 1e12
    return {"tokens_per_s": tokens_per_step / seconds, "tflops": tflops, "mfu": tflops / peak if peak else None}


def build_side(name: str, ctx: dict):
    """(step object, None) or (None, (status, reason))."""
    if name == "peer":
        return PeerSide(ctx["cfg"], ctx["data"], ctx["mbs"], ctx["gbs"], ctx["device"], ctx["precision"],
                        compile=PEER_COMPILE), None
    flags = ours_flags(name, ctx["loss_chunk_tokens"])
    missing = unknown_flags(flags)
    if missing:
        return None, ("unavailable", f"this engine's config has no {' '.join(missing)}")
    argv = ours_argv(ctx["cfg"], ctx["mbs"], ctx["gbs"], ctx["device"].type, ctx["precision"], ctx["workdir"],
                     ctx["peak_override"]) + flags
    try:
        return OursSide(argv, ctx["data"], ctx["cfg"]), None
    except ConfigError as exc:
        return None, ("unavailable", " / ".join(str(exc).splitlines()))


def prepare_side(name: str, ctx: dict, record: dict, warmup: int):
    """Builds and warms a side up (the first call timed on its own). Returns the Measured step, or None with the
    record's status set to unavailable / failed."""
    device = ctx["device"]
    graphs = _compiled_graphs()
    step = None
    try:
        t0 = time.perf_counter()
        step, problem = build_side(name, ctx)
        if problem is not None:
            record["status"], record["reason"] = problem
            log(f"{ctx['size']}: {name} {problem[0]}: {problem[1]}")
            return None
        record["build_s"] = time.perf_counter() - t0
        measured = Measured(step, device)
        first_s, result = ab.timed(measured, device=device)
        record["first_call_s"] = first_s
        record["first_loss"] = step.first_loss(result)
        record["warmup_s"] = [ab.timed(measured, device=device)[0] for _ in range(max(warmup - 1, 0))]
        if cuda(device):  # (compilation may allocate more than a step: the timed steps' peak is counted afresh)
            record["warmup_peak_mem_bytes"], measured.peak = measured.peak, 0
        if isinstance(step, PeerSide):
            record["optimizer"] = step.optimizer_kind
        record["compiled_graphs"] = _compiled_graphs() - graphs
        record["status"] = "ok"
        log(f"{ctx['size']}: {name} built in {record['build_s']:.1f}s, first step {first_s:.1f}s"
            f"{' (compiling)' if name == 'peer' or '--compile' in ours_flags(name, 1) else ''}, warm-up {sum(record['warmup_s']):.1f}s; first-step "
            f"loss {record['first_loss']:.4f}; {record['compiled_graphs']} graphs compiled"
            + (f"; {allocated_gib(device)}" if cuda(device) else ""))
        return measured
    except Exception as exc:  # noqa: BLE001  (one side failing must not lose the others' results)
        record["status"] = "failed"
        record["reason"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500]
        record["traceback"] = traceback.format_exc()[-4000:]
        log(f"{ctx['size']}: {name} FAILED: {record['reason']}")
        print(record["traceback"], file=sys.stderr, flush=True)
        if step is not None:
            step.close()
        return None


def finish_side(name: str, measured: Measured, record: dict, times: list[float], ctx: dict, others: int) -> None:
    """Fills a side's record from its step times and memory counters."""
    device, step = ctx["device"], measured.step
    med = statistics.median(times)
    record.update(times_s=times, median_s=med, quartiles_s=ab.quartiles(times),
                  **mfu_numbers(ctx["flops_per_token"], ctx["tokens_per_step"], med, ctx["peak"]))
    record["state_bytes"] = step.state_bytes()
    if cuda(device):
        record["peak_mem_bytes"] = measured.peak
        record["other_sides_bytes"] = others
        record["alone_peak_bytes"] = measured.peak - max(measured.allocated_at_start - step.persistent_bytes(), 0)
    if isinstance(step, OursSide):
        record["activation_bytes"] = step.trainer.activation_bytes  # the engine's count of saved activations
    if isinstance(step, OursSide) and step.last is not None:
        record["trainer_record"] = {k: v for k, v in step.last.items() if isinstance(v, (int, float, str, bool))
                                    or v is None}
    if ctx["profile"]:
        record["profile"] = ab.profile(measured, 2, ctx["profile"], f"{ctx['size']}-{name}")


def run_size(size: str, args, device: torch.device, peak: float | None, sides: list[str]) -> dict:
    cfg = size_config(size, args.seq_length)
    mbs, gbs = DEFAULT_BATCH[size]
    mbs = args.micro_batch_size or mbs
    gbs = args.global_batch_size or max(gbs, mbs)
    if gbs % mbs:
        raise SystemExit(f"--global-batch-size {gbs} is not a multiple of --micro-batch-size {mbs}")
    counters_at_start = dynamo_counters()
    params = parameter_count(cfg)
    state_estimate = sum(STATE_BYTES_PER_PARAM["peer" if s == "peer" else "ours"] for s in sides) * params
    if args.sequential is not None:
        sequential = args.sequential
    elif cuda(device):
        total = torch.cuda.get_device_properties(device).total_memory
        sequential = state_estimate > SEQUENTIAL_FRACTION * total
    else:
        sequential = size in ("smoke-gqa",)  # the smoke run exercises both modes
    out = {"model_config": dataclasses.asdict(cfg), "parameters": params, "micro_batch_size": mbs,
           "global_batch_size": gbs, "tokens_per_step": gbs * cfg.seq_length,
           "flops_per_token": model_flops_per_token(cfg, cfg.seq_length), "sequential": sequential,
           "state_bytes_estimate_all_sides": state_estimate, "sides": {name: {} for name in sides}}
    log(f"{size}: {_count(params)} parameters, seq {cfg.seq_length}, micro-batch {mbs}, global batch {gbs} "
        f"({gbs // mbs} micro-batches), {'sides one after the other' if sequential else 'sides interleaved'}")
    with tempfile.TemporaryDirectory(prefix="bench_mfu_") as workdir:
        ctx = dict(size=size, cfg=cfg, mbs=mbs, gbs=gbs, device=device, precision=args.precision,
                   loss_chunk_tokens=args.loss_chunk_tokens, workdir=workdir, peak=peak,
                   peak_override=args.peak_tflops, flops_per_token=out["flops_per_token"],
                   tokens_per_step=out["tokens_per_step"], profile=args.profile,
                   data=RandomTokens(gbs * 4, cfg.seq_length, cfg.vocab_size))
        times: dict[str, list[float]] = {}
        paired = None
        if sequential:
            _run_sequential(ctx, out, sides, times, args)
        else:
            paired = _run_interleaved(ctx, out, sides, times, args)
            _free_side(device)
            oom = [n for n in sides if out["sides"][n].get("status") == "failed" and _is_oom(out["sides"][n])]
            if oom:  # what did not fit beside the other sides gets a run of its own
                log(f"{size}: out of memory with the sides side by side; running {', '.join(oom)} one after the "
                    "other")
                out["retried_sequentially"] = oom
                for n in oom:
                    out["sides"][n] = {"first_attempt": out["sides"][n].get("reason")}
                _run_sequential(ctx, out, oom, times, args)
    for name, record in out["sides"].items():
        if name == "peer" or "peer" not in times or name not in times:
            continue
        if paired is not None and name in paired.times and "peer" in paired.times:
            # per-repeat pairs: tokens/s ours / peer = peer's time / ours
            record["ratio_vs_peer"] = dict(paired.ratio_summary("peer", name), paired=True)
        else:
            record["ratio_vs_peer"] = {"median": statistics.median(times["peer"]) / statistics.median(times[name]),
                                       "paired": False}
    compiled = [n for n in sides if n != "peer" and "--compile" in ours_flags(n, 1)
                and out["sides"][n].get("status") == "ok"]
    if compiled and not any(out["sides"][n].get("compiled_graphs") for n in compiled):
        for n in compiled:
            out["sides"][n]["warning"] = ("--compile was accepted, but torch._dynamo compiled no graph during the "
                                          "build and warm-up: the layers ran eagerly")
    out["first_step_losses"] = {n: r.get("first_loss") for n, r in out["sides"].items() if "first_loss" in r}
    out["dynamo"] = counters_since(counters_at_start)
    _reset_compiler()
    free_memory(device)
    return out


def _is_oom(record: dict) -> bool:
    reason = record.get("reason") or ""
    return "OutOfMemoryError" in reason or "out of memory" in reason.lower()


def _run_sequential(ctx: dict, out: dict, names: list[str], times: dict, args) -> None:
    """Each side built, warmed up, timed (run_ab with that side alone) and freed before the next."""
    size, device = ctx["size"], ctx["device"]
    for name in names:
        record = out["sides"][name]
        measured = prepare_side(name, ctx, record, args.warmup)
        if measured is None:
            _free_side(device)
            continue
        try:
            result = ab.run_ab({name: measured}, repeats=args.repeats, warmup=0, device=device)
            times[name] = list(result.times[name])
            record["ab"] = result.to_dict()
            finish_side(name, measured, record, times[name], ctx, 0)
            log(f"{size}: {name} timed: {record['tokens_per_s']:,.0f} tokens/s")
        except Exception as exc:  # noqa: BLE001
            times.pop(name, None)
            record.update(status="failed", reason=f"{type(exc).__name__}: {exc}"[:500],
                          traceback=traceback.format_exc()[-4000:])
            log(f"{size}: {name} FAILED while timed: {record['reason']}")
            print(record["traceback"], file=sys.stderr, flush=True)
        measured.step.close()
        measured = None
        _free_side(device)


def _run_interleaved(ctx: dict, out: dict, sides: list[str], times: dict, args):
    """Builds and warms up every side, then alternates them (run_ab); returns the ABResult, or None."""
    size, device = ctx["size"], ctx["device"]
    steps = {}
    for name in sides:
        measured = prepare_side(name, ctx, out["sides"][name], args.warmup)
        if measured is not None:
            steps[name] = measured
        else:
            free_memory(device)
    measured = None
    if not steps:
        return None
    log(f"{size}: timing {', '.join(steps)}: {args.repeats} repeats each, alternating")
    try:
        paired = ab.run_ab(steps, repeats=args.repeats, warmup=0, device=device)
        persistent = {n: m.step.persistent_bytes() for n, m in steps.items()}
        for name, measured in steps.items():
            times[name] = list(paired.times[name])
            others = sum(b for n, b in persistent.items() if n != name)
            finish_side(name, measured, out["sides"][name], times[name], ctx, others)
        out["ab"] = paired.to_dict()
        out["ab_table"] = ab.markdown_table(paired, "peer" if "peer" in steps else next(iter(steps)))
        return paired
    except Exception as exc:  # noqa: BLE001
        for name in steps:
            times.pop(name, None)
            out["sides"][name].update(status="failed", reason=f"{type(exc).__name__}: {exc}"[:500])
        out["traceback"] = traceback.format_exc()[-4000:]
        log(f"{size}: timing FAILED: {type(exc).__name__}: {exc}")
        print(out["traceback"], file=sys.stderr, flush=True)
        return None
    finally:
        measured = None
        for m in steps.values():
            m.step.close()
        steps.clear()


def _free_side(device: torch.device) -> None:
    free_memory(device)
    if cuda(device):
        log(f"  freed: {allocated_gib(device)}")


def _reset_compiler() -> None:
    """Forgets every compiled graph, so the next size compiles its own shapes statically (and frees them)."""
    try:
        torch._dynamo.reset()
    except Exception:  # noqa: BLE001
        pass


# ---------------------------------------------------------------------------------------------------------------
# Output.

def _fmt(value, spec: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


def _bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / GiB:.2f} GiB" if n >= 0.01 * GiB else f"{n / 2 ** 20:.2f} MiB"


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def _num(x: float) -> str:
    return f"{x:,.1f}" if abs(x) >= 10 else f"{x:.3g}"


def size_table(size: str, out: dict) -> str:
    """The markdown table of one size (and the first-step loss sanity line)."""
    cfg, tq = out["model_config"], out["tokens_per_step"]
    lines = [f"### {size}: {_count(out['parameters'])} parameters ({cfg['num_layers']} x {cfg['hidden_size']}, "
             f"{cfg['num_heads']}/{cfg['num_kv_heads']} heads, ffn {cfg['ffn_hidden_size']}, vocab "
             f"{cfg['vocab_size']}), seq {cfg['seq_length']}, micro-batch {out['micro_batch_size']}, global batch "
             f"{out['global_batch_size']}, {'sides one after the other' if out['sequential'] else 'sides interleaved'}",
             "",
             "| side | tokens/s [q1, q3] | TFLOP/s | MFU | peak mem | alone (est.) | state | first step s "
             "| tokens/s ours/peer [q1, q3] |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in out["sides"].items():
        if r.get("status") != "ok" or "median_s" not in r:
            reason = r.get("reason", "").replace("|", "/")
            lines.append(f"| {name} | {r.get('status', 'not run')}: {reason} | | | | | | | |")
            continue
        q1, _, q3 = r["quartiles_s"]
        ratio = r.get("ratio_vs_peer")
        if ratio is None:
            ratio_text = "1 (baseline)" if name == "peer" else "n/a"
        elif ratio["paired"]:
            ratio_text = f"**{ratio['median']:.3f}** [{ratio['q1']:.3f}, {ratio['q3']:.3f}]"
        else:
            ratio_text = f"**{ratio['median']:.3f}** (of medians)"
        mfu = "n/a" if r["mfu"] is None else f"{r['mfu'] * 100:.1f}%"
        spread = f"[{tq / q3:,.0f}, {tq / q1:,.0f}]" if min(q1, q3) > 0 else "[n/a]"  # (few repeats: q1 may be < 0)
        lines.append(f"| {name} | {r['tokens_per_s']:,.0f} {spread} | {_num(r['tflops'])} | "
                     f"{mfu} | {_bytes(r.get('peak_mem_bytes'))} | {_bytes(r.get('alone_peak_bytes'))} | "
                     f"{_bytes(r.get('state_bytes'))} | {r['first_call_s']:.1f} | {ratio_text} |")
    losses = out.get("first_step_losses") or {}
    if losses:
        ln_v = math.log(cfg["vocab_size"])
        lines += ["", f"first-step losses (sanity, ~ln V = {ln_v:.2f}): "
                  + ", ".join(f"{n} {v:.4f}" for n, v in losses.items())]
        bad = [n for n, v in losses.items() if not math.isfinite(v) or abs(v - ln_v) > 1.0]
        if bad:
            lines.append(f"WARNING: first-step loss far from ln V for {', '.join(bad)}")
    if out.get("retried_sequentially"):
        lines.append(f"note: {', '.join(out['retried_sequentially'])} ran out of memory beside the other sides and "
                     "ran alone afterwards (ratio of medians)")
    for name, r in out["sides"].items():
        if r.get("warning"):
            lines.append(f"WARNING: {name}: {r['warning']}")
    return "\n".join(lines)


def environment(device: torch.device, peak: float | None) -> dict:
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "argv": sys.argv, "host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "device": str(device), "peak_tflops": peak}
    if cuda(device):
        props = torch.cuda.get_device_properties(device)
        env.update(card=torch.cuda.get_device_name(device), capability=list(torch.cuda.get_device_capability(device)),
                   memory_bytes=props.total_memory, cudnn=torch.backends.cudnn.version())
    else:
        env.update(card=platform.processor() or platform.machine(), cpu_threads=torch.get_num_threads())
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        pass
    try:
        import subprocess
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_HERE, capture_output=True,
                                           text=True, timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001
        env["git_commit"] = None
    return env


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=SIZES + SMOKE_SIZES, default=None,
                        help=f"model sizes [{' '.join(SIZES)}; with --smoke {' '.join(SMOKE_SIZES)}]")
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=SIDES, help="what to measure [all]")
    parser.add_argument("--micro-batch-size", type=int, default=None,
                        help="samples per micro-batch [124m/350m: 8, 1b: 4, smoke: 2]")
    parser.add_argument("--global-batch-size", type=int, default=None,
                        help="samples per optimizer step (gradient accumulation) [16; smoke: 4]")
    parser.add_argument("--seq-length", type=int, default=None, help="tokens per sample [2048; smoke: 64]")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="[cuda when available]")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                        help="bf16: ours --precision bf16, the peer under bf16 autocast (both with fp32 master "
                             "weights) [bf16]")
    parser.add_argument("--loss-chunk-tokens", type=int, default=None,
                        help="--loss-chunk-tokens of ours-compile-fused-loss and ours-fused [4096; smoke: 48]")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak TFLOP/s per device for MFU [engine.training.metrics.peak_tflops: by card name]")
    parser.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=None,
                        help="build, time and free each side before the next [when all sides' states would "
                             f"exceed {SEQUENTIAL_FRACTION * 100:.0f}%% of the device's memory: the 1b size on 80 GB]")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU-sized run of every code path: tiny sizes, seq 64, --repeats 1 --warmup 1")
    ab.add_timing_args(parser, repeats=5, warmup=3, repeats_help="timed steps per side [5; smoke: 1]",
                       warmup_help="untimed steps per side first, the first of them compiling (timed on its own: "
                                   "'first step s') [3; smoke: 1]")
    parser.set_defaults(repeats=None, warmup=None)  # (the defaults depend on --smoke)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    if args.smoke:
        args.sizes = args.sizes or SMOKE_SIZES
        args.seq_length = args.seq_length or 64
        args.loss_chunk_tokens = args.loss_chunk_tokens or 48
        args.repeats = 1 if args.repeats is None else args.repeats
        args.warmup = 1 if args.warmup is None else args.warmup
    args.repeats = 5 if args.repeats is None else args.repeats
    args.warmup = 3 if args.warmup is None else args.warmup
    args.sizes = args.sizes or SIZES
    args.seq_length = args.seq_length or 2048
    args.loss_chunk_tokens = args.loss_chunk_tokens or 4096
    if args.repeats < 1 or args.warmup < 1:
        raise SystemExit("--repeats and --warmup must be at least 1 (the first call of a side is its compilation)")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if cuda(device):
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device visible; use --device cpu")
        device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    peak = peak_tflops(device, args.precision, args.peak_tflops)
    payload = {"environment": environment(device, peak), "settings": {k: v for k, v in vars(args).items()},
               "sizes": {}}
    env = payload["environment"]
    log(f"{env['card']}, torch {env['torch']}, CUDA {env['cuda']}, peak {_fmt(peak, '.0f')} TFLOP/s "
        f"({args.precision}); sizes {' '.join(args.sizes)}; sides {' '.join(args.sides)}; repeats {args.repeats}, "
        f"warm-up {args.warmup}")
    tables = []
    for size in args.sizes:
        out = run_size(size, args, device, peak, args.sides)
        payload["sizes"][size] = out
        tables.append(size_table(size, out))
        print("\n" + tables[-1] + "\n", flush=True)
        if args.json:
            ab.write_json(args.json, payload)
            log(f"wrote {args.json}")
    log("done")
    print("\n\n".join(tables), flush=True)
    if not args.json:
        print("(no --json PATH given: the full record was not written)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
