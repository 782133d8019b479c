"""Shared test fixtures: a tiny generated corpus and tokenizer in a throwaway base dir.

Tests never touch ~/.cache/nanochat or ../shared/corpora: every test that needs data gets a
fresh `NANOCHAT_BASE_DIR` holding generated shards and a small trained tokenizer.
"""

import os
import random
import shutil
import subprocess
import sys

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


def run_script(module, *args, base_dir=None, env=None, timeout=600, torchrun_nproc=None):
    """Run `python -m module args...` (or under torchrun) in a subprocess; returns CompletedProcess."""
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
