"""Tokenizer files are verified on load (nanochat.tokenizer.Tokenizer.load): every damaged file is
one clear error naming the file and the rebuild command, at load time; saving goes through the
atomic writer (nothing half-written, no temporary file), and tokenizers saved before the
fingerprint was recorded still load. docs/SAFETY.md, "Tokenizer files"."""

import errno
import json
import os
import pickle

import numpy as np
import pytest

from nanochat.common import UserError
from nanochat.tokenizer import Tokenizer, get_token_bytes, get_tokenizer, tokenizer_dir

TEXT = ["the quick brown fox jumps over the lazy dog. " * 3, "def add(a, b):\n    return a + b\n",
        "Alice was beginning to get very tired of sitting by her sister on the bank."] * 4


@pytest.fixture(scope="module")
def trained():
    return Tokenizer.train_from_iterator(iter(TEXT), vocab_size=300)


@pytest.fixture
def saved(trained, tmp_path):
    """A fresh copy of the tokenizer in <base>/tokenizer; returns the base dir."""
    trained.save(tokenizer_dir(str(tmp_path)))
    return str(tmp_path)


def path(base, name):
    return os.path.join(tokenizer_dir(base), name)


def edit_meta(base, change):
    with open(path(base, "tokenizer.json")) as f:
        meta = json.load(f)
    change(meta)
    with open(path(base, "tokenizer.json"), "w") as f:
        json.dump(meta, f)


def refused(base, file_name, phrase):
    with pytest.raises(UserError) as info:
        get_tokenizer(base)
    message = str(info.value)
    assert file_name in message and phrase in message and "python -m scripts.tok_train" in message, message
    assert "\n" not in message


def test_a_saved_tokenizer_loads_and_records_its_fingerprint(saved, trained):
    loaded = get_tokenizer(saved)
    assert loaded.fingerprint() == trained.fingerprint()
    with open(path(saved, "tokenizer.json")) as f:
        assert json.load(f)["fingerprint"] == trained.fingerprint()
    assert sorted(os.listdir(tokenizer_dir(saved))) == ["ranks.tiktoken", "token_bytes.npy", "tokenizer.json"]
    assert get_token_bytes(base_dir=saved).tolist() == trained.token_byte_lengths().tolist()


def test_a_tokenizer_saved_before_the_fingerprint_still_loads(saved, trained):
    """Older tokenizer.json files have no fingerprint: they are checked for consistency instead, and
    the checkpoint fingerprint (Tokenizer.fingerprint) is unchanged, so old checkpoints still match."""
    edit_meta(saved, lambda m: m.pop("fingerprint"))
    assert get_tokenizer(saved).fingerprint() == trained.fingerprint()


