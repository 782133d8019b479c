"""Tests for nanochat.checkpoint_manager: round trips, direction metadata, safe and atomic files."""

import json
import os

import pytest
import torch

from nanochat.checkpoint_manager import (
    build_model,
    check_tokenizer_matches,
    checkpoint_dir_for,
    list_steps,
    list_tags,
    load_checkpoint,
    load_model,
    meta_path,
    model_path,
    optim_path,
    resolve_checkpoint,
    save_checkpoint,
)
from nanochat.common import UserError
from nanochat.experiment_config import ExperimentConfig
from nanochat.direction import DirectionSpec
from nanochat.tokenizer import get_tokenizer
from conftest import tiny_model
from conftest import ckpt_dir, edit_json, train_tiny



def make_meta(model, tokenizer=None, direction="forward", step=0, **extra):
    meta = {"phase": "base", "direction": direction, "model_config": model.config.to_dict(), "step": step,
            "vocab_size": model.config.vocab_size}
    if tokenizer is not None:  # the direction as checkpoints store it (DirectionSpec.to_meta)
        meta["direction_spec"] = DirectionSpec.from_tokenizer(direction, tokenizer).to_meta()
    meta.update(extra)
    return meta


def save_tagged(base_dir, tag, direction="forward", step=5, seed=0, tokenizer=None):
    model = tiny_model(384, 32, seed=seed)
    tokenizer = tokenizer or get_tokenizer(base_dir)
    d = os.path.join(base_dir, "base_checkpoints", tag)
    save_checkpoint(d, step, model.state_dict(), None, make_meta(model, tokenizer, direction, step))
    return model, d


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ---- save / load ----------------------------------------------------------------------------

def test_save_load_round_trip(tmp_path):
    model = tiny_model(384, 32)
    d = str(tmp_path / "ckpt")
    optim_state = {"optimizers": [{"state": {}, "lr": 0.1}], "dataloader": {"next_stream": 1}}
    meta = make_meta(model, direction="backward", step=12, marker_ids=None, user_config={"depth": 1})
    save_checkpoint(d, 12, model.state_dict(), optim_state, meta)
    assert sorted(os.listdir(d)) == sorted(os.path.basename(p) for p in
                                           (model_path(d, 12), meta_path(d, 12), optim_path(d, 12, 0)))
    state, optim, loaded_meta = load_checkpoint(d, 12, "cpu", load_optimizer=True)
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v), k
    assert optim == optim_state
    assert loaded_meta == meta and loaded_meta["direction"] == "backward"
    assert load_checkpoint(d, 12, "cpu")[1] is None
    assert list_steps(d) == [12]


def test_build_model_restores_weights_and_direction(tmp_path, tok):
    model = tiny_model(384, 32, seed=3)
    d = str(tmp_path / "ckpt")
    save_checkpoint(d, 1, model.state_dict(), None, make_meta(model, tok, "bidirectional", 1))
    loaded, meta = build_model(d, 1, "cpu")
    assert_same_weights(model, loaded)
    assert not loaded.training
    assert meta["direction"] == "bidirectional"
    assert DirectionSpec.from_meta(meta).marker_ids == (tok.get_forward_token_id(), tok.get_backward_token_id())
    x = torch.randint(0, 384, (1, 16))
    assert torch.equal(model(x), loaded(x))
    assert build_model(d, 1, "cpu", phase="train")[0].training


def test_saved_state_dict_loads_as_written(tmp_path):
    # Today's save path writes the uncompiled model's state dict: no "_orig_mod." prefix to strip.
    model = tiny_model(384, 32)
    d = str(tmp_path / "ckpt")
    state = model.state_dict()
    save_checkpoint(d, 0, state, None, make_meta(model))
    assert_same_weights(model, build_model(d, 0, "cpu")[0])


def test_rank_nonzero_writes_only_its_optimizer(tmp_path):
    d = str(tmp_path / "ckpt")
    model = tiny_model(384, 32)
    save_checkpoint(d, 3, model.state_dict(), {"r": 1}, make_meta(model), rank=1)
    assert os.listdir(d) == [os.path.basename(optim_path(d, 3, 1))]
    assert list_steps(d) == []  # no meta: not a complete checkpoint


def test_failed_write_leaves_no_files(tmp_path):
    d = str(tmp_path / "ckpt")
    model = tiny_model(384, 32)
    with pytest.raises(Exception):
        save_checkpoint(d, 0, model.state_dict(), {"bad": lambda: None}, make_meta(model))  # unpicklable
    assert os.listdir(d) == []


# ---- load_model via the base dir ------------------------------------------------------------

def test_load_model_by_tag(base_dir):
    model, _ = save_tagged(base_dir, "d1", direction="backward", step=7)
    loaded, tokenizer, meta = load_model("base", "cpu", model_tag="d1")
    assert_same_weights(model, loaded)
    assert meta["direction"] == "backward"
    assert meta["model_tag"] == "d1" and meta["step"] == 7
    assert meta["checkpoint_dir"] == os.path.join(base_dir, "base_checkpoints", "d1")
    assert tokenizer.get_vocab_size() == 384


