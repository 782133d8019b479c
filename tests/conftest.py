"""Shared test fixtures: a tiny generated corpus and tokenizer in a throwaway base dir, one tiny
model, one set of tiny trained checkpoints, and the scripts run in-process.

Tests never touch ~/.cache/nanochat or ../shared/corpora: every test that needs data gets a
fresh `NANOCHAT_BASE_DIR` holding generated shards and a small trained tokenizer. Everything built
once per session (`corpus_template`, `tok`, `trained`) is read-only: a test that writes works
in a copy (`base_dir`, `trained_base_dir`, `copy_base`).

Scripts run in-process through their `main(argv)` (`run_inprocess`); a subprocess (`run_script`)
only where the process boundary is what is tested (torchrun, kill -9, locks, the orchestrator),
and such tests are marked `slow` (`pytest -m "not slow"` leaves them out).
"""

import contextlib
import gc
import hashlib
import importlib
import io
import os
import random
import shutil
import subprocess
import sys
import threading
import traceback
import warnings
from typing import NamedTuple

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy"]
VERBS = ["sends", "reads", "writes", "sorts", "counts", "finds", "keeps", "moves"]
THINGS = ["letters", "numbers", "books", "files", "lists", "words", "tokens", "notes"]


def make_document(rng, index):
    """A small English-like document with a fixed opening and closing, so that its two ends
    differ (which direction is which is visible in a decoded row)."""
    n = rng.randint(2, 12)
    sentences = [f"{rng.choice(NAMES)} {rng.choice(VERBS)} {rng.randint(2, 99)} {rng.choice(THINGS)}."
                 for _ in range(n)]
    return f"Story {index}: " + " ".join(sentences) + " The end."


def make_documents(n, seed=0, start=0):
    rng = random.Random(seed)
    return [make_document(rng, start + i) for i in range(n)]


def write_corpus(base_dir, n_train=600, n_val=120, docs_per_shard=300, seed=0):
    """Train shards then one validation shard (the last one) under base_dir/base_data."""
    from nanochat.dataset import write_shards
    data = os.path.join(base_dir, "base_data")
    train = make_documents(n_train, seed)
    val = make_documents(n_val, seed + 1, start=n_train)
    paths = write_shards(train, data, docs_per_shard)
    paths += write_shards(val, data, len(val), start_index=len(paths))
    return train, val


def train_tokenizer(base_dir, vocab_size=384):
    from nanochat.tokenizer import Tokenizer, tokenizer_dir
    from nanochat.dataset import DocumentSource
    texts = [t for _, t in DocumentSource("train", os.path.join(base_dir, "base_data")).iter_from()]
    tok = Tokenizer.train_from_iterator(iter(texts), vocab_size)
    tok.save(tokenizer_dir(base_dir))
    return tok


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tiny models run in-process: one intra-op thread avoids OpenMP spin-waiting on a busy
    2-core machine (subprocess scripts get OMP_NUM_THREADS=1 from run_script)."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tok(corpus_template):
    """The generated corpus's tokenizer, loaded once (tests that damage a tokenizer use base_dir's copy)."""
    from nanochat.tokenizer import get_tokenizer
    return get_tokenizer(corpus_template["dir"])


def tiny_model(vocab_size, sequence_len=64, seed=0, depth=1, std=0.02, matrices_std=None, **config):
    """A tiny GPT on CPU: depth 1 unless told (`config` overrides GPTConfig fields).

    init_weights starts each block's output projections at zero (the block is the identity);
    here they are drawn N(0, std), so that every parameter gets a gradient from the first step.
    With `matrices_std`, every weight matrix is drawn N(0, matrices_std) instead: a model far
    from uniform, whose samples depend on the context."""
    import dataclasses
    import torch
    from nanochat.gpt import GPT, config_for_depth
    torch.manual_seed(seed)
    model = GPT.build(dataclasses.replace(config_for_depth(depth, vocab_size, sequence_len), **config), "cpu")
    with torch.no_grad():
        if matrices_std is not None:
            for p in model.parameters():
                if p.ndim == 2:
                    p.normal_(0, matrices_std)
        else:
            for block in model.model.layers:
                block.self_attn.o_proj.weight.normal_(std=std)
                block.mlp.down_proj.weight.normal_(std=std)
    return model


