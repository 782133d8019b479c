"""Tests for nanochat.training: batch arithmetic, the phases' LR schedules, and the shared Trainer step."""

import copy

import pytest
import torch

from nanochat.muon import Muon
from nanochat.common import UserError
from conftest import tiny_model
from nanochat.training import Trainer, grad_accum_steps_for, muon_momentum
from scripts import base_train, chat_rl, chat_sft, mid_train
from scripts.base_train import lr_multiplier
import os
import signal

V, T = 64, 16



# ---- batch arithmetic -----------------------------------------------------------------------

def test_grad_accum_steps_divisible():
    assert grad_accum_steps_for(4 * 16 * 2 * 3, 4, 16, 2) == 3
    assert grad_accum_steps_for(8 * 64, 8, 64, 1) == 1
    assert grad_accum_steps_for(-1, 8, 64, 4) == 1  # -1 = one micro-batch per rank


@pytest.mark.parametrize("total", [1000, 0, -5])
def test_grad_accum_steps_not_divisible_is_user_error(total):
    with pytest.raises(UserError) as e:
        grad_accum_steps_for(total, 4, 16, 2)
    msg = str(e.value)
    assert str(total) in msg
    assert "4 x 16 x 2 = 128" in msg


# ---- schedule -------------------------------------------------------------------------------

def test_lr_multiplier_trapezoid():
    # Steps 0 .. n-1 are trained: linear warmup, flat, then linear warmdown whose last step runs
    # at exactly final_lr_frac.
    n = 100
    kw = dict(warmup_ratio=0.1, warmdown_ratio=0.2, final_lr_frac=0.1)
    values = [lr_multiplier(s, n, **kw) for s in range(n)]
    # linear warmup over the first 10 steps, reaching 1
    assert values[0] == pytest.approx(0.1)
    assert values[4] == pytest.approx(0.5)
    assert values[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(values[:9], values[1:10]))
    # flat
    assert all(v == 1.0 for v in values[10:80])
    # linear warmdown over the last 20 steps, down to final_lr_frac at the last step
    warmdown = values[80:]
    assert all(v < 1.0 for v in warmdown)
    steps = [a - b for a, b in zip(warmdown, warmdown[1:])]
    assert all(d == pytest.approx(steps[0]) and d > 0 for d in steps)
    assert values[-1] == pytest.approx(0.1)
    assert min(values) == pytest.approx(0.1)


def test_lr_multiplier_defaults_have_no_warmup_and_decay_to_zero():
    n = 50
    flags = base_train.build_parser().parse_args([])

    def default(step):
        return lr_multiplier(step, n, flags.warmup_ratio, flags.warmdown_ratio, flags.final_lr_frac)
    assert default(0) == 1.0
    assert default(39) == 1.0
    assert default(40) == pytest.approx(0.9)
    assert default(49) == pytest.approx(0.0)


@pytest.mark.parametrize("n", [1, 3, 10, 50, 333])
@pytest.mark.parametrize("warmdown_ratio", [0.0, 0.2, 0.5, 1.0])
def test_later_phases_schedules_are_the_trapezoid_without_warmup_to_zero(n, warmdown_ratio):
    # Each phase script owns its schedule; mid and SFT decay linearly to 0 over the last
    # warmdown_ratio of the steps, RL over all of them: bit for bit the trapezoid they replaced.
    for step in range(n):
        expected = lr_multiplier(step, n, 0.0, warmdown_ratio, 0.0)
        assert mid_train.lr_multiplier(step, n, warmdown_ratio) == expected
        assert chat_sft.lr_multiplier(step, n, warmdown_ratio) == expected
        assert chat_rl.lr_multiplier(step, n) == lr_multiplier(step, n, 0.0, 1.0, 0.0)


def test_muon_momentum_ramp():
    assert muon_momentum(0) == pytest.approx(0.85)
    assert muon_momentum(150) == pytest.approx(0.90)
    assert muon_momentum(300) == pytest.approx(0.95)
    assert muon_momentum(10_000) == pytest.approx(0.95)


