"""engine.optim.FusedAdamW against torch.optim.AdamW / Adam, on every kernel path (compiled and fallback; CPU and,
with a GPU, CUDA)."""
import io

import pytest
import torch
from kernel_paths import PATHS, resolve

from engine.optim import FusedAdamW, build_optimizer

SHAPES = [(0,), (1,), (7,), (33,), (3, 5, 7), (70001,), (64, 65)]  # 70001 crosses the CPU and CUDA chunks
HYPER = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8)


@pytest.fixture(params=PATHS)
def path(request):
    return resolve(request.param)


def make_params(device, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(device, dtype).requires_grad_() for s in SHAPES]


def clone(params):
    return [p.detach().clone().requires_grad_() for p in params]


def set_grads(params, step, scale=1.0):
    gen = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen) * scale).to(p.device, p.dtype)


def groups(params, weight_decay=0.1):
    """Weight decay on the first half of the tensors, none on the rest."""
    half = len(params) // 2
    return [{"params": params[:half], "weight_decay": weight_decay}, {"params": params[half:], "weight_decay": 0.0}]


def run(opt, params, steps, start=0, **step_kwargs):
    for step in range(start, start + steps):
        set_grads(params, step)
        opt.step(**step_kwargs)


def assert_params_close(params, ref):
    for p, q in zip(params, ref):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def assert_state_close(ours, ref, keys=("exp_avg", "exp_avg_sq"), **tol):
    for p, q in zip(ours.state, ref.state):
        for key in keys:
            torch.testing.assert_close(ours.state[p][key], ref.state[q][key], **tol)


@pytest.mark.parametrize("weight_decay", [0.1, 0.0])
def test_matches_torch_adamw(path, weight_decay):
    device, ops = path
    params = make_params(device)
    ref = clone(params)
    ours = FusedAdamW(groups(params, weight_decay), **HYPER, ops=ops)
    theirs = torch.optim.AdamW(groups(ref, weight_decay), **HYPER, foreach=False)
    run(ours, params, 20)
    run(theirs, ref, 20)
    assert_params_close(params, ref)
    assert_state_close(ours, theirs, rtol=1e-5, atol=1e-7)
    assert all(float(s["step"]) == 20 for s in ours.state.values())


def test_adam_l2_mode_matches_torch_adam(path):
    device, ops = path
    params = make_params(device)
    ref = clone(params)
    ours = FusedAdamW(params, **HYPER, weight_decay=0.1, adam_w_mode=False, ops=ops)
    theirs = torch.optim.Adam(ref, **HYPER, weight_decay=0.1, foreach=False)
    run(ours, params, 20)
    run(theirs, ref, 20)
    assert_params_close(params, ref)


def ulp(x: torch.Tensor, dtype) -> torch.Tensor:
    """One unit in the last place of `dtype` at the magnitude of x (fp32)."""
    info = torch.finfo(dtype)
    return torch.exp2(torch.floor(torch.log2(x.abs().clamp_min(info.tiny)))) * info.eps


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_master_weights_track_an_fp32_reference(path, dtype):
    device, ops = path
    params = make_params(device, dtype)
    ref = [p.detach().float().requires_grad_() for p in params]  # fp32 run from the same starting values
    ours = FusedAdamW(params, **HYPER, weight_decay=0.1, master_weights=True, ops=ops)
    theirs = torch.optim.AdamW(ref, **HYPER, weight_decay=0.1, foreach=False)
    for step in range(20):
        set_grads(params, step)
        for p, q in zip(params, ref):
            q.grad = p.grad.float()
        ours.step()
        theirs.step()
    for p, q in zip(params, ref):
        master = ours.state[p]["master_param"]
        assert master.dtype == torch.float32 and p.dtype == dtype
        torch.testing.assert_close(master, q.detach(), rtol=1e-5, atol=1e-6)
        assert torch.equal(p.detach(), master.to(dtype))  # the param is its master, rounded
        assert bool(((p.detach().float() - q.detach()).abs() <= ulp(q.detach(), dtype)).all())


