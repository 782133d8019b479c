"""scripts.chat_eval and nanochat.chat_eval_lib: whole-text likelihood scoring of multiple
choice in each direction (docs/DESIGN.md §7), generative evaluation with task rewards in the model's
directions (§5-6), evaluation files beside the checkpoint, and clean errors.

Models are the session's tiny base checkpoints (conftest.py: depth 2, 64-token context) in all
three directions: the tests check the plumbing and the scoring definition, not what a model learned.
The multiple-choice and GSM8K data are small local fixtures read through the tasks' own loaders
($NANOCHAT_TASK_DATA_DIR)."""

import json
import os
from types import SimpleNamespace

import pytest
import torch

from conftest import TRAINED_STEPS, TRAINED_TAGS, assert_one_line_error, copy_base, run_inprocess

TAGS = TRAINED_TAGS
STEPS = TRAINED_STEPS
# Short questions: a rendered multiple-choice conversation must fit the 64-token context.
ARC_ROWS = [
    {"question": "Sky color?", "choices": {"text": ["blue", "green"], "label": ["A", "B"]}, "answerKey": "A"},
    {"question": "Is ice hot?", "choices": {"text": ["no", "yes"], "label": ["1", "2"]}, "answerKey": "1"},
    {"question": "Two plus two?", "choices": {"text": ["four", "five"], "label": ["A", "B"]}, "answerKey": "A"},
    # Too long for the context: skipped and counted, never cropped.
    {"question": "Which of these statements about the water cycle is true?",
     "choices": {"text": ["rain falls", "snow melts", "lakes evaporate"], "label": ["A", "B", "C"]}, "answerKey": "C"},
]
FITTING_ARC_ROWS = 3
GSM8K_ROWS = [{"question": "What is 2+2?", "answer": "2+2=<<2+2=4>>4\n#### 4"}]

def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def models(trained, tmp_path_factory):
    """A copy of the session's checkpoints (evaluations are written beside them) with task fixtures."""
    base = copy_base(trained["dir"], tmp_path_factory, "chat_models")
    write_jsonl(os.path.join(base, "task_data", "arc_easy", "test.jsonl"), ARC_ROWS)
    write_jsonl(os.path.join(base, "task_data", "gsm8k", "test.jsonl"), GSM8K_ROWS)
    return base


