"""The training loop: one global batch per step, gradient accumulation over micro-batches, clipping, the
optimizer, metrics, evaluation, checkpoints, rollback on loss spikes and clean exit on SIGTERM."""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import signal
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from engine.data.sampler import BatchSizeRampup, GlobalBatchSampler, IterableSamples
from engine.data.tokenizers import build_tokenizer
from engine.estimate import model_flops_per_token
from engine.models.documents import DocumentMask
from engine.models.llama import (PRECISION_DTYPES, Llama, ModelConfig, Parallelism, partial_gradient,
                                 pipeline_chunk)
from engine.optim import Adafactor, LossScaler, LRSchedule, no_weight_decay
from engine.optim.adamw import FusedAdamW
from engine.optim.zero import ZeroOptimizer
from engine.parallel import (
    RNGTracker,
    Topology,
    TPContext,
)
from engine.parallel.context import shard_sequence
from engine.parallel.recompute import SavedTensorCounter
from engine.pipeline import schedules
from engine.pipeline.executor import PipelineExecutor
from engine.pipeline.p2p import P2P
from engine.training import checkpoint as ckpt
from engine.training.banner import trainer_banner
from engine.training.config import (
    Config,
    ConfigError,
    checkpoint_mismatch,
    checkpoint_to_load,
    job_start,
    parse_fault,
    parse_profile_ranks,
    parse_profile_steps,
    parse_rampup,
    run_dir,
    save_dir,
)
from engine.training.compile import CompileCounts, compile_layers, graph_break_reasons
from engine.training.data import TrainingData, prepare_data
from engine.training.metrics import (
    MetricsWriter,
    PhaseTimer,
    Progress,
    peak_memory_bytes,
    peak_tflops,
    plot_losses,
    require_tensorboard,
    step_line,
)
from engine.training.profiling import StepProfiler
from engine.training.watchdog import JobMonitor

SPIKE_WINDOW = 20      # the running mean for spike detection is over this many recent steps
SPIKE_MIN_HISTORY = 5  # no spike detection before this many steps of history


class StopTraining(RuntimeError):
    """Training cannot continue (e.g. too many rollbacks); the message says why."""


@dataclass
class TrainState:
    step: int = 0                 # optimizer steps taken (the last completed step)
    consumed_samples: int = 0     # samples trained on
    data_position: int = 0        # next sample position in the sampler's order (> consumed after skips)
    skipped_ranges: list = field(default_factory=list)  # [start, end) sample positions skipped by rollbacks
    skipped_steps: int = 0        # updates skipped for non-finite gradients
    rollbacks: int = 0
    loss_history: list = field(default_factory=list)  # [step, loss] of recent steps, for spike detection
    source_samples: list = field(default_factory=list)  # samples trained on from each --data blend source