def test_load_model_defaults_to_newest_tag_and_last_step(base_dir):
    save_tagged(base_dir, "old", step=1)
    model_new, d = save_tagged(base_dir, "new", direction="bidirectional", step=2, seed=1)
    os.utime(os.path.join(base_dir, "base_checkpoints", "old"), (1, 1))  # make "old" clearly older
    save_checkpoint(d, 9, model_new.state_dict(), None, make_meta(model_new, get_tokenizer(), "bidirectional", 9))
    assert list_tags("base") == ["new", "old"]
    loaded, _, meta = load_model("base", "cpu")
    assert meta["model_tag"] == "new" and meta["step"] == 9
    assert meta["direction"] == "bidirectional"
    _, _, meta2 = load_model("base", "cpu", model_tag="new", step=2)
    assert meta2["step"] == 2
    with pytest.raises(UserError) as e:
        load_model("base", "cpu", model_tag="new", step=4)
    assert "[2, 9]" in str(e.value)


def test_missing_tag_lists_known_tags(base_dir):
    save_tagged(base_dir, "alpha")
    save_tagged(base_dir, "beta")
    with pytest.raises(UserError) as e:
        load_model("base", "cpu", model_tag="gamma")
    msg = str(e.value)
    assert "gamma" in msg and "alpha" in msg and "beta" in msg


def test_no_checkpoints_at_all_is_user_error(base_dir):
    with pytest.raises(UserError):
        load_model("base", "cpu")
    with pytest.raises(UserError):
        resolve_checkpoint("pretrain")


def test_experiment_owns_its_checkpoints(base_dir):
    ec = ExperimentConfig()
    ec.create_experiment("base", "forward", 1, experiment_id="exp_a")
    d = checkpoint_dir_for("base", "exp_a")
    assert d == ec.checkpoint_dir("exp_a")
    model = tiny_model(384, 32)
    save_checkpoint(d, 3, model.state_dict(), None, make_meta(model))
    assert "exp_a" in list_tags("base")
    loaded, _, meta = load_model("base", "cpu", model_tag="exp_a")
    assert_same_weights(model, loaded)
    assert meta["checkpoint_dir"] == d


