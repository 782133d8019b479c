"""Direction: the one home for what forward, backward and bidirectional mean (docs/DESIGN.md §1-2).

Every other module asks this one to orient a token sequence (document, conversation, generation)
and to restore it; nobody else reverses tokens. A *trained* direction is one of DIRECTIONS; a
*concrete* one (of a row, an evaluation, a generation) is forward or backward, and a bidirectional
model draws one per document, written as a marker right after BOS. Documents are oriented one by
one *before* packing (docs/DIRECTIONS.md).
"""

from nanochat.common import UserError
from nanochat.conversation import TRAIN_ON_CHOICES, answer_context, question_context, render_conversation

DIRECTIONS = ("forward", "backward", "bidirectional")
CONCRETE_DIRECTIONS = ("forward", "backward")


def validate_direction(direction, allowed=DIRECTIONS):
    """Return `direction` if it is one of `allowed`, else raise a UserError naming them."""
    if direction not in allowed:
        raise UserError(f"unknown direction {direction!r}: must be one of {', '.join(allowed)}")
    return direction


def validate_p_backward(p_backward):
    try:
        p = float(p_backward)
    except (TypeError, ValueError):
        raise UserError(f"--p_backward={p_backward!r} is not a number in [0, 1]")
    if not 0.0 <= p <= 1.0:
        raise UserError(f"--p_backward={p_backward} is outside [0, 1]: it is the probability that a "
                        "bidirectional document is drawn backward")
    return p


def parse_directions(spec, allowed=CONCRETE_DIRECTIONS):
    """'forward,backward' -> ['forward', 'backward'], each validated."""
    names = [s.strip() for s in str(spec).split(",") if s.strip()]
    if not names:
        raise UserError(f"no direction given: use a comma list of {', '.join(allowed)}")
    return [validate_direction(n, allowed) for n in names]


def concrete_directions(trained_direction):
    """The directions a model trained in `trained_direction` generates and is scored in natively."""
    validate_direction(trained_direction)
    return list(CONCRETE_DIRECTIONS) if trained_direction == "bidirectional" else [trained_direction]


def is_two_way(trained_direction):
    """Whether the model reads and writes both ways (a marker after BOS, documents drawn with p_backward)."""
    return len(concrete_directions(trained_direction)) > 1


def default_generation_direction(trained_direction):
    """The direction generated when none is asked for: the model's own, forward for bidirectional."""
    validate_direction(trained_direction)
    return "forward" if trained_direction == "bidirectional" else trained_direction


def by_direction(concrete_direction, forward, backward):
    """`forward` or `backward`, whichever `concrete_direction` names; any other value is a UserError
    (unlike `a if d == "forward" else b`, which reads a misspelt direction as backward)."""
    return {"forward": forward, "backward": backward}[validate_direction(concrete_direction, CONCRETE_DIRECTIONS)]


def reverse_tokens(tokens, keep_bos=True):
    """Reverse a list, tuple, tensor or array (along its last axis); keep_bos keeps the first token
    in front: [BOS, a, b, c] -> [BOS, c, b, a]. Its own inverse."""
    k = 1 if keep_bos else 0
    if hasattr(tokens, "flip"):  # torch tensor
        import torch
        return torch.cat([tokens[..., :k], tokens[..., k:].flip(-1)], dim=-1)
    if hasattr(tokens, "ndim"):  # numpy array
        import numpy as np
        return np.concatenate([tokens[..., :k], tokens[..., k:][..., ::-1]], axis=-1)
    seq = list(tokens)
    return seq[:k] + seq[k:][::-1]


def orient_text_tokens(tokens, concrete_direction):
    """Orient bare text tokens (no special tokens) for a concrete direction."""
    validate_direction(concrete_direction, CONCRETE_DIRECTIONS)
    return list(tokens) if concrete_direction == "forward" else reverse_tokens(tokens, keep_bos=False)


