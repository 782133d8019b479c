"""Direction-aware pretraining batches: orient each document, then pack whole documents.

Order of operations (docs/DESIGN.md §2):
  1. read a document, tokenize it (in batches, multi-threaded),
  2. orient it with nanochat.direction (BOS first; reversed text for backward; a marker after
     BOS for bidirectional, drawn from (seed, global document index)),
  3. pack oriented documents into rows of T+1 tokens, BOS-aligned: every row starts with a
     document's BOS, documents are placed whole by best fit, and only the document that fills
     the end of a row is cropped.
Targets are the inputs shifted by one; a direction marker is never a target (-1).

Data parallelism. Each optimizer step consumes N = world_size x grad_accum_steps micro-batches.
Micro-batch slot s (0 <= s < N) is fed by its own *stream*, which reads the documents whose
global index is congruent to s modulo N. Rank r runs slots r*A .. r*A+A-1 (A = grad_accum_steps).
So the global batch depends on (total batch, B, T) and not on how it is split over processes:
two ranks without accumulation see exactly the data of one rank accumulating two micro-batches.

Resuming: `state_dict()` after a batch records each stream's epoch, read cursor and the
documents still waiting in its packing buffer; `load_state_dict()` re-reads those documents,
so a resumed run yields the same batches as an uninterrupted one.
"""

import bisect
import os

import torch

from nanochat.common import UserError
from nanochat.dataset import DocumentSource
from nanochat.direction import DirectionSpec, validate_direction, validate_p_backward


class _Stream:
    """One micro-batch slot: documents index % stride == offset, oriented and packed."""

    def __init__(self, source, stride, offset, spec, tokenizer, tokenizer_threads, tokenizer_batch_size, buffer_docs):
        self.source, self.stride, self.offset = source, stride, offset
        self.spec, self.tokenizer = spec, tokenizer
        self.threads, self.batch_size, self.buffer_docs = tokenizer_threads, tokenizer_batch_size, buffer_docs
        self.epoch, self.cursor = 0, offset
        self._iter = None
        # Buffer kept sorted by length: parallel lists so bisect finds the best fit quickly.
        self.lengths, self.docs, self.doc_ids = [], [], []
        if offset >= len(source):
            raise UserError(f"data stream {offset} has no documents: the split has only {len(source)} "
                             f"documents for {stride} streams; use fewer processes or more data")

    def _insert(self, doc_index, tokens):
        pos = bisect.bisect_right(self.lengths, len(tokens))
        self.lengths.insert(pos, len(tokens))
        self.docs.insert(pos, tokens)
        self.doc_ids.insert(pos, doc_index)

    def _pop(self, pos):
        self.lengths.pop(pos)
        self.doc_ids.pop(pos)
        return self.docs.pop(pos)

    def _add_texts(self, indexed_texts):
        indices = [i for i, _ in indexed_texts]
        token_lists = self.tokenizer.encode([t for _, t in indexed_texts], num_threads=self.threads)
        for doc_index, tokens in zip(indices, token_lists):
            if tokens:  # an empty document has nothing to predict
                self._insert(doc_index, self.spec.orient(tokens, doc_index=doc_index)[0])

    def _refill(self):
        while len(self.docs) < self.buffer_docs:
            if self._iter is None:
                self._iter = self.source.iter_from(self.cursor, self.stride, self.offset)
            chunk = []
            for doc_index, text in self._iter:
                chunk.append((doc_index, text))
                self.cursor = doc_index + self.stride
                if len(chunk) == self.batch_size:
                    break
            if not chunk:  # end of the split: start the next epoch
                self.epoch += 1
                self.cursor, self._iter = self.offset, None
                if not self.docs and self.epoch > 1 and self._empty_epochs():
                    raise UserError("the data split holds no non-empty documents")
                continue
            self._add_texts(chunk)

    def _empty_epochs(self):
        return all(not t.strip() for _, t in self.source.iter_from(0, self.stride, self.offset))

    def next_row(self, width):
        row = []
        while len(row) < width:
            self._refill()
            remaining = width - len(row)
            pos = bisect.bisect_right(self.lengths, remaining) - 1
            if pos >= 0:
                row.extend(self._pop(pos))  # the longest document that fits whole
            else:
                row.extend(self._pop(0)[:remaining])  # nothing fits: crop the shortest to fill the row
        return row

    def state_dict(self):
        return {"epoch": self.epoch, "cursor": self.cursor, "pending": list(self.doc_ids)}

    def load_state_dict(self, state):
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._iter = None
        self.lengths, self.docs, self.doc_ids = [], [], []
        pending = [int(i) for i in state["pending"]]
        for start in range(0, len(pending), self.batch_size):
            part = pending[start:start + self.batch_size]
            self._add_texts([(i, self.source.get(i)) for i in part])


