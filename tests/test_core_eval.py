"""nanochat.core_eval: the CORE-style benchmark scored the same way in every direction.

The rows of both readings hold the same tokens with the demonstrations read first; whole-text
scoring ranks forward multiple choice like the conditional likelihood of the choice (and
backward schema like that of the context); a language-modelling item's target in the backward
reading is the item's first tokens; the bundle downloads through the same code offline (file://)
and fails with one clear line without a network; base_eval --eval=core and base_train
--core_metric_every write core_step<N>.json."""

import json
import os
import shutil
import zipfile

import pytest
import torch

from conftest import REPO, copy_base, run_inprocess
from nanochat.common import UserError
from nanochat.core_eval import (CoreBenchmark, centered_accuracy, download_bundle, ensure_bundle, evaluate_task,
                                item_rows, load_items, load_task_list, markdown_section, score_rows,
                                split_at_delimiter)
from nanochat.direction import DirectionSpec, orient_text_tokens
from nanochat.gpt import GPT, config_for_depth

FIXTURE = os.path.join(REPO, "tests", "fixtures", "eval_bundle")


@pytest.fixture(scope="module")
def tasks():
    return {t["label"]: (t, load_items(t)) for t in load_task_list(FIXTURE)}


def test_bundle_fixture_loads_three_task_types(tasks):
    types = {label: t["task_type"] for label, (t, _) in tasks.items()}
    assert types == {"story_choice": "multiple_choice", "story_schema": "schema", "story_ending": "language_modeling"}
    t, items = tasks["story_choice"]
    assert t["random_baseline"] == pytest.approx(0.25) and t["num_fewshot"] == 2 and t["delimiter"] == "\nAnswer: "
    assert len(items) == 6 and all(len(i["options"]) == 4 for i in items)
    assert all(len(i["options"]) == 1 for i in tasks["story_ending"][1])


def test_delimiter_space_moves_to_the_continuation():
    assert split_at_delimiter("Q: where?", "\nAnswer: ", "Paris") == ("Q: where?\nAnswer:", " Paris")
    assert split_at_delimiter("ctx", "", "x") == ("ctx", "x")


@pytest.mark.parametrize("trained", ["forward", "backward", "bidirectional"])
def test_rows_hold_the_same_tokens_with_demonstrations_read_first(tok, tasks, trained):
    spec = DirectionSpec.from_tokenizer(trained, tok)
    for label, (task, items) in tasks.items():
        for index in range(len(items)):
            built = {d: item_rows(tok, spec, task, items, index, d, 256) for d in ("forward", "backward")}
            (fwd_rows, fwd_shots, k), (bwd_rows, bwd_shots, k2) = built["forward"], built["backward"]
            assert fwd_shots == bwd_shots == task["num_fewshot"] and k == k2
            for (f_ids, f_roles), (b_ids, b_roles) in zip(fwd_rows, bwd_rows):
                assert sorted(f_ids[spec.header_len:]) == sorted(b_ids[spec.header_len:])
                if trained == "bidirectional":
                    assert f_ids[1] == spec.forward_id and b_ids[1] == spec.backward_id
                for ids, roles in ((f_ids, f_roles), (b_ids, b_roles)):
                    first_item = roles.index("item")
                    assert set(roles[first_item:]) == {"item"}, "demonstrations must come before the item"
                # The item's tokens in reading order are the same in both readings.
                f_item = [t for t, r in zip(f_ids, f_roles) if r == "item"]
                b_item = [t for t, r in zip(b_ids, b_roles) if r == "item"][::-1]
                assert f_item == b_item
            text = orient_text_tokens(bwd_rows[0][0][spec.header_len:], "backward")  # back to reading order
            context, continuation = items[index]["options"][0]
            given, cont = split_at_delimiter(context, task["delimiter"], continuation)
            assert tok.decode(text).startswith(tok.decode(tok.encode(given) + tok.encode(cont)))


def test_short_context_drops_the_same_demonstrations_and_skips_what_cannot_fit(tok, tasks):
    spec = DirectionSpec.from_tokenizer("forward", tok)
    task, items = tasks["story_ending"]
    item_len = len(tok.encode(items[0]["options"][0][0])) + len(tok.encode(items[0]["options"][0][1]))
    seq_len = item_len + 12
    shots = {}
    for d in ("forward", "backward"):
        rows, shots[d], _ = item_rows(tok, spec, task, items, 0, d, seq_len)
        assert all(len(ids) <= seq_len + 1 for ids, _ in rows)
    assert shots["forward"] == shots["backward"] < task["num_fewshot"]
    assert item_rows(tok, spec, task, items, 0, "forward", item_len - 2) is None


