"""The training step and loop shared by every phase: phases differ in data, not in how a step is taken.

One optimizer step = `grad_accum_steps` micro-batches on each of `world_size` ranks. Gradients are
averaged with an explicit all-reduce (not the DDP wrapper): the distributed path and the
accumulation path are the same computation, the mean over all micro-batches of the global batch.
"""

import math
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from nanochat.checkpoint_manager import NonFiniteWeights
from nanochat.common import UserError
from nanochat.muon import Muon

# Peak dense bf16 throughput used for MFU (per GPU).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2250e12}


def gpu_peak_flops(device):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""  # no MFU off CUDA
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


def autocast_context(device_type):
    # bf16 autocast on GPU; full fp32 on CPU/MPS where bf16 matmuls are slow or unsupported.
    return torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16) if device_type == "cuda" else nullcontext()


def grad_accum_steps_for(total_batch_size, device_batch_size, seq_len, world_size):
    """Micro-batches per rank per step; the global batch must split evenly."""
    per_micro = device_batch_size * seq_len * world_size
    if total_batch_size == -1:
        return 1
    if total_batch_size <= 0 or total_batch_size % per_micro:
        raise UserError(f"--total_batch_size={total_batch_size} is not divisible by device_batch_size x max_seq_len x "
                        f"world_size = {device_batch_size} x {seq_len} x {world_size} = {per_micro}; "
                        f"use a multiple of {per_micro}")
    return total_batch_size // per_micro


def muon_momentum(step, ramp_steps=300):
    """Muon momentum ramps 0.85 -> 0.95 over the first steps (stabler start)."""
    frac = min(step / ramp_steps, 1.0)
    return (1 - frac) * 0.85 + frac * 0.95


def sync_gradients(params, world_size):
    """Average gradients over ranks (no-op without a process group)."""
    if world_size <= 1 or not dist.is_initialized():
        return
    grads = [p.grad for p in params if p.grad is not None]
    handles = [dist.all_reduce(g, op=dist.ReduceOp.SUM, async_op=True) for g in grads]
    for h in handles:
        h.wait()
    for g in grads:
        g.div_(world_size)


def per_layer_grad_norms(model):
    """{'layer<i>': L2 norm of all gradients in block i} plus embeddings and head."""
    norms = {"embed": model.model.embed_tokens.weight.grad, "head": model.lm_head.weight.grad}
    out = {k: (g.norm().item() if g is not None else 0.0) for k, g in norms.items()}
    for i, block in enumerate(model.model.layers):
        sq = sum(p.grad.float().pow(2).sum() for p in block.parameters() if p.grad is not None)
        out[f"layer{i}"] = math.sqrt(float(sq))
    return out


