"""Inference: KV-cache generation with batched sampling, and a direction-aware front.

The model always generates left to right over its own orientation; `Engine.complete` and
`Engine.chat` turn the user's view into that orientation and back (docs/DESIGN.md §5): a backward
model is given an *ending* and writes what precedes it. The `*_stream` methods yield as tokens
arrive, drawing the same random numbers as `generate`. `ChatHistory` keeps a multi-turn chat in
reading order (forward appends exchanges, backward prepends them).
"""

from itertools import takewhile

import torch
import torch.nn.functional as F

from nanochat.common import UserError, check_number
from nanochat.direction import CONCRETE_DIRECTIONS, DirectionSpec, by_direction, validate_direction


class KVCache:
    """Keys and values of every layer for a batch, filled left to right: the model calls update()
    from each attention layer and advance(T) once per forward; `position` is the next tokens' place."""

    def __init__(self, n_layers, batch_size, n_kv_head, head_dim, max_len, device, dtype):
        shape = (n_layers, batch_size, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.position = 0
        self.max_len = max_len

    @classmethod
    def for_model(cls, model, batch_size, max_len):
        c = model.config
        w = model.lm_head.weight
        return cls(c.n_layer, batch_size, c.n_kv_head, c.head_dim, max_len, w.device, w.dtype)

    def update(self, layer_idx, k, v):
        T = k.size(2)
        end = self.position + T
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} > {self.max_len}")
        self.k[layer_idx, :, :, self.position:end] = k
        self.v[layer_idx, :, :, self.position:end] = v
        return self.k[layer_idx, :, :, :end], self.v[layer_idx, :, :, :end]

    def advance(self, T):
        self.position += T

    def expand(self, batch_size):
        """Replicate a batch-1 cache (a shared prompt) to batch_size rows."""
        self.k = self.k.expand(-1, batch_size, -1, -1, -1).contiguous()
        self.v = self.v.expand(-1, batch_size, -1, -1, -1).contiguous()