class Oracle:
    """A stand-in model whose greedy prediction at every position is the row's true next token,
    except at the positions it was told to get wrong."""

    def __init__(self, rows, vocab_size):
        self.rows, self.vocab = rows, vocab_size  # {tuple(inputs): (ids, positions to get wrong)}

    def __call__(self, x):
        logits = torch.zeros(x.size(0), x.size(1), self.vocab)
        for r in range(x.size(0)):
            prefix = tuple(x[r].tolist())
            ids, bad = next(v for k, v in self.rows.items() if prefix[:len(k)] == k)
            for t in range(len(ids) - 1):
                target = ids[t + 1] if t + 1 not in bad else (ids[t + 1] + 1) % self.vocab
                logits[r, t, target] = 10.0
        return logits


def _oracle(tok, spec, task, items, wrong):
    """An Oracle wrong on the item tokens at reading-order offsets `wrong` (0 = the item's first
    token, -1 = its last), in both readings."""
    rows = {}
    for d in ("forward", "backward"):
        for index in range(len(items)):
            (ids, roles), = item_rows(tok, spec, task, items, index, d, 256)[0]
            order = [i for i, r in enumerate(roles) if r == "item"]
            if d == "backward":
                order = order[::-1]  # reading order of the item's tokens in the oriented row
            rows[tuple(ids[:-1])] = (ids, {order[w] for w in wrong})
    return Oracle(rows, tok.get_vocab_size())


@pytest.mark.parametrize("wrong,expected", [((), {"forward": 1.0, "backward": 1.0}),
                                            ((0,), {"forward": 1.0, "backward": 0.0}),
                                            ((-1,), {"forward": 0.0, "backward": 1.0})])
def test_language_modelling_target_is_the_continuation_in_the_evaluated_reading(tok, tasks, wrong, expected):
    """Forward the target is the task's continuation (the item's last tokens); backward it is
    the item's first tokens, given the rest. An oracle wrong only on the item's first token
    fails only backward; wrong only on its last token, only forward."""
    task, items = tasks["story_ending"]
    spec = DirectionSpec.from_tokenizer("forward", tok)
    model = _oracle(tok, spec, task, items, wrong)
    for d, acc in expected.items():
        r = evaluate_task(model, tok, task, items, "forward", d, torch.device("cpu"), 256)
        assert r["count"] == len(items) and r["correct"] / r["count"] == acc, (d, r)


@pytest.fixture(scope="module")
def random_model(tok):
    torch.manual_seed(0)
    model = GPT.build(config_for_depth(1, tok.get_vocab_size(), 256), torch.device("cpu"))
    with torch.no_grad():  # a context-dependent random network (init zeroes the output projections)
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("label,direction", [("story_choice", "forward"), ("story_schema", "backward")])
def test_whole_text_ranks_like_the_conditional_of_what_is_read_last(tok, tasks, random_model, label, direction):
    """Whole-text log-likelihood minus that of the part the options do not share is the same
    for every option: the shared part drops out of the ranking (docs/DESIGN.md §7)."""
    task, items = tasks[label]
    spec = DirectionSpec.from_tokenizer("forward", tok)
    for index in range(len(items)):
        rows, _, _ = item_rows(tok, spec, task, items, index, direction, 256)
        whole = [s for s, _ in score_rows(random_model, rows, [0] * len(rows), torch.device("cpu"))]
        # The part that differs between options: each option's own tokens, read last.
        n_shared = []
        for ids, roles in rows:
            item = [t for t, r in zip(ids, roles) if r == "item"]
            n_shared.append(item)
        common = 0
        while all(len(it) > common and it[common] == n_shared[0][common] for it in n_shared):
            common += 1
        partial_rows = []
        for ids, roles in rows:
            first = roles.index("item")
            partial_rows.append((ids, roles[:first] + ["context"] * common + roles[first + common:]))
        partial = [s for s, _ in score_rows(random_model, partial_rows, [0] * len(rows), torch.device("cpu"))]
        shared = [w - p for w, p in zip(whole, partial)]
        assert common > 0
        assert max(shared) - min(shared) < 1e-3, shared
        assert max(range(len(whole)), key=whole.__getitem__) == max(range(len(partial)), key=partial.__getitem__)


