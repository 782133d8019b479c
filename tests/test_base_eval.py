"""scripts.base_eval: the arrow of time on tiny forward and backward models, comparable byte
counts across directions (docs/DESIGN.md §3), evaluation files beside the checkpoints, and refusing
to overwrite an evaluation."""

import json
import os

import pytest

from conftest import TRAINED_STEPS, TRAINED_TAGS, assert_one_line_error, copy_base, run_inprocess, snapshot
import shutil
from conftest import ckpt_dir, train_tiny

STEPS = TRAINED_STEPS
TAGS = {d: TRAINED_TAGS[d] for d in ("forward", "backward")}
EVAL_TOKENS = 3000


def eval_args():
    return [f"--model_tag={TAGS['forward']},{TAGS['backward']}", f"--eval_tokens={EVAL_TOKENS}",
            "--device_batch_size=8", "--device_type=cpu"]


def evaluation_file(base, tag):
    return os.path.join(base, "base_checkpoints", tag, "evaluations", f"bpb_step{STEPS:06d}.json")


@pytest.fixture(scope="module")
def arrow(trained, corpus_template, tmp_path_factory):
    """The session's forward and backward models (in a copy), evaluated by one base_eval call.
    The evaluation files are read right away, so later tests may rewrite them."""
    base = copy_base(trained["dir"], tmp_path_factory, "arrow")
    result = run_inprocess("scripts.base_eval", *eval_args(), base_dir=base)
    assert result.returncode == 0, result.stderr
    records = {}
    for direction, tag in TAGS.items():
        with open(evaluation_file(base, tag)) as f:
            records[direction] = json.load(f)
    return {"base": base, "result": result, "records": records, "val": corpus_template["val"]}


def bpb(record, direction):
    return record["results"][direction]["bpb"]


def test_each_model_prefers_its_own_direction(arrow):
    fwd, bwd = arrow["records"]["forward"], arrow["records"]["backward"]
    assert fwd["trained_direction"] == "forward" and bwd["trained_direction"] == "backward"
    assert bpb(fwd, "forward") < bpb(fwd, "backward")
    assert bpb(bwd, "backward") < bpb(bwd, "forward")
    for record in (fwd, bwd):
        f, b = bpb(record, "forward"), bpb(record, "backward")
        assert record["arrow_of_time_gap"] == pytest.approx((b - f) / f)
    assert fwd["arrow_of_time_gap"] > 0 > bwd["arrow_of_time_gap"]


def test_matrix_is_printed(arrow):
    out = arrow["result"].stdout
    header = [i for i, line in enumerate(out.splitlines()) if line.split()[:3] == ["model", "trained", "bpb"]]
    assert len(header) == 1, out
    rows = [line.split() for line in out.splitlines()[header[0] + 1:] if line.strip()]
    assert [r[:2] for r in rows] == [[TAGS["forward"], "forward"], [TAGS["backward"], "backward"]]
    for row, direction in zip(rows, TAGS):
        record = arrow["records"][direction]
        assert float(row[2]) == pytest.approx(bpb(record, "forward"), abs=1e-4)
        assert float(row[3]) == pytest.approx(bpb(record, "backward"), abs=1e-4)


def test_evaluation_files_sit_beside_checkpoints(arrow):
    for direction, tag in TAGS.items():
        path = evaluation_file(arrow["base"], tag)
        assert os.path.isfile(path)
        assert os.path.isfile(os.path.join(os.path.dirname(os.path.dirname(path)), f"model_{STEPS:06d}.pt"))
        record = arrow["records"][direction]
        assert record["model_tag"] == tag and record["step"] == STEPS and record["max_seq_len"] == 64
        assert record["eval_tokens"] == EVAL_TOKENS and record["split"] == "val"
        assert not [f for f in os.listdir(os.path.dirname(path)) if ".tmp" in f]


def test_byte_counts_are_identical_across_directions_and_models(arrow):
    counts = set()
    for record in arrow["records"].values():
        for direction in ("forward", "backward"):
            r = record["results"][direction]
            counts.add((r["bytes"], r["tokens"], r["documents"]))
    assert len(counts) == 1, counts
    nbytes, ntokens, ndocs = counts.pop()
    assert ntokens == EVAL_TOKENS and ndocs > 1  # --eval_tokens is a cap: the last document is cut to fit
    # The denominator is the UTF-8 size of exactly the text scored: the first ndocs - 1 documents of
    # the validation shard whole (longer than the context of 64: scored in pieces), then the start
    # of the next one, in reading order.
    from nanochat.tokenizer import get_tokenizer
    tok = get_tokenizer(arrow["base"])
    whole = arrow["val"][:ndocs - 1]
    rest = ntokens - sum(len(tok.encode(d)) for d in whole)
    last = tok.encode(arrow["val"][ndocs - 1])[:rest]
    assert nbytes == sum(len(d.encode("utf-8")) for d in whole) + int(tok.token_byte_lengths()[last].sum())