@pytest.mark.parametrize("old_format", [False, True])
def test_a_truncated_ranks_file_is_refused(saved, old_format):
    if old_format:
        edit_meta(saved, lambda m: m.pop("fingerprint"))
    with open(path(saved, "ranks.tiktoken")) as f:
        lines = f.readlines()
    with open(path(saved, "ranks.tiktoken"), "w") as f:
        f.writelines(lines[: len(lines) // 2])
    refused(saved, "ranks.tiktoken", "truncated?")


def test_a_ranks_file_with_a_hole_or_a_changed_merge_is_refused(saved):
    with open(path(saved, "ranks.tiktoken")) as f:
        lines = f.readlines()
    duplicated = lines[280].split()[0] + " " + lines[279].split()[1] + "\n"  # two tokens share rank 279
    with open(path(saved, "ranks.tiktoken"), "w") as f:
        f.writelines(lines[:280] + [duplicated] + lines[281:])
    refused(saved, "ranks.tiktoken", "are not 0..")
    # Same count, same ranks, two merges swapped: only the recorded fingerprint can tell.
    lines[-1], lines[-2] = lines[-2].split()[0] + " " + lines[-1].split()[1] + "\n", \
        lines[-1].split()[0] + " " + lines[-2].split()[1] + "\n"
    with open(path(saved, "ranks.tiktoken"), "w") as f:
        f.writelines(lines)
    refused(saved, "ranks.tiktoken", "do not belong together")


def test_special_ids_colliding_with_byte_or_merge_tokens_are_refused(saved):
    edit_meta(saved, lambda m: m["special_tokens"].update({"<|bos|>": 65}))  # the byte 'A'
    refused(saved, "tokenizer.json", "special token ids")


def test_duplicate_special_ids_are_refused(saved):
    def duplicate(meta):
        specials = meta["special_tokens"]
        specials["<|backward|>"] = specials["<|forward|>"]
    edit_meta(saved, duplicate)
    refused(saved, "tokenizer.json", "must be unique")


def write_pickled(p):
    with open(p, "wb") as f:
        pickle.dump(list(range(10)), f)


@pytest.mark.parametrize("damage,phrase", [
    (write_pickled, "not a valid .npy array"),
    (lambda p: np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True), "not a valid .npy array"),
    (lambda p: open(p, "wb").write(os.urandom(200)), "not a valid .npy array"),
    (lambda p: open(p, "wb").write(b""), "not a valid .npy array"),
    (lambda p: np.save(p, np.ones(7, dtype=np.int32)), "shape (7,)"),
    (lambda p: np.save(p, np.ones(300, dtype=np.float32)), "float32"),
    (lambda p: np.save(p, np.ones(300, dtype=np.int32)), "does not match ranks.tiktoken"),
    (os.remove, "is missing"),
])
def test_a_damaged_token_bytes_file_is_refused_at_load(saved, damage, phrase):
    damage(path(saved, "token_bytes.npy"))
    refused(saved, "token_bytes.npy", phrase)
    with pytest.raises(UserError, match="token_bytes.npy"):
        get_token_bytes(base_dir=saved)


@pytest.mark.parametrize("victim", ["ranks.tiktoken", "token_bytes.npy", "tokenizer.json"])
def test_saving_on_a_full_disk_keeps_the_old_tokenizer_and_no_temporary(saved, trained, victim, monkeypatch):
    """The three files are written to temporaries before any is renamed: a disk that fills while
    writing any of them leaves the previous tokenizer whole, and no *.tmp file behind."""
    import builtins
    before = {name: open(path(saved, name), "rb").read() for name in os.listdir(tokenizer_dir(saved))}
    other = Tokenizer.train_from_iterator(iter(TEXT[:3]), vocab_size=280)
    real_open = builtins.open

    def open_on_a_full_disk(file, mode="r", *args, **kwargs):
        if victim in str(file) and "w" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(file, mode, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", open_on_a_full_disk)
    with pytest.raises(UserError) as info:
        other.save(tokenizer_dir(saved))
    monkeypatch.undo()
    assert "no space left" in str(info.value) and victim in str(info.value) and "resume from" not in str(info.value)
    after = {name: open(path(saved, name), "rb").read() for name in os.listdir(tokenizer_dir(saved))}
    assert after == before  # the same three files, byte for byte, and nothing else
    assert get_tokenizer(saved).fingerprint() == trained.fingerprint()


def test_saving_under_a_file_is_one_clear_error(trained, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="cannot write to the tokenizer directory"):
        trained.save(str(tmp_path / "file" / "tokenizer"))


def test_tok_train_checks_it_can_write_before_training(tmp_path, monkeypatch):
    """--overwrite onto a tokenizer directory that cannot be written: refused before training."""
    from scripts import tok_train
    (tmp_path / "tokenizer").write_text("a file where the directory should be")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.setattr(Tokenizer, "train_from_iterator",
                        classmethod(lambda *a, **kw: pytest.fail("trained before checking the directory")))
    with pytest.raises(UserError, match="cannot write to the tokenizer directory"):
        tok_train.main(["--overwrite"])
