"""Direction-aware pretraining batches (docs/DIRECTIONS.md): each epoch's documents in a seeded order,
each oriented on its own (nanochat.direction), then packed BOS-aligned, best fit, with no token lost
(a document that does not fit continues in the next row behind its header and some context). Slot s of
world_size x grad_accum streams reads epoch positions p % N == s, so the global batch does not depend on
how it is split over processes; the state after a batch resumes exactly.
"""

import bisect
import os

import torch

from nanochat.common import UserError
from nanochat.dataset import DocumentOrder, DocumentSource, shuffle_window
from nanochat.direction import DirectionSpec, document_piece, validate_direction, validate_p_backward

# Texts longer than this are tokenized in pieces cut at line ends, so one giant document does not
# need one giant tokenizer call (docs: bounded memory). Shorter texts are encoded whole.
MAX_ENCODE_CHARS = 1 << 20


def _split_long_text(text, max_chars=MAX_ENCODE_CHARS):
    parts, start = [], 0
    while len(text) - start > max_chars:
        cut = text.rfind("\n", start + max_chars // 2, start + max_chars)
        cut = start + max_chars if cut < 0 else cut + 1
        parts.append(text[start:cut])
        start = cut
    parts.append(text[start:])
    return parts


def encode_documents(tokenizer, texts, num_threads=4, max_chars=MAX_ENCODE_CHARS):
    """Token lists of `texts`; a text over `max_chars` is encoded in pieces cut after a newline
    (deterministic, the same for training and evaluation)."""
    texts = list(texts)
    if all(len(t) <= max_chars for t in texts):
        return tokenizer.encode(texts, num_threads=num_threads)
    out = []
    for text in texts:
        parts = tokenizer.encode(_split_long_text(text, max_chars), num_threads=num_threads)
        out.append([token for part in parts for token in part])
    return out


def to_batch(rows, keep, device):
    """(inputs, targets) on `device` of rows of T+1 tokens: targets are -1 where `keep` is false (markers,
    context, padding)."""
    rows = torch.tensor(rows, dtype=torch.long)
    inputs = rows[:, :-1]
    targets = rows[:, 1:].clone()
    targets[~torch.tensor(keep, dtype=torch.bool)[:, 1:]] = -1
    if device.type == "cuda":
        return inputs.pin_memory().to(device, non_blocking=True), targets.pin_memory().to(device, non_blocking=True)
    return inputs.to(device), targets.to(device)


class _Piece:
    """What is left of one oriented document: the text from `body_start` on still has to be trained."""
    __slots__ = ("doc_index", "epoch", "row", "body_start", "seq")

    def __init__(self, doc_index, epoch, row, body_start=0, seq=0):
        self.doc_index, self.epoch, self.row, self.body_start = doc_index, epoch, row, body_start
        self.seq = seq  # arrival order: the document waiting longest is the next to be cut


class _Stream:
    """One micro-batch slot: the documents at epoch positions p % stride == offset, oriented and packed."""

    def __init__(self, source, order, stride, offset, spec, tokenizer, tokenizer_threads, tokenizer_batch_size,
                 buffer_docs, buffer_tokens, context_tokens):
        self.source, self.order, self.stride, self.offset = source, order, stride, offset
        self.spec, self.tokenizer = spec, tokenizer
        self.threads, self.batch_size = tokenizer_threads, tokenizer_batch_size
        # The buffer never holds more documents than the stream has, so a small corpus is not read
        # several epochs ahead (each epoch's documents are trained before the next epoch's, bar a few).
        n_docs = max(1, (len(source) - offset + stride - 1) // stride)
        self.buffer_docs, self.buffer_tokens = min(buffer_docs, n_docs), buffer_tokens
        self.context_tokens = context_tokens
        self.header_len = spec.header_len
        self.epoch, self.cursor = 0, offset  # the next epoch position this stream reads
        self._iter = None
        self._epoch_had_text = False
        # Buffer kept sorted by piece length: parallel lists so bisect finds the best fit quickly.
        self.lengths, self.pieces, self.buffered = [], [], 0
        self.carry, self._seq = None, 0  # the document cut at the end of the last row; arrival counter
        if offset >= len(source):
            raise UserError(f"data stream {offset} has no documents: the split has only {len(source)} "
                             f"documents for {stride} streams; use fewer processes or more data")

    def _length(self, piece):
        ctx = min(self.context_tokens, piece.body_start)
        return len(piece.row) - piece.body_start + ctx

    def _insert(self, piece):
        n = self._length(piece)
        pos = bisect.bisect_right(self.lengths, n)
        self.lengths.insert(pos, n)
        self.pieces.insert(pos, piece)
        self.buffered += n

    def _pop(self, pos):
        self.buffered -= self.lengths.pop(pos)
        return self.pieces.pop(pos)

    def _make_pieces(self, indexed, body_starts=None):
        """indexed: [(doc_index, epoch, text)]; body_starts: where each document resumes (default 0).
        Empty documents have nothing to predict and give no piece."""
        token_lists = encode_documents(self.tokenizer, [t for _, _, t in indexed], self.threads)
        pieces = []
        for k, ((doc_index, epoch, _), tokens) in enumerate(zip(indexed, token_lists)):
            if tokens:
                self._epoch_had_text = True
                row = self.spec.orient(tokens, doc_index=doc_index, epoch=epoch)[0]
                pieces.append(_Piece(doc_index, epoch, row, 0 if body_starts is None else body_starts[k], self._seq))
                self._seq += 1
        return pieces

    def _add_texts(self, indexed, body_starts=None):
        for piece in self._make_pieces(indexed, body_starts):
            self._insert(piece)

    def _refill(self):
        while len(self.pieces) < self.buffer_docs and self.buffered < self.buffer_tokens:
            if self._iter is None:
                self._iter = self._read_from(self.cursor)
            chunk, chars = [], 0
            for position, doc_index, text in self._iter:
                chunk.append((doc_index, self.epoch, text))
                self.cursor = position + self.stride
                chars += len(text)
                # a tokenizer batch: up to batch_size documents, fewer when they are huge (at ~4
                # characters a token, about one buffer's worth), so a giant document comes alone
                if len(chunk) == self.batch_size or chars >= 4 * self.buffer_tokens:
                    break
            if not chunk:  # end of the split: start the next epoch
                if not self.pieces and not self._epoch_had_text and self._no_text():
                    # a shuffled stream reads other documents next epoch; a stored-order one never does
                    if not self.order.shuffle or all(not self.source.get(i).strip() for i in range(len(self.source))):
                        raise UserError("the data split holds no non-empty documents for data stream "
                                        f"{self.offset} of {self.stride}: use fewer processes or more data")
                self.epoch += 1
                self.cursor, self._iter, self._epoch_had_text = self.offset, None, False
                continue
            self._add_texts(chunk)

    def _read_from(self, position):
        """(epoch position, global document index, text) of this stream's documents from `position` on."""
        epoch = self.epoch
        for p in range(position, len(self.order), self.stride):
            i = self.order.index(epoch, p)
            yield p, i, self.source.get(i)

    def _no_text(self):
        """No document of this stream has text in this epoch (in storage order: ever)."""
        return all(not self.source.get(self.order.index(self.epoch, p)).strip()
                   for p in range(self.offset, len(self.order), self.stride))

    def _place(self, row, keep, placed, piece, room):
        """Put (the beginning of) `piece` into `row`; returns what is left of it, or None.
        `placed` gets (row offset, document index, epoch, first and end body position trained)."""
        tokens, n_masked = document_piece(piece.row, self.header_len, piece.body_start, self.context_tokens,
                                          max_len=room)
        new_start = piece.body_start + len(tokens) - n_masked
        placed.append((len(row) + n_masked, piece.doc_index, piece.epoch, piece.body_start, new_start))
        row.extend(tokens)
        keep.append(True)  # BOS: as a target it predicts the end of the document before it
        keep.extend([False] * (n_masked - 1))  # marker, context
        keep.extend([True] * (len(tokens) - n_masked))
        if self.header_len + new_start < len(piece.row):
            piece.body_start = new_start
            return piece
        return None

    def next_row(self, width):
        """(row, keep, placed): `width` tokens, whether each token may be a loss target, and where
        each document's trained text went: [(row position of its first new token, document index,
        epoch, body start, body end)] (what tests use to check that no token is lost).

        A document cut at the end of a row is carried into the start of the next row, so a long
        document is trained contiguously and its continuation always has a whole row of room."""
        row, keep, placed = [], [], []
        if self.carry is not None:
            piece, self.carry = self.carry, None
            self.carry = self._place(row, keep, placed, piece, width)
        while len(row) < width:
            self._refill()
            room = width - len(row)
            pos = bisect.bisect_right(self.lengths, room) - 1
            if pos >= 0:  # the longest document that fits whole
                self._place(row, keep, placed, self._pop(pos), room)
            elif room <= self.header_len:  # no room for text: pad (BOS ends the document before it)
                row.extend([self.spec.bos_id] * room)
                keep.extend([True] + [False] * (room - 1))
            else:  # nothing fits: the document waiting longest starts here and continues next row
                oldest = min(range(len(self.pieces)), key=lambda i: self.pieces[i].seq)
                self.carry = self._place(row, keep, placed, self._pop(oldest), room)
        return row, keep, placed

    def state_dict(self):
        pending = sorted(self.pieces, key=lambda p: p.seq)
        carry = self.carry and [self.carry.doc_index, self.carry.epoch, self.carry.body_start]
        return {"epoch": self.epoch, "cursor": self.cursor, "carry": carry,
                "pending": [[p.doc_index, p.epoch, p.body_start] for p in pending]}

    def load_state_dict(self, state):
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._iter = None
        self.lengths, self.pieces, self.buffered, self.carry = [], [], 0, None
        pending = [tuple(int(v) for v in p) for p in state["pending"]]
        for start in range(0, len(pending), self.batch_size):
            part = pending[start:start + self.batch_size]
            self._add_texts([(i, e, self.source.get(i)) for i, e, _ in part], [b for _, _, b in part])
        if state.get("carry"):
            i, e, b = (int(v) for v in state["carry"])
            self.carry = self._make_pieces([(i, e, self.source.get(i))], [b])[0]


class DirectionAwareLoader:
    """Iterator of (inputs, targets), each (B, T) int64 on `device`; see the module docstring.
    `shuffle` is off by default (a validation loader reads the stored order; base_train's --shuffle turns
    it on); `window_shards`, the shards permuted together, defaults to as many as fit in 256 MB."""

    def __init__(self, B, T, split, direction="forward", tokenizer_threads=4, tokenizer_batch_size=128,
                 device="cuda", seed=0, p_backward=0.5, tokenizer=None, rank=None, world_size=None,
                 grad_accum_steps=1, buffer_docs=256, buffer_tokens=None, context_tokens=None, data_dir=None,
                 resume_state=None, shuffle=False, window_shards=None):
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
        # Each epoch reads the documents in a fresh order drawn from (seed, epoch) (DocumentOrder);
        # the streams of a rank share the source, which holds the two windows of shards in use.
        source = DocumentSource(split, data_dir)
        self.shuffle = bool(shuffle)
        self.shuffle_window = int(window_shards or shuffle_window(source.shards))
        source.cache_shards = 2 * self.shuffle_window
        # Continuations carry up to T/8 tokens of preceding text (docs/DIRECTIONS.md); the packing
        # buffer is bounded in tokens as well as documents, so one giant document is held once.
        self.context_tokens = T // 8 if context_tokens is None else int(context_tokens)
        if self.context_tokens < 0:
            raise UserError(f"context_tokens={context_tokens} must be >= 0")
        buffer_tokens = buffer_docs * (T + 1) if buffer_tokens is None else int(buffer_tokens)
        n_streams = self.world_size * grad_accum_steps
        self.streams = [
            _Stream(source, DocumentOrder(source.row_counts, seed, self.shuffle, self.shuffle_window), n_streams,
                    self.rank * grad_accum_steps + a, self.spec, tokenizer,
                    tokenizer_threads, tokenizer_batch_size, buffer_docs, buffer_tokens, self.context_tokens)
            for a in range(grad_accum_steps)
        ]
        self.next_stream = 0
        self.last_placements = ()  # per row of the last batch: see _Stream.next_row
        if resume_state is not None:
            self.load_state_dict(resume_state)

    def __iter__(self):
        return self

    def __next__(self):
        stream = self.streams[self.next_stream]
        self.next_stream = (self.next_stream + 1) % len(self.streams)
        rows, keeps, self.last_placements = zip(*(stream.next_row(self.T + 1) for _ in range(self.B)))
        return to_batch(rows, keeps, self.device)

    def close(self):
        """Nothing runs in the background here (nanochat.prefetch.Prefetcher.close stops its worker)."""

    def state_dict(self):
        return {"direction": self.direction, "shuffle": self.shuffle, "shuffle_window": self.shuffle_window,
                "rank": self.rank, "world_size": self.world_size,
                "grad_accum_steps": self.grad_accum_steps, "next_stream": self.next_stream,
                "streams": [s.state_dict() for s in self.streams]}

    def load_state_dict(self, state):
        layout = (state["world_size"], state["grad_accum_steps"])
        if layout != (self.world_size, self.grad_accum_steps) or state["rank"] != self.rank:
            raise UserError(f"dataloader state was saved with world_size x grad_accum = {layout} on rank "
                            f"{state['rank']}; this run has {(self.world_size, self.grad_accum_steps)} on rank {self.rank}. "
                            "Resume with the same --total_batch_size, --device_batch_size and number of processes")
        # States saved before the shuffle existed read in storage order.
        order = (bool(state.get("shuffle", False)), int(state.get("shuffle_window", self.shuffle_window)))
        if order[0] != self.shuffle or (self.shuffle and order[1] != self.shuffle_window):
            raise UserError(f"dataloader state was saved with shuffle={int(order[0])} (window {order[1]} shards); "
                            f"this run has shuffle={int(self.shuffle)} (window {self.shuffle_window}). Resume with the same "
                            "--shuffle and the same shards")
        self.next_stream = int(state["next_stream"])
        for stream, s in zip(self.streams, state["streams"]):
            stream.load_state_dict(s)


direction_aware_dataloader = DirectionAwareLoader
