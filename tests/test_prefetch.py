"""Tests for nanochat.prefetch: same batches, exact-resume state, errors, shutdown, and the
data wait of a step that is slower than its loader."""

import threading
import time

import pytest
import torch

from nanochat.chat_data import ConversationBatches
from nanochat.direction_dataloader import DirectionAwareLoader
from nanochat.prefetch import Prefetcher, prefetching
from nanochat.tokenizer import get_tokenizer
from tasks.arithmetic import TwoWayArithmetic

B, T = 2, 32


def real_loader(direction="bidirectional", **kwargs):
    return DirectionAwareLoader(B, T, "train", direction, device="cpu", tokenizer_threads=1, buffer_docs=16,
                                **kwargs)


def take(it, n):
    return [next(it) for _ in range(n)]


def same_batches(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for ba, bb in zip(a, b) for x, y in zip(ba, bb))


class CountingLoader:
    """batch i = (tensor [i], tensor [-i]); state = number of batches produced; optional sleep
    per batch and a failure at a given index."""

    def __init__(self, n=None, delay=0.0, fail_at=None):
        self.i, self.n, self.delay, self.fail_at = 0, n, delay, fail_at

    def __iter__(self):
        return self

    def __next__(self):
        if self.n is not None and self.i >= self.n:
            raise StopIteration
        if self.fail_at is not None and self.i == self.fail_at:
            raise FileNotFoundError("shard_00003.parquet is missing")
        if self.delay:
            time.sleep(self.delay)
        self.i += 1
        return torch.tensor([self.i - 1]), torch.tensor([-(self.i - 1)])

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, state):
        self.i = state["i"]


# ---- equivalence and exact resume on the real loaders -----------------------------------------

def test_prefetched_real_loader_yields_the_same_batches_and_consumed_state(base_dir):
    k = 5
    plain = real_loader(grad_accum_steps=2)
    with Prefetcher(real_loader(grad_accum_steps=2), depth=3) as pre:
        got = take(pre, k)
        time.sleep(0.2)  # let the worker run ahead: its loader is now past batch k
        assert same_batches(got, take(plain, k))
        # The saved state is that of the last batch consumed, not of the batches prepared ahead.
        assert pre.state_dict() == plain.state_dict()
        assert pre.loader.state_dict() != plain.state_dict()


def test_resume_from_prefetch_state_continues_with_the_following_batches(base_dir):
    k, more = 4, 4
    reference = take(real_loader(), k + more)
    pre = Prefetcher(real_loader(), depth=2)
    take(pre, k)
    state = pre.state_dict()
    pre.close()
    # into a plain loader ...
    assert same_batches(take(real_loader(resume_state=state), more), reference[k:])
    # ... and into a fresh prefetching one (the base_train path: load before the first batch)
    resumed = Prefetcher(real_loader(), depth=2)
    resumed.load_state_dict(state)
    assert same_batches(take(resumed, more), reference[k:])
    uninterrupted = real_loader()
    take(uninterrupted, k + more)
    assert resumed.state_dict() == uninterrupted.state_dict()
    resumed.close()


def test_load_state_dict_while_running_discards_batches_prepared_ahead(base_dir):
    reference = take(real_loader("backward"), 6)
    pre = Prefetcher(real_loader("backward"), depth=3)
    take(pre, 2)
    state = pre.state_dict()
    take(pre, 3)
    pre.load_state_dict(state)  # rewind: batches 2.. again, none of the queued ones
    assert same_batches(take(pre, 4), reference[2:6])
    pre.close()


def test_conversation_batches_prefetch_identically(base_dir):
    tok = get_tokenizer()
    task = TwoWayArithmetic("train", size=40)

    def make():
        return ConversationBatches(task, tok, "bidirectional", B=2, T=32, mode="pack", train_on="all")

    plain = make()
    pre = Prefetcher(make(), depth=2)
    assert same_batches(take(pre, 3), take(plain, 3))
    assert pre.state_dict() == plain.state_dict()
    pre.close()


def test_prefetching_depth_zero_is_the_loader_itself():
    loader = CountingLoader()
    assert prefetching(loader, 0) is loader
    assert isinstance(prefetching(loader, 2), Prefetcher)
    with pytest.raises(ValueError):
        prefetching(loader, -1)


# ---- errors, end of data, shutdown ----------------------------------------------------------------

def test_worker_error_is_raised_in_the_consumer():
    pre = Prefetcher(CountingLoader(fail_at=3), depth=2)
    assert [int(x) for x, _ in take(pre, 3)] == [0, 1, 2]
    with pytest.raises(FileNotFoundError, match="shard_00003"):
        next(pre)
    assert pre.state_dict() == {"i": 3}  # still the state after the last good batch
    pre.close()