@pytest.mark.parametrize("as_tensor", [False, True])
def test_grad_scale_equals_scaling_the_gradients_first(path, as_tensor):
    device, ops = path
    scale = 0.37
    params = make_params(device)
    ref = clone(params)
    ours = FusedAdamW(params, **HYPER, ops=ops)
    theirs = FusedAdamW(ref, **HYPER, ops=ops)
    for step in range(5):
        set_grads(params, step)
        set_grads(ref, step)
        for q in ref:
            q.grad.mul_(scale)
        ours.step(grad_scale=torch.tensor(scale) if as_tensor else scale)
        theirs.step()
    for p, q in zip(params, ref):
        assert torch.equal(p, q)


def test_found_inf_skips_the_step(path):
    device, ops = path
    params = make_params(device)
    opt = FusedAdamW(params, **HYPER, ops=ops)
    run(opt, params, 2)
    before = [p.detach().clone() for p in params]
    states = [{k: v.clone() for k, v in s.items()} for s in opt.state.values()]
    set_grads(params, 7)
    opt.step(found_inf=torch.ones((), device=device))
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    for state, saved in zip(opt.state.values(), states):  # moments and step counters included
        assert state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in state)
    opt.step(found_inf=torch.zeros((), device=device))
    assert not all(torch.equal(p, b) for p, b in zip(params, before))


def test_found_inf_skipped_by_the_kernels_then_counters_undone(path):
    """skip_on_device: nothing reads found_inf on the host; the kernels leave parameters and moments alone, the
    step counters advance until undo_step_counters(); the steps after are those of an optimizer that never saw the
    skipped one."""
    device, ops = path
    params, ref = make_params(device), make_params(device)
    opt, ref_opt = FusedAdamW(params, **HYPER, ops=ops), FusedAdamW(ref, **HYPER, ops=ops)
    run(opt, params, 2)
    run(ref_opt, ref, 2)
    before = [p.detach().clone() for p in params]
    states = [{k: v.clone() for k, v in s.items()} for s in opt.state.values()]
    set_grads(params, 7)
    opt.step(found_inf=torch.ones((), device=device), skip_on_device=True)
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    for state, saved in zip(opt.state.values(), states):
        assert all(torch.equal(state[k], saved[k]) for k in state if k != "step")
        assert state["step"] == saved["step"] + 1
    opt.undo_step_counters()
    for state, saved in zip(opt.state.values(), states):
        assert all(torch.equal(state[k], saved[k]) for k in state)
    for step in (3, 4):
        for ps, o in ((params, opt), (ref, ref_opt)):
            set_grads(ps, step)
            o.step(found_inf=torch.zeros((), device=device), skip_on_device=True)
    assert all(torch.equal(p, q) for p, q in zip(params, ref))


def snapshot(opt):
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, True)])
def test_state_dict_round_trip_is_bit_exact(path, dtype, master):
    device, ops = path
    straight = make_params(device, dtype)
    resumed = clone(straight)
    opt = FusedAdamW(groups(straight), **HYPER, master_weights=master, ops=ops)
    run(opt, straight, 10)

    first = FusedAdamW(groups(resumed), **HYPER, master_weights=master, ops=ops)
    run(first, resumed, 5)
    saved, weights = snapshot(first), clone(resumed)
    second = FusedAdamW(groups(weights), **HYPER, master_weights=master, ops=ops)
    second.load_state_dict(saved)
    run(second, weights, 5, start=5)
    for p, q in zip(straight, weights):
        assert torch.equal(p, q)
    for p, q in zip(opt.state, second.state):
        assert opt.state[p].keys() == second.state[q].keys()
        assert all(torch.equal(opt.state[p][k], second.state[q][k]) for k in opt.state[p])