class Trainer:
    """Takes optimizer steps, not knowing which phase it runs: `batches` yields this rank's (inputs,
    targets) micro-batches; `lr_schedule(step)` (0-based) gives each step's learning-rate multiplier."""

    def __init__(self, model, optimizers, batches, grad_accum_steps, tokens_per_step, device, world_size=1,
                 lr_schedule=None, lr_scale=1.0, grad_clip=0.0, flops_per_token=None):
        self.model, self.optimizers, self.batches = model, optimizers, batches
        self.grad_accum_steps, self.tokens_per_step = grad_accum_steps, tokens_per_step
        self.device, self.world_size = device, world_size
        self.lr_schedule, self.lr_scale = lr_schedule, lr_scale
        self.grad_clip, self.flops_per_token = grad_clip, flops_per_token
        self.peak_flops = gpu_peak_flops(device)
        self.autocast = autocast_context(device.type)
        self.params = list(model.parameters())
        self.last_batch = None

    def set_lr(self, step):
        """Every group's rate is its initial rate x lr_scale x lr_schedule(step) (the phase script's
        schedule; none = constant); Muon's momentum ramps up. Returns the multiplier."""
        mult = 1.0 if self.lr_schedule is None else self.lr_schedule(step)
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * self.lr_scale * mult
                if isinstance(opt, Muon):
                    group["momentum"] = muon_momentum(step)
        return mult

    def step(self, step, want_layer_grads=False, timing=False):
        """One optimizer step; returns a dict of scalar metrics (and per-layer grad norms). One host
        sync, at the end: loss and grad norm come back in one transfer, queued behind the optimizer,
        so it also ends `dt`. `dt_data`: time waiting for batches. timing=True (benchmarks) adds two
        syncs to split off `dt_fwd_bwd` (data wait excluded) and `dt_optim` (sync, norm, optimizers)."""
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        self.model.train()
        total, data_wait = 0.0, 0.0
        for _ in range(self.grad_accum_steps):
            t_data = time.perf_counter()
            x, y = next(self.batches)
            data_wait += time.perf_counter() - t_data
            with self.autocast:
                loss = self.model(x, y)
            total += loss.detach()
            (loss / self.grad_accum_steps).backward()
        self.last_batch = (x, y)
        if timing:
            if cuda:
                torch.cuda.synchronize()
            t_fwd_bwd = time.perf_counter()
        sync_gradients(self.params, self.world_size)
        if self.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        else:
            grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.params if p.grad is not None]))
        layer_grads = per_layer_grad_norms(self.model) if want_layer_grads else None
        mult = self.set_lr(step)
        for opt in self.optimizers:
            opt.step()
        self.model.zero_grad(set_to_none=True)
        # float64 on the device, so the mean over ranks is exact to double precision.
        loss_sum = (total / self.grad_accum_steps).double().reshape(1)
        n_ranks = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
            n_ranks = dist.get_world_size()
        loss_sum_value, grad_norm_value = torch.cat([loss_sum, grad_norm.detach().double().reshape(1)]).tolist()
        loss_value = loss_sum_value / n_ranks
        dt = time.perf_counter() - t0
        metrics = {"loss": loss_value, "lr_mult": mult, "dt": dt, "tok_per_s": self.tokens_per_step / dt,
                   "grad_norm": grad_norm_value, "dt_data": data_wait}
        if timing:
            metrics["dt_fwd_bwd"] = t_fwd_bwd - t0 - data_wait
            metrics["dt_optim"] = t0 + dt - t_fwd_bwd
        if not math.isfinite(loss_value):
            # step is 0-based here; progress lines and checkpoints count steps from 1
            raise TrainingDiverged(f"training diverged at step {step + 1}: loss is {loss_value}; lower the learning rates")
        if self.peak_flops and self.flops_per_token:
            metrics["mfu"] = self.flops_per_token * self.tokens_per_step / dt / (self.peak_flops * self.world_size)
        if layer_grads is not None:
            metrics["layer_grad_norm"] = layer_grads
        return metrics

    def optimizer_state(self):
        return [opt.state_dict() for opt in self.optimizers]

    def load_optimizer_state(self, states):
        """Load saved moments and step counts; every group keeps this run's hyperparameters (a
        resumed run's flags apply from the resume step)."""
        for opt, s in zip(self.optimizers, states):
            fresh = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
            opt.load_state_dict(s)
            for group, wanted in zip(opt.param_groups, fresh):
                group.update(wanted)
                group.setdefault("initial_lr", group["lr"])  # the schedule is re-applied from the step


class TrainingDiverged(UserError):
    """The loss (or a validation metric) is not finite, or blew up: the run stops, exit 2."""


class LossMonitor:
    """Warns of a spike (a loss above `spike_factor` x its running mean, after `warmup` steps) and
    stops a blow-up (a loss above `blowup_loss`, the scripts' 10 x ln(vocab size): the weights are
    wrecked even if the loss later settles; docs/SAFETY.md)."""

    def __init__(self, blowup_loss=None, spike_factor=3.0, beta=0.9, warmup=5):
        self.blowup_loss, self.spike_factor, self.beta, self.warmup = blowup_loss, spike_factor, beta, warmup
        self.mean, self.seen = None, 0

    def update(self, step, loss, print_fn=print):
        """`step` counts from 1. Returns True for a spike; raises TrainingDiverged on a blow-up."""
        if self.blowup_loss is not None and loss > self.blowup_loss:
            raise TrainingDiverged(f"training blew up at step {step}: loss {loss:.4g} exceeds {self.blowup_loss:.4g} "
                                   "(10 x ln(vocab size), far worse than a uniform guess); lower the learning rates")
        spike = (self.mean is not None and self.seen >= self.warmup and self.spike_factor > 0
                 and loss > self.spike_factor * self.mean)
        if spike:
            print_fn(f"warning: loss spike at step {step}: {loss:.4f} is {loss / self.mean:.1f}x the running mean "
                     f"{self.mean:.4f}")
        else:  # a spike does not move the mean it is judged against
            self.mean = loss if self.mean is None else self.beta * self.mean + (1 - self.beta) * loss
        self.seen += 1
        return spike


class StopRequested(SystemExit):
    """SIGTERM/SIGINT arrived: the loop stopped after a step with its log flushed."""