def test_end_of_loader_stops_iteration():
    pre = Prefetcher(CountingLoader(n=3), depth=2)
    assert [int(x) for x, _ in pre] == [0, 1, 2]
    with pytest.raises(StopIteration):
        next(pre)
    pre.close()


def test_close_stops_the_worker_blocked_on_a_full_queue():
    pre = Prefetcher(CountingLoader(), depth=2)
    next(pre)
    time.sleep(0.2)  # the queue fills and the worker blocks on put
    thread = pre._thread
    assert thread.is_alive() and thread.daemon
    pre.close()
    assert not thread.is_alive()
    assert not any(t.name == "nanochat-prefetch" and t.is_alive() for t in threading.enumerate())


def test_next_after_close_continues_after_the_last_consumed_batch():
    pre = Prefetcher(CountingLoader(), depth=3)
    take(pre, 2)
    time.sleep(0.1)  # batches 2, 3, 4 are prepared ahead ...
    pre.close()      # ... and dropped: the loader is rewound to the consumed state on restart
    assert [int(x) for x, _ in take(pre, 2)] == [2, 3]
    pre.close()


def test_tensors_are_moved_to_the_requested_device():
    pre = Prefetcher(CountingLoader(), depth=1, device="cpu")
    x, y = next(pre)
    assert x.device.type == "cpu" and int(y) == 0
    pre.close()


# ---- the point of it all: a slow step does not wait for data ----------------------------------------

def data_wait_per_step(batches, step_seconds, steps):
    """Consume `steps` batches like a training loop whose step takes `step_seconds` (sleep: the
    fake model's compute); returns the time each next() blocked, skipping the first (the
    pipeline has to fill once)."""
    waits = []
    for _ in range(steps):
        t0 = time.perf_counter()
        next(batches)
        waits.append(time.perf_counter() - t0)
        time.sleep(step_seconds)  # forward + backward + optimizer of a slow model
    return waits[1:]


def test_slow_step_never_waits_for_a_faster_loader_with_prefetch():
    load_s, step_s, steps = 0.05, 0.12, 8
    without = data_wait_per_step(CountingLoader(delay=load_s), step_s, steps)
    pre = Prefetcher(CountingLoader(delay=load_s), depth=2)
    with_prefetch = data_wait_per_step(pre, step_s, steps)
    pre.close()
    # Without prefetching every step pays the whole loading time ...
    assert min(without) >= 0.9 * load_s
    # ... with it the next batch is ready when the step asks: waits are a small fraction of the
    # step (generous margins: the CPU is shared; the expected value is ~0.1 ms).
    assert sorted(with_prefetch)[len(with_prefetch) // 2] < 0.1 * step_s
    assert sum(with_prefetch) < 0.25 * sum(without)


class TokenLoader(CountingLoader):
    """Random (inputs, targets) token batches, `delay` seconds each: a tokenizer-bound loader."""

    def __next__(self):
        i = self.i
        super().__next__()
        g = torch.Generator().manual_seed(i)
        rows = torch.randint(0, 64, (2, 17), generator=g)
        return rows[:, :-1], rows[:, 1:]


class SlowModel(torch.nn.Module):
    """A tiny GPT whose forward also sleeps: a model step slower than the loader."""

    def __init__(self, seconds):
        super().__init__()
        from nanochat.gpt import GPT, config_for_depth
        torch.manual_seed(0)
        self.gpt = GPT.build(config_for_depth(1, 64, 16), "cpu")
        self.seconds = seconds

    def forward(self, x, y):
        time.sleep(self.seconds)
        return self.gpt(x, y)


def trainer_data_waits(prefetch, load_s, step_s, steps=4):
    from nanochat.training import Trainer
    model = SlowModel(step_s)
    batches = prefetching(TokenLoader(delay=load_s), prefetch)
    trainer = Trainer(model, model.gpt.setup_optimizers(), batches, 1, 32, torch.device("cpu"))
    metrics = [trainer.step(s) for s in range(steps)]
    if prefetch:
        batches.close()
    return [m["dt_data"] for m in metrics[1:]], [m["dt"] for m in metrics[1:]]


def test_trainer_step_waits_for_data_only_without_prefetch():
    load_s, step_s = 0.05, 0.12
    waits_plain, _ = trainer_data_waits(0, load_s, step_s)
    waits_prefetch, dts = trainer_data_waits(2, load_s, step_s)
    assert min(waits_plain) >= 0.9 * load_s
    # relative to the step it serves, the wait with prefetching is negligible
    ratios = sorted(w / dt for w, dt in zip(waits_prefetch, dts))
    assert ratios[len(ratios) // 2] < 0.1