def test_checkpoint_style_restore_is_bit_exact(path):
    """The trainer's checkpoints save every tensor of optimizer.state[p] and restore it as {key: tensor}."""
    device, ops = path
    straight = make_params(device)
    resumed = clone(straight)
    opt = FusedAdamW(straight, **HYPER, ops=ops)
    run(opt, straight, 6)
    first = FusedAdamW(resumed, **HYPER, ops=ops)
    run(first, resumed, 3)
    second = FusedAdamW(resumed, **HYPER, ops=ops)
    for p in resumed:
        second.state[p] = {k: v.clone() for k, v in first.state[p].items()}
    run(second, resumed, 3, start=3)
    assert all(torch.equal(p, q) for p, q in zip(straight, resumed))


def test_works_with_lambda_lr(path):
    device, ops = path
    params = make_params(device)
    ref = clone(params)
    ours = FusedAdamW(params, **HYPER, ops=ops)
    theirs = torch.optim.AdamW(ref, **HYPER, foreach=False)
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda step: 0.8 ** step) for o in (ours, theirs)]
    for step in range(10):
        set_grads(params, step)
        set_grads(ref, step)
        ours.step()
        theirs.step()
        for s in schedules:
            s.step()
    assert ours.param_groups[0]["lr"] == pytest.approx(HYPER["lr"] * 0.8 ** 10)
    assert_params_close(params, ref)


def test_params_without_grads_are_left_alone(path):
    device, ops = path
    params = make_params(device)
    opt = FusedAdamW(params, **HYPER, ops=ops)
    set_grads(params, 0)
    params[2].grad = None
    before = params[2].detach().clone()
    opt.step()
    assert torch.equal(params[2], before) and params[2] not in opt.state


def test_params_dropping_out_of_some_steps_match_torch(path):
    """The cached plan follows which parameters have gradients: a parameter without one in a step keeps its
    step counter and moments, as in torch.optim.AdamW."""
    device, ops = path
    params = make_params(device)
    ref = clone(params)
    ours = FusedAdamW(groups(params), **HYPER, ops=ops)
    theirs = torch.optim.AdamW(groups(ref), **HYPER, foreach=False)
    skipped = {1: [2], 2: [2, 5], 4: [0], 5: [0, 1, 2, 3, 4, 5, 6]}  # step -> params without a gradient
    for step in range(8):
        for side, opt in ((params, ours), (ref, theirs)):
            set_grads(side, step)
            for i in skipped.get(step, []):
                side[i].grad = None
            opt.step()
    assert_params_close(params, ref)
    assert [float(ours.state[p]["step"]) for p in params] == [float(theirs.state[q]["step"]) for q in ref]
    assert_state_close(ours, theirs, rtol=1e-5, atol=1e-7)


def test_state_replaced_between_steps_is_used(path):
    """ZeRO's checkpoint loader replaces optimizer.state[p] wholesale: the next step must use the new tensors."""
    device, ops = path
    straight, resumed = make_params(device), make_params(device)
    opt, other = FusedAdamW(straight, **HYPER, ops=ops), FusedAdamW(resumed, **HYPER, ops=ops)
    run(opt, straight, 4)
    run(other, resumed, 1)  # builds and caches a plan over states that are then replaced
    donor = FusedAdamW(clone(straight), **HYPER, ops=ops)
    donor.load_state_dict(opt.state_dict())
    other.state.clear()
    for p, q, d in zip(resumed, straight, donor.state.values()):
        p.data.copy_(q.detach())
        other.state[p] = {k: v.clone() for k, v in d.items()}
    run(opt, straight, 2, start=4)
    run(other, resumed, 2, start=4)
    assert all(torch.equal(p, q) for p, q in zip(straight, resumed))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reads_main_grad_beside_a_low_precision_param(path, dtype):
    """p.main_grad (fp32) is the gradient when set: ZeRO keeps low-precision shards' gradients there, as torch
    before 2.10 refuses an fp32 .grad on a bf16 parameter."""
    device, ops = path
    params = make_params(device, dtype)
    ref = [p.detach().float().requires_grad_() for p in params]  # the same arithmetic as the masters get
    ours = FusedAdamW(params, **HYPER, master_weights=True, ops=ops)
    theirs = FusedAdamW(ref, **HYPER, ops=ops)
    for step in range(5):
        set_grads(ref, step)
        for p, q in zip(params, ref):
            p.main_grad = q.grad.clone()
        ours.step()
        theirs.step()
    for p, q in zip(params, ref):
        assert p.grad is None and torch.equal(ours.state[p]["master_param"], q.detach())
        assert torch.equal(p.detach(), q.detach().to(dtype))


