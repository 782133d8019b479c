"""Reranking a forward model's answers with a backward model (docs/DESIGN.md §7, docs/EVALUATION.md).

A forward (or bidirectional) model samples N answers per question; the pick is the candidate with the
highest score: `forward` log p_fwd(answer | question), `backward` log p_bwd(question | answer) (the
"reverse reward" of instruction backtranslation) or their `sum`. Reported: accuracy@1 (ties share
credit), random choice among the candidates, pass@N; standard errors over questions.
"""

import json
import math

from nanochat.chat_eval_lib import sequence_logprobs
from nanochat.direction import DirectionSpec, by_direction
from nanochat.evaluations import latest_of_each

METHODS = ("forward", "backward", "sum")


def _conversation(question, answer):
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def score_candidates(model, tokenizer, trained_direction, concrete_direction, question, answers, device,
                     batch_size=32, autocast_ctx=None):
    """Sum of log p (nats) over the scored side of each (question, answer) conversation: the answer
    forward, the question backward; `trained_direction`: the scorer's direction name or DirectionSpec."""
    spec = (trained_direction if isinstance(trained_direction, DirectionSpec)
            else DirectionSpec.from_tokenizer(trained_direction, tokenizer))
    train_on = by_direction(concrete_direction, forward="assistant", backward="user")  # the side that is scored
    rows = [spec.conversation_row(tokenizer, _conversation(question, answer), concrete_direction=concrete_direction,
                                  train_on=train_on)[:2] for answer in answers]
    return sequence_logprobs(model, rows, device, batch_size, autocast_ctx)


def pick_credit(scores, correct):
    """Credit of picking the top-scored candidate: the fraction of right ones among the tied best."""
    best = max(scores)
    tied = [c for s, c in zip(scores, correct) if s == best]
    return sum(tied) / len(tied)


def mean_and_se(values):
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n == 1:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def summarise(per_question):
    """Accuracy@1 per method (and vs random, paired), random choice and pass@N, each (mean, se)."""
    random_pick = [q["random"] for q in per_question]
    out = {"questions": len(per_question), "random": mean_and_se(random_pick),
           "pass_at_n": mean_and_se([q["pass"] for q in per_question]), "methods": {}}
    for method in METHODS:
        picks = [q["picks"][method] for q in per_question]
        out["methods"][method] = {"accuracy": mean_and_se(picks),
                                  "vs_random": mean_and_se([p - r for p, r in zip(picks, random_pick)])}
    for method in ("sum", "backward") if per_question else ():
        out["methods"][method]["vs_forward"] = mean_and_se(
            [q["picks"][method] - q["picks"]["forward"] for q in per_question])
    return out