@pytest.fixture
def env(models, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", models)
    monkeypatch.setenv("NANOCHAT_TASK_DATA_DIR", os.path.join(models, "task_data"))
    monkeypatch.setenv("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    return models


def evaluation(base, tag, task):
    path = os.path.join(base, "base_checkpoints", tag, "evaluations", f"chat_{task}_step{STEPS:06d}.json")
    with open(path) as f:
        return json.load(f)


def chat_eval(*args):
    from scripts.chat_eval import main
    main(["--source=base", "--device_type=cpu", *args])


# ---- scoring definition ------------------------------------------------------------------------
class CostModel(torch.nn.Module):
    """Stands in for GPT: the loss of a target token is costs[token], whatever the context."""

    def __init__(self, costs, sequence_len=512):
        super().__init__()
        self.costs, self.config = costs, SimpleNamespace(sequence_len=sequence_len)

    def forward(self, x, y, loss_reduction="none"):
        return torch.where(y >= 0, self.costs[y.clamp(min=0)], torch.zeros(()))


class ListTask(list):
    eval_type = "categorical"


def mc_example(answer, question="Which is hot?", choices=("ice", "fire", "snow")):
    from tasks.multiple_choice import multiple_choice_conversation
    return multiple_choice_conversation(question, list(choices), answer)


def test_mc_picks_the_choice_with_the_highest_whole_text_likelihood(tok):
    from nanochat.chat_eval_lib import choice_rows, evaluate_multiple_choice, sequence_logprobs
    from nanochat.direction import DirectionSpec
    letter_ids = [tok.encode(letter) for letter in "ABC"]
    assert all(len(ids) == 1 for ids in letter_ids)
    costs = torch.ones(tok.get_vocab_size())
    costs[letter_ids[1][0]] = 0.25  # "B" is the likeliest answer; everything else costs 1 nat
    model = CostModel(costs)
    for direction in ("forward", "backward", "bidirectional"):
        spec = DirectionSpec.from_tokenizer(direction, tok)
        for concrete in ("forward", "backward") if direction == "bidirectional" else (direction,):
            result = evaluate_multiple_choice(model, tok, spec, ListTask([mc_example(1), mc_example(2)]), [0, 1],
                                              concrete, "cpu")
            assert result["predictions"] == [(0, 1, 1), (1, 1, 2)]
            assert (result["correct"], result["n"]) == (1.0, 2)
            # The score sums every position but BOS and the marker: each costs 1 except a "B"
            # (the answer, and the "B." of the listing in the question).
            rows = choice_rows(spec, tok, mc_example(0), concrete)
            scores = sequence_logprobs(model, rows, "cpu", batch_size=2)
            for (ids, _), score in zip(rows, scores):
                scored = ids[spec.header_len:]
                assert score == pytest.approx(-len(scored) + 0.75 * scored.count(letter_ids[1][0]))


def manual_score(model, ids, header_len):
    """Sum of log p(ids[i] | ids[:i]) for i past the header (BOS, marker), computed directly."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0].double(), dim=-1)
    return sum(logp[i - 1, ids[i]].item() for i in range(header_len, len(ids)))


def test_backward_mc_scores_the_reversed_whole_text(env):
    """Backward (and the bidirectional model's backward draw) score [BOS, (marker,)] + the
    reversed rendered conversation: checked against a manual reversal and a direct sum."""
    from nanochat.chat_eval_lib import choice_rows, sequence_logprobs, with_answer
    from nanochat.checkpoint_manager import load_model
    from nanochat.direction import DirectionSpec
    markers = {TAGS["backward"]: lambda tok: [], TAGS["bidirectional"]: lambda tok: [tok.get_backward_token_id()]}
    for tag, header in markers.items():
        model, tok, meta = load_model("base", "cpu", model_tag=tag)
        spec = DirectionSpec.from_tokenizer(meta["direction"], tok)
        example = mc_example(0, "Sky?", ("blue", "red"))  # short: it must fit the 64-token context
        rows = choice_rows(spec, tok, example, "backward")
        scores = sequence_logprobs(model, rows, "cpu")
        forward_scores = sequence_logprobs(model, choice_rows(spec, tok, example, "forward"), "cpu")
        for choice, (ids, mask), score, fwd in zip(example["choices"], rows, scores, forward_scores):
            reading, _ = tok.render_conversation(with_answer(example, choice), train_on="all")
            expected = [tok.get_bos_token_id()] + header(tok) + list(reversed(reading[1:]))
            assert ids == expected
            assert score == pytest.approx(manual_score(model, ids, 1 + len(header(tok))), rel=1e-6)
            assert abs(score - fwd) > 1e-6  # the orientation changes the likelihood


# ---- the command line ----------------------------------------------------------------------------
def test_generative_arithmetic_in_both_directions_writes_json(env, capsys):
    chat_eval(f"--model_tag={TAGS['bidirectional']}", "--tasks=arithmetic", "--max_examples=3",
              "--max_new_tokens=4")
    out = capsys.readouterr().out
    record = evaluation(env, TAGS["bidirectional"], "arithmetic")
    assert record["trained_direction"] == "bidirectional" and record["eval_directions"] == ["forward", "backward"]
    for direction in ("forward", "backward"):
        r = record["results"][direction]
        assert 0.0 <= r["accuracy"] <= 1.0 and r["n"] == 3
        assert f"arithmetic [{direction}]: accuracy" in out
        given = [s["given"] for s in r["samples"]]
        # forward is given the question, backward the answer (a product) and writes the question
        if direction == "forward":
            assert all(g.startswith("What is") for g in given)
        else:
            assert all(g.isdigit() for g in given)
    # An existing evaluation is kept unless --overwrite.
    from nanochat.common import UserError
    with pytest.raises(UserError, match="already exists"):
        chat_eval(f"--model_tag={TAGS['bidirectional']}", "--tasks=arithmetic", "--max_examples=3")
    chat_eval(f"--model_tag={TAGS['bidirectional']}", "--tasks=arithmetic", "--max_examples=2",
              "--max_new_tokens=2", "--eval_direction=backward", "--overwrite")
    record = evaluation(env, TAGS["bidirectional"], "arithmetic")
    assert list(record["results"]) == ["backward"] and record["n"] == 2 and 0.0 <= record["accuracy"] <= 1.0


def test_multiple_choice_fixture_matches_manual_scores(env):
    """arc_easy from a local fixture, scored both ways by the bidirectional model: each
    prediction is the argmax of the directly computed whole-text log-likelihoods."""
    from nanochat.chat_eval_lib import with_answer
    from nanochat.checkpoint_manager import load_model
    from tasks.registry import get_task
    chat_eval(f"--model_tag={TAGS['bidirectional']}", "--tasks=arc_easy", "--overwrite")
    record = evaluation(env, TAGS["bidirectional"], "arc_easy")
    assert record["eval_type"] == "categorical" and record["mc_answer"] == "letter"
    model, tok, _ = load_model("base", "cpu", model_tag=TAGS["bidirectional"])
    task = get_task("arc_easy", "test")
    bos = tok.get_bos_token_id()
    for direction, marker in (("forward", tok.get_forward_token_id()), ("backward", tok.get_backward_token_id())):
        r = record["results"][direction]
        assert r["n"] == FITTING_ARC_ROWS and r["skipped_too_long"] == len(ARC_ROWS) - FITTING_ARC_ROWS
        for p in r["predictions"]:
            example = task[p["index"]]
            scores = []
            for choice in example["choices"]:
                reading, _ = tok.render_conversation(with_answer(example, choice), train_on="all")
                body = reading[1:] if direction == "forward" else list(reversed(reading[1:]))
                scores.append(manual_score(model, [bos, marker] + body, 2))
            assert p["predicted"] == max(range(len(scores)), key=scores.__getitem__)
            assert p["answer"] == example["answer"]
        assert r["accuracy"] == pytest.approx(sum(p["predicted"] == p["answer"] for p in r["predictions"]) / r["n"])


def test_task_without_the_models_direction_is_skipped_with_a_note(env, capsys):
    chat_eval(f"--model_tag={TAGS['backward']}", "--tasks=arithmetic,gsm8k", "--max_examples=2",
              "--max_new_tokens=2", "--overwrite")
    out = capsys.readouterr().out
    assert "note: skipping task gsm8k" in out and "arithmetic [backward]: accuracy" in out
    assert evaluation(env, TAGS["backward"], "arithmetic")["results"]["backward"]["n"] == 2
    assert not os.path.exists(os.path.join(env, "base_checkpoints", TAGS["backward"], "evaluations",
                                           f"chat_gsm8k_step{STEPS:06d}.json"))


def test_bad_inputs_exit_with_one_error_line(env):
    """As commands (a missing checkpoint; the only task cannot run in the model's direction)."""
    task_env = {"NANOCHAT_TASK_DATA_DIR": os.path.join(env, "task_data")}
    cases = [
        (["--model_tag=no_such_model", "--tasks=arithmetic"], ("no base checkpoint with tag 'no_such_model'",)),
        ([f"--model_tag={TAGS['backward']}", "--tasks=gsm8k"], ("gsm8k", "cannot be generated backward")),
    ]
    results = [run_inprocess("scripts.chat_eval", "--source=base", "--device_type=cpu", *c[0], base_dir=env,
                             env=task_env) for c in cases]
    for (_, fragments), result in zip(cases, results):
        assert_one_line_error(result, *fragments)


@pytest.mark.parametrize("args, fragments", [
    ([f"--model_tag={TAGS['forward']}", "--eval_direction=backward"],
     ("trained forward", "cannot be evaluated backward")),
    ([f"--model_tag={TAGS['forward']}", "--tasks=no_such_task"], ("unknown task 'no_such_task'",)),
    ([f"--model_tag={TAGS['forward']}", "--max_examples=0"], ("--max_examples=0",)),
])
def test_bad_flags_give_one_error_line(env, capsys, args, fragments):
    from nanochat.common import run_main
    from scripts.chat_eval import main
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: main(["--source=base", "--device_type=cpu", "--tasks=arithmetic", *args]))
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and all(f in lines[0] for f in fragments), lines
