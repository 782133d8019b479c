"""Tests for nanochat.tokenizer: round trips, special tokens, byte table, persistence."""

import os

import numpy as np
import pytest

from nanochat.common import UserError
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer, get_token_bytes, get_tokenizer, tokenizer_dir

SAMPLES = [
    "Story 1: alice sends 3 letters. The end.",
    "héllo wörld — ✓ naïve café 日本語 🙂",
    "def reverse(xs):\n    return xs[::-1]  # slice\n\n\tif a != b: pass\r\n",
    "",
    "   leading and trailing spaces   ",
]


@pytest.fixture(scope="module")
def tok(corpus_template):
    return get_tokenizer(corpus_template["dir"])


@pytest.mark.parametrize("text", SAMPLES)
def test_encode_decode_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(isinstance(i, int) for i in ids)
    assert tok.decode(ids) == text


def test_batch_encode_equals_single(tok):
    batch = tok.encode(SAMPLES)
    assert batch == [tok.encode(t) for t in SAMPLES]
    assert tok.encode(SAMPLES, prepend="<|bos|>") == [tok.encode(t, prepend="<|bos|>") for t in SAMPLES]


def test_encode_rejects_other_types(tok):
    with pytest.raises(TypeError):
        tok.encode(42)


def test_prepend_and_append_by_name_and_id(tok):
    text = "alice reads 5 books."
    bare = tok.encode(text)
    bos = tok.get_bos_token_id()
    end = tok.encode_special("<|assistant_end|>")
    assert tok.encode(text, prepend="<|bos|>") == [bos] + bare
    assert tok.encode(text, prepend=bos) == [bos] + bare
    assert tok.encode(text, append="<|assistant_end|>") == bare + [end]
    assert tok.encode(text, prepend=bos, append=end) == [bos] + bare + [end]
    assert tok.encode([text, text], append=end) == [bare + [end]] * 2


def test_unknown_special_token_is_user_error(tok):
    with pytest.raises(UserError) as e:
        tok.encode_special("<|nope|>")
    assert "<|bos|>" in str(e.value)


def test_special_tokens_present_and_distinct(tok):
    assert set(SPECIAL_TOKENS) >= {"<|bos|>", "<|forward|>", "<|backward|>"}
    assert tok.get_special_tokens() == set(SPECIAL_TOKENS)
    ids = [tok.encode_special(name) for name in SPECIAL_TOKENS]
    assert len(set(ids)) == len(SPECIAL_TOKENS)
    assert all(0 <= i < tok.get_vocab_size() for i in ids)
    # distinct from every ordinary (merge) token
    assert not set(ids) & set(tok.mergeable_ranks.values())
    assert tok.get_vocab_size() == 384
    assert tok.has_direction_markers()
    fwd, bwd = tok.get_marker_ids()
    assert (fwd, bwd) == (tok.encode_special("<|forward|>"), tok.encode_special("<|backward|>"))
    assert tok.get_forward_token_id() == fwd and tok.get_backward_token_id() == bwd


def test_special_spellings_in_text_are_ordinary_text(tok):
    text = "a <|bos|> b <|forward|> c <|backward|>"
    ids = tok.encode(text)
    specials = {tok.encode_special(n) for n in SPECIAL_TOKENS}
    assert not specials & set(ids)
    assert tok.decode(ids) == text


def test_token_byte_lengths(tok):
    lengths = tok.token_byte_lengths()
    assert lengths.shape == (tok.get_vocab_size(),)
    for name in SPECIAL_TOKENS:
        assert lengths[tok.encode_special(name)] == 0
    assert (lengths[list(tok.mergeable_ranks.values())] > 0).all()
    for text in SAMPLES:
        ids = tok.encode(text)
        assert int(lengths[ids].sum()) == len(text.encode("utf-8"))


def test_get_token_bytes_matches_table(tok, corpus_template):
    tb = get_token_bytes(base_dir=corpus_template["dir"])
    np.testing.assert_array_equal(tb.numpy(), tok.token_byte_lengths())


def test_save_load_round_trip(tok, tmp_path):
    d = str(tmp_path / "tok")
    tok.save(d)
    assert sorted(os.listdir(d)) == ["ranks.tiktoken", "token_bytes.npy", "tokenizer.json"]  # no tmp files
    loaded = Tokenizer.load(d)
    assert loaded.special_tokens == tok.special_tokens
    assert loaded.get_vocab_size() == tok.get_vocab_size()
    for text in SAMPLES:
        assert loaded.encode(text) == tok.encode(text)
    np.testing.assert_array_equal(np.load(os.path.join(d, "token_bytes.npy")), tok.token_byte_lengths())


def test_train_gives_requested_vocab_with_specials_last(corpus_template):
    tok = Tokenizer.train_from_iterator(iter(corpus_template["train"][:200]), 300)
    assert tok.get_vocab_size() == 300
    assert tok.decode(tok.encode("alice sends 3 books")) == "alice sends 3 books"
    assert tok.has_direction_markers()
    assert sorted(tok.special_tokens.values()) == list(range(300 - len(SPECIAL_TOKENS), 300))


def test_vocab_too_small_is_user_error():
    with pytest.raises(UserError) as e:
        Tokenizer.train_from_iterator(iter(["abc"]), 256)
    assert "256" in str(e.value)


def test_get_tokenizer_on_empty_dir_is_user_error(tmp_path):
    with pytest.raises(UserError) as e:
        get_tokenizer(str(tmp_path))
    assert "tok_train" in str(e.value)
    with pytest.raises(UserError):
        get_token_bytes(base_dir=str(tmp_path))
    assert tokenizer_dir(str(tmp_path)) == os.path.join(str(tmp_path), "tokenizer")