# ---- corrupt and unsafe files ---------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_model_file_is_user_error_naming_it(base_dir, damage):
    _, d = save_tagged(base_dir, "d1", step=5)
    path = model_path(d, 5)
    if damage == "truncate":
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.truncate(size // 2)
    else:
        with open(path, "wb") as f:
            f.write(b"\x80\x02garbage, not a checkpoint" * 4)
    with pytest.raises(UserError) as e:
        load_model("base", "cpu", model_tag="d1")
    assert path in str(e.value)


def test_corrupt_meta_is_user_error(base_dir):
    _, d = save_tagged(base_dir, "d1", step=5)
    with open(meta_path(d, 5), "w") as f:
        f.write("{not json")
    with pytest.raises(UserError) as e:
        load_model("base", "cpu", model_tag="d1")
    assert meta_path(d, 5) in str(e.value)


def test_meta_without_direction_is_user_error(base_dir):
    model, d = save_tagged(base_dir, "d1", step=5)
    with open(meta_path(d, 5), "w") as f:
        json.dump({"model_config": model.config.to_dict()}, f)
    with pytest.raises(UserError) as e:
        load_model("base", "cpu", model_tag="d1")
    assert "direction" in str(e.value)


def test_weights_that_do_not_fit_the_config_are_user_error(base_dir):
    model, d = save_tagged(base_dir, "d1", step=5)
    state = model.state_dict()
    state.pop("lm_head.weight")
    torch.save(state, model_path(d, 5))
    with pytest.raises(UserError):
        load_model("base", "cpu", model_tag="d1")


class _Evil:
    """Unpickling this calls open(path, 'w'), creating a file: code execution on load."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_loading_does_not_execute_pickled_code(base_dir, tmp_path):
    model, d = save_tagged(base_dir, "d1", step=5)
    marker = str(tmp_path / "pwned")
    state = dict(model.state_dict())
    state["evil"] = _Evil(marker)
    torch.save(state, model_path(d, 5))
    with pytest.raises(UserError) as e:
        load_model("base", "cpu", model_tag="d1")
    assert model_path(d, 5) in str(e.value)
    assert not os.path.exists(marker)
    # sanity: unrestricted unpickling *would* have executed it
    torch.load(model_path(d, 5), weights_only=False)
    assert os.path.exists(marker)


def test_save_leaves_no_temporary_files(base_dir):
    model, d = save_tagged(base_dir, "d1", step=5)
    save_checkpoint(d, 6, model.state_dict(), {"x": torch.zeros(2)}, make_meta(model, step=6))
    assert not [f for f in os.listdir(d) if ".tmp" in f]
    assert list_steps(d) == [5, 6]


# ---- tokenizer consistency ------------------------------------------------------------------

def test_marker_ids_mismatch_is_user_error(base_dir):
    tok = get_tokenizer()
    fwd, bwd = tok.get_marker_ids()
    # older metadata: the direction's fields stored separately
    meta = {"direction": "bidirectional", "vocab_size": 384, "bos_id": tok.get_bos_token_id(),
            "marker_ids": {"forward": bwd, "backward": fwd}}
    with pytest.raises(UserError) as e:
        check_tokenizer_matches(meta, tok)
    assert "marker" in str(e.value)
    meta["marker_ids"] = {"forward": fwd, "backward": bwd}
    check_tokenizer_matches(meta, tok)  # consistent: no error

    model, d = save_tagged(base_dir, "bidi", direction="bidirectional", step=1)
    with open(meta_path(d, 1)) as f:
        saved = json.load(f)
    saved["direction_spec"]["forward_marker_id"] = fwd + 100
    with open(meta_path(d, 1), "w") as f:
        json.dump(saved, f)
    with pytest.raises(UserError):
        load_model("base", "cpu", model_tag="bidi")


def test_vocab_size_mismatch_is_user_error(base_dir):
    tok = get_tokenizer()
    with pytest.raises(UserError) as e:
        check_tokenizer_matches({"direction": "forward", "vocab_size": 500}, tok)
    assert "500" in str(e.value)


# ---- from the safety review (docs/SAFETY.md): no poisoned checkpoint, the tokenizer fingerprint, a full disk, absurd configs

def test_non_finite_weights_are_never_saved(tmp_path):
    from nanochat.checkpoint_manager import NonFiniteWeights, save_checkpoint
    state = {"w": torch.tensor([1.0, float("nan")])}
    with pytest.raises(NonFiniteWeights, match="step 5"):
        save_checkpoint(str(tmp_path), 5, state, {"optimizers": []}, {"direction": "forward"})
    assert os.listdir(tmp_path) == []


def test_a_changed_tokenizer_of_the_same_size_is_refused(base_dir):
    from nanochat.checkpoint_manager import load_meta, load_model
    from nanochat.tokenizer import get_tokenizer, tokenizer_dir
    train_tiny("--num_iterations=2")
    assert load_meta(ckpt_dir(base_dir), 2)["tokenizer_fingerprint"] == get_tokenizer().fingerprint()
    path = os.path.join(tokenizer_dir(), "tokenizer.json")
    with open(path) as f:
        meta = json.load(f)
    specials = meta["special_tokens"]  # same size, same BOS and markers, two chat ids swapped
    specials["<|user_start|>"], specials["<|user_end|>"] = specials["<|user_end|>"], specials["<|user_start|>"]
    meta.pop("fingerprint")  # as a retrained tokenizer would be: consistent in itself, not the checkpoint's
    with open(path, "w") as f:
        json.dump(meta, f)
    with pytest.raises(UserError, match="tokenizer differs"):
        load_model("base", "cpu", model_tag="run")
    with pytest.raises(UserError, match="tokenizer differs"):
        train_tiny("--num_iterations=3", "--resume_from_step=2")


def test_disk_full_is_one_message_and_leaves_no_partial_step(tmp_path, monkeypatch):
    from nanochat.checkpoint_manager import save_checkpoint
    real_save = torch.save

    def full_disk(obj, path):
        if "model_" in os.path.basename(path):
            with open(path, "wb") as f:
                f.write(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1280 vs 1174")
        real_save(obj, path)
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(UserError, match="no space left"):
        save_checkpoint(str(tmp_path), 3, {"w": torch.ones(2)}, {"optimizers": []}, {"direction": "forward"})
    assert os.listdir(tmp_path) == [], "no temporary file and no orphan optimizer file may remain"


def test_an_absurd_model_config_is_refused_before_allocating(base_dir):
    from nanochat.checkpoint_manager import build_model, meta_path
    train_tiny("--num_iterations=1")
    edit_json(meta_path(ckpt_dir(base_dir), 1), lambda m: m["model_config"].update(n_embd=2_000_000, vocab_size=10**7))
    with pytest.raises(UserError, match="parameters: the metadata is corrupt"):
        build_model(ckpt_dir(base_dir), 1, "cpu")
    edit_json(meta_path(ckpt_dir(base_dir), 1), lambda m: m["model_config"].update(n_embd=128, vocab_size=384))
    with pytest.raises(UserError, match="does not match the saved weights"):
        build_model(ckpt_dir(base_dir), 1, "cpu")
    edit_json(meta_path(ckpt_dir(base_dir), 1), lambda m: m["model_config"].update(n_layer=-3))
    with pytest.raises(UserError, match="not positive integers"):
        build_model(ckpt_dir(base_dir), 1, "cpu")
