"""Bad input to the command-line entry points: each mistake exits non-zero with ONE line on
stderr that starts with 'error:' (no traceback), and leaves every file under the base dir as it
was (nothing overwritten, nothing half-written).

The cases are a table: each gets its own copy of the generated data (plus the session's tiny
trained checkpoints for base_eval), an optional `prepare` step that plants the mistake, a command
and the fragments its one-line message must contain. The commands run in-process, as
`run_main(main)` (what `python -m` runs): exit status, stdout and stderr as a shell sees them;
then every case is checked by its own test.
"""

import os
import shutil
from typing import Callable, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import (TRAINED_RUN, TRAINED_STEPS, TRAINED_TAGS, assert_one_line_error, copy_base,  # noqa: F401
                      run_inprocess, snapshot)

# A tiny but valid training run (the trained checkpoints' own flags, 2 steps): the base for the
# flags that must be rejected.
TINY = [a if not a.startswith("--num_iterations") else "--num_iterations=2" for a in TRAINED_RUN]
EVAL = ["--eval_tokens=256", "--device_type=cpu"]
TINY_TAG, TINY_STEP = TRAINED_TAGS["forward"], TRAINED_STEPS


# ---------------------------------------------------------------------------------------
# Ways to plant a mistake in a copy of the base dir.

def train_shard(base):
    return os.path.join(base, "base_data", "shard_00000.parquet")


def tiny_model_file(base):
    return os.path.join(base, "base_checkpoints", TINY_TAG, f"model_{TINY_STEP:06d}.pt")


def remove_shards(base):
    for name in os.listdir(os.path.join(base, "base_data")):
        os.remove(os.path.join(base, "base_data", name))


def empty_shard(base):
    pq.write_table(pa.table({"text": pa.array([], type=pa.string())}), train_shard(base))


def shard_without_text(base):
    pq.write_table(pa.table({"body": ["one document", "another document"]}), train_shard(base))


def non_utf8_shard(base):
    texts = [b"a valid document about numbers.", b"invalid bytes \xff\xfe here", b"another fine one."]
    pq.write_table(pa.table({"text": pa.array(texts * 50, type=pa.binary())}), train_shard(base))


def tokenizer_without_markers(base):
    from nanochat.dataset import DocumentSource
    from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer, tokenizer_dir
    texts = [t for _, t in DocumentSource("train", os.path.join(base, "base_data")).iter_from()]
    specials = [t for t in SPECIAL_TOKENS if "ward" not in t]
    plain = Tokenizer.train_from_iterator(iter(texts), 384, special_tokens=specials)
    plain.save(tokenizer_dir(base))
    assert not plain.has_direction_markers()


def remove_checkpoints(base):
    shutil.rmtree(os.path.join(base, "base_checkpoints"))


def truncate_model_file(base):
    with open(tiny_model_file(base), "rb") as f:
        head = f.read(5000)
    with open(tiny_model_file(base), "wb") as f:
        f.write(head)


def garbage_model_file(base):
    with open(tiny_model_file(base), "wb") as f:
        f.write(b"garbage " * 100)