@pytest.fixture(scope="session")
def corpus_template(tmp_path_factory):
    """Generated shards + tokenizer, built once per test session (copied into each test)."""
    root = str(tmp_path_factory.mktemp("corpus_template"))
    train, val = write_corpus(root)
    train_tokenizer(root)
    return {"dir": root, "train": train, "val": val}


@pytest.fixture
def base_dir(corpus_template, tmp_path, monkeypatch):
    """A fresh NANOCHAT_BASE_DIR with the template's data and tokenizer; returns its path."""
    d = str(tmp_path / "nanochat_base")
    shutil.copytree(corpus_template["dir"], d)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", d)
    return d


# A depth-1 run of a few steps, in-process in the test's base_dir (the safety checks' model).
TINY_RUN = ["--depth=1", "--max_seq_len=32", "--device_batch_size=2", "--total_batch_size=-1", "--eval_every=-1",
            "--eval_tokens=128", "--sample_every=-1", "--device_type=cpu", "--prefetch=0"]


def train_tiny(*args, tag="run"):
    """scripts.base_train's main on TINY_RUN (a UserError propagates, as the test wants it)."""
    from scripts.base_train import main
    main([*TINY_RUN, f"--model_tag={tag}", *args])


def ckpt_dir(base_dir, tag="run"):
    return os.path.join(base_dir, "base_checkpoints", tag)


def steps_of(base_dir, tag="run"):
    from nanochat.checkpoint_manager import list_steps
    return list_steps(ckpt_dir(base_dir, tag))


def edit_json(path, change):
    """Rewrite a JSON file through change(obj) (to plant a defect)."""
    import json
    with open(path) as f:
        meta = json.load(f)
    change(meta)
    with open(path, "w") as f:
        json.dump(meta, f)


def copy_base(src, tmp_path_factory, name):
    """A copy of a read-only base dir (a module fixture's own place to write)."""
    dst = str(tmp_path_factory.mktemp(name) / "base")
    shutil.copytree(src, dst)
    return dst


def snapshot(root):
    """{relative path: (size, mtime_ns, sha256)} of every file under root."""
    out = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            st = os.stat(path)
            out[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns, digest)
    return out


