"""nanochat.rerank and scripts.rerank: candidates scored by the sampler's log p(answer | question)
and by a backward model's log p(question | answer), picks with fair ties, accuracy against random
choice and pass@N with standard errors, and the command on tiny models."""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import TRAINED_STEPS, TRAINED_TAGS, copy_base, run_inprocess
from nanochat.engine import Engine
from nanochat.gpt import GPT, config_for_depth
from nanochat.rerank import (markdown_section, mean_and_se, pick_credit, rerank_task, score_candidates, summarise)
from tasks.arithmetic import TwoWayArithmetic


def random_model(tok, seed):
    torch.manual_seed(seed)
    model = GPT.build(config_for_depth(1, tok.get_vocab_size(), 64), torch.device("cpu"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def test_pick_credit_shares_ties():
    assert pick_credit([1.0, 3.0, 2.0], [0, 1, 0]) == 1.0
    assert pick_credit([3.0, 3.0, 2.0], [0, 1, 1]) == 0.5
    assert pick_credit([-1.0, -1.0], [1, 1]) == 1.0


def test_summary_means_standard_errors_and_paired_differences():
    questions = [{"random": 0.5, "pass": 1.0, "picks": {"forward": 1.0, "backward": 1.0, "sum": 1.0}},
                 {"random": 0.25, "pass": 1.0, "picks": {"forward": 0.0, "backward": 1.0, "sum": 0.5}},
                 {"random": 0.0, "pass": 0.0, "picks": {"forward": 0.0, "backward": 0.0, "sum": 0.0}}]
    s = summarise(questions)
    assert s["questions"] == 3
    assert s["random"][0] == pytest.approx(0.25) and s["pass_at_n"][0] == pytest.approx(2 / 3)
    mean, se = s["methods"]["backward"]["accuracy"]
    assert mean == pytest.approx(2 / 3) and se == pytest.approx(math.sqrt((2 * (1 / 3) ** 2 + (2 / 3) ** 2) / 2 / 3))
    assert s["methods"]["sum"]["vs_random"][0] == pytest.approx((0.5 + 0.25 + 0.0) / 3)
    assert s["methods"]["backward"]["vs_forward"][0] == pytest.approx(1 / 3)
    assert math.isnan(mean_and_se([1.0])[1]) and math.isnan(mean_and_se([])[0])


def _manual_logprob(model, ids, positions):
    x = torch.tensor([ids[:-1]])
    logp = F.log_softmax(model(x)[0].float(), dim=-1)
    return sum(logp[i - 1, ids[i]].item() for i in positions)


def test_scores_are_the_answer_given_the_question_and_the_question_given_the_answer(tok):
    model = random_model(tok, 1)
    question, answers = "What is 7*8?", ["56", "54"]
    bos = tok.get_bos_token_id()
    us, ue = tok.encode_special("<|user_start|>"), tok.encode_special("<|user_end|>")
    as_, ae = tok.encode_special("<|assistant_start|>"), tok.encode_special("<|assistant_end|>")
    q = tok.encode(question)
    fwd = score_candidates(model, tok, "forward", "forward", question, answers, torch.device("cpu"))
    bwd = score_candidates(model, tok, "backward", "backward", question, answers, torch.device("cpu"))
    for answer, f, b in zip(answers, fwd, bwd):
        a = tok.encode(answer)
        reading = [bos, us] + q + [ue, as_] + a + [ae]
        # forward: the answer and <|assistant_end|>, after BOS, the question and <|assistant_start|>
        start = 2 + len(q) + 2
        assert f == pytest.approx(_manual_logprob(model, reading, range(start, len(reading))), abs=1e-4)
        # backward: the row is read right to left; the question and <|user_start|> come last
        row = [bos] + reading[1:][::-1]
        n_q = len(q) + 1
        assert b == pytest.approx(_manual_logprob(model, row, range(len(row) - n_q, len(row))), abs=1e-4)
    assert bwd[0] != bwd[1]  # the backward score depends on the candidate it conditions on


def test_bidirectional_scorer_reads_with_its_marker(tok):
    model = random_model(tok, 2)
    as_bidi = score_candidates(model, tok, "bidirectional", "backward", "What is 2*3?", ["6"], torch.device("cpu"))
    as_bwd = score_candidates(model, tok, "backward", "backward", "What is 2*3?", ["6"], torch.device("cpu"))
    assert as_bidi[0] != pytest.approx(as_bwd[0])  # the marker after BOS changes the context


def test_rerank_task_on_tiny_models(tok):
    sampler = Engine(random_model(tok, 3), tok, {"direction": "forward"})
    scorer = random_model(tok, 4)
    task = TwoWayArithmetic("test", size=4)
    out = rerank_task(sampler, scorer, "backward", task, range(4), num_samples=3, max_new_tokens=4, temperature=1.0,
                      top_k=None, seed=0, device=torch.device("cpu"), keep=2)
    s = out["summary"]
    assert s["questions"] == 4 and s["skipped_too_long"] == 0 and len(out["examples"]) == 2
    ex = out["examples"][0]
    assert len(ex["candidates"]) == 3 and len(ex["scores"]["backward"]) == 3
    assert ex["scores"]["sum"] == pytest.approx([f + b for f, b in zip(ex["scores"]["forward"], ex["scores"]["backward"])])
    for m in ("forward", "backward", "sum"):
        assert 0.0 <= s["methods"][m]["accuracy"][0] <= s["pass_at_n"][0]
    assert s["random"][0] <= s["pass_at_n"][0]
    # A question longer than the context is skipped and counted, not cropped.
    long_task = TwoWayArithmetic("test", size=2, min_factor=10 ** 30, max_factor=10 ** 30 + 5)
    out = rerank_task(sampler, scorer, "backward", long_task, range(2), num_samples=2, max_new_tokens=40,
                      temperature=1.0, top_k=None, seed=0, device=torch.device("cpu"))
    assert out["summary"]["skipped_too_long"] == 2 and out["summary"]["questions"] == 0


# ---- the command ------------------------------------------------------------------------------------
FWD, BWD, STEP = TRAINED_TAGS["forward"], TRAINED_TAGS["backward"], TRAINED_STEPS
RERANK = ["--source=base", f"--forward_tag={FWD}", f"--backward_tag={BWD}", "--task=arithmetic", "--num_questions=3",
          "--num_samples=2", "--max_new_tokens=4", "--device_type=cpu"]
RECORD = f"rerank_arithmetic_step{STEP:06d}.json"


@pytest.fixture(scope="module")
def pair(trained, tmp_path_factory):
    """A copy of the session's checkpoints: a forward and a backward model (the record goes beside them)."""
    return copy_base(trained["dir"], tmp_path_factory, "rerank")


def test_rerank_command_writes_the_table(pair):
    result = run_inprocess("scripts.rerank", *RERANK, base_dir=pair)
    assert result.returncode == 0, result.stderr
    assert "backward log p(question | answer)" in result.stdout and "pass@2" in result.stdout
    evaluations = os.path.join(pair, "base_checkpoints", FWD, "evaluations")
    path = os.path.join(evaluations, RECORD)
    with open(path) as f:
        record = json.load(f)
    assert record["backward_model"] == BWD and record["summary"]["questions"] == 3
    assert record["forward_direction"] == "forward" and record["backward_direction"] == "backward"
    section = markdown_section(FWD, evaluations, None)
    assert f"| arithmetic (step {STEP}, 3 questions) | 2 | {BWD} |" in section


def test_rerank_refuses_before_any_work(pair, monkeypatch):
    """An existing result and models in the wrong roles are refused before a model is loaded
    (run_main turns each into one 'error:' line)."""
    from nanochat.common import UserError
    from scripts import rerank
    monkeypatch.setenv("NANOCHAT_BASE_DIR", pair)
    path = os.path.join(pair, "base_checkpoints", FWD, "evaluations", RECORD)
    if not os.path.exists(path):  # when run alone
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write("{}")
    with pytest.raises(UserError, match=f"{RECORD} already exists; pass --overwrite"):
        rerank.main(RERANK)
    swapped = [a.replace(FWD, "X").replace(BWD, FWD).replace("X", BWD) for a in RERANK]
    with pytest.raises(UserError, match=f"{BWD} was trained backward"):
        rerank.main(swapped)


def test_format_table_shows_paired_differences_against_forward():
    from nanochat.rerank import format_table, summarise
    per_question = [{"random": 0.5, "pass": 1.0, "picks": {"forward": 0.0, "backward": 1.0, "sum": 1.0}},
                    {"random": 0.5, "pass": 1.0, "picks": {"forward": 1.0, "backward": 1.0, "sum": 0.0}}]
    text = format_table(summarise(per_question), 2)
    assert "vs forward (paired)" in text
    assert "0.5000 +- 0.5000" in text.splitlines()[2]  # backward - forward = +1, 0 -> 0.5 +- 0.5