def sample_next(logits, generator, temperature=1.0, top_k=None):
    """(B, V) logits -> (B, 1) token ids; temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    if top_k is not None and top_k > 0:
        values, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = logits.masked_fill(logits < values[:, -1:], float("-inf"))
    probs = F.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


class Engine:
    """Generation for one model, whose DirectionSpec (`spec`, or from the checkpoint's `meta`;
    neither: forward) decides which directions it may generate and what a request without one gets."""

    def __init__(self, model, tokenizer, meta=None, spec=None):
        self.model, self.tokenizer = model, tokenizer
        self.spec = spec if spec is not None else DirectionSpec.for_model(meta, tokenizer)

    @property
    def direction(self):  # the direction the model was trained in
        return self.spec.direction

    @property
    def device(self):
        return self.model.lm_head.weight.device

    def _room(self, prompt, max_tokens):
        limit = self.model.config.sequence_len
        max_tokens = min(max_tokens, limit - len(prompt))
        if max_tokens <= 0:
            raise UserError(f"the prompt has {len(prompt)} tokens: no room left in the model's {limit}-token context")
        return max_tokens

    def _steps(self, prompt, num_samples, max_tokens, temperature, top_k, seed, stop_tokens, use_cache):
        """Yield (num_samples, 1) sampled ids until every row has hit a stop token or max_tokens are
        drawn: the one sampling loop behind generate() and stream()."""
        # The entry points check their flags before loading (common.check_sampling); this keeps a
        # library caller's NaN from becoming a torch.multinomial error.
        check_number("temperature", temperature, low=0.0)
        if top_k is not None:
            check_number("top_k", top_k, low=0, integer=True)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        stops = torch.tensor(sorted(set(stop_tokens)) or [-1], device=self.device)
        ids = torch.tensor([prompt], dtype=torch.long, device=self.device)
        done = torch.zeros(num_samples, dtype=torch.bool, device=self.device)
        if use_cache:
            cache = KVCache.for_model(self.model, 1, len(prompt) + max_tokens)
            logits = self.model(ids, kv_cache=cache)[:, -1, :]
            cache.expand(num_samples)
            logits = logits.expand(num_samples, -1)
        else:
            ids = ids.expand(num_samples, -1)
            logits = self.model(ids)[:, -1, :]
        for step in range(max_tokens):
            next_ids = sample_next(logits, generator, temperature, top_k)
            done = done | torch.isin(next_ids.squeeze(1), stops)
            yield next_ids
            if bool(done.all()) or step + 1 == max_tokens:
                return
            if use_cache:
                logits = self.model(next_ids, kv_cache=cache)[:, -1, :]
            else:
                ids = torch.cat([ids, next_ids], dim=1)
                logits = self.model(ids)[:, -1, :]

    @torch.inference_mode()
    def generate(self, prompt, num_samples=1, max_tokens=64, temperature=1.0, top_k=None, seed=42,
                 stop_tokens=(), use_cache=True):
        """`num_samples` continuations (token lists without their stop token) of one prompt, in model
        orientation; the cached and uncached paths return the same tokens for the same seed."""
        prompt = list(prompt)
        max_tokens = self._room(prompt, max_tokens)
        steps = list(self._steps(prompt, num_samples, max_tokens, temperature, top_k, seed, stop_tokens, use_cache))
        out = torch.cat(steps, dim=1) if steps else torch.empty((num_samples, 0), dtype=torch.long)
        stop_set = set(stop_tokens)
        return [list(takewhile(lambda t: t not in stop_set, row)) for row in out.tolist()]

    def stream(self, prompt, max_tokens=64, temperature=1.0, top_k=None, seed=42, stop_tokens=()):
        """One sample, token by token (model orientation), stopping before a stop token: the tokens
        of generate(num_samples=1) for the same seed."""
        from nanochat.training import autocast_context  # lazy: training imports more than the engine needs
        prompt = list(prompt)
        max_tokens = self._room(prompt, max_tokens)
        stop_set = set(stop_tokens)
        steps = self._steps(prompt, 1, max_tokens, temperature, top_k, seed, stop_tokens, True)
        while True:
            # Contexts per step: the consumer (the web server) may resume us from another thread.
            with torch.inference_mode(), autocast_context(self.device.type):
                next_ids = next(steps, None)
            if next_ids is None:
                return
            token = int(next_ids[0, 0])
            if token in stop_set:
                return
            yield token

    def _concrete(self, direction):
        # None (or "") asks for the model's default direction; the spec refuses what it cannot do.
        return self.spec.generation_direction(direction or None)

    def complete(self, given_text, direction=None, **sampling):
        """Continue a beginning (forward) or write what precedes an ending (backward): one dict per
        sample, 'generated' (the new text) and 'text' (the whole text), both in reading order."""
        direction = self._concrete(direction)
        given = self.tokenizer.encode(given_text)
        prompt = self.spec.generation_prompt(given, direction)
        sampling.setdefault("stop_tokens", (self.tokenizer.get_bos_token_id(),))
        results = []
        for generated in self.generate(prompt, **sampling):
            restored = self.spec.restore_generation(generated, direction)
            full = self.spec.join_in_reading_order(given, restored, direction)
            results.append({"generated": self.tokenizer.decode(restored), "text": self.tokenizer.decode(full),
                            "direction": direction})
        return results

    def chat(self, conversation, direction=None, **sampling):
        """Forward: the assistant's answer to the last user turn; backward: the user's question to
        the assistant's answer (the last message). One string per sample, in reading order."""
        direction = self._concrete(direction)
        prompt, stops = self.spec.chat_prompt(self.tokenizer, conversation, direction)
        sampling.setdefault("stop_tokens", stops)
        return [self.tokenizer.decode(self.spec.restore_generation(g, direction)) for g in self.generate(prompt, **sampling)]

    # ---- streaming fronts (the web page and the CLI) -------------------------------------------
    def _stream_text(self, prompt, direction, stops, **sampling):
        """The whole generated text so far, in reading order, after every token (backward text
        grows at its front)."""
        tokens = []
        for token in self.stream(prompt, stop_tokens=stops, **sampling):
            tokens.append(token)
            yield self.tokenizer.decode(self.spec.restore_generation(tokens, direction))

    def complete_stream(self, given_text, direction=None, **sampling):
        """Streaming Engine.complete for one sample: yields the generated text so far (reading order)."""
        direction = self._concrete(direction)
        prompt = self.spec.generation_prompt(self.tokenizer.encode(given_text), direction)
        return self._stream_text(prompt, direction, (self.tokenizer.get_bos_token_id(),), **sampling)

    def chat_stream(self, conversation, direction=None, **sampling):
        """Streaming Engine.chat for one sample: yields the generated turn so far (reading order)."""
        direction = self._concrete(direction)
        prompt, stops = self.spec.chat_prompt(self.tokenizer, conversation, direction)
        return self._stream_text(prompt, direction, stops, **sampling)

    def chat_prompt_len(self, conversation, direction):
        return len(self.spec.chat_prompt(self.tokenizer, conversation, self._concrete(direction))[0])


class ChatHistory:
    """A multi-turn chat in one concrete direction, `messages` in reading order (docs/DESIGN.md §5):
    forward, the user asks and exchanges are appended; backward, the user types an *answer*, the model
    writes the question, and exchanges are prepended. The CLI and the web page build requests here."""

    def __init__(self, direction, messages=()):
        self.direction = validate_direction(direction, CONCRETE_DIRECTIONS)
        self.messages = [{"role": m["role"], "content": m["content"]} for m in messages]

    def request(self, text):
        """The conversation handed to Engine.chat for the user's new `text`."""
        return by_direction(self.direction, forward={"messages": self.messages + [{"role": "user", "content": text}]},
                            backward={"messages": [{"role": "assistant", "content": text}] + self.messages})

    def record(self, text, generated):
        """Keep the finished exchange, user then assistant: forward, the user asked `text` and the model
        answered; backward, the user gave the answer `text` and the model wrote the question."""
        asked = [{"role": "user", "content": text}, {"role": "assistant", "content": generated}]
        answered = [{"role": "user", "content": generated}, {"role": "assistant", "content": text}]
        self.messages = by_direction(self.direction, forward=self.messages + asked, backward=answered + self.messages)

    def fit(self, engine, text, room):
        """Drop the exchanges farthest from the new turn until the prompt leaves `room` tokens in the
        context; returns how many. A text too long alone: UserError."""
        dropped = 0
        limit = engine.model.config.sequence_len
        while True:
            if engine.chat_prompt_len(self.request(text), self.direction) + room <= limit:
                return dropped
            if not self.messages:
                raise UserError(f"the message is too long for the model's {limit}-token context "
                                f"(with {room} tokens to generate); shorten it")
            self.messages = by_direction(self.direction, forward=self.messages[2:], backward=self.messages[:-2])
            dropped += 1