@contextmanager
def stop_on_signals():
    """Within the block the first SIGTERM/SIGINT only sets `state["signal"]` (the loop stops after
    its step); a second one interrupts at once. Off the main thread the block does nothing."""
    state = {"signal": None}
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def handler(signum, frame):
        if state["signal"] is not None:
            # The same signal again within a moment is one request delivered twice (the parent-death
            # signal and the lock-holder watch both fire when the orchestrator dies): not an escalation.
            if signum == state["signal"] and time.monotonic() - state["at"] < 2.0:
                return
            raise KeyboardInterrupt(f"second signal {signum}")
        state["signal"], state["at"] = signum, time.monotonic()
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield state
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@dataclass
class Every:
    """`fn` called every `steps` steps (steps count from 1; -1 = never)."""
    steps: int
    fn: Callable

    def due(self, step):
        return self.steps > 0 and step % self.steps == 0


class StepLog:
    """Where each step's metrics go: a progress line every `log_every` steps (with the metrics `show`
    names), the research log (and `snapshot(step, layer_grads)` when it asks), and wandb."""

    def __init__(self, print_fn=print, log_every=1, show=(), logger=None, snapshot=None, wandb_run=None):
        self.print_fn, self.log_every, self.show = print_fn, log_every, show
        self.logger, self.snapshot, self.wandb_run = logger, snapshot, wandb_run
        self.t_start = time.time()

    def wants_snapshot(self, step):
        return self.logger is not None and self.snapshot is not None and self.logger.should_snapshot(step)

    def write(self, step, num_iterations, metrics):
        if (step - 1) % self.log_every == 0 or step == num_iterations:
            extra = "".join(f" | {k} {metrics[k]:.4f}" for k in self.show if k in metrics)
            extra += f" | mfu {100 * metrics['mfu']:.1f}%" if "mfu" in metrics else ""
            self.print_fn(f"step {step:05d}/{num_iterations} | loss {metrics['loss']:.4f} "
                          f"| lrm {metrics['lr_mult']:.3f} | dt {1000 * metrics['dt']:.0f}ms "
                          f"| tok/s {metrics['tok_per_s']:,.0f}{extra} | {time.time() - self.t_start:.0f}s")
        if self.logger is not None:
            self.logger.log_step(step, metrics)
        if self.wandb_run is not None:
            self.wandb_run.log(dict(metrics, step=step))

    def flush(self):
        if self.logger is not None and not self.logger.closed:
            self.logger.flush()


def run_loop(trainer, start_step, num_iterations, log=None, monitor=None, evaluate=None, save=None, sample=None):
    """The step loop every phase shares: step, evaluate, log, check, sample, save; returns the last
    metrics. `evaluate(step)` (also at the last step), `save(step, last)` (also at the end) and
    `sample(step)` are Every(steps, fn); steps count from 1. What a killed or diverged run keeps
    (the log flushed at every save, a clean stop on SIGTERM): docs/SAFETY.md."""
    log, monitor = log or StepLog(), monitor or LossMonitor()
    last, saved = {}, start_step if start_step > 0 else None

    def checkpoint(step):
        nonlocal saved
        save.fn(step, last)
        saved = step
        log.flush()  # the log always reaches at least the last checkpoint

    with stop_on_signals() as stop:
        try:
            for step in range(start_step, num_iterations):
                done, is_last = step + 1, step == num_iterations - 1  # `done` steps taken: what is printed and saved
                want_snapshot = log.wants_snapshot(step)
                metrics = trainer.step(step, want_layer_grads=want_snapshot)
                layer_grads = metrics.pop("layer_grad_norm", None)
                last["train_loss"] = metrics["loss"]
                if evaluate is not None and (evaluate.due(done) or is_last):
                    val = evaluate.fn(done)
                    metrics.update(val)
                    last.update(val)
                log.write(done, num_iterations, metrics)
                if want_snapshot:
                    log.logger.log_snapshot(done, log.snapshot(done, layer_grads))
                bad = sorted(k for k, v in last.items() if isinstance(v, float) and not math.isfinite(v))
                if bad:
                    raise TrainingDiverged(f"{', '.join(bad)} is not finite at step {done} ({last[bad[0]]})")
                monitor.update(done, metrics["loss"], log.print_fn)
                if sample is not None and sample.due(done):
                    sample.fn(done)
                if save is not None and save.due(done) and not is_last:
                    checkpoint(done)
                if stop["signal"] is not None and not is_last:
                    log.flush()
                    where = f"resume from step {saved}" if saved is not None else "no checkpoint was saved yet"
                    log.print_fn(f"stopped by {signal.Signals(stop['signal']).name} after step {done}: the research "
                                 f"log is flushed; {where}")
                    raise StopRequested(128 + stop["signal"])
            if save is not None and start_step < num_iterations:
                checkpoint(num_iterations)
            return last
        except (TrainingDiverged, NonFiniteWeights) as e:
            where = (f"the last good checkpoint is step {saved}" if saved is not None
                     else "no checkpoint was saved")
            raise type(e)(f"{e}; {where}") from None
        finally:
            log.flush()