def test_state_dict_steps_are_not_shared_and_loads_into_torch_adamw(path):
    """Inside FusedAdamW the parameters of one kernel call share a step tensor; its state_dict gives each its own,
    so torch.optim.AdamW can continue from it (a shared tensor would be advanced once per parameter)."""
    device, ops = path
    params = make_params(device)
    ref = clone(params)
    ours = FusedAdamW(params, **HYPER, ops=ops)
    run(ours, params, 3)
    saved = snapshot(ours)
    assert len({id(s["step"]) for s in saved["state"].values()}) == len(saved["state"])
    theirs = torch.optim.AdamW(ref, **HYPER, foreach=False)
    for p, q in zip(params, ref):
        q.data.copy_(p.detach())
    theirs.load_state_dict(saved)
    run(theirs, ref, 1, start=3)
    run(ours, params, 1, start=3)
    assert [float(s["step"]) for s in theirs.state.values()] == [4.0] * len(ref)
    assert_params_close(params, ref)


def test_a_replaced_state_entry_is_used(path):
    device, ops = path
    params = make_params(device)
    opt = FusedAdamW(params, **HYPER, ops=ops)
    run(opt, params, 3)
    opt.state[params[1]]["step"] = torch.tensor(0.0)
    opt.state[params[1]]["exp_avg"] = torch.zeros_like(opt.state[params[1]]["exp_avg"])
    run(opt, params, 1, start=3)
    assert float(opt.state[params[1]]["step"]) == 1.0 and float(opt.state[params[0]]["step"]) == 4.0
    assert params[1].numel() == 0 or opt.state[params[1]]["exp_avg"].abs().sum() > 0


def test_build_optimizer_gives_fused_adamw():
    model = torch.nn.Linear(4, 3)
    opt = build_optimizer("adamw", model.named_parameters(), lr=1e-3, weight_decay=0.05)
    assert isinstance(opt, FusedAdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]


def test_rejects_bad_hyper_parameters():
    with pytest.raises(ValueError, match="betas"):
        FusedAdamW([torch.zeros(1, requires_grad=True)], betas=(0.9, 1.0))


def test_signature_and_defaults_are_torch_adamws():
    """A drop-in: every argument of torch.optim.AdamW, with the same default and kind; our additions are
    keyword-only."""
    import inspect
    theirs = inspect.signature(torch.optim.AdamW.__init__).parameters
    ours = inspect.signature(FusedAdamW.__init__).parameters
    for name, param in theirs.items():
        assert name in ours and ours[name].default == param.default and ours[name].kind == param.kind, name
    assert all(ours[n].kind == inspect.Parameter.KEYWORD_ONLY for n in ours if n not in theirs)


def test_defaults_train_like_torch_adamw():
    params = make_params("cpu")
    ref = clone(params)
    ours, theirs = FusedAdamW(params), torch.optim.AdamW(ref, foreach=False)
    run(ours, params, 10)
    run(theirs, ref, 10)
    assert_params_close(params, ref)


@pytest.mark.parametrize("option", ["amsgrad", "maximize", "capturable", "differentiable"])
def test_refuses_options_it_does_not_implement(option):
    with pytest.raises(ValueError, match=f"{option}=True"):
        FusedAdamW([torch.zeros(1, requires_grad=True)], **{option: True})
    FusedAdamW([torch.zeros(1, requires_grad=True)], foreach=True, fused=False)  # implementation choices: accepted