class DirectionAwareLoader:
    """Iterator of (inputs, targets), each (B, T) int64 on `device`; see the module docstring."""

    def __init__(self, B, T, split, direction="forward", tokenizer_threads=4, tokenizer_batch_size=128,
                 device="cuda", seed=0, p_backward=0.5, tokenizer=None, rank=None, world_size=None,
                 grad_accum_steps=1, buffer_docs=256, data_dir=None, resume_state=None):
        validate_direction(direction)
        validate_p_backward(p_backward)
        if tokenizer is None:
            from nanochat.tokenizer import get_tokenizer
            tokenizer = get_tokenizer()
        self.B, self.T, self.split, self.direction = B, T, split, direction
        self.device = torch.device(device)
        self.rank = int(os.environ.get("RANK", 0)) if rank is None else rank
        self.world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
        self.grad_accum_steps = grad_accum_steps
        self.spec = DirectionSpec.from_tokenizer(direction, tokenizer, seed=seed, p_backward=p_backward)
        source = DocumentSource(split, data_dir)
        n_streams = self.world_size * grad_accum_steps
        self.streams = [
            _Stream(source, n_streams, self.rank * grad_accum_steps + a, self.spec, tokenizer,
                    tokenizer_threads, tokenizer_batch_size, buffer_docs)
            for a in range(grad_accum_steps)
        ]
        self.next_stream = 0
        self.marker_ids = torch.tensor(self.spec.marker_ids, dtype=torch.long)
        if resume_state is not None:
            self.load_state_dict(resume_state)

    def __iter__(self):
        return self

    def __next__(self):
        stream = self.streams[self.next_stream]
        self.next_stream = (self.next_stream + 1) % len(self.streams)
        rows = torch.tensor([stream.next_row(self.T + 1) for _ in range(self.B)], dtype=torch.long)
        inputs = rows[:, :-1]
        targets = rows[:, 1:].clone()
        if len(self.marker_ids):
            targets[torch.isin(targets, self.marker_ids)] = -1  # markers are control inputs, not text
        if self.device.type == "cuda":
            return (inputs.pin_memory().to(self.device, non_blocking=True),
                    targets.pin_memory().to(self.device, non_blocking=True))
        return inputs.to(self.device), targets.to(self.device)

    def state_dict(self):
        return {"direction": self.direction, "rank": self.rank, "world_size": self.world_size,
                "grad_accum_steps": self.grad_accum_steps, "next_stream": self.next_stream,
                "streams": [s.state_dict() for s in self.streams]}

    def load_state_dict(self, state):
        layout = (state["world_size"], state["grad_accum_steps"])
        if layout != (self.world_size, self.grad_accum_steps) or state["rank"] != self.rank:
            raise UserError(f"dataloader state was saved with world_size x grad_accum = {layout} on rank "
                            f"{state['rank']}; this run has {(self.world_size, self.grad_accum_steps)} on rank {self.rank}. "
                            "Resume with the same --total_batch_size, --device_batch_size and number of processes")
        self.next_stream = int(state["next_stream"])
        for stream, s in zip(self.streams, state["streams"]):
            stream.load_state_dict(s)


def direction_aware_dataloader(B, T, split, direction="forward", tokenizer_threads=4, tokenizer_batch_size=128,
                               device="cuda", seed=0, p_backward=0.5, **kwargs):
    """Yields (inputs, targets) of shape (B, T); see DirectionAwareLoader for the extra options
    (tokenizer, rank, world_size, grad_accum_steps, buffer_docs, data_dir, resume_state)."""
    return DirectionAwareLoader(B, T, split, direction, tokenizer_threads, tokenizer_batch_size,
                                device, seed, p_backward, **kwargs)