# ---- the Trainer ----------------------------------------------------------------------------

def data(n_rows, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (n_rows, T + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def make_trainer(model, batches, grad_accum_steps, **kwargs):
    return Trainer(model, model.setup_optimizers(), iter(batches), grad_accum_steps, tokens_per_step=4 * T,
                   device=torch.device("cpu"), **kwargs)


def test_accumulating_two_micro_batches_equals_one_double_batch():
    # float64: Muon orthogonalises in bf16 and AdamW (eps=1e-10) normalises tiny gradients, so
    # float32 summation-order noise would be amplified; in float64 both paths agree to ~1e-12.
    B, steps = 2, 3
    x, y = data(2 * B * steps)
    micro, whole = [], []
    for s in range(steps):
        xs, ys = x[2 * B * s:2 * B * (s + 1)], y[2 * B * s:2 * B * (s + 1)]
        micro += [(xs[:B], ys[:B]), (xs[B:], ys[B:])]
        whole.append((xs, ys))
    model_a = tiny_model(V, T).to(torch.float64)
    model_b = copy.deepcopy(model_a)
    start = copy.deepcopy(model_a.state_dict())
    ta = make_trainer(model_a, micro, grad_accum_steps=2)
    tb = make_trainer(model_b, whole, grad_accum_steps=1)
    for s in range(steps):
        ma, mb = ta.step(s), tb.step(s)
        assert ma["loss"] == pytest.approx(mb["loss"], rel=1e-6)  # logits are cast to float32
        assert ma["grad_norm"] == pytest.approx(mb["grad_norm"], rel=1e-6)
    moved = 0
    for (name, pa), pb in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6, rtol=0), name
        moved += not torch.equal(pa, start[name])
    assert moved == len(start)  # every parameter was updated (the comparison is not vacuous)


def test_accumulation_differs_from_a_single_micro_batch():
    # Guard for the test above: using only the first half of the data gives a different update.
    B = 2
    x, y = data(2 * B)
    model_a = tiny_model(V, T).to(torch.float64)
    model_b = copy.deepcopy(model_a)
    make_trainer(model_a, [(x[:B], y[:B]), (x[B:], y[B:])], grad_accum_steps=2).step(0)
    make_trainer(model_b, [(x[:B], y[:B])], grad_accum_steps=1).step(0)
    assert not all(torch.allclose(pa, pb, atol=1e-6) for pa, pb in zip(model_a.parameters(), model_b.parameters()))


def test_step_metrics_and_loss_decreases():
    model = tiny_model(V, T)
    x, y = data(4)
    trainer = make_trainer(model, [(x, y)] * 10, grad_accum_steps=1)
    first = trainer.step(0, want_layer_grads=True)
    assert {"loss", "lr_mult", "dt", "tok_per_s", "grad_norm", "layer_grad_norm"} <= set(first)
    assert set(first["layer_grad_norm"]) == {"embed", "head", "layer0"}
    assert all(v > 0 for v in first["layer_grad_norm"].values())
    last = first
    for s in range(1, 6):
        last = trainer.step(s)
    assert last["loss"] < first["loss"]
    assert all(p.grad is None for p in model.parameters())  # gradients cleared after each step
    assert torch.equal(trainer.last_batch[0], x)


def test_set_lr_applies_schedule_and_init_frac():
    model = tiny_model(V, T)
    trainer = make_trainer(model, [], grad_accum_steps=1, lr_scale=0.5,
                           lr_schedule=lambda step: lr_multiplier(step, 10, 0.0, 0.5, 0.0))
    mult = trainer.set_lr(8)
    assert mult == pytest.approx(lr_multiplier(8, 10, 0.0, 0.5, 0.0))
    assert 0 < mult < 1
    for opt in trainer.optimizers:
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(g["initial_lr"] * 0.5 * mult)
    muon = [o for o in trainer.optimizers if isinstance(o, Muon)][0]
    assert muon.param_groups[0]["momentum"] == pytest.approx(muon_momentum(8))


def test_grad_clip_limits_the_norm():
    model = tiny_model(V, T)
    x, y = data(4)
    trainer = make_trainer(model, [(x, y)], grad_accum_steps=1, grad_clip=1e-3)
    metrics = trainer.step(0)
    assert metrics["grad_norm"] > 1e-3  # the norm before clipping is reported


def test_divergence_is_user_error():
    model = tiny_model(V, T)
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    x, y = data(2)
    trainer = make_trainer(model, [(x, y)], grad_accum_steps=1)
    with pytest.raises(UserError) as e:
        trainer.step(3)  # 0-based; messages count steps from 1, as progress lines do
    assert "diverged at step 4" in str(e.value)


def test_optimizer_state_round_trip_resumes_identically():
    x, y = data(4)
    batches = [(x, y)] * 6
    model_a = tiny_model(V, T)
    model_b = copy.deepcopy(model_a)
    ta = make_trainer(model_a, batches, grad_accum_steps=1)
    for s in range(3):
        ta.step(s)
    # resume: copy weights and optimizer state into a fresh trainer
    model_b.load_state_dict(model_a.state_dict())
    tb = make_trainer(model_b, batches, grad_accum_steps=1)
    tb.load_optimizer_state(copy.deepcopy(ta.optimizer_state()))
    for s in range(3, 5):
        ta.step(s)
        tb.step(s)
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6)