def assert_one_line_error(result, *fragments):
    """Non-zero exit, exactly one non-empty stderr line, starting 'error:', holding each fragment."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0, f"expected failure, got exit 0; stdout:\n{result.stdout}"
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{result.stderr}"
    assert lines[0].startswith("error:"), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


class Result(NamedTuple):
    """What a command left: its exit status and what it printed (as subprocess.CompletedProcess)."""
    returncode: int
    stdout: str
    stderr: str


# Warnings Python prints by default (it hides these four categories outside __main__).
HIDDEN_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


def run_inprocess(module, *args, base_dir=None, env=None):
    """`python -m module args...` in this process: `run_main(lambda: module.main(args))` with
    stdout and stderr captured, NANOCHAT_BASE_DIR (and `env`) set for the call only, SystemExit
    turned into the exit status and an uncaught exception into a traceback on stderr and status
    1, as the interpreter would. Warnings a plain `python -m` run would print go to stderr too,
    so a one-line-error check sees them. Returns a Result."""
    from nanochat.common import run_main
    main = importlib.import_module(module).main
    out, err = io.StringIO(), io.StringIO()
    code = 0
    threads_before = set(threading.enumerate())
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        mp.setenv("WANDB_MODE", "disabled")
        if base_dir is not None:
            mp.setenv("NANOCHAT_BASE_DIR", base_dir)
        for key, value in (env or {}).items():
            mp.setenv(key, value)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                run_main(lambda: main(list(args)))
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
            except Exception:
                traceback.print_exc()
                code = 1
    for w in caught:
        if not issubclass(w.category, HIDDEN_WARNINGS):
            err.write(warnings.formatwarning(w.message, w.category, w.filename, w.lineno))
    # The process would end here, and its threads with it (base_train leaves its prefetch worker to
    # that): collect what the command dropped and let the threads it started finish.
    gc.collect()
    for thread in set(threading.enumerate()) - threads_before:
        thread.join(timeout=10)
    return Result(code, out.getvalue(), err.getvalue())


# ---------------------------------------------------------------------------------------
# One set of tiny trained checkpoints for the session: a base model in each direction (depth 2,
# 64-token context, 40 steps: enough for each model to prefer its own reading), and one SFT of
# the backward model (the seed plan's commands). Made in-process by the scripts themselves.

TRAINED_TAGS = {"forward": "test_forward", "backward": "test_backward", "bidirectional": "test_bidirectional"}
TRAINED_STEPS = 40
TRAINED_RUN = ["--depth=2", "--max_seq_len=64", "--device_batch_size=2", "--total_batch_size=128",
               f"--num_iterations={TRAINED_STEPS}", "--eval_every=-1", "--eval_tokens=256", "--device_type=cpu"]
TRAINED_SFT = ["--source=base", f"--model_tag={TRAINED_TAGS['backward']}", "--device_batch_size=2",
               "--num_iterations=5", "--eval_batches=2"]
TRAINED_SFT_STEPS = 5


@pytest.fixture(scope="session")
def trained(corpus_template, tmp_path_factory):
    """{"dir": a read-only base dir holding the three base checkpoints and the SFT one,
    "results": {tag or "sft": the Result of the command that made it}}."""
    base = copy_base(corpus_template["dir"], tmp_path_factory, "trained")
    results = {}
    for direction, tag in TRAINED_TAGS.items():
        results[tag] = run_inprocess("scripts.base_train", f"--direction={direction}", f"--model_tag={tag}",
                                     *TRAINED_RUN, base_dir=base)
        assert results[tag].returncode == 0, results[tag].stderr
    results["sft"] = run_inprocess("scripts.chat_sft", *TRAINED_SFT, base_dir=base)
    assert results["sft"].returncode == 0, results["sft"].stderr
    return {"dir": base, "results": results}


RANDOM_PARENTS = {"fwd": "forward", "bwd": "backward", "bidi": "bidirectional"}


def save_random_parents(base_dir, sequence_len=48, step=3):
    """One untrained tiny base checkpoint per direction (tags fwd, bwd, bidi) at `step`, with the
    metadata base_train writes: cheap parents for mid, SFT and RL runs. Returns base_dir."""
    from nanochat.checkpoint_manager import save_checkpoint
    from nanochat.direction import DirectionSpec
    from nanochat.tokenizer import get_tokenizer
    tok = get_tokenizer(base_dir)
    for tag, direction in RANDOM_PARENTS.items():
        model = tiny_model(tok.get_vocab_size(), sequence_len)
        meta = {"phase": "base", "direction": direction, "model_tag": tag, "model_config": model.config.to_dict(),
                "vocab_size": tok.get_vocab_size(), "step": step,
                "direction_spec": DirectionSpec.from_tokenizer(direction, tok).to_meta()}
        save_checkpoint(os.path.join(base_dir, "base_checkpoints", tag), step, model.state_dict(), None, meta)
    return base_dir


@pytest.fixture
def trained_base_dir(trained, tmp_path, monkeypatch):
    """A fresh NANOCHAT_BASE_DIR holding a copy of the trained checkpoints; returns its path."""
    d = str(tmp_path / "trained_base")
    shutil.copytree(trained["dir"], d)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", d)
    return d


def run_script(module, *args, base_dir=None, env=None, timeout=600, torchrun_nproc=None):
    """Run `python -m module args...` (or under torchrun) in a subprocess; returns CompletedProcess.
    Only where the process boundary is what is tested; otherwise run_inprocess."""
    full_env = dict(os.environ)
    full_env.update({"PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"})
    if base_dir is not None:
        full_env["NANOCHAT_BASE_DIR"] = base_dir
    full_env.update(env or {})
    if torchrun_nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun_nproc}",
               "-m", module, *args]
    else:
        cmd = [sys.executable, "-m", module, *args]
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
