"""tasks/direction_wrapper.py and nanochat/direction_eval.py: tasks scored in every direction
(docs/DESIGN.md §7), checked against numbers computed here independently of the library.

Models are built in-process (depth 1, random weights, or a stand-in whose token costs are fixed):
the tests check what is scored and how, not what a model learned."""

import json
import math
import os
from types import SimpleNamespace

import pytest
import torch

from nanochat.common import UserError
from nanochat.direction_eval import (compute_direction_metrics, evaluate_task_multi_direction, markdown_section,
                                     save_direction_evaluation)
from nanochat.evaluations import list_family
from tasks.direction_wrapper import DirectionTaskWrapper

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "tasks")


@pytest.fixture(scope="module")
def gpt(tok):
    from nanochat.gpt import GPT, config_for_depth
    torch.manual_seed(0)
    model = GPT.build(config_for_depth(1, tok.get_vocab_size(), 256), torch.device("cpu"))
    model.init_weights()
    return model.eval()


@pytest.fixture
def arc(monkeypatch):
    from tasks.arc import ARC
    monkeypatch.setenv("NANOCHAT_TASK_DATA_DIR", FIXTURES)
    monkeypatch.setenv("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    return ARC("ARC-Easy", "test")


class CostModel(torch.nn.Module):
    """Stands in for GPT: the loss of a target token is costs[token], whatever the context."""

    def __init__(self, costs, sequence_len=512):
        super().__init__()
        self.costs, self.config = costs, SimpleNamespace(sequence_len=sequence_len)

    def forward(self, x, y, loss_reduction="none"):
        return torch.where(y >= 0, self.costs[y.clamp(min=0)], torch.zeros(()))


def reading_order_rows(tok, conversation):
    """The conversation rendered (every turn) in reading order, by hand."""
    from nanochat.conversation import normalize_messages
    ids = [tok.get_bos_token_id()]
    for m in normalize_messages(conversation):
        ids += [tok.encode_special(f"<|{m['role']}_start|>")] + tok.encode(m["content"]) + \
               [tok.encode_special(f"<|{m['role']}_end|>")]
    return ids


def by_hand(tok, ids, direction, model_direction):
    """Orient by hand: backward reverses everything after BOS; a bidirectional model's marker follows BOS."""
    body = ids[1:] if direction == "forward" else ids[1:][::-1]
    marker = [tok.encode_special(f"<|{direction}|>")] if model_direction == "bidirectional" else []
    return [ids[0]] + marker + body


def logprob_sum(model, ids, only=None):
    """sum over positions i >= 1 of log p(ids[i] | ids[:i]), skipping markers (and, with `only`,
    every target not in `only`)."""
    x, y = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
    with torch.no_grad():
        logits = model(x)
    logp = torch.log_softmax(logits.double(), dim=-1)[0, torch.arange(len(ids) - 1), y[0]]
    keep = [only is None or t in only for t in ids[1:]]
    return float(sum(v for v, k in zip(logp.tolist(), keep) if k))


# ---- the wrapper --------------------------------------------------------------------------------
@pytest.mark.parametrize("model_direction", [None, "forward", "backward", "bidirectional"])
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_render_for_eval_orients_the_whole_conversation(tok, arc, direction, model_direction):
    wrapper = DirectionTaskWrapper(arc, direction, tok, model_direction=model_direction)
    assert len(wrapper) == len(arc) and wrapper[1] == arc[1]  # the conversation itself is untouched
    ids = wrapper.render_for_eval(wrapper[1], None, tok)
    assert ids == by_hand(tok, reading_order_rows(tok, arc[1]), direction, model_direction)
    assert wrapper.scoring == "multiple_choice" and wrapper.not_applicable_reason is None


def test_wrapper_refuses_bidirectional_as_the_evaluated_direction(tok, arc):
    with pytest.raises(UserError, match="model_direction='bidirectional'"):
        DirectionTaskWrapper(arc, "bidirectional", tok)
    with pytest.raises(ValueError, match="forward, backward"):
        DirectionTaskWrapper(arc, "sideways", tok)


def test_generative_scoring_kinds(tok):
    from tasks.arithmetic import TwoWayArithmetic
    from tasks.gsm8k import GSM8K
    arithmetic = TwoWayArithmetic("test", size=4)
    gsm8k = GSM8K("test", data_files=os.path.join(FIXTURES, "gsm8k"))
    kinds = {(t.name, m, d): DirectionTaskWrapper(t, d, tok, model_direction=m).scoring
             for t in (arithmetic, gsm8k) for m in ("forward", "backward", "bidirectional")
             for d in ("forward", "backward")}
    assert kinds[("arithmetic", "forward", "forward")] == "generation"
    assert kinds[("arithmetic", "forward", "backward")] == "likelihood_only"  # never trained to write backward
    assert kinds[("arithmetic", "backward", "backward")] == "generation"
    assert kinds[("arithmetic", "bidirectional", "backward")] == "generation"
    assert kinds[("gsm8k", "bidirectional", "backward")] == "likelihood_only"  # a question cannot be checked
    assert kinds[("gsm8k", "backward", "backward")] == "likelihood_only"
    assert kinds[("gsm8k", "bidirectional", "forward")] == "generation"
    assert "never trained to generate backward" in DirectionTaskWrapper(
        arithmetic, "backward", tok, model_direction="forward").not_applicable_reason


def test_a_task_gives_its_view_in_a_direction_and_nanochat_never_imports_tasks(tok, gpt):
    import subprocess
    import sys
    from nanochat.direction import DirectionSpec
    from tasks.arithmetic import TwoWayArithmetic
    from tasks.common import check_task_direction
    task = TwoWayArithmetic("test", size=2)
    view = task.in_direction("backward", tok, model_direction="forward")
    assert isinstance(view, DirectionTaskWrapper) and view.task is task and view.scoring == "likelihood_only"
    # The model's DirectionSpec (an Engine's) works wherever its name does, and decides the same.
    spec = DirectionSpec.from_tokenizer("bidirectional", tok)
    by_spec = task.in_direction("backward", tok, model_direction=spec)
    assert by_spec.spec is spec and by_spec.model_direction == "bidirectional" and by_spec.scoring == "generation"
    assert check_task_direction(task, spec) == check_task_direction(task, "bidirectional") == ["forward", "backward"]
    from tasks.gsm8k import GSM8K
    gsm8k = GSM8K("test", data_files=os.path.join(FIXTURES, "gsm8k"))  # checks answers only
    with pytest.raises(UserError, match="cannot be generated backward"):
        check_task_direction(gsm8k, DirectionSpec.from_tokenizer("backward", tok))
    # Something that is not a task is refused with one clear error.
    with pytest.raises(UserError, match="not a task"):
        evaluate_task_multi_direction([{"messages": []}], gpt, tok, ["forward"], verbose=False)
    # nanochat (the library) loads without the tasks package.
    code = ("import sys, nanochat.direction_eval, nanochat.engine, nanochat.chat_eval_lib, nanochat.rerank, "
            "nanochat.hf_export, nanochat.consistency; "
            "print(sorted(m for m in sys.modules if m == 'tasks' or m.startswith('tasks.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == "[]", out.stdout


# ---- multiple choice ----------------------------------------------------------------------------
@pytest.mark.parametrize("model_direction", ["forward", "backward", "bidirectional"])
def test_multiple_choice_accuracy_equals_whole_text_argmax_by_hand(tok, gpt, arc, model_direction):
    """Every direction of every model: per_example is the argmax of the whole-text log-likelihood
    computed here by hand, and bpb is the reference text's nats / (ln 2 * bytes)."""
    from tasks.multiple_choice import LETTERS
    from nanochat.chat_eval_lib import with_answer
    results = evaluate_task_multi_direction(arc, gpt, tok, ["forward", "backward"], max_examples=4,
                                            model_direction=model_direction, verbose=False)
    token_bytes = tok.token_byte_lengths()
    text_tokens = {i for i in range(tok.get_vocab_size()) if token_bytes[i] > 0}
    for direction in ("forward", "backward"):
        entry = results[direction]
        assert entry["scoring"] == "multiple_choice" and entry["total"] == 4 == len(entry["per_example"])
        expected, nats, n_bytes = [], 0.0, 0
        for i in range(4):
            example = arc[i]
            scores = [logprob_sum(gpt, by_hand(tok, reading_order_rows(tok, with_answer(example, letter)), direction,
                                               model_direction))
                      for letter in LETTERS[:len(example["choices"])]]
            expected.append(max(range(len(scores)), key=scores.__getitem__) == example["answer"])
            row = by_hand(tok, reading_order_rows(tok, example), direction, model_direction)
            nats -= logprob_sum(gpt, row, only=text_tokens)
            n_bytes += int(sum(token_bytes[t] for t in row))
        assert entry["per_example"] == expected
        assert entry["accuracy"] == sum(expected) / 4
        assert entry["stderr"] == pytest.approx(math.sqrt(entry["accuracy"] * (1 - entry["accuracy"]) / 4))
        assert entry["bpb"] == pytest.approx(nats / (math.log(2) * n_bytes), rel=1e-6)
    # The byte denominator is the same text both ways (docs/DESIGN.md §3).
    assert results["forward"]["bpb_bytes"] == results["backward"]["bpb_bytes"]


def test_known_accuracy_with_a_model_that_prefers_one_letter(tok, arc):
    """A stand-in whose only cheap token is "B" picks B everywhere, in both directions: the
    accuracy is the share of questions whose answer is B, and the metrics follow."""
    costs = torch.ones(tok.get_vocab_size())
    (b_id,) = tok.encode("B")
    costs[b_id] = 0.25
    results = evaluate_task_multi_direction(arc, CostModel(costs), tok, ["forward", "backward"], verbose=False)
    share_b = sum(arc[i]["answer"] == 1 for i in range(len(arc))) / len(arc)
    assert 0 < share_b < 1
    for direction in ("forward", "backward"):
        assert results[direction]["predictions"] == [1] * len(arc)
        assert results[direction]["accuracy"] == share_b
    metrics = compute_direction_metrics(results)
    assert metrics["forward_accuracy"] == metrics["backward_accuracy"] == share_b
    assert metrics["direction_gap"] == 0 and metrics["average_accuracy"] == share_b
    # Each text token costs 1 nat (B: 0.25) whatever the order, so bpb is the same both ways.
    assert metrics["forward_bpb"] == pytest.approx(metrics["backward_bpb"]) and metrics["bpb_gap"] == pytest.approx(0)


# ---- generative ---------------------------------------------------------------------------------
def test_generative_native_directions_generate_and_others_are_not_applicable(tok, gpt):
    from nanochat.chat_eval_lib import evaluate_generative
    from nanochat.engine import Engine
    from tasks.arithmetic import TwoWayArithmetic
    task = TwoWayArithmetic("test", size=3)
    forward_engine = Engine(gpt, tok, {"direction": "forward"})
    results = evaluate_task_multi_direction(task, gpt, tok, ["forward", "backward"], engine=forward_engine,
                                            max_new_tokens=4, verbose=False)
    fwd, bwd = results["forward"], results["backward"]
    direct = evaluate_generative(forward_engine, task, [0, 1, 2], "forward", max_new_tokens=4)
    assert fwd["scoring"] == "generation" and fwd["total"] == 3
    assert fwd["per_example"] == [score >= 1.0 for _, score in direct["per_example"]]
    assert fwd["accuracy"] == direct["correct"] / 3
    # A forward model asked to write backward: no accuracy, a reason, and the likelihood instead.
    assert bwd["scoring"] == "likelihood_only" and bwd["accuracy"] is None and bwd["per_example"] == []
    assert "never trained to generate backward" in bwd["reason"]
    assert bwd["bpb"] > 0 and bwd["bpb_bytes"] == fwd["bpb_bytes"]
    metrics = compute_direction_metrics(results)
    assert metrics["backward_accuracy"] is None and metrics["direction_gap"] is None
    assert metrics["bpb_gap"] == pytest.approx((bwd["bpb"] - fwd["bpb"]) / fwd["bpb"])
    # A bidirectional model generates both ways (its marker tells it which).
    both = evaluate_task_multi_direction(task, gpt, tok, ["forward", "backward"], model_direction="bidirectional",
                                         max_new_tokens=4, verbose=False)
    assert [both[d]["scoring"] for d in ("forward", "backward")] == ["generation", "generation"]
    assert all(both[d]["total"] == 3 and both[d]["accuracy"] is not None for d in both)


def test_generative_task_needs_the_trained_direction(tok, gpt):
    from tasks.arithmetic import TwoWayArithmetic
    results = evaluate_task_multi_direction(TwoWayArithmetic("test", size=2), gpt, tok, ["forward"], verbose=False)
    assert results["forward"]["accuracy"] is None and "model_direction" in results["forward"]["reason"]
    with pytest.raises(UserError, match="contradicts"):
        from nanochat.engine import Engine
        evaluate_task_multi_direction(TwoWayArithmetic("test", size=2), gpt, tok, ["forward"],
                                      engine=Engine(gpt, tok, {"direction": "backward"}), model_direction="forward")


# ---- files and the report section -----------------------------------------------------------------
def test_saved_evaluation_and_markdown_section(tok, arc, tmp_path):
    costs = torch.ones(tok.get_vocab_size())
    (b_id,) = tok.encode("B")
    costs[b_id] = 0.25
    results = evaluate_task_multi_direction(arc, CostModel(costs), tok, ["forward", "backward"], verbose=False)
    evaluations = str(tmp_path / "evaluations")
    assert markdown_section("run", evaluations, str(tmp_path)) is None  # nothing yet
    path = save_direction_evaluation(results, evaluations, "arc_easy", 7, trained_direction="forward")
    with pytest.raises(UserError, match="already exists"):
        save_direction_evaluation(results, evaluations, "arc_easy", 7)
    assert list_family(evaluations, "direction") == [(7, "arc_easy", path)]
    with open(path) as f:
        record = json.load(f)
    assert record["metrics"] == compute_direction_metrics(results)
    section = markdown_section("run", evaluations, str(tmp_path))
    acc = results["forward"]["accuracy"]
    assert f"| arc_easy | 7 | {acc:.4f} ± {results['forward']['stderr']:.4f} (n={len(arc)}) |" in section


# ---- the command line ---------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--tasks=arithmetic,arithmetic"], "distinct task names"),
    (["--directions=sideways"], "unknown direction 'sideways'"),
    (["--max_examples=0"], "--max_examples=0"),
    (["--mc_answer=number"], "--mc_answer='number'"),
])
def test_cli_refuses_bad_flags_before_loading_anything(args, message):
    from scripts.direction_eval import main
    with pytest.raises(UserError, match=message):
        main(["--device_type=cpu", *args])