def test_step_metrics_are_the_loss_and_norm_of_the_batch_exactly():
    # One host transfer per step must report the same numbers as reading each value directly.
    model = tiny_model(V, T)
    reference = copy.deepcopy(model)
    x, y = data(4)
    loss = reference(x, y)
    loss.backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in reference.parameters()]))
    metrics = make_trainer(model, [(x, y)], grad_accum_steps=1).step(0)
    assert metrics["loss"] == loss.item()
    assert metrics["grad_norm"] == norm.item()
    assert type(metrics["loss"]) is float and type(metrics["grad_norm"]) is float


def test_step_timing_splits_dt_into_data_wait_forward_backward_and_optimizer():
    model = tiny_model(V, T)
    x, y = data(4)
    trainer = make_trainer(model, [(x, y)] * 4, grad_accum_steps=2)
    plain = trainer.step(0)
    assert plain["dt_data"] >= 0 and "dt_fwd_bwd" not in plain
    timed = trainer.step(1, timing=True)
    parts = [timed["dt_data"], timed["dt_fwd_bwd"], timed["dt_optim"]]
    assert all(p >= 0 for p in parts)
    assert sum(parts) == pytest.approx(timed["dt"], rel=1e-6)


def test_step_data_wait_measures_a_slow_loader():
    import time

    def slow(batches, seconds):
        for b in batches:
            time.sleep(seconds)
            yield b
    model = tiny_model(V, T)
    x, y = data(4)
    metrics = make_trainer(model, slow([(x, y)] * 2, 0.05), grad_accum_steps=2).step(0)
    assert metrics["dt_data"] >= 0.1  # two micro-batches, each waited for
    assert metrics["dt"] >= metrics["dt_data"]


# ---- from the safety review (docs/SAFETY.md): SIGTERM and the research log, blow-ups, optimizer state

class FakeTrainer:
    """Steps return a fixed loss; `on_step(step)` runs inside each step (to send signals, read files)."""

    def __init__(self, on_step=None, losses=None):
        self.on_step, self.losses = on_step, losses or {}

    def step(self, step, want_layer_grads=False):
        if self.on_step:
            self.on_step(step)
        return {"loss": self.losses.get(step, 2.0), "lr_mult": 1.0, "dt": 0.01, "tok_per_s": 1.0, "grad_norm": 1.0}