def _splitmix64(x):
    # A small, well-mixed integer hash (SplitMix64 finaliser). Pure Python so the draw is the
    # same on every platform, rank and Python process: no RNG state is involved.
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def draw_direction(seed, doc_index, p_backward=0.5, epoch=0):
    """The bidirectional draw, 'backward' with probability p_backward: a pure function of (seed,
    epoch, global document index), the same on every rank and after a resume, fresh each epoch
    (docs/DESIGN.md §2). Epoch 0 keeps the draw of (seed, index) alone."""
    key = _splitmix64(int(seed) & 0xFFFFFFFFFFFFFFFF) ^ (int(doc_index) & 0xFFFFFFFFFFFFFFFF)
    if epoch:
        key = _splitmix64(key) ^ (int(epoch) & 0xFFFFFFFFFFFFFFFF)
    u = _splitmix64(key)
    return "backward" if (u >> 11) / float(1 << 53) < p_backward else "forward"


def document_piece(row, header_len, body_start, context_cap, max_len=None):
    """(tokens, n_masked) of the piece of an oriented document `row` that scores its text from
    `body_start` on: the header, up to `context_cap` tokens of preceding text as context (shrunk so
    that one new token fits in `max_len`), then the text, cut to `max_len`. Positions 1..n_masked-1
    are never targets (docs/DIRECTIONS.md, "Long documents")."""
    ctx = max(0, min(int(context_cap), body_start))
    if max_len is not None:
        if max_len <= header_len:
            raise ValueError(f"a piece of {max_len} tokens cannot hold the {header_len}-token header and text")
        ctx = min(ctx, max_len - header_len - 1)
    start = header_len + body_start - ctx
    end = len(row) if max_len is None else min(len(row), start + max_len - header_len)
    return row[:header_len] + row[start:end], header_len + ctx


# ---- conversations (docs/DESIGN.md §4; the chat template is nanochat/conversation.py) -------------

def default_train_on(concrete_direction):
    """Forward trains on the assistant; backward on the user (instruction backtranslation):
    reversed assistant tokens would teach answers conditioned on nothing."""
    return by_direction(concrete_direction, forward="assistant", backward="user")


def validate_train_on(train_on):
    if train_on not in (None, "auto") + TRAIN_ON_CHOICES:
        raise UserError(f"--train_on={train_on!r}: use auto (assistant forward, user backward), "
                        f"{', '.join(TRAIN_ON_CHOICES)}")
    return None if train_on == "auto" else train_on


def orient_conversation(ids, mask, concrete_direction, marker_id=None):
    """Orient a rendered conversation; each mask bit travels with its token. BOS stays first;
    a bidirectional marker (mask 0) goes right after it."""
    validate_direction(concrete_direction, CONCRETE_DIRECTIONS)
    if concrete_direction == "backward":
        ids, mask = reverse_tokens(ids, keep_bos=True), reverse_tokens(mask, keep_bos=True)
    ids, mask = list(ids), list(mask)
    if marker_id is not None:
        ids, mask = ids[:1] + [marker_id] + ids[1:], mask[:1] + [0] + mask[1:]
    return ids, mask