def test_centred_accuracy_and_core_aggregate(tok, random_model):
    assert centered_accuracy(0.25, 0.25) == 0.0 and centered_accuracy(1.0, 0.25) == 1.0
    assert centered_accuracy(0.0, 0.5) == -1.0
    bench = CoreBenchmark(FIXTURE, max_per_task=4)
    results = bench.evaluate(random_model, tok, "forward", ["forward", "backward"], torch.device("cpu"), 256,
                             log=lambda *a: None)
    assert set(results["tasks"]) == {"story_choice", "story_schema", "story_ending"}
    assert results["native_directions"] == ["forward"]
    for d in ("forward", "backward"):
        centred = []
        for t in results["tasks"].values():
            r = t["results"][d]
            assert r["count"] == 4 and r["accuracy"] == pytest.approx(r["correct"] / 4)
            assert r["centered"] == pytest.approx(centered_accuracy(r["accuracy"], t["random_baseline"]))
            centred.append(r["centered"])
        assert results["core"][d] == pytest.approx(sum(centred) / 3)
    with pytest.raises(UserError, match="story_choice"):
        CoreBenchmark(FIXTURE, labels=["nope"])


def _zip_fixture(tmp_path):
    path = str(tmp_path / "bundle.zip")
    with zipfile.ZipFile(path, "w") as z:
        for root, _, files in os.walk(FIXTURE):
            for name in files:
                full = os.path.join(root, name)
                z.write(full, os.path.join("eval_bundle", os.path.relpath(full, FIXTURE)))
    return path


def test_download_unpacks_the_bundle_and_caches_it(tmp_path):
    base = str(tmp_path / "base")
    os.makedirs(base)
    url = "file://" + _zip_fixture(tmp_path)
    path = download_bundle(url, base_dir=base, max_attempts=1)
    assert path == os.path.join(base, "eval_bundle")
    assert {t["label"] for t in load_task_list(path)} == {"story_choice", "story_schema", "story_ending"}
    assert sorted(os.listdir(base)) == ["eval_bundle"]  # no temporary files left
    # Cached: no download is attempted again (this URL would fail).
    assert ensure_bundle(None, "http://127.0.0.1:9/none.zip", base_dir=base) == path


def test_offline_download_is_one_clear_error(tmp_path):
    base = str(tmp_path / "base")
    os.makedirs(base)
    with pytest.raises(UserError) as e:
        download_bundle("http://127.0.0.1:9/eval_bundle.zip", base_dir=base, max_attempts=2, backoff_s=0)
    message = str(e.value)
    assert "127.0.0.1:9" in message and "--bundle_dir" in message and "\n" not in message
    assert os.listdir(base) == []
    with pytest.raises(UserError, match="core.yaml"):
        ensure_bundle(str(tmp_path), base_dir=base)


def test_markdown_section(tmp_path):
    assert markdown_section("run", str(tmp_path), str(tmp_path / "plots")) is None
    record = {"trained_direction": "backward", "native_directions": ["backward"],
              "core": {"forward": 0.1, "backward": 0.2},
              "tasks": {"t": {"task_type": "schema", "num_fewshot": 1, "random_baseline": 0.5,
                              "results": {"forward": {"accuracy": 0.55, "centered": 0.1},
                                          "backward": {"accuracy": 0.6, "centered": 0.2}}}}}
    with open(tmp_path / "core_step000007.json", "w") as f:
        json.dump(record, f)
    text = markdown_section("run", str(tmp_path), str(tmp_path / "plots"))
    assert "Step 7" in text and "acc forward (cross)" in text and "acc backward |" in text
    assert "**+0.1000**" in text and "**+0.2000**" in text
    rows = [line for line in text.splitlines() if line.startswith("|")]
    assert len({line.count("|") for line in rows}) == 1  # every row has the header's columns


# ---- the commands ----------------------------------------------------------------------------------
TRAIN = ["--depth=2", "--max_seq_len=64", "--device_batch_size=2", "--total_batch_size=128", "--num_iterations=4",
         "--eval_every=2", "--eval_tokens=256", "--device_type=cpu", "--model_tag=core_tiny", "--sample_every=-1"]


@pytest.fixture(scope="module")
def trained(corpus_template, tmp_path_factory):
    """A tiny forward model trained with --core_metric_every=2 (the bundle cached in the base dir)."""
    base = copy_base(corpus_template["dir"], tmp_path_factory, "core")
    shutil.copytree(FIXTURE, os.path.join(base, "eval_bundle"))
    result = run_inprocess("scripts.base_train", *TRAIN, "--core_metric_every=2", base_dir=base)
    assert result.returncode == 0, result.stderr
    return {"base": base, "result": result, "evaluations": os.path.join(base, "base_checkpoints", "core_tiny",
                                                                        "evaluations")}


