"""Tests for nanochat.tokenizer: round trips, special tokens, byte table, persistence."""

import json
import os
import shutil

import numpy as np
import pytest

from nanochat.common import UserError
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer, get_token_bytes, get_tokenizer, tokenizer_dir
from conftest import edit_json

SAMPLES = [
    "Story 1: alice sends 3 letters. The end.",
    "héllo wörld — ✓ naïve café 日本語 🙂",
    "def reverse(xs):\n    return xs[::-1]  # slice\n\n\tif a != b: pass\r\n",
    "",
    "   leading and trailing spaces   ",
]


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
    assert set(tok.special_tokens) == set(SPECIAL_TOKENS)
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


# ---- the tokenizer control: merges fitted to reversed text (scripts.tok_train --train_direction) ----
from nanochat.direction import reverse_text  # noqa: E402


def _tokens_per_char(tok, texts):
    return sum(len(tok.encode(t)) for t in texts) / sum(len(t) for t in texts)


@pytest.fixture(scope="module")
def tokenizers_by_direction(corpus_template):
    texts = corpus_template["train"][:300]
    return {d: Tokenizer.train_from_iterator(iter(texts), 320, train_direction=d)
            for d in ("forward", "backward", "both")}


def test_reverse_text_is_an_involution_on_code_points():
    for text in SAMPLES:
        assert reverse_text(reverse_text(text)) == text
        assert len(reverse_text(text)) == len(text)
    assert reverse_text("ab\r\nc") == "c\n\rba"


def test_train_direction_fits_merges_to_that_reading(tokenizers_by_direction, corpus_template):
    """A tokenizer compresses the text it was fitted to better than its mirror image; one fitted
    to both readings is less lopsided than the forward one."""
    val = corpus_template["val"][:60]
    rev = [reverse_text(t) for t in val]
    cost = {d: (_tokens_per_char(tok, val), _tokens_per_char(tok, rev)) for d, tok in tokenizers_by_direction.items()}
    assert cost["forward"][0] < cost["forward"][1]
    assert cost["backward"][1] < cost["backward"][0]
    lopsided = {d: abs(f - b) / min(f, b) for d, (f, b) in cost.items()}
    assert lopsided["both"] < lopsided["forward"]
    for tok in tokenizers_by_direction.values():  # the round trip holds either way
        for text in val[:5] + rev[:5]:
            assert tok.decode(tok.encode(text)) == text


def test_train_direction_is_saved_and_loaded(tokenizers_by_direction, tok, tmp_path):
    for direction, trained in tokenizers_by_direction.items():
        d = str(tmp_path / direction)
        trained.save(d)
        with open(os.path.join(d, "tokenizer.json")) as f:
            assert json.load(f)["train_direction"] == direction
        assert Tokenizer.load(d).train_direction == direction
    # A tokenizer saved before the field existed was trained on forward text.
    d = str(tmp_path / "old")
    tok.save(d)
    path = os.path.join(d, "tokenizer.json")
    with open(path) as f:
        meta = json.load(f)
    del meta["train_direction"]
    with open(path, "w") as f:
        json.dump(meta, f)
    assert Tokenizer.load(d).train_direction == "forward"


def test_unknown_train_direction_is_user_error():
    with pytest.raises(UserError) as e:
        Tokenizer.train_from_iterator(iter(["abc"]), 300, train_direction="sideways")
    assert "both" in str(e.value)


def test_tok_train_cli_records_train_direction(corpus_template, tmp_path):
    from conftest import assert_one_line_error, run_inprocess
    base = str(tmp_path / "base")
    shutil.copytree(os.path.join(corpus_template["dir"], "base_data"), os.path.join(base, "base_data"))
    bad = run_inprocess("scripts.tok_train", "--train_direction=up", "--vocab_size=300", base_dir=base)
    assert_one_line_error(bad, "--train_direction", "backward")
    result = run_inprocess("scripts.tok_train", "--train-direction=backward", "--vocab_size=300", "--max_chars=20000",
                           base_dir=base)
    assert result.returncode == 0, result.stderr
    assert "on backward text" in result.stdout
    assert get_tokenizer(base).train_direction == "backward"


# ---- from the safety review (docs/SAFETY.md): corrupt tokenizer files

@pytest.mark.parametrize("damage, fragment", [
    (lambda d: open(os.path.join(d, "tokenizer.json"), "w").write('{"pattern": "x", "spec'), "tokenizer.json is corrupt"),
    (lambda d: edit_json(os.path.join(d, "tokenizer.json"), lambda m: m.pop("special_tokens")),
     "tokenizer.json is corrupt"),
    (lambda d: open(os.path.join(d, "ranks.tiktoken"), "a").write("not-base64!! x\n"), "ranks.tiktoken is corrupt at line"),
    (lambda d: edit_json(os.path.join(d, "tokenizer.json"), lambda m: m.update(pattern="(unclosed")),
     "cannot be built"),
])
def test_corrupt_tokenizer_files_are_one_clear_error(base_dir, damage, fragment):
    from nanochat.tokenizer import get_tokenizer, tokenizer_dir
    damage(tokenizer_dir())
    with pytest.raises(UserError, match=fragment) as e:
        get_tokenizer()
    assert "tok_train" in str(e.value)