class DirectionSpec:
    """Everything needed to orient and restore documents for one trained direction; the marker ids
    (from the tokenizer) are only needed, and checked, for bidirectional."""

    def __init__(self, direction, bos_id, forward_id=None, backward_id=None, seed=0, p_backward=0.5):
        self.direction = validate_direction(direction)
        self.bos_id = int(bos_id)
        self.seed = int(seed)
        self.p_backward = validate_p_backward(p_backward)
        if self.direction == "bidirectional" and (forward_id is None or backward_id is None):
            raise UserError("bidirectional training needs a tokenizer with the <|forward|> and <|backward|> "
                            "marker tokens; retrain it with `python -m scripts.tok_train`")
        self.forward_id = None if forward_id is None else int(forward_id)
        self.backward_id = None if backward_id is None else int(backward_id)

    @classmethod
    def from_tokenizer(cls, direction, tokenizer, seed=0, p_backward=0.5):
        fwd = bwd = None
        if direction == "bidirectional":
            fwd, bwd = tokenizer.get_marker_ids()  # raises a UserError if the tokenizer lacks them
        return cls(direction, tokenizer.get_bos_token_id(), fwd, bwd, seed=seed, p_backward=p_backward)

    @property
    def marker_ids(self):
        return tuple(i for i in (self.forward_id, self.backward_id) if i is not None)

    def marker_for(self, concrete_direction):
        return by_direction(concrete_direction, forward=self.forward_id, backward=self.backward_id)

    @property
    def header_len(self):
        """Tokens before the text: BOS, plus the marker for bidirectional."""
        return 2 if self.direction == "bidirectional" else 1

    def concrete_direction_for(self, doc_index, epoch=0):
        if self.direction == "bidirectional":
            return draw_direction(self.seed, doc_index, self.p_backward, epoch=epoch)
        return self.direction

    def _resolve(self, doc_index, concrete_direction, epoch):
        """The forced concrete direction, else the draw for (doc_index, epoch)."""
        if concrete_direction is not None:
            return validate_direction(concrete_direction, CONCRETE_DIRECTIONS)
        if self.direction == "bidirectional" and doc_index is None:
            raise ValueError("bidirectional data needs doc_index (or a forced concrete_direction)")
        return self.concrete_direction_for(doc_index, epoch)

    def header(self, concrete_direction):
        if self.direction == "bidirectional":
            return [self.bos_id, self.marker_for(concrete_direction)]
        return [self.bos_id]

    def orient(self, tokens, doc_index=None, concrete_direction=None, epoch=0):
        """(row tokens, concrete direction) of one document's bare text tokens. A bidirectional
        document takes the draw for (doc_index, epoch) unless `concrete_direction` forces one; a
        one-way model may be forced the other way (the cross-direction cell): no marker then."""
        concrete = self._resolve(doc_index, concrete_direction, epoch)
        return self.header(concrete) + orient_text_tokens(tokens, concrete), concrete

    def _split_header(self, row):
        """(concrete direction, row without its marker) of an oriented row."""
        if not row or row[0] != self.bos_id:
            raise ValueError("an oriented document must start with BOS")
        if self.direction != "bidirectional":
            return self.direction, row
        if len(row) < 2 or row[1] not in (self.forward_id, self.backward_id):
            raise ValueError("a bidirectional document must have a direction marker after BOS")
        return ("forward" if row[1] == self.forward_id else "backward"), row[:1] + row[2:]

    def restore(self, row_tokens):
        """Inverse of orient: (bare text tokens in reading order, concrete direction)."""
        concrete, row = self._split_header(list(row_tokens))
        return orient_text_tokens(row[1:], concrete), concrete

    def generation_prompt(self, given_tokens, concrete_direction):
        """The model-side prompt (docs/DESIGN.md §5): forward continues the given beginning;
        backward is given an *ending* and writes what precedes it."""
        return self.header(concrete_direction) + orient_text_tokens(given_tokens, concrete_direction)

    def restore_generation(self, generated_tokens, concrete_direction):
        """Generated tokens in reading order (for display, scoring and rewards)."""
        return orient_text_tokens(generated_tokens, concrete_direction)

    @staticmethod
    def join_in_reading_order(given_tokens, restored_generation, concrete_direction):
        """The full text's tokens: given + generated forward, generated + given backward."""
        given, generated = list(given_tokens), list(restored_generation)
        return by_direction(concrete_direction, forward=given + generated, backward=generated + given)

    def position_directions(self, row):
        """The concrete direction of the document each position of a packed row belongs to."""
        out, current = [], self.default_generation_direction()
        row = list(row)
        for i, tok in enumerate(row):
            if self.direction == "bidirectional" and tok == self.bos_id and i + 1 < len(row):
                current = "backward" if row[i + 1] == self.backward_id else "forward"
            out.append(current)
        return out

    # ---- conversations -----------------------------------------------------------------------
    def conversation_row(self, tokenizer, conversation, doc_index=None, concrete_direction=None, train_on=None,
                         epoch=0):
        """(ids, mask, concrete_direction) of one training conversation in model orientation.
        train_on None = the per-direction default (bidirectional: the policy of each draw)."""
        concrete = self._resolve(doc_index, concrete_direction, epoch)
        closing = by_direction(concrete, forward="end", backward="start")
        ids, mask = render_conversation(tokenizer, conversation, train_on=train_on or default_train_on(concrete),
                                        closing=closing)
        marker = self.marker_for(concrete) if self.direction == "bidirectional" else None
        return (*orient_conversation(ids, mask, concrete, marker), concrete)

    def restore_conversation(self, ids, mask=None):
        """Inverse of conversation_row: (ids, mask, concrete) in reading order without the marker."""
        mask = list(mask) if mask is not None else [0] * len(ids)
        concrete, ids = self._split_header(list(ids))
        if self.direction == "bidirectional":
            mask = mask[:1] + mask[2:]
        return (*orient_conversation(ids, mask, concrete), concrete)  # reversal is its own inverse

    def chat_prompt(self, tokenizer, conversation, concrete_direction):
        """(prompt ids, stop ids) for generating one turn of a conversation: forward writes the next
        answer, backward the question before the first answer (docs/DIRECTIONS.md, "Chat")."""
        self.generation_direction(concrete_direction)
        bos = tokenizer.get_bos_token_id()
        if concrete_direction == "forward":
            context, stop = answer_context(tokenizer, conversation)
            return self.header("forward") + context, [stop, bos]
        # Reading order: [BOS] <|user_start|> (written) <|user_end|> later...; the model's row is
        # [BOS] + reversed(everything after BOS), so the prompt is header + reversed(later) + <|user_end|>.
        later, slot_end, slot_start = question_context(tokenizer, conversation)
        return self.header("backward") + reverse_tokens(later, keep_bos=False) + [slot_end], [slot_start, bos]

    # ---- policy: what this model can do, asked here instead of re-derived by callers ----------
    def generation_directions(self):
        return concrete_directions(self.direction)

    def default_generation_direction(self):
        return default_generation_direction(self.direction)

    def generation_direction(self, requested=None):
        """`requested` (or the default) if this model can generate it, else one clear UserError."""
        concrete = self.default_generation_direction() if requested is None else requested
        validate_direction(concrete, CONCRETE_DIRECTIONS)
        if concrete not in self.generation_directions():
            raise UserError(f"this model was trained {self.direction}: it cannot generate {concrete} "
                            "(only a bidirectional model does both)")
        return concrete

    # ---- checkpoint metadata: the direction goes in and out as one thing ------------------------
    def to_meta(self):
        """What a checkpoint records about how this model's data was oriented (meta["direction_spec"])."""
        return {
            "direction": self.direction,
            "bos_id": self.bos_id,
            "forward_marker_id": self.forward_id,
            "backward_marker_id": self.backward_id,
            "p_backward": self.p_backward if is_two_way(self.direction) else None,
            "seed": self.seed,
        }

    @classmethod
    def for_model(cls, meta, tokenizer):
        """The spec of a loaded model: from the checkpoint metadata that records it, else from a bare
        {"direction": name} and the tokenizer's ids; no direction at all is a forward model."""
        meta = meta or {}
        if meta.get("direction_spec") or meta.get("bos_id") is not None:
            return cls.from_meta(meta)
        return cls.from_tokenizer(meta.get("direction", "forward"), tokenizer)

    @classmethod
    def from_meta(cls, meta):
        """The spec a checkpoint's metadata describes: its "direction_spec", or the older separate
        "direction" / "bos_id" / "marker_ids" fields."""
        spec = meta.get("direction_spec") or {}
        direction = spec.get("direction", meta.get("direction"))
        if direction is None:
            raise UserError("checkpoint metadata has no direction; it was not written by this project")
        markers = meta.get("marker_ids") or {}
        bos = spec.get("bos_id", meta.get("bos_id"))
        if bos is None:
            raise UserError("checkpoint metadata has no BOS id; it was not written by this project")
        return cls(direction, bos, spec.get("forward_marker_id", markers.get("forward")),
                   spec.get("backward_marker_id", markers.get("backward")),
                   seed=spec.get("seed") or 0,
                   p_backward=spec.get("p_backward") if spec.get("p_backward") is not None else 0.5)


def reverse_text(text):
    """The characters (code points) of `text` reversed: only for the tokenizer control of
    docs/DESIGN.md §2 (`scripts.tok_train --train_direction`); models reverse token ids."""
    return text[::-1]