def rerank_task(forward_engine, backward_model, backward_direction, task, indices, num_samples, max_new_tokens,
                temperature, top_k, seed, device, batch_size=32, autocast_ctx=None, log=None, keep=5):
    """Sample, score and pick for task[indices]: {"summary": summarise()'s, "examples": the first `keep`
    questions with their candidates and scores}; `backward_direction`: a direction name or DirectionSpec."""
    tokenizer = forward_engine.tokenizer
    fwd_model, fwd_spec = forward_engine.model, forward_engine.spec
    # A question must leave room for an answer in the sampler's context, and the scored rows
    # (question + answer) must fit both models; otherwise it is skipped and counted, not cropped.
    limit = min(fwd_model.config.sequence_len, backward_model.config.sequence_len)
    per_question, examples, skipped = [], [], 0
    for n, index in enumerate(indices):
        conversation = task[index]
        question = conversation["messages"][0]["content"]
        if forward_engine.chat_prompt_len(conversation, "forward") + max_new_tokens + 1 > limit:
            skipped += 1
            continue
        answers = forward_engine.chat(conversation, direction="forward", num_samples=num_samples,
                                      max_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                      seed=seed + index)
        correct = [float(task.reward(conversation, a, "forward")) for a in answers]
        fwd = score_candidates(fwd_model, tokenizer, fwd_spec, "forward", question, answers, device,
                               batch_size, autocast_ctx)
        bwd = score_candidates(backward_model, tokenizer, backward_direction, "backward", question, answers, device,
                               batch_size, autocast_ctx)
        scores = {"forward": fwd, "backward": bwd, "sum": [f + b for f, b in zip(fwd, bwd)]}
        per_question.append({"random": sum(correct) / len(correct), "pass": float(max(correct)),
                             "picks": {m: pick_credit(scores[m], correct) for m in METHODS}})
        if len(examples) < keep:
            examples.append({"index": index, "question": question, "candidates": answers, "correct": correct,
                             "scores": scores})
        if log is not None and (n + 1) % max(1, len(indices) // 5) == 0:
            s = summarise(per_question)
            log(f"{n + 1}/{len(indices)} questions | " + " | ".join(
                f"{m} {s['methods'][m]['accuracy'][0]:.3f}" for m in METHODS)
                + f" | random {s['random'][0]:.3f} | pass@{num_samples} {s['pass_at_n'][0]:.3f}")
    return {"summary": dict(summarise(per_question), skipped_too_long=skipped, context_limit=limit),
            "examples": examples}


def format_table(summary, num_samples):
    def cell(pair):
        mean, se = pair
        return f"{mean:.4f} +- {se:.4f}" if not math.isnan(se) else f"{mean:.4f}"
    lines = [f"{'pick by':<34} {'accuracy@1':>18} {'vs random (paired)':>20} {'vs forward (paired)':>20}"]
    names = {"forward": "forward log p(answer | question)", "backward": "backward log p(question | answer)",
             "sum": "sum of both"}
    for m in METHODS:
        r = summary["methods"][m]
        vs_forward = cell(r["vs_forward"]) if "vs_forward" in r else ""
        lines.append(f"{names[m]:<34} {cell(r['accuracy']):>18} {cell(r['vs_random']):>20} {vs_forward:>20}")
    lines.append(f"{'random choice':<34} {cell(summary['random']):>18}")
    lines.append(f"{f'pass@{num_samples} (any candidate right)':<34} {cell(summary['pass_at_n']):>18}")
    if summary.get("skipped_too_long"):
        lines.append(f"skipped: {summary['skipped_too_long']} questions too long for a {summary['context_limit']}-token "
                     "context (prompt + --max_new_tokens)")
    return "\n".join(lines)


# ---- the report -------------------------------------------------------------------------------------
SECTION_TITLE = "Reranking with a backward model"


def markdown_section(run_name, evaluations_dir, plots_dir):
    """The report's reranking section (the latest file of each task), or None if there is none
    (nanochat/research/report.py REPORT_SECTIONS)."""
    latest = latest_of_each(evaluations_dir, "rerank")
    if not latest:
        return None
    lines = ["This run sampled N answers per question; the pick is the candidate with the highest score: its own "
             "log p(answer | question), the backward model's log p(question | answer), or their sum "
             "(nanochat/rerank.py). Accuracy@1 +- standard error over questions.", "",
             "| task | N | backward scorer | forward | backward | sum | random | pass@N |",
             "|---|---|---|---|---|---|---|---|"]
    for task, (step, path) in latest.items():
        with open(path) as f:
            r = json.load(f)
        s = r["summary"]
        cell = lambda pair: f"{pair[0]:.3f} +- {pair[1]:.3f}"  # noqa: E731
        lines.append(f"| {task} (step {step}, {s['questions']} questions) | {r['num_samples']} | "
                     f"{r['backward_model']} | " + " | ".join(cell(s["methods"][m]["accuracy"]) for m in METHODS)
                     + f" | {cell(s['random'])} | {cell(s['pass_at_n'])} |")
    return "\n".join(lines) + "\n"