def test_sigterm_stops_after_the_step_with_the_log_flushed(tmp_path):
    from nanochat.research_logger import ResearchLogger, read_scalar
    from nanochat.training import StepLog, StopRequested, run_loop
    logger = ResearchLogger(str(tmp_path), flush_every=100)
    trainer = FakeTrainer(on_step=lambda s: s == 4 and os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(StopRequested) as stopped:
        run_loop(trainer, 0, 50, StepLog(print_fn=lambda *a: None, logger=logger))
    assert stopped.value.code == 128 + signal.SIGTERM
    assert list(read_scalar(logger.path, "step")) == [1, 2, 3, 4, 5]  # on disk before close()
    logger.close()


def test_the_log_is_on_disk_up_to_every_checkpoint(tmp_path):
    # What SIGKILL cannot take away: at any moment the file holds every row up to the last save.
    from nanochat.research_logger import ResearchLogger, read_scalar
    from nanochat.training import Every, StepLog, run_loop
    logger = ResearchLogger(str(tmp_path), flush_every=100)
    on_disk = {}
    trainer = FakeTrainer(on_step=lambda s: on_disk.__setitem__(s, list(read_scalar(logger.path, "step"))))
    run_loop(trainer, 0, 7, StepLog(print_fn=lambda *a: None, logger=logger), save=Every(3, lambda step, last: None))
    logger.close()
    assert on_disk[3] == [1, 2, 3] and on_disk[6] == [1, 2, 3, 4, 5, 6]


def test_loss_monitor_reports_spikes_and_stops_a_blow_up():
    from nanochat.training import LossMonitor, TrainingDiverged
    printed = []
    monitor = LossMonitor(blowup_loss=60.0)
    for step in range(1, 11):
        assert not monitor.update(step, 3.0, printed.append)
    assert monitor.update(11, 12.0, printed.append) and "loss spike at step 11" in printed[-1]
    with pytest.raises(TrainingDiverged, match="blew up at step 12"):
        monitor.update(12, 7e7, printed.append)


def test_divergence_names_the_step_as_progress_lines_count_it():
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.training import Trainer
    model = GPT.build(GPTConfig(vocab_size=64, sequence_len=8, n_layer=1, n_head=1, n_kv_head=1, n_embd=16,
                                intermediate_size=32), "cpu")
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    x = torch.randint(0, 64, (2, 8))
    trainer = Trainer(model, model.setup_optimizers(), iter([(x, x)]), 1, 16, torch.device("cpu"))
    with pytest.raises(UserError, match="diverged at step 4"):
        trainer.step(3)  # the 0-based loop index of the step printed as "step 00004"


def test_a_nan_validation_metric_stops_the_run(tmp_path):
    from nanochat.training import Every, StepLog, TrainingDiverged, run_loop
    with pytest.raises(TrainingDiverged, match="val_bpb_forward is not finite at step 2"):
        run_loop(FakeTrainer(), 0, 5, StepLog(print_fn=lambda *a: None),
                 evaluate=Every(2, lambda s: {"val_bpb_forward": float("nan")}))


def test_loaded_optimizer_state_keeps_this_runs_hyperparameters():
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.training import Trainer
    config = GPTConfig(vocab_size=64, sequence_len=8, n_layer=1, n_head=1, n_kv_head=1, n_embd=16,
                       intermediate_size=32)
    model = GPT.build(config, "cpu")
    saved = [opt.state_dict() for opt in model.setup_optimizers(matrix_lr=0.02, weight_decay=0.0)]
    optimizers = model.setup_optimizers(matrix_lr=0.05, weight_decay=0.1)
    trainer = Trainer(model, optimizers, iter([]), 1, 16, torch.device("cpu"))
    trainer.load_optimizer_state(saved)
    muon = optimizers[1].param_groups[0]
    assert muon["initial_lr"] == 0.05 and muon["weight_decay"] == 0.1
