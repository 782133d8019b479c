"""Inference: KV-cache generation with batched sampling, and a direction-aware front.

The model always generates left to right over its own orientation (docs/DESIGN.md §5). The
front (`Engine.complete`, `Engine.chat`) turns the user's view into that orientation and back:
- forward: the given text is a beginning; the model continues it.
- backward: the given text is an *ending*; the model writes what precedes it, and the result is
  restored to reading order and placed before the ending.
- bidirectional: either, chosen per request (the marker after BOS tells the model which).
"""

import torch
import torch.nn.functional as F

from nanochat.common import UserError
from nanochat.direction import CONCRETE_DIRECTIONS, DirectionSpec, validate_direction


class KVCache:
    """Keys and values of every layer for a batch, filled left to right.

    The model calls update(layer, k, v) from each attention layer and advance(T) once per
    forward; `position` is where the next tokens go (and their rotary offset)."""

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
    def __init__(self, model, tokenizer, meta=None):
        self.model, self.tokenizer = model, tokenizer
        self.direction = (meta or {}).get("direction", "forward")
        self.spec = DirectionSpec.from_tokenizer(self.direction, tokenizer)

    @property
    def device(self):
        return self.model.lm_head.weight.device

    @torch.inference_mode()
    def generate(self, prompt, num_samples=1, max_tokens=64, temperature=1.0, top_k=None, seed=42,
                 stop_tokens=(), use_cache=True):
        """Sample `num_samples` continuations of one prompt (model orientation). Returns a list of
        token lists, each without its stop token. Cached and uncached paths draw the same random
        numbers in the same order, so with the same seed they return the same tokens."""
        prompt = list(prompt)
        limit = self.model.config.sequence_len
        max_tokens = min(max_tokens, limit - len(prompt))
        if max_tokens <= 0:
            raise UserError(f"the prompt has {len(prompt)} tokens: no room left in the model's {limit}-token context")
        generator = torch.Generator(device=self.device).manual_seed(seed)
        stops = torch.tensor(sorted(set(stop_tokens)) or [-1], device=self.device)
        ids = torch.tensor([prompt], dtype=torch.long, device=self.device)
        out = torch.empty((num_samples, 0), dtype=torch.long, device=self.device)
        done = torch.zeros(num_samples, dtype=torch.bool, device=self.device)
        if use_cache:
            cache = KVCache.for_model(self.model, 1, len(prompt) + max_tokens)
            logits = self.model(ids, kv_cache=cache)[:, -1, :]
            cache.expand(num_samples)
            logits = logits.expand(num_samples, -1)
        else:
            ids = ids.expand(num_samples, -1)
            logits = self.model(ids)[:, -1, :]
        for _ in range(max_tokens):
            next_ids = sample_next(logits, generator, temperature, top_k)
            done = done | torch.isin(next_ids.squeeze(1), stops)
            out = torch.cat([out, next_ids], dim=1)
            if bool(done.all()) or out.size(1) == max_tokens:
                break
            if use_cache:
                logits = self.model(next_ids, kv_cache=cache)[:, -1, :]
            else:
                ids = torch.cat([ids, next_ids], dim=1)
                logits = self.model(ids)[:, -1, :]
        results = []
        stop_set = set(stop_tokens)
        for row in out.tolist():
            cut = next((i for i, t in enumerate(row) if t in stop_set), len(row))
            results.append(row[:cut])
        return results

    def _concrete(self, direction):
        direction = direction or (self.direction if self.direction != "bidirectional" else "forward")
        validate_direction(direction, CONCRETE_DIRECTIONS)
        if self.direction != "bidirectional" and direction != self.direction:
            raise UserError(f"this model was trained {self.direction}: it cannot generate {direction} "
                            "(only bidirectional models do both)")
        return direction

    def complete(self, given_text, direction=None, **kwargs):
        """Continue a beginning (forward) or write what precedes an ending (backward).

        Returns a list (one per sample) of dicts: 'generated' (the new text, reading order) and
        'text' (the whole text in reading order)."""
        direction = self._concrete(direction)
        given = self.tokenizer.encode(given_text)
        prompt = self.spec.generation_prompt(given, direction)
        kwargs.setdefault("stop_tokens", (self.tokenizer.get_bos_token_id(),))
        results = []
        for generated in self.generate(prompt, **kwargs):
            restored = self.spec.restore_generation(generated, direction)
            full = self.spec.join_in_reading_order(given, restored, direction)
            results.append({"generated": self.tokenizer.decode(restored), "text": self.tokenizer.decode(full),
                            "direction": direction})
        return results

    def chat(self, conversation, direction=None, **kwargs):
        """Forward: write the assistant's answer to the last user turn. Backward: given the
        assistant's answer (last message), write the user's question. Returns a list of strings
        (one per sample) in reading order."""
        direction = self._concrete(direction)
        prompt, stops = self.spec.chat_prompt(self.tokenizer, conversation, direction)
        kwargs.setdefault("stop_tokens", stops)
        return [self.tokenizer.decode(self.spec.restore_generation(g, direction)) for g in self.generate(prompt, **kwargs)]