def truncate_tokenizer_json(base):
    path = os.path.join(base, "tokenizer", "tokenizer.json")
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text[: len(text) // 2])


class Case(NamedTuple):
    module: str
    args: list
    fragments: tuple            # must all appear in the one error line
    prepare: Callable = None    # plants the mistake in the case's base dir
    checkpoint: bool = False    # start from the base dir holding the tiny checkpoint


TRAIN, EVAL_SCRIPT = "scripts.base_train", "scripts.base_eval"
CASES = {
    # base_train: flags
    "unknown_direction": Case(TRAIN, ["--direction=sideways", *TINY],
                              ("sideways", "forward", "backward", "bidirectional")),
    "p_backward_1.5": Case(TRAIN, ["--direction=bidirectional", "--p_backward=1.5", *TINY], ("p_backward", "1.5")),
    # B*T*world = 2*64*1 = 128; 200 is not a multiple of it.
    "total_batch_not_divisible": Case(TRAIN, [*TINY, "--total_batch_size=200"], ("--total_batch_size=200", "128")),
    "core_metric_every": Case(TRAIN, ["--core_metric_every=5", *TINY], ("core_metric_every",)),
    "tokenizer_without_markers": Case(TRAIN, ["--direction=bidirectional", *TINY], ("marker",),
                                      tokenizer_without_markers),
    # base_train: names, numbers, files (the safety review's "Tracebacks" list)
    "model_tag_is_a_path": Case(TRAIN, ["--model_tag=../../x", *TINY], ("invalid model tag", "../../x")),
    "nan_learning_rate": Case(TRAIN, [*TINY, "--matrix_lr=nan"], ("--matrix_lr=nan", "finite")),
    "log_every_0": Case(TRAIN, [*TINY, "--log_every=0"], ("--log_every=0",)),
    "corrupt_tokenizer_json": Case(TRAIN, TINY, ("tokenizer.json is corrupt", "tok_train"), truncate_tokenizer_json),
    "resume_larger_max_seq_len": Case(TRAIN, [f"--model_tag={TINY_TAG}", f"--resume_from_step={TINY_STEP}", *TINY,
                                              "--max_seq_len=128", f"--num_iterations={TINY_STEP + 1}"],
                                      ("--max_seq_len=128", "checkpoint: 64"), checkpoint=True),
    # base_train: data
    "no_shards": Case(TRAIN, TINY, ("no shards", "nanochat.dataset"), remove_shards),
    "empty_shard": Case(TRAIN, TINY, ("shard_00000.parquet", "empty"), empty_shard),
    "shard_without_text": Case(TRAIN, TINY, ("shard_00000.parquet", "'text'"), shard_without_text),
    "non_utf8_text": Case(TRAIN, TINY, ("shard_00000.parquet", "UTF-8"), non_utf8_shard),
    # base_eval
    "eval_max_seq_len": Case(EVAL_SCRIPT, [f"--model_tag={TINY_TAG}", "--max_seq_len=128", *EVAL],
                             ("--max_seq_len=128", "64"), checkpoint=True),
    "eval_unknown_tag": Case(EVAL_SCRIPT, ["--model_tag=nosuchtag", *EVAL], ("nosuchtag", TINY_TAG), checkpoint=True),
    "eval_missing_checkpoint_dir": Case(EVAL_SCRIPT, [f"--model_tag={TINY_TAG}", *EVAL],
                                        (TINY_TAG, "no base checkpoint"), remove_checkpoints, checkpoint=True),
    "eval_no_checkpoints_no_tag": Case(EVAL_SCRIPT, EVAL, ("no base checkpoints",), remove_checkpoints,
                                       checkpoint=True),
    "eval_truncated_model": Case(EVAL_SCRIPT, [f"--model_tag={TINY_TAG}", *EVAL], (f"model_{TINY_STEP:06d}.pt", "corrupt"),
                                 truncate_model_file, checkpoint=True),
    "eval_garbage_model": Case(EVAL_SCRIPT, [f"--model_tag={TINY_TAG}", *EVAL], (f"model_{TINY_STEP:06d}.pt", "corrupt"),
                               garbage_model_file, checkpoint=True),
    # dataset and tokenizer entry points
    "dataset_neither_source": Case("nanochat.dataset", [], ("--builtin", "-n")),
    "dataset_both_sources": Case("nanochat.dataset", ["--builtin", "-n", "2"], ("--builtin", "-n")),
    "tok_train_existing": Case("scripts.tok_train", ["--vocab_size=300", "--max_chars=10000"],
                               ("already exists", "--overwrite")),
}


@pytest.fixture(scope="module")
def tiny_checkpoint(trained):
    """A base dir holding the session's checkpoints (TINY_TAG: T=64, step TINY_STEP); read-only."""
    return trained["dir"]


@pytest.fixture(scope="module")
def failures(corpus_template, tiny_checkpoint, tmp_path_factory):
    """{case id: (result, files before, files after)}, every case run in its own base dir."""
    out = {}
    for case_id, case in CASES.items():
        base = copy_base(tiny_checkpoint if case.checkpoint else corpus_template["dir"], tmp_path_factory, case_id)
        if case.prepare:
            case.prepare(base)
        before = snapshot(base)
        result = run_inprocess(case.module, *case.args, base_dir=base)
        out[case_id] = (result, before, snapshot(base))
    return out


@pytest.mark.parametrize("case_id", list(CASES))
def test_bad_input_fails_cleanly(failures, case_id):
    result, before, after = failures[case_id]
    assert_one_line_error(result, *CASES[case_id].fragments)
    assert after == before, "a failed command changed files under the base dir"


def test_corrupt_checkpoint_message_gives_no_pickle_advice(failures):
    result, _, _ = failures["eval_garbage_model"]
    line = assert_one_line_error(result, f"model_{TINY_STEP:06d}.pt")
    assert "weights_only" not in line and "will likely succeed" not in line


def test_the_tiny_checkpoint_evaluates(trained_base_dir):
    # The control for the base_eval failures: the same command on intact input works.
    base = trained_base_dir
    result = run_inprocess(EVAL_SCRIPT, f"--model_tag={TINY_TAG}", "--max_seq_len=64", *EVAL, base_dir=base)
    assert result.returncode == 0, result.stderr
    assert os.path.isfile(os.path.join(os.path.dirname(tiny_model_file(base)), "evaluations",
                                       f"bpb_step{TINY_STEP:06d}.json"))
