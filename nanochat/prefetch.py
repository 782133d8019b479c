"""Batches prepared ahead of the training step on a background thread (docs/DESIGN.md §10,
"Prefetching"). `state_dict()` is the loader's state right after the last batch *consumed*, so a
resume continues exactly; a failure in the worker is re-raised at the `next()` that would have
received the batch.
"""

import copy
import queue
import threading
from contextlib import nullcontext as _no_stream

import torch

# What travels through the queue: ("batch", tensors, state, event) | ("error", exception) | ("end",)
_POLL_S = 0.1  # how often a blocked worker checks whether it was asked to stop


class Prefetcher:
    """Iterator over `loader`'s batches (tuples of tensors, moved to `device` if given), `depth` ahead.
    `loader` has `state_dict()` / `load_state_dict()`; its attributes describing "the latest batch"
    belong to a batch not yet consumed."""

    def __init__(self, loader, depth=2, device=None):
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self.loader, self.depth = loader, depth
        self.device = torch.device(device) if device is not None else None
        self._state = copy.deepcopy(loader.state_dict())  # nothing consumed yet
        self._thread, self._queue, self._stop = None, None, None
        self._finished = False
        self._ran_ahead = False  # the loader is past the consumed state (a worker was stopped)

    # ---- the worker ----------------------------------------------------------------------
    def _start(self):
        self._queue = queue.Queue(maxsize=self.depth)
        self._stop = threading.Event()
        # The worker holds the loader, not the Prefetcher: a dropped Prefetcher is collected, and
        # __del__ stops its worker (a caller that never closes it, such as base_train, leaks nothing).
        self._thread = threading.Thread(target=Prefetcher._work,
                                        args=(self.loader, self.device, self._queue, self._stop),
                                        name="nanochat-prefetch", daemon=True)
        self._thread.start()

    @staticmethod
    def _put(q, stop, item):
        """Blocking put that gives up when asked to stop; returns False if it gave up."""
        while not stop.is_set():
            try:
                q.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    @staticmethod
    def _work(loader, device, q, stop):
        cuda = device is not None and device.type == "cuda"
        put = Prefetcher._put
        try:
            if cuda:
                torch.cuda.set_device(device)  # a new thread starts on device 0
            # Copies (ours, and any the loader makes itself) go on a side stream so they overlap
            # with the step running on the main stream.
            stream = torch.cuda.Stream(device) if cuda else None
            while not stop.is_set():
                with torch.cuda.stream(stream) if cuda else _no_stream():
                    try:
                        batch = next(loader)
                    except StopIteration:
                        put(q, stop, ("end",))
                        return
                    state = copy.deepcopy(loader.state_dict())  # the state right after this batch
                    event = None
                    if cuda:
                        batch = tuple(t.pin_memory().to(device, non_blocking=True) if t.device.type == "cpu"
                                      else t for t in batch)
                        event = torch.cuda.Event()
                        event.record(stream)
                if not put(q, stop, ("batch", batch, state, event)):
                    return
        except BaseException as e:  # handed to the consumer, who re-raises it
            put(q, stop, ("error", e))

    # ---- the consumer ----------------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self):
        if self._finished:
            raise StopIteration
        if self._thread is None:
            if self._ran_ahead:  # batches prepared ahead were dropped by close(): rewind to them
                self.loader.load_state_dict(copy.deepcopy(self._state))
                self._ran_ahead = False
            self._start()
        while True:
            try:
                item = self._queue.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("the prefetch worker stopped without handing over a batch or an error")
        kind = item[0]
        if kind == "end":
            self._finished = True
            raise StopIteration
        if kind == "error":
            self._finished = True
            raise item[1]
        _, batch, state, event = item
        if event is not None:
            # Kernels of this step run on the current stream: order them after the copy, and tell
            # the allocator the tensors are used there (they were allocated on the copy stream).
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for t in batch:
                t.record_stream(current)
        elif self.device is not None:  # CPU, MPS: moved here, on the training thread
            batch = tuple(t.to(self.device) for t in batch)
        self._state = state
        return batch

    # ---- resume ------------------------------------------------------------------------------
    def state_dict(self):
        """The loader's state right after the last batch returned by `next()`."""
        return copy.deepcopy(self._state)

    def load_state_dict(self, state):
        """Discard batches produced ahead, restore the loader, and prefetch from there."""
        self.close()
        self.loader.load_state_dict(state)
        self._state = copy.deepcopy(self.loader.state_dict())
        self._finished = self._ran_ahead = False

    # ---- shutdown ----------------------------------------------------------------------------
    def close(self, timeout=10.0):
        """Stop the worker and drop the batches it prepared; a later `next()` rewinds the loader
        to the consumed state and restarts the worker."""
        thread = self._thread
        if thread is None:
            return
        self._stop.set()  # a worker blocked on the full queue sees it within _POLL_S
        self._ran_ahead = True
        thread.join(timeout)
        if thread.is_alive():
            # The worker is inside next(loader) (e.g. tokenizing). It sees the stop event after
            # that batch and exits; it is a daemon, so it never keeps the process alive. It must
            # not touch the loader again, which is why load_state_dict refuses to go on.
            raise RuntimeError(f"the prefetch worker did not stop within {timeout:.0f}s")
        self._thread, self._queue, self._stop = None, None, None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            if self._thread is not None:
                self._stop.set()
        except Exception:
            pass


def prefetching(loader, depth, device=None):
    """`loader` wrapped in a Prefetcher of `depth` batches; `depth` 0 returns `loader` itself."""
    if depth < 0:
        raise ValueError(f"prefetch depth must be >= 0 (0 = off), got {depth}")
    return Prefetcher(loader, depth, device) if depth > 0 else loader