def _device(requested: str | None) -> torch.device:
    if (requested or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _shifted(micro_batches) -> tuple[list, list]:
    """(inputs, targets) of language modelling: each sample's tokens predict the next ones."""
    return [mb[:, :-1] for mb in micro_batches], [mb[:, 1:] for mb in micro_batches]


def _map_style(data) -> bool:
    return hasattr(data, "__len__") and hasattr(data, "__getitem__")


class Trainer:
    """Trains one rank's part of the model. `topology` holds the process groups (built from the config when
    not given; a single process needs no process group). `train_data` / `valid_data`: the caller's own samples
    instead of --data, items of `seq_length + 1` token ids: a map-style dataset (len() and [i], like
    torch.utils.data.Dataset), which the engine's sampler orders (seeded, layout-independent, resumable), or an
    iterable (a generator, an IterableDataset), read in its own order (layout-independent; resuming reads forward
    to the position; a rollback or resume to an earlier position needs a re-iterable source)."""

    def __init__(self, cfg: Config, topology: Topology | None = None, train_data=None, valid_data=None,
                 data: TrainingData | None = None):
        # --time-limit counts from the job's start ($ENGINE_JOB_START, read only when a limit is set)
        self.job_started = job_start() if cfg.run.time_limit is not None else time.time()
        p, run = cfg.parallel, cfg.run
        if run.tensorboard:  # on every rank, before any work: a missing package is one line and exit status 2
            require_tensorboard()
        self.cfg = cfg
        self.topo = topology or Topology(p.tp, p.pp, p.dp, p.vpp, timeout_s=run.collective_timeout, cp=p.cp)
        self.world_size, self.rank = self.topo.world, self.topo.rank
        self.device = _device(run.device)
        cfg.precision.precision = cfg.precision.precision or ("bf16" if self.device.type == "cuda" else "fp32")
        self.precision = cfg.precision.precision
        self.run_dir = run_dir(cfg)
        self.run_name = os.path.basename(self.run_dir)
        self.save_dir = save_dir(cfg)
        self.last_checkpoint: str | None = None  # this run's latest saved or resumed step directory (rollbacks)
        self.pending_save: ckpt.PendingSave | None = None  # an --async-save still being written
        self.snapshot_wait_s = 0.0  # time optimizer steps waited for a background save's copy of the state
        self.metrics_path = run.metrics_file or os.path.join(self.run_dir, "metrics.jsonl")
        self.plot_path = run.plot or os.path.join(self.run_dir, "loss.png")
        self.is_logger = self.rank == 0

        self._build_data(train_data, valid_data, data)
        self.model_cfg = self._model_config()
        # the engine's own random streams, swapped in around its random work: the caller's generator is left alone
        self.rng = RNGTracker(run.seed, self.topo.tp_rank, self.device)
        tp = TPContext(self.topo.tp_group, p.tp, self.topo.tp_rank, p.sequence_parallel)
        par = Parallelism(tp, self.rng, cfg.recompute.recompute, cfg.recompute.recompute_layers,
                          cp_group=self.topo.cp_group if self.topo.cp > 1 else None,
                          loss_chunk_tokens=cfg.performance.loss_chunk_tokens,
                          fused_elementwise=cfg.performance.fused_elementwise)
        # (the layers are built on the CPU, then moved: on another device that draws on the caller's CPU generator)
        cpu_draws = contextlib.nullcontext() if self.device.type == "cpu" else torch.random.fork_rng(devices=[])
        with self.rng.fork("default"), cpu_draws:
            self.chunks = self._build_chunks(par)
        self.named_params = [(n, q) for chunk in self.chunks for n, q in chunk.named_parameters()]
        self.compile_counts = None
        if cfg.performance.compile:
            self.compile_counts = CompileCounts()
            compile_layers(self.chunks)
        self.zero = self._build_optimizer()
        self.optimizer = self.zero.optimizer
        o, s = cfg.optimizer, cfg.schedule
        self.lr_schedule = LRSchedule(o.lr, o.min_lr, s.lr_warmup_steps, s.lr_decay_steps, s.lr_decay_style,
                                      s.lr_wsd_decay_fraction)
        b = cfg.batch
        ramp = parse_rampup(b.rampup_batch_size) if b.rampup_batch_size else (None, None, 0)
        self.rampup = BatchSizeRampup(b.global_batch_size, *ramp)
        ls = cfg.precision.loss_scale
        self.scaler = (LossScaler(initial=ls or 2.0 ** 16, dynamic=ls is None,
                                  hysteresis=cfg.precision.loss_scale_hysteresis)
                       if self.precision == "fp16" else None)
        self.state = TrainState()
        self.flops_per_token = model_flops_per_token(self.model_cfg, self.model_cfg.seq_length)
        self.peak_tflops = peak_tflops(self.device, self.precision, run.peak_tflops)
        self.activation_bytes = None
        self._stop_requested = False
        self.faults = [parse_fault(spec) for spec in cfg.stability.inject_fault or []]  # (kind, step, rank)
        self._nonfinite_in_row = 0
        shape = (b.micro_batch_size, self.model_cfg.seq_length // self.topo.cp // (p.tp if p.sequence_parallel else 1),
                 self.model_cfg.hidden_size)
        pipe = P2P(self.topo.pipeline_ranks, self.topo.pp_rank, self.device, p.vpp, [(shape, self.param_dtype)],
                   run.collective_timeout) if p.pp > 1 else None
        self.executor = PipelineExecutor(self.chunks, self.topo.pp_rank, self.topo.pp, pipe)
        self.monitor = JobMonitor(self.rank, self.world_size, run.step_timeout,
                                  f"resume with --auto-resume from {self.save_dir} (python -m engine.launch "
                                  "restarts by itself)", os.path.join(self.run_dir, "failures"))
        self.executor.on_action = self.monitor.action
        self._schedules: dict[int, list] = {}
        self.timer = PhaseTimer(self.device)  # the step's phases, in its metrics line
        perf = cfg.performance
        window = parse_profile_steps(perf.profile_steps) if perf.profile_steps else None
        self.profile_ranks = parse_profile_ranks(perf.profile_ranks, self.world_size) if window else []
        self.profiler = StepProfiler(window, self.rank in self.profile_ranks, self.rank, self.device,
                                     perf.profile_memory, os.path.join(self.run_dir, "profile"))

    def _build_chunks(self, par: Parallelism) -> list[Llama]:
        """This rank's model chunks: virtual stage v = c * pp + rank holds layers [v*L/(pp*vpp), (v+1)*L/(pp*vpp));
        the first virtual stage holds the embedding, the last the final norm and head. Every chunk draws its
        weights by global parameter name, so the split never changes them."""
        p = self.cfg.parallel
        chunks = []
        for c in range(p.vpp):
            v = schedules.virtual_stage(self.topo.pp_rank, c, p.pp)
            chunk = pipeline_chunk(self.model_cfg, v, p.pp * p.vpp, par).to(self.device)
            chunk.init_weights(self.cfg.run.seed)
            chunk.to(self.param_dtype)
            chunks.append(chunk)
        return chunks

    @property
    def param_dtype(self) -> torch.dtype:
        return PRECISION_DTYPES[self.precision]

    def _build_optimizer(self) -> ZeroOptimizer:
        """Flat parameter and gradient buffers, bucketed data-parallel reduction and the (ZeRO-sharded)
        optimizer. bf16/fp16 parameters get fp32 master weights inside the optimizer."""
        o, p = self.cfg.optimizer, self.cfg.parallel
        master = self.param_dtype != torch.float32
        if o.optimizer == "adafactor":
            inner = dict(optimizer_class=Adafactor, lr=o.lr, beta1=o.beta1, weight_decay=o.weight_decay,
                         master_weights=master)
        else:
            inner = dict(optimizer_class=FusedAdamW, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                         weight_decay=o.weight_decay, master_weights=master)
        # The loss is normalised by the global batch's tokens, so gradients are summed over dp, and over cp (each
        # context-parallel rank holds the gradient of its part of every sequence); ZeRO shards over both.
        units = [u for chunk in self.chunks for u in chunk.gathering_units()]
        return ZeroOptimizer(self.chunks, stage=p.zero, group=self.topo.dp_cp_group, units=units,
                             grad_reduction="sum", bucket_numel=self.cfg.run.bucket_size,
                             no_weight_decay=no_weight_decay, partial_grad_group=self._partial_grad_group,
                             keep_params_in_step=p.zero3_keep_params, overlap_param_gather=p.overlap_param_gather,
                             **inner)

    def _partial_grad_group(self, name: str, param):
        """Sequence-parallel norm gains hold partial sums over tp; a tied embedding split across pipeline stages
        is summed over the embedding group (the first and last stages) once the schedule is over."""
        kind = partial_gradient(name, param, self.model_cfg.tie_embeddings and self.cfg.parallel.pp > 1)
        return {"tp": self.topo.tp_group, "embedding": self.topo.embedding_group}.get(kind)


    def _tied_copy(self, name: str) -> bool:
        """The last stage's copy of a tied embedding (the first stage's is the counted, saved one)."""
        return name == "head.weight" and self.model_cfg.tie_embeddings

    def owns(self, name: str, param) -> bool:
        """Whether this rank holds the one counted copy of `param` across the tensor and pipeline groups."""
        return not self._tied_copy(name) and not getattr(param, "tp_duplicate", False)

    def schedule(self, num_microbatches: int) -> list:
        if num_microbatches not in self._schedules:
            p = self.cfg.parallel
            self._schedules[num_microbatches] = schedules.build(p.schedule, p.pp, num_microbatches,
                                                                p.vpp)[self.topo.pp_rank]
        return self._schedules[num_microbatches]

    # ---- setup -------------------------------------------------------------------------------------------
    def _build_data(self, train_data=None, valid_data=None, data: TrainingData | None = None) -> None:
        """The caller's samples, or --data (prepared here unless `data` is the result of prepare_data(cfg), which
        the command line runs before any process group exists)."""
        seq = self.cfg.model_config().seq_length
        if valid_data is not None and train_data is None:
            raise ConfigError("Trainer(valid_data=...) needs train_data=... too (else both come from --data)")
        self.stream = None  # a user's iterable (read in its own order) instead of a map-style dataset
        self.blend = None
        if train_data is not None:
            self.tokenizer = build_tokenizer(self.cfg.data.tokenizer, self.cfg.data.eos_token)
            self.data_sources = []
            if not _map_style(train_data):
                if not hasattr(train_data, "__iter__"):
                    raise ConfigError("Trainer(train_data=...): needs len() and indexing (a map-style dataset, e.g. "
                                      "a list of token tensors) or iteration (a generator, an IterableDataset)")
                self.stream = IterableSamples(train_data)
            if valid_data is not None and not _map_style(valid_data):  # the same batches at every evaluation
                valid_data = list(itertools.islice(valid_data, self.cfg.data.eval_iters *
                                                   self.cfg.batch.global_batch_size))
            for name, items in (("train_data", train_data), ("valid_data", valid_data)):
                if items is not None and _map_style(items) and (len(items) == 0 or
                                                                 tuple(torch.as_tensor(items[0]).shape) != (seq + 1,)):
                    raise ConfigError(f"Trainer({name}=...): items must be {seq + 1} token ids (--seq-length + 1)")
            self.train_data, self.valid_data = train_data, valid_data
        else:
            data = data or prepare_data(self.cfg)
            self.tokenizer, self.data_sources, self.blend = data.tokenizer, data.sources, data.blend
            self.train_data, self.valid_data = data.train, data.valid
        self.sampler = None if self.stream else GlobalBatchSampler(len(self.train_data), self.cfg.run.seed)

    def _model_config(self) -> ModelConfig:
        cfg = self.cfg.model_config()
        if self.cfg.model.vocab_size is None:
            cfg.vocab_size = self.tokenizer.vocab_size
        elif cfg.vocab_size < self.tokenizer.vocab_size:
            raise ConfigError(f"--vocab-size: {cfg.vocab_size} is smaller than the tokenizer's vocabulary "
                              f"({self.tokenizer.vocab_size}); leave it unset or raise it")
        return cfg

    # ---- one step ----------------------------------------------------------------------------------------
    def _micro_batches(self, position: int, global_batch: int) -> list[torch.Tensor]:
        """This rank's micro-batches of the global batch at sample `position`, in host memory (see _host)."""
        if self.stream is None:
            indices = self.sampler.rank_slice(position, global_batch, self.topo.dp_rank, self.topo.dp)
            items = [self.train_data[i] for i in indices]
        else:  # every rank reads the global batch and keeps its slice
            per_rank = global_batch // self.topo.dp
            try:
                items = self.stream.take(position, global_batch)[self.topo.dp_rank * per_rank:][:per_rank]
            except ValueError as exc:
                raise StopTraining(str(exc)) from None
        samples = [torch.as_tensor(item).long() for item in items]
        seq = self.model_cfg.seq_length
        if any(tuple(x.shape) != (seq + 1,) for x in samples):
            raise StopTraining(f"train_data: an item at sample position {position}.. is not {seq + 1} token ids "
                               "(--seq-length + 1)")
        return self._host(torch.stack(samples))

    def _host(self, samples: torch.Tensor) -> list[torch.Tensor]:
        """samples [n, seq + 1] as micro-batches in host memory: pinned for a GPU, so that copying them (and the
        document layouts derived from them) does not wait for the device."""
        if self.device.type == "cuda":
            samples = samples.pin_memory()
        return list(samples.split(self.cfg.batch.micro_batch_size))

    def _on_device(self, host: list[torch.Tensor]) -> list[torch.Tensor]:
        return [mb.to(self.device, non_blocking=True) for mb in host]

    def _loss_fn(self, num_tokens: int):
        """A micro-batch's token cross-entropy / num_tokens, from the summed loss (fp32, vocabulary-parallel) the
        last stage computes in its forward (targets_in_forward: the head's matmul is part of the loss)."""
        return lambda summed, targets: summed / num_tokens

    def forward_backward(self, micro_batches: list[torch.Tensor], num_tokens: int,
                         host_micro_batches: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Runs the pipeline schedule over this rank's micro-batches, accumulating gradients of the global-batch
        mean loss; returns this rank's share of that loss (the loss lives on the last pipeline stage).
        host_micro_batches: the same in host memory, where the document layouts are derived without a wait."""
        for chunk in self.chunks:
            chunk.train()
        counter = None
        # (not under --compile: the counting hooks would be traced into the compiled graphs as graph breaks)
        if self.activation_bytes is None and self.compile_counts is None:
            exclude = [q for _, q in self.named_params] + [t for c in self.chunks for t in c.buffers()]
            counter = SavedTensorCounter(exclude)  # parameters are not activations (looked up at save time)
        with self.rng.fork("default"):
            loss = self.executor.run(self.schedule(len(micro_batches)), *self._inputs_and_targets(micro_batches),
                                     self._loss_fn(num_tokens), self.scaler.scale if self.scaler else 1.0,
                                     first_forward_context=(lambda: counter) if counter else contextlib.nullcontext,
                                     forward_kwargs=self._forward_kwargs(host_micro_batches or micro_batches),
                                     targets_in_forward=True)
        if counter is not None:
            self.activation_bytes = counter.bytes
        return loss

    def _inputs_and_targets(self, micro_batches: list[torch.Tensor]) -> tuple[list, list]:
        """Each micro-batch's inputs and next-token targets; with context parallelism this rank's load-balanced
        part of every sequence."""
        inputs, targets = _shifted(micro_batches)
        if self.topo.cp > 1:
            inputs, targets = ([shard_sequence(t, self.topo.cp, self.topo.cp_rank, dim=1) for t in ts]
                               for ts in (inputs, targets))
        return inputs, targets

    def _forward_kwargs(self, micro_batches: list[torch.Tensor]) -> list[dict] | None:
        """--document-mask: each micro-batch's document layout, for every pipeline stage's forward (every rank reads
        the micro-batches, so each derives it from the token ids; from host memory, the layout's lengths are read
        without waiting for the device)."""
        if not self.cfg.data.document_mask:
            return None
        return [{"documents": DocumentMask.from_tokens(mb[:, :-1], self.tokenizer.eos_id).to(self.device,
                                                                                              non_blocking=True)}
                for mb in micro_batches]

    def grad_norm(self) -> torch.Tensor:
        """The global gradient norm over the whole model (each slice counted once: tensor-parallel shards
        everywhere, replicated parameters on tp rank 0, a tied embedding on the first stage), still scaled by
        the fp16 loss scale."""
        squared = self.zero.grad_norm_squared(self.owns)
        if self.topo.mp_group is not None:
            dist.all_reduce(squared, group=self.topo.mp_group)
        return squared.sqrt()

    def train_step(self) -> dict:
        st = self.state
        step = st.step + 1
        global_batch = self.rampup.global_batch_size(st.consumed_samples)
        lr = self.lr_schedule(step)
        start = time.perf_counter()
        self.monitor.begin_step(step)
        self.timer.start()
        host = self._micro_batches(st.data_position, global_batch)
        micro_batches = self._on_device(host)
        self.timer.mark("data")
        faults = self._faults_at(step)
        self.zero.start_step(len(micro_batches))
        loss = self.forward_backward(micro_batches, global_batch * self.model_cfg.seq_length, host)
        self.timer.mark("forward_backward")
        self.monitor.phase("gradient reduction and norm")
        self.zero.finish_gradients()
        if "nan" in faults:  # as a diverged step looks: a non-finite loss and gradients
            loss.fill_(float("nan"))
            self.zero.grads.tensors()[0].fill_(float("nan"))
        self._share_loss(loss)
        if "spike" in faults:  # the loss a spike reports (the weights are untouched)
            loss.mul_(100.0)
        loss_scale = self.scaler.scale if self.scaler else 1.0
        grad_norm = self.grad_norm() / loss_scale
        # Unscaling, clipping and skipping a non-finite step happen inside the optimizer's pass, decided on the
        # device (clip coefficient as torch's clip_grad_norm_ computes it), so the host queues the update right
        # after the backward instead of waiting for the norm.
        finite = torch.isfinite(grad_norm) & torch.isfinite(loss)
        max_norm = self.cfg.optimizer.clip_grad
        clip = torch.where(grad_norm > max_norm, max_norm / (grad_norm + 1e-6), 1.0) if max_norm > 0 else 1.0
        self.timer.mark("grad_sync")
        if self.pending_save is not None:  # a background save's writer must hold its copy of the state first
            self.snapshot_wait_s += self.pending_save.wait_snapshot()
        for group in self.zero.param_groups:
            group["lr"] = lr
        self.zero.step(grad_scale=clip / loss_scale, found_inf=~finite)
        self.timer.mark("optimizer")
        # The step's one wait for the device: its figures, read after all its work on the compute stream (gathers
        # that --overlap-param-gather leaves in flight run on, on their own stream).
        loss_value, norm_value, finite_value = torch.stack([loss.float(), grad_norm.float(), finite.float()]).tolist()
        finite = finite_value == 1.0
        if not finite:
            self.zero.undo_step_counters()
            st.skipped_steps += 1
        if self.scaler is not None:
            self.scaler.update(found_inf=not finite)
        elapsed = time.perf_counter() - start
        if self.blend is not None:  # (every rank counts the whole global batch: the counts agree)
            counts = self.blend.source_counts(self.sampler.indices(st.data_position, global_batch))
            st.source_samples = [a + b for a, b in zip(st.source_samples or [0] * len(counts), counts)]
        st.step, st.consumed_samples = step, st.consumed_samples + global_batch
        st.data_position += global_batch
        tokens = global_batch * self.model_cfg.seq_length
        tflops = self.flops_per_token * tokens / elapsed / self.world_size / 1e12
        return {"step": step, "loss": loss_value, "lr": lr, "grad_norm": norm_value,
                "global_batch_size": global_batch, "consumed_samples": st.consumed_samples,
                "tokens_per_s": tokens / elapsed, "tflops_per_device": tflops,
                "mfu": tflops / self.peak_tflops if self.peak_tflops else None,
                "peak_mem_bytes": peak_memory_bytes(self.device),
                "loss_scale": self.scaler.scale if self.scaler else 1.0, "skipped": not finite,
                "step_time_s": elapsed, **self.timer.seconds(),
                **(self.compile_counts.since_last() if self.compile_counts is not None else {}),
                **({"consumed_samples_by_source": dict(zip((s.name for s in self.data_sources), st.source_samples))}
                   if self.blend is not None else {})}

    def _faults_at(self, step: int) -> set:
        """--inject-fault: the kinds due at `step` on this rank, each once per run (a rollback replays the step
        number). kill and hang act here, before the step's work."""
        due = {f for f in self.faults if f[1] == step and f[2] in (None, self.rank)}
        self.faults = [f for f in self.faults if f not in due]
        kinds = {kind for kind, _, _ in due}
        if "kill" in kinds:
            print(f"--inject-fault: killing rank {self.rank} at step {step}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        if "hang" in kinds:
            print(f"--inject-fault: rank {self.rank} hangs at step {step}", file=sys.stderr, flush=True)
            while True:
                time.sleep(3600)
        return kinds

    def _share_loss(self, loss: torch.Tensor) -> None:
        """In place: the loss of the whole global batch on every rank (summed over the pipeline, where only
        the last stage holds it, and over data-parallel replicas)."""
        if self.topo.pp > 1:
            dist.all_reduce(loss, group=self.topo.pp_group)
        if self.topo.dp * self.topo.cp > 1:  # each context-parallel rank holds the loss of its part of the tokens
            dist.all_reduce(loss, group=self.topo.dp_cp_group)

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean token loss over the first eval_iters global batches of the validation set (the same ones at
        every evaluation, split across data-parallel ranks like training batches)."""
        if self.valid_data is None:
            return None
        self.monitor.phase(f"evaluation after step {self.state.step}", restart_clock=True)
        for chunk in self.chunks:
            chunk.eval()
        gbs, mbs, p = self.cfg.batch.global_batch_size, self.cfg.batch.micro_batch_size, self.cfg.parallel
        per_rank, seq = gbs // self.topo.dp, self.model_cfg.seq_length
        m = per_rank // mbs
        forward_only = [schedules.Action(schedules.F, i, c) for i in range(m) for c in range(p.vpp)]
        actions = schedules.with_communication([forward_only] * p.pp, p.pp, p.vpp)[self.topo.pp_rank]
        total = torch.zeros((), device=self.device)
        for it in range(self.cfg.data.eval_iters):
            first = it * gbs + self.topo.dp_rank * per_rank
            host = self._host(torch.stack([torch.as_tensor(self.valid_data[i % len(self.valid_data)]).long()
                                           for i in range(first, first + per_rank)]))
            total += self.executor.run(actions, *self._inputs_and_targets(self._on_device(host)), self._loss_fn(1),
                                       forward_only=True, forward_kwargs=self._forward_kwargs(host),
                                       targets_in_forward=True)
        self._share_loss(total)
        return total.item() / (self.cfg.data.eval_iters * gbs * seq)

    # ---- checkpoints -------------------------------------------------------------------------------------
    def save_checkpoint(self, background: bool = False) -> str:
        """Saves the current step (every rank calls it). background (--async-save): a thread copies the state to
        host memory (before the next optimizer step changes it) and writes it; the step is published later
        (`finish_pending_save`, polled after every step), so `latest` and last_checkpoint move only once every
        rank's file is on disk."""
        self.finish_pending_save()
        self.monitor.phase(f"saving step {self.state.step}", restart_clock=True)
        if not background and not self._all_finite():  # (a background save checks its copy on its thread)
            raise StopTraining(f"the parameters or optimizer state are not finite at step {self.state.step}: not "
                               f"saving them (the last good checkpoint stays {self.last_checkpoint or 'none'}); "
                               "lower --lr or set --clip-grad, and resume from it")
        states = self.zero.state_by_name(copy=False)  # a collective over dp: every rank takes part
        owns = lambda n, q: self.topo.dp_rank == self.topo.cp_rank == 0 and self.owns(n, q)  # noqa: E731  one copy
        self.zero.gather_all()  # ZeRO-3: whole parameters for the save
        tensors, slices = ckpt.shard_tensors(self.named_params, states, owns)
        params_live = self.zero.stage < 3  # ZeRO-3's gathered parameters are released next: copy them now
        if not params_live:
            tensors = {k: v.clone() if k.startswith("model/") else v for k, v in tensors.items()}
        self.zero.release_all()
        for name, state in self.rng.get_states().items():
            tensors[f"rng/rank{self.rank}/{name}"] = state
        meta = {"state": dataclasses.asdict(self.state), "config": self.cfg.to_dict(),
                "model_config": dataclasses.asdict(self.model_cfg), "layout": self._layout(),
                "optimizer": self.cfg.optimizer.optimizer,
                "scaler": self.scaler.state_dict() if self.scaler else None}
        c = self.cfg.checkpoint
        # the writer copies what training will change (views of live buffers) or what sits on a device to host
        # memory first; in the background that overlaps the next forward/backward, and the next optimizer step
        # waits for the copy
        live = lambda k: (k.startswith("model/") and params_live) or (  # noqa: E731
            k.startswith("optim/") and self.zero.states_are_live)
        copy_first = {k for k, t in tensors.items() if live(k) or t.device.type != "cpu"}
        pending = ckpt.PendingSave(self.save_dir, self.state.step, self.rank, tensors, slices, meta, c.keep_last,
                                   c.overwrite_checkpoints, background, copy_first)
        if background:
            self.pending_save = pending
            return pending.final + " (writing in the background)"
        self.last_checkpoint = pending.finish()
        return self.last_checkpoint

    def finish_pending_save(self, when_written: bool = False) -> str | None:
        """Publishes a background save (a collective). when_written: only if every rank's file is already written
        (a one-number all-reduce decides, so all ranks agree); else waits for it."""
        pending = self.pending_save
        if pending is None:
            return None
        if when_written:
            done = torch.tensor([float(pending.written())], device=self.device)
            if self.world_size > 1:
                dist.all_reduce(done, op=dist.ReduceOp.MIN)
            if not done.item():
                return None
        self.pending_save = None
        self.monitor.phase(f"publishing the background save of step {pending.step}", restart_clock=True)
        step_dir = pending.finish()
        if step_dir is not None:
            self.last_checkpoint = step_dir
        return step_dir

    def _saved_current_step(self) -> bool:
        """Whether this run saved (or resumed from) the current step in --save already."""
        current = os.path.join(self.save_dir, ckpt.step_dir_name(self.state.step))
        return self.last_checkpoint is not None and os.path.abspath(self.last_checkpoint) == os.path.abspath(current)

    def load_checkpoint(self, step_dir: str) -> None:
        reader = ckpt.CheckpointReader(step_dir)
        meta = reader.meta
        mismatch = checkpoint_mismatch(step_dir, meta, self.model_cfg, self.cfg.optimizer.optimizer)
        if mismatch:
            raise ConfigError("\n".join(mismatch))
        weights_only = meta.get("state") is None  # engine.convert output: a fresh run starting from them
        source = lambda name: "embedding.weight" if self._tied_copy(name) else name  # noqa: E731
        self.zero.gather_all()
        states = ckpt.load_shards(reader, self.named_params, source, with_optimizer=not weights_only)
        self.zero.release_all(refresh_shards=True)
        if weights_only:
            return
        self.zero.load_state_by_name(states)
        self.state = TrainState(**meta["state"])
        self.last_checkpoint = step_dir
        if self.scaler is not None and meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
        prefix = f"rng/rank{self.rank}/"
        if meta["layout"] == self._layout() and reader.keys(prefix):
            self.rng.set_states({k[len(prefix):]: reader.read(k) for k in reader.keys(prefix)})
        elif self.is_logger:
            print(f"note: {step_dir} was saved under layout {meta['layout']}; random streams restart from the seed")

    def _layout(self) -> dict:
        p = self.cfg.parallel
        layout = {"tp": p.tp, "pp": p.pp, "dp": p.dp, "vpp": p.vpp, "zero": p.zero, "world": self.world_size}
        return {**layout, "cp": p.cp} if p.cp > 1 else layout  # (the contract's keys stay exact without cp)

    # ---- stability ---------------------------------------------------------------------------------------
    def _is_spike(self, loss: float) -> bool:
        factor = self.cfg.stability.spike_factor
        history = [l for _, l in self.state.loss_history[-SPIKE_WINDOW:]]
        if factor is None or len(history) < SPIKE_MIN_HISTORY:
            return False
        return loss > factor * (sum(history) / len(history))

    def rollback(self, metrics: MetricsWriter, progress: Progress, reason: str = "loss spike") -> bool:
        """Back to this run's last checkpoint, skipping the data consumed since; False when there is none."""
        self._log_published(progress, self.finish_pending_save())  # (progress prints on the logging rank)
        self.monitor.phase(f"rolling back from step {self.state.step}", restart_clock=True)
        step_dir = self.last_checkpoint  # this run's, not whatever `latest` in --save names
        st = self.state
        if step_dir is None:
            progress.log(f"warning: {reason} at step {st.step} but no checkpoint in {self.save_dir} to roll "
                         "back to; continuing (set --save-interval to enable rollback)")
            return False
        if st.rollbacks >= self.cfg.stability.max_rollbacks:
            raise StopTraining(f"{reason} at step {st.step} after {st.rollbacks} rollbacks (--max-rollbacks "
                               f"{self.cfg.stability.max_rollbacks}); the run is unstable: lower --lr, raise "
                               "--clip-grad's strictness or --spike-factor, or inspect the data")
        from_step, skip_end, rollbacks = st.step, st.data_position, st.rollbacks + 1
        self.load_checkpoint(step_dir)
        skipped = [self.state.data_position, skip_end]
        self.state.skipped_ranges.append(skipped)
        self.state.data_position, self.state.rollbacks = skip_end, rollbacks
        metrics.write({"event": "rollback", "from_step": from_step, "to_step": self.state.step,
                       "skipped_samples": skipped})
        progress.log(f"{reason} at step {from_step}: rolled back to step {self.state.step}, skipping samples "
                     f"[{skipped[0]}, {skipped[1]}) (rollback {rollbacks}/{self.cfg.stability.max_rollbacks})")
        self._nonfinite_in_row = 0
        return True

    def _nonfinite(self, rec: dict) -> bool:
        """A diverged step: a non-finite loss, or non-finite gradients outside fp16 (where an overflow is the loss
        scaler's business: it skips the step and backs off)."""
        loss_bad = not torch.isfinite(torch.tensor(rec["loss"]))
        return loss_bad or (rec["skipped"] and self.precision != "fp16")

    def _check_divergence(self, rec: dict, metrics: MetricsWriter, progress: Progress) -> bool:
        """After a step: a non-finite step rolls back like a spike (when a checkpoint exists); --max-skipped-steps
        of them in a row stop the run. Returns whether it rolled back."""
        if not self._nonfinite(rec):
            self._nonfinite_in_row = 0
            return False
        self._nonfinite_in_row += 1
        self.finish_pending_save()  # a background save being written is a checkpoint to come back to
        limit = self.cfg.stability.max_skipped_steps
        if self.last_checkpoint is None and limit and self._nonfinite_in_row >= limit:
            raise StopTraining(f"{self._nonfinite_in_row} non-finite steps in a row (the last at step {rec['step']}, "
                               f"--max-skipped-steps {limit}) and no checkpoint to roll back to: the run diverged; "
                               "lower --lr, set --clip-grad, or resume from an earlier checkpoint")
        return self.last_checkpoint is not None and self.rollback(metrics, progress, "non-finite loss or gradients")

    def _all_finite(self) -> bool:
        """Whether every parameter and optimizer state on every rank is finite (a collective)."""
        tensors = [pc.shard for pc in self.zero.pieces] + [t for s in self.zero.optimizer.state.values()
                                                           for t in s.values() if torch.is_tensor(t)]
        ok = torch.tensor([float(all(bool(torch.isfinite(t).all()) for t in tensors))], device=self.device)
        if self.world_size > 1:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item())

    # ---- the loop ----------------------------------------------------------------------------------------
    def memory_event(self) -> dict:
        def nbytes(tensors):
            return sum(t.numel() * t.element_size() for t in tensors)
        event = {"event": "memory", "param_bytes": self.zero.param_bytes(),
                 "grad_bytes": self.zero.grad_bytes(), "optimizer_bytes": self.zero.optimizer_bytes(),
                 "activation_bytes": self.activation_bytes}
        if self.world_size > 1:  # reported by the first rank of the last pipeline stage (it holds the head)
            events = [event]
            dist.broadcast_object_list(events, src=self.topo.rank_of(pp=self.topo.pp - 1, dp=0, cp=0, tp=0))
            event = events[0]
        return event

    @staticmethod
    def _log_published(progress: Progress, step_dir: str | None) -> None:
        if step_dir is not None:
            progress.log(f"saved {step_dir} (background save published)")

    def _on_stop_signal(self, signum, frame) -> None:
        """SIGTERM or SIGINT: the first finishes the step, saves and exits; a second aborts at once."""
        if self._stop_requested:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: aborting without a save")
        self._stop_requested = True

    def _profile(self, event: str | None, progress: Progress) -> None:
        """Acts on the --profile-steps window: reports its start; at its end every traced rank writes its files
        (timed as its own phase by the watchdog) while the others wait at a barrier, not in the next step."""
        window = self.profiler
        if event is None or (event == "ending" and not window.open):  # (nothing happens, or it ended already)
            return
        ranks = ", ".join(map(str, self.profile_ranks))
        if event == "started":
            progress.log(f"profiling from step {window.first} to {window.steps[1]} on rank(s) {ranks} with "
                         "torch.profiler (these steps run slower)")
            return
        self.monitor.phase(f"writing the --profile-steps trace ({window.tag})", restart_clock=True)
        # gloo runs --overlap-param-gather's all-gathers on its own threads, which record into the trace: they must
        # be over before the profiler stops (in the suite a rank once died with SIGSEGV just after it stopped, with
        # those gathers in flight; not reproduced in 24 runs since)
        self.zero.params.wait_all()
        window.finish()
        if self.world_size > 1:
            dist.barrier()
        tag = f"rank<R>_{window.tag}"
        memory = f", memory_{tag}.pickle (https://pytorch.org/memory_viz)" if window.memory and window.cuda else ""
        if window.busy is not None:  # (this rank's, on CUDA)
            progress.log(f"profile: the GPU was busy {100 * window.busy:.1f}% of the traced steps' time on rank "
                         f"{self.rank}")
        progress.log(f"profile of {window.tag.replace('steps', 'steps ')} written to "
                     f"{os.path.join(self.run_dir, 'profile')}/ by rank(s) {ranks} (each warns if it cannot): "
                     f"trace_{tag}.json (https://ui.perfetto.dev), ops_{tag}.txt (costliest operators){memory}")

    def _stop_reason(self) -> str | None:
        """Why the run stops after this step, if it does: a stop signal, or --time-limit passed. Ranks receive
        SIGTERM, and their clocks pass the limit, at slightly different times: stop when any rank has, all at the
        same step."""
        limit = self.cfg.run.time_limit
        flags = [float(self._stop_requested), float(limit is not None and time.time() - self.job_started > limit)]
        if self.world_size > 1:
            agreed = torch.tensor(flags, device=self.device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
            flags = agreed.tolist()
        if flags[0]:
            return "stop signal (SIGTERM/SIGINT)"
        if flags[1]:
            return "--time-limit passed" + (f" ({limit:g} s)" if limit is not None else " (on another rank)")
        return None

    def train(self) -> TrainState:
        cfg = self.cfg
        if self.is_logger:
            blend = [(s.weight, s.name) for s in self.data_sources if s.weight is not None]
            print(trainer_banner(self, blend=blend or None), flush=True)
        resumed = False
        step_dir = checkpoint_to_load(cfg) if self.rank == 0 else None
        if self.world_size > 1:  # rank 0's reading of `latest` for all (a shared filesystem may lag on others)
            chosen = [step_dir]
            dist.broadcast_object_list(chosen, src=0)
            step_dir = chosen[0]
        if step_dir is not None:
            self.load_checkpoint(step_dir)
            resumed = self.state.step > 0
            if self.is_logger:
                print(f"resumed from {step_dir} at step {self.state.step}" if resumed else
                      f"initialised from the weights in {step_dir}; starting at step 0")
        metrics = MetricsWriter(self.metrics_path if self.is_logger else None, append=resumed)
        if self.is_logger and cfg.run.tensorboard:
            metrics.add_tensorboard(cfg.run.tensorboard, purge_step=self.state.step + 1)
        progress = Progress(cfg.run.steps, self.state.step, self.is_logger)
        metrics.write({"event": "layout", **self._layout()})
        if self.is_logger:
            for name in ckpt.clean_stale(self.save_dir):
                progress.log(f"removed {os.path.join(self.save_dir, name)} (left by an interrupted save)")
        previous = {sig: signal.signal(sig, self._on_stop_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        self.monitor.start()
        wrote_memory = False
        window = self.profiler.steps
        if window and self.state.step >= window[1]:
            progress.log(f"--profile-steps {window[0]}:{window[1]}: the run starts after step {self.state.step}, "
                         "past them; nothing is traced")
        try:
            early = self._stop_reason() if self.state.step < cfg.run.steps else None
            if early:  # (e.g. a restart too late to train a step in the job's time: the checkpoint it loaded stands)
                progress.log(f"{early} before step {self.state.step + 1}: nothing trained; exiting")
                return self.state
            while self.state.step < cfg.run.steps:
                self._profile(self.profiler.before_step(self.state.step + 1), progress)
                with self.profiler.label(f"train step {self.state.step + 1}"):
                    rec = self.train_step()
                if not wrote_memory:
                    metrics.write(self.memory_event())
                    wrote_memory = True
                if rec["step"] % cfg.run.log_interval == 0 or rec["skipped"]:
                    metrics.write(rec)
                    progress.log(step_line(rec, cfg.run.steps))
                if rec.get("graph_breaks"):  # (--compile) each break splits a layer's graph: name the causes
                    progress.log(f"--compile: {rec['graph_breaks']} graph break(s) in step {rec['step']}; causes so "
                                 f"far: {'; '.join(graph_break_reasons())}")
                progress.advance()
                if self._check_divergence(rec, metrics, progress):
                    continue
                if self._is_spike(rec["loss"]):
                    self.rollback(metrics, progress)
                    continue
                if not rec["skipped"]:
                    self.state.loss_history = (self.state.loss_history + [[rec["step"], rec["loss"]]])[-SPIKE_WINDOW:]
                if cfg.data.eval_interval and rec["step"] % cfg.data.eval_interval == 0:
                    eval_loss = self.evaluate()
                    if eval_loss is not None:
                        metrics.write({"event": "eval", "step": rec["step"], "eval_loss": eval_loss})
                        progress.log(f"eval at step {rec['step']}: loss {eval_loss:.4f}")
                reason = self._stop_reason()
                if reason:
                    self._profile("ending", progress)  # (a window cut short)
                    path = self.save_checkpoint()
                    progress.log(f"{reason}: saved {path} at step {self.state.step}; exiting (--auto-resume "
                                 "continues from it)")
                    return self.state
                if cfg.checkpoint.save_interval and rec["step"] % cfg.checkpoint.save_interval == 0:
                    if self._nonfinite_in_row:  # a model that just diverged is no point to come back to
                        progress.log(f"not saving at step {rec['step']}: the last step was non-finite")
                        continue
                    if not cfg.checkpoint.async_save and not self._all_finite() and \
                            self.rollback(metrics, progress, "non-finite parameters"):
                        continue  # (without a checkpoint to go back to, save_checkpoint stops the run)
                    progress.log(f"saved {self.save_checkpoint(background=cfg.checkpoint.async_save)}")
                else:
                    self._log_published(progress, self.finish_pending_save(when_written=True))
            self._profile("ending", progress)  # (a window that ends with the run)
            self._log_published(progress, self.finish_pending_save())
            if not self._saved_current_step():
                progress.log(f"saved {self.save_checkpoint()}")
        finally:
            self.profiler.discard()  # (a window still open here: the run is failing)
            self.monitor.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            progress.close()
            metrics.close()
        if self.is_logger and plot_losses(self.metrics_path, self.plot_path):
            progress.log(f"loss curve: {self.plot_path}")
        return self.state
