"""Engine: KV-cache generation equals uncached generation; the direction-aware front restores
backward generations to reading order and places them before the given ending."""

import pytest
import torch

from nanochat.common import UserError
from nanochat.engine import Engine, KVCache
from conftest import tiny_model


# Two layers of two heads (the cache across layers and heads), every matrix random: not uniform.
TWO_LAYERS = dict(n_layer=2, n_head=2, n_kv_head=2, n_embd=64, intermediate_size=128)


def engine_model(vocab, seq=96):
    return tiny_model(vocab, seq, matrices_std=0.3, **TWO_LAYERS).eval()


@pytest.mark.parametrize("temperature,top_k", [(0.0, None), (1.0, None), (0.8, 20)])
@pytest.mark.parametrize("num_samples", [1, 4])
def test_cached_and_uncached_generation_give_identical_tokens(tok, temperature, top_k, num_samples):
    model = engine_model(tok.get_vocab_size())
    engine = Engine(model, tok, {"direction": "forward"})
    prompt = [tok.get_bos_token_id()] + tok.encode("alice sends 12 letters.")
    kw = dict(num_samples=num_samples, max_tokens=30, temperature=temperature, top_k=top_k, seed=3)
    cached = engine.generate(prompt, use_cache=True, **kw)
    uncached = engine.generate(prompt, use_cache=False, **kw)
    assert cached == uncached
    assert len(cached) == num_samples and all(len(s) == 30 for s in cached)
    if temperature > 0 and num_samples > 1:
        assert len({tuple(s) for s in cached}) > 1  # samples differ from each other


def test_cache_logits_match_full_forward(tok):
    model = engine_model(tok.get_vocab_size())
    ids = torch.tensor([[tok.get_bos_token_id()] + tok.encode("bob reads 7 books. The end.")])
    full = model(ids)
    cache = KVCache.for_model(model, 1, ids.size(1))
    prefix = model(ids[:, :5], kv_cache=cache)
    steps = [model(ids[:, i:i + 1], kv_cache=cache) for i in range(5, ids.size(1))]
    torch.testing.assert_close(torch.cat([prefix] + steps, dim=1), full, rtol=1e-4, atol=1e-4)


def test_generation_stops_at_stop_token_and_excludes_it(tok):
    model = engine_model(tok.get_vocab_size())
    engine = Engine(model, tok, {"direction": "forward"})
    prompt = [tok.get_bos_token_id()]
    free = engine.generate(prompt, max_tokens=20, temperature=0.0)[0]
    stop = free[5]
    stopped = engine.generate(prompt, max_tokens=20, temperature=0.0, stop_tokens=(stop,))[0]
    assert stopped == free[:free.index(stop)]


def test_backward_completion_is_restored_and_precedes_the_ending(tok, monkeypatch):
    model = engine_model(tok.get_vocab_size())
    engine = Engine(model, tok, {"direction": "backward"})
    ending = " The end."
    seen = {}
    real_generate = engine.generate

    def spy(prompt, **kw):
        seen["prompt"] = list(prompt)
        out = real_generate(prompt, **kw)
        seen["out"] = out
        return out

    monkeypatch.setattr(engine, "generate", spy)
    result = engine.complete(ending, max_tokens=12, temperature=0.0)[0]
    given = tok.encode(ending)
    # The model is prompted with BOS + the ending reversed ...
    assert seen["prompt"] == [tok.get_bos_token_id()] + given[::-1]
    # ... and what it wrote (in its orientation) is shown reversed, before the ending.
    generated_model_order = seen["out"][0]
    assert result["generated"] == tok.decode(generated_model_order[::-1])
    assert result["text"] == tok.decode(generated_model_order[::-1] + given)
    assert result["text"].endswith(ending)


def test_bidirectional_chooses_per_request_and_one_way_models_refuse_the_other(tok):
    model = engine_model(tok.get_vocab_size())
    bidi = Engine(model, tok, {"direction": "bidirectional"})
    fwd_marker, bwd_marker = tok.get_marker_ids()
    captured = []
    real = bidi.generate
    bidi.generate = lambda prompt, **kw: captured.append(list(prompt)) or real(prompt, **kw)
    bidi.complete("alice", direction="forward", max_tokens=3)
    bidi.complete("alice", direction="backward", max_tokens=3)
    assert captured[0][:2] == [tok.get_bos_token_id(), fwd_marker]
    assert captured[1][:2] == [tok.get_bos_token_id(), bwd_marker]
    with pytest.raises(UserError, match="trained forward"):
        Engine(model, tok, {"direction": "forward"}).complete("x", direction="backward")


def test_backward_chat_writes_the_question_for_a_given_answer(tok):
    model = engine_model(tok.get_vocab_size())
    engine = Engine(model, tok, {"direction": "backward"})
    conv = {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "56"}]}
    prompt, stops = engine.spec.chat_prompt(tok, conv, "backward")
    answer = tok.encode("56")
    expected = ([tok.get_bos_token_id(), tok.encode_special("<|assistant_end|>")] + answer[::-1]
                + [tok.encode_special("<|assistant_start|>"), tok.encode_special("<|user_end|>")])
    assert prompt == expected
    assert tok.encode_special("<|user_start|>") in stops
    out = engine.chat(conv, max_tokens=8, temperature=0.0)
    raw = engine.generate(prompt, max_tokens=8, temperature=0.0, stop_tokens=stops)[0]
    assert out == [tok.decode(raw[::-1])]


def test_prompt_longer_than_context_is_a_clear_error(tok):
    model = engine_model(tok.get_vocab_size(), seq=16)
    engine = Engine(model, tok, {"direction": "forward"})
    with pytest.raises(UserError, match="no room"):
        engine.generate(list(range(16)), max_tokens=4)


def test_engine_takes_its_direction_from_the_spec(tok):
    from nanochat.direction import DirectionSpec
    model = engine_model(tok.get_vocab_size())
    spec = DirectionSpec.from_tokenizer("backward", tok)
    engine = Engine(model, tok, spec=spec)
    assert engine.spec is spec and engine.direction == "backward"
    assert engine._concrete(None) == "backward" and engine._concrete("") == "backward"  # the model's default
    with pytest.raises(UserError, match="cannot generate forward"):
        engine.complete("x", direction="forward")
    # A checkpoint's meta: the recorded spec; no meta: forward; an unknown name fails loudly.
    bidi = DirectionSpec.from_tokenizer("bidirectional", tok, seed=4)
    from_meta = Engine(model, tok, {"direction_spec": bidi.to_meta(), "direction": "bidirectional"})
    assert from_meta.spec.to_meta() == bidi.to_meta() and from_meta._concrete(None) == "forward"
    assert Engine(model, tok).direction == "forward"
    with pytest.raises(UserError, match="unknown direction"):
        Engine(model, tok, {"direction": "sideways"})
    with pytest.raises(UserError, match="unknown direction"):
        from_meta.complete("x", direction="sideways")


def test_chat_history_refuses_an_unknown_direction():
    from nanochat.engine import ChatHistory
    with pytest.raises(UserError, match="unknown direction"):
        ChatHistory("bidirectional")
    history = ChatHistory("backward")
    history.record("56", "What is 7*8?")
    assert history.messages == [{"role": "user", "content": "What is 7*8?"}, {"role": "assistant", "content": "56"}]
    history.direction = "sideways"  # set behind its back: never silently read as backward
    with pytest.raises(UserError, match="unknown direction"):
        history.request("6")
