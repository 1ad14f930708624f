"""The trainer's step (gradient accumulation, global norm, clip coefficient, fused AdamW update) against a plain
PyTorch loop on the same model and batches: torch.nn.utils.clip_grad_norm_ and torch.optim.AdamW."""
import pytest
import torch
import torch.nn.functional as F

from conftest import SMALL
from engine.models.llama import Llama
from engine.training import parse_config, validate
from engine.training.trainer import Trainer

STEPS = 8


def test_a_trainer_step_equals_a_plain_torch_loop(corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # --clip-grad 2.4: the norms of these steps lie between 1.6 and 3.1, so some are clipped and some are not
    cfg = parse_config(SMALL + ["--data", corpus, "--steps", str(STEPS), "--lr-warmup-steps", "2",
                                "--clip-grad", "2.4", "--device", "cpu", "--precision", "fp32"])
    validate(cfg, 1)
    trainer = Trainer(cfg)
    model = Llama(trainer.model_cfg)
    model.init_weights(cfg.run.seed)
    mine = dict(trainer.named_params)
    theirs = dict(model.named_parameters())
    assert sorted(mine) == sorted(theirs)
    for name, param in theirs.items():
        assert torch.equal(param, mine[name]), name
    o = cfg.optimizer
    decay = [p for p in theirs.values() if p.ndim >= 2]  # matrices decay, vectors (norm gains) do not
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                   {"params": [p for p in theirs.values() if p.ndim < 2], "weight_decay": 0.0}],
                                  lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    gbs, mbs, seq = cfg.batch.global_batch_size, cfg.batch.micro_batch_size, trainer.model_cfg.seq_length
    clipped = []
    for step in range(1, STEPS + 1):
        position = trainer.state.data_position
        record = trainer.train_step()
        batch = torch.stack([trainer.train_data[i] for i in trainer.sampler.indices(position, gbs)])
        optimizer.zero_grad()
        loss = 0.0
        for micro in batch.split(mbs):
            logits = model(micro[:, :-1])
            part = F.cross_entropy(logits.flatten(0, 1), micro[:, 1:].flatten(), reduction="sum") / (gbs * seq)
            part.backward()
            loss += part.item()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_grad).item()
        for group in optimizer.param_groups:
            group["lr"] = trainer.lr_schedule(step)
        optimizer.step()
        clipped.append(norm > o.clip_grad)
        assert record["lr"] == trainer.lr_schedule(step)
        assert record["loss"] == pytest.approx(loss, rel=1e-6), step
        assert record["grad_norm"] == pytest.approx(norm, rel=1e-5), step
        for name, param in theirs.items():
            torch.testing.assert_close(mine[name], param, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"step {step} {name}: {m}")
    assert any(clipped) and not all(clipped), clipped  # both sides of the clip threshold were exercised