def test_second_eval_without_overwrite_fails_and_keeps_the_file(arrow):
    base = arrow["base"]
    before = snapshot(base)
    result = run_inprocess("scripts.base_eval", *eval_args(), base_dir=base)
    assert_one_line_error(result, os.path.basename(evaluation_file(base, TAGS["forward"])), "--overwrite")
    assert snapshot(base) == before


def test_overwrite_replaces_the_file(arrow):
    base = arrow["base"]
    path = evaluation_file(base, TAGS["backward"])
    other = evaluation_file(base, TAGS["forward"])
    with open(other, "rb") as f:
        other_before = f.read()
    result = run_inprocess("scripts.base_eval", f"--model_tag={TAGS['backward']}", "--eval_directions=backward",
                        f"--eval_tokens={EVAL_TOKENS}", "--device_batch_size=8", "--device_type=cpu", "--overwrite",
                        base_dir=base)
    assert result.returncode == 0, result.stderr
    with open(path) as f:
        record = json.load(f)
    assert set(record["results"]) == {"backward"} and record["arrow_of_time_gap"] is None
    # Evaluation is deterministic: the same documents give the same number as before.
    assert bpb(record, "backward") == pytest.approx(bpb(arrow["records"]["backward"], "backward"), rel=1e-6)
    with open(other, "rb") as f:
        assert f.read() == other_before


def test_consistency_of_a_forward_backward_pair(arrow):
    """--eval=consistency with a forward and a backward model: per-document bpb of the forward
    model read forward against the backward model read backward, on the bpb documents."""
    base = arrow["base"]
    result = run_inprocess("scripts.base_eval", "--eval=consistency", *eval_args()[:1], f"--eval_tokens={EVAL_TOKENS}",
                        "--device_batch_size=8", "--device_type=cpu", base_dir=base)
    assert result.returncode == 0, result.stderr
    evaluations = os.path.dirname(evaluation_file(base, TAGS["forward"]))
    name = f"consistency_pair_{TAGS['backward']}_step{STEPS:06d}"
    assert os.path.isfile(os.path.join(evaluations, name + ".png"))
    with open(os.path.join(evaluations, name + ".json")) as f:
        record = json.load(f)
    per_doc, stats = record["per_document"], record["stats"]
    fwd, bwd = arrow["records"]["forward"]["results"]["forward"], arrow["records"]["backward"]["results"]["backward"]
    assert stats["documents"] == fwd["documents"] == len(per_doc["bytes"])
    assert sum(per_doc["bytes"]) == fwd["bytes"] == bwd["bytes"]
    # One document per row here, packed rows in evaluate_bpb: the same windows, almost the same sums.
    # (in a packed row a document also attends to the documents before it: a small difference)
    assert sum(per_doc["nats_forward"]) == pytest.approx(fwd["nats"], rel=1e-2)
    assert sum(per_doc["nats_backward"]) == pytest.approx(bwd["nats"], rel=1e-2)
    assert "correlation" in result.stdout
    one_way = run_inprocess("scripts.base_eval", "--eval=consistency", f"--model_tag={TAGS['forward']}", base_dir=base)
    assert_one_line_error(one_way, "bidirectional model", "--model_tag")


# ---- from the safety review (docs/SAFETY.md): evaluations go where the tag resolves

def test_evaluation_paths_come_from_the_resolved_tag_not_the_metadata(base_dir, tmp_path):
    from nanochat.checkpoint_manager import load_model, meta_path
    from scripts.base_eval import main as eval_main
    train_tiny("--num_iterations=2", tag="A")
    elsewhere = tmp_path / "elsewhere"
    path = meta_path(ckpt_dir(base_dir, "A"), 2)
    with open(path) as f:
        meta = json.load(f)
    meta["model_tag"] = str(elsewhere)  # a tampered (or hand-edited) record
    with open(path, "w") as f:
        json.dump(meta, f)
    shutil.copytree(ckpt_dir(base_dir, "A"), ckpt_dir(base_dir, "B"))  # cp -r A B

    _, _, loaded = load_model("base", "cpu", model_tag="B")
    assert loaded["model_tag"] == "B" and loaded["saved_model_tag"] == str(elsewhere)
    assert loaded["evaluations_dir"] == os.path.join(ckpt_dir(base_dir, "B"), "evaluations")

    eval_main(["--model_tag=A", "--eval_tokens=128", "--device_type=cpu"])
    a_record = os.path.join(ckpt_dir(base_dir, "A"), "evaluations", "bpb_step000002.json")
    before = open(a_record).read()
    eval_main(["--model_tag=B", "--eval_tokens=128", "--device_type=cpu", "--overwrite"])
    assert open(a_record).read() == before, "evaluating the copy B replaced A's record"
    assert os.path.isfile(os.path.join(ckpt_dir(base_dir, "B"), "evaluations", "bpb_step000002.json"))
    assert not elsewhere.exists()
