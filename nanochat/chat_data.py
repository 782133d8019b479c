"""Direction-aware conversation batches for midtraining (packed) and SFT (padded): each conversation
rendered with a per-token mask and oriented by nanochat.direction (the mask travels with its token);
targets are -1 where the mask is 0. Order, sharding and continuation of long conversations follow the
pretraining loader (docs/DIRECTIONS.md): no token is lost, and the global batch does not depend on the split.
"""

import torch

from nanochat.common import UserError
from nanochat.dataset import DocumentOrder
from nanochat.direction import DirectionSpec, document_piece
from nanochat.direction_dataloader import to_batch


class ConversationStream:
    """The examples at epoch positions p % stride == offset of a task, oriented, cycling over epochs."""

    def __init__(self, task, spec, tokenizer, stride, offset, train_on=None, max_len=None, order=None):
        if len(task) <= offset:
            raise ValueError(f"the task has {len(task)} examples, too few for {stride} data streams")
        self.task, self.spec, self.tokenizer = task, spec, tokenizer
        self.stride, self.offset, self.train_on, self.max_len = stride, offset, train_on, max_len
        self.order = order or DocumentOrder([len(task)], shuffle=False)
        self.cursor, self.epoch = offset, 0  # the next epoch position read
        self.carry = None  # (index, epoch, ids, mask, concrete, body_start) of a conversation cut at a row's end

    def _row(self, index, epoch):
        ids, mask, concrete = self.spec.conversation_row(self.tokenizer, self.task[index], doc_index=index,
                                                         train_on=self.train_on, epoch=epoch)
        if self.max_len is not None:
            ids, mask = ids[:self.max_len], mask[:self.max_len]
        return ids, mask, concrete

    def _advance(self):
        """(index, epoch) of the next example."""
        if self.cursor >= len(self.task):
            self.cursor, self.epoch = self.offset, self.epoch + 1
        index = self.order.index(self.epoch, self.cursor)
        self.cursor += self.stride
        return index, self.epoch

    def next_example(self):
        """(ids, mask, concrete_direction) of the next example (model orientation)."""
        return self._row(*self._advance())

    def next_piece(self, room, context_tokens):
        """(ids, mask, concrete) of at most `room` tokens: the rest of a conversation cut at the end
        of the previous row, else the next conversation; what does not fit is carried over."""
        if self.carry is None:
            index, epoch = self._advance()
            self.carry = (index, epoch, *self._row(index, epoch), 0)
        index, epoch, ids, mask, concrete, body_start = self.carry
        hl = self.spec.header_len
        piece, n_masked = document_piece(ids, hl, body_start, context_tokens, max_len=room)
        n_new = len(piece) - n_masked
        piece_mask = mask[:1] + [0] * (n_masked - 1) + mask[hl + body_start:hl + body_start + n_new]
        body_start += n_new
        self.carry = (index, epoch, ids, mask, concrete, body_start) if hl + body_start < len(ids) else None
        return piece, piece_mask, concrete

    def state_dict(self):
        carry = None if self.carry is None else [self.carry[0], self.carry[1], self.carry[5]]
        return {"cursor": self.cursor, "epoch": self.epoch, "carry": carry}

    def load_state_dict(self, state):
        self.cursor, self.epoch = int(state["cursor"]), int(state["epoch"])
        self.carry = None
        if state.get("carry"):
            index, epoch, body_start = (int(v) for v in state["carry"])
            self.carry = (index, epoch, *self._row(index, epoch), body_start)


class ConversationBatches:
    """Iterator of (inputs, targets), (B, T) each, for one rank. mode "pack" (midtraining):
    conversations packed into rows of T+1, an overflowing one continued in the next row behind its
    header and `context_tokens` (default T/8) of context; "pad" (SFT): one per row, cut to T+1,
    padded with masked BOS."""

    def __init__(self, task, tokenizer, direction, B, T, mode="pad", train_on=None, seed=0, p_backward=0.5,
                 rank=0, world_size=1, grad_accum_steps=1, device="cpu", context_tokens=None, shuffle=False):
        if mode not in ("pack", "pad"):
            raise ValueError(f"mode must be 'pack' or 'pad', not {mode!r}")
        self.B, self.T, self.mode, self.device = B, T, mode, torch.device(device)
        self.spec = DirectionSpec.from_tokenizer(direction, tokenizer, seed=seed, p_backward=p_backward)
        self.pad_id = tokenizer.get_bos_token_id()
        self.context_tokens = T // 8 if context_tokens is None else int(context_tokens)
        n = world_size * grad_accum_steps
        self.shuffle = bool(shuffle)
        self.streams = [ConversationStream(task, self.spec, tokenizer, n, rank * grad_accum_steps + a, train_on,
                                           max_len=T + 1 if mode == "pad" else None,
                                           order=DocumentOrder([len(task)], seed, self.shuffle, window=1))
                        for a in range(grad_accum_steps)]
        self.next_stream = 0
        self.last_directions = ()  # per row of the last batch: the concrete directions of its conversations

    def __iter__(self):
        return self

    def _pad_row(self, stream):
        ids, mask, concrete = stream.next_example()
        pad = self.T + 1 - len(ids)
        return ids + [self.pad_id] * pad, mask + [0] * pad, [concrete]

    def _pack_row(self, stream):
        ids, mask, dirs = [], [], []
        while len(ids) < self.T + 1:
            room = self.T + 1 - len(ids)
            if room <= self.spec.header_len:  # no room for text: pad (padding is never a target)
                ids += [self.pad_id] * room
                mask += [0] * room
                break
            e_ids, e_mask, concrete = stream.next_piece(room, self.context_tokens)
            ids += e_ids
            mask += e_mask
            dirs.append(concrete)
        return ids, mask, dirs

    def __next__(self):
        stream = self.streams[self.next_stream]
        self.next_stream = (self.next_stream + 1) % len(self.streams)
        make = self._pad_row if self.mode == "pad" else self._pack_row
        rows, masks, self.last_directions = zip(*(make(stream) for _ in range(self.B)))
        return to_batch(rows, masks, self.device)

    def state_dict(self):
        return {"shuffle": self.shuffle, "next_stream": self.next_stream,
                "streams": [s.state_dict() for s in self.streams]}

    def load_state_dict(self, state):
        if bool(state.get("shuffle", False)) != self.shuffle:  # states saved before the shuffle: task order
            saved = int(bool(state.get("shuffle")))
            raise UserError(f"the conversation batches' state was saved with shuffle={saved}; "
                            f"this run has shuffle={int(self.shuffle)}. Resume with the same --shuffle")
        self.next_stream = int(state["next_stream"])
        for s, st in zip(self.streams, state["streams"]):
            s.load_state_dict(st)