def test_base_train_core_metric_every_writes_core_files(trained):
    files = sorted(os.listdir(trained["evaluations"]))
    assert files == ["core_step000002.json", "core_step000004.json"], files
    with open(os.path.join(trained["evaluations"], "core_step000004.json")) as f:
        record = json.load(f)
    assert record["step"] == 4 and list(record["core"]) == ["forward"] and record["trained_direction"] == "forward"
    assert "CORE forward" in trained["result"].stdout


def test_base_eval_core_and_bpb(trained):
    base = trained["base"]
    os.remove(os.path.join(trained["evaluations"], "core_step000004.json"))
    result = run_inprocess("scripts.base_eval", "--eval=bpb,core", "--model_tag=core_tiny", "--eval_tokens=256",
                           "--device_type=cpu", "--device_batch_size=4", f"--bundle_dir={FIXTURE}", "--max_per_task=3",
                           base_dir=base)
    assert result.returncode == 0, result.stderr
    with open(os.path.join(trained["evaluations"], "core_step000004.json")) as f:
        record = json.load(f)
    assert set(record["core"]) == {"forward", "backward"} and record["max_per_task"] == 3
    assert all(t["results"]["backward"]["count"] == 3 for t in record["tasks"].values())
    assert os.path.isfile(os.path.join(trained["evaluations"], "bpb_step000004.json"))
    assert "CORE (mean centred accuracy)" in result.stdout


def test_cli_mistakes_are_user_errors(trained, tmp_path, monkeypatch):
    """Refused before any work (run_main turns each into one 'error:' line)."""
    from scripts import base_eval, base_train
    monkeypatch.setenv("NANOCHAT_BASE_DIR", trained["base"])
    with pytest.raises(UserError, match="--eval='bpb,cor'.*core"):
        base_eval.main(["--eval=bpb,cor", "--model_tag=core_tiny"])
    with pytest.raises(UserError, match="--core_metric_every=3 must be a multiple of --eval_every=2"):
        base_train.validate_args(base_train.build_parser().parse_args([*TRAIN, "--core_metric_every=3"]))
    with pytest.raises(UserError, match="--bundle_dir.*core.yaml"):
        base_eval.main(["--eval=core", "--model_tag=core_tiny", "--device_type=cpu", f"--bundle_dir={tmp_path}",
                        "--overwrite"])


def test_report_registers_core_rerank_and_consistency_sections(tmp_path):
    """nanochat/research/report.py renders the three sections when their files exist."""
    from nanochat.consistency import consistency_record, write_consistency
    from nanochat.evaluations import record_path
    from nanochat.research.report import REPORT_SECTIONS, evaluation_sections
    from nanochat.rerank import summarise
    assert {REPORT_SECTIONS[k] for k in ("core", "rerank", "consistency")} == {
        "nanochat.core_eval", "nanochat.rerank", "nanochat.consistency"}
    evaluations = str(tmp_path / "evaluations")
    record = {"trained_direction": "forward", "native_directions": ["forward"], "core": {"forward": 0.25},
              "tasks": {"t": {"task_type": "schema", "num_fewshot": 1, "random_baseline": 0.5,
                              "results": {"forward": {"accuracy": 0.625, "centered": 0.25}}}}}
    os.makedirs(evaluations)
    with open(os.path.join(evaluations, "core_step000003.json"), "w") as f:
        json.dump(record, f)
    picks = {"forward": 1.0, "backward": 0.0, "sum": 1.0}
    with open(record_path(evaluations, "rerank_arithmetic", 3), "w") as f:
        json.dump({"num_samples": 4, "backward_model": "bwd",
                   "summary": summarise([{"random": 0.5, "pass": 1.0, "picks": picks}] * 2)}, f)
    write_consistency(record_path(evaluations, "consistency", 3),
                      consistency_record("bidirectional", ([1.0, 2.0], [3, 4]), ([1.5, 2.5], [3, 4]), [3, 4]), "t")

    class Experiments:
        @staticmethod
        def evaluations_dir(experiment_id):
            return evaluations

    plots = str(tmp_path / "report")
    os.makedirs(plots)
    sections = dict(evaluation_sections([(Experiments, "run")], plots))
    assert set(sections) >= {"CORE benchmark (in each direction)", "Reranking with a backward model",
                             "Factorisation consistency"}
    assert "+0.2500" in sections["CORE benchmark (in each direction)"][0][1]
    assert "| bwd |" in sections["Reranking with a backward model"][0][1]
    assert os.listdir(plots) == ["run_consistency_step000003.png"]
