"""Chat evaluation in every direction: the library behind scripts/chat_eval.py (docs/EVALUATION.md).

Generative tasks are generated through Engine.chat and scored by task.reward in reading order; multiple
choice ranks the choices by the log-likelihood of the *whole* conversation read in the evaluated
direction. Examples that do not fit the context are skipped and counted, never cropped (not direction-fair).
"""

import torch

from nanochat.loss_eval import padded_batch, token_losses
from nanochat.common import UserError
from nanochat.direction import CONCRETE_DIRECTIONS, by_direction
from nanochat.conversation import normalize_messages, turn_content

EVAL_DIRECTION_CHOICES = ("auto", "both", "forward", "backward")


def resolve_eval_directions(spec, requested="auto"):
    """The concrete directions to evaluate the model of DirectionSpec `spec` in: auto = what it
    generates natively; both, forward, backward ask explicitly (one it cannot generate is an error)."""
    native = spec.generation_directions()
    wanted = native if requested == "auto" else list(CONCRETE_DIRECTIONS) if requested == "both" else [requested]
    missing = [d for d in wanted if d not in native]
    if missing:
        raise UserError(f"--eval_direction={requested}: this model was trained {spec.direction} and cannot "
                        f"be evaluated {' and '.join(missing)} here (only bidirectional models generate both ways); "
                        "python -m scripts.direction_eval scores it in both directions (cross-direction transfer)")
    return wanted


def example_indices(n_total, max_examples):
    """The first `max_examples` indices of a task (all when None or -1): deterministic, and a reversal fact's
    probes stay together (not a sample: sorted data sets such as MMLU need N large enough)."""
    return list(range(n_total if max_examples is None or max_examples < 0 else min(n_total, max_examples)))


# ---- multiple choice ---------------------------------------------------------------------------
def with_answer(conversation, answer_text):
    """The conversation with `answer_text` as its last (assistant) turn."""
    messages = normalize_messages(conversation)
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return {"messages": messages + [{"role": "assistant", "content": answer_text}]}


MC_ANSWERS = {"letter": "choices", "text": "choice_texts"}


def choice_rows(spec, tokenizer, example, concrete_direction, mc_answer="letter"):
    """[(ids, mask)] per choice: the whole conversation with that choice as the answer (mc_answer
    "letter": example["choices"], what the assistant writes; "text": example["choice_texts"]), in
    model orientation; mask 1 on every scored position (all but BOS and the marker)."""
    if mc_answer not in MC_ANSWERS:
        raise UserError(f"--mc_answer={mc_answer!r}: use {' or '.join(MC_ANSWERS)}")
    field = MC_ANSWERS[mc_answer]
    if field not in example or "answer" not in example:
        raise UserError(f"a multiple-choice example needs '{field}' and 'answer' for --mc_answer={mc_answer}")
    return [spec.conversation_row(tokenizer, with_answer(example, choice), concrete_direction=concrete_direction,
                                  train_on="all")[:2] for choice in example[field]]


class Tally:
    """Correct / scored counts, overall and per `probe` (reversal facts: as_trained vs reversed)."""

    def __init__(self):
        self.correct, self.n, self.skipped_too_long, self.by_probe = 0.0, 0, 0, {}

    def add(self, example, score):
        self.correct += score
        self.n += 1
        if example.get("probe") is not None:
            c, n = self.by_probe.get(example["probe"], (0.0, 0))
            self.by_probe[example["probe"]] = (c + score, n + 1)

    def as_dict(self):
        return {"correct": self.correct, "n": self.n, "skipped_too_long": self.skipped_too_long,
                "by_probe": {k: {"correct": c, "n": n} for k, (c, n) in sorted(self.by_probe.items())}}


@torch.no_grad()
def sequence_logprobs(model, rows, device, batch_size=32, autocast_ctx=None):
    """For each (ids, mask): the sum of log p(ids[i] | ids[:i]) over positions i >= 1 with
    mask[i] == 1, in nats (float64 accumulation). Rows are padded per batch; padding is ignored."""
    scores = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        x, y = padded_batch([(ids[:-1], [t if m else -1 for t, m in zip(ids[1:], mask[1:])])
                             for ids, mask in chunk], 0)
        x, y = x.to(device), y.to(device)
        loss = token_losses(model, x, y, autocast_ctx)
        # cross_entropy gives 0 at ignored targets, so the row sum is over scored positions only
        scores += (-loss.double().sum(dim=1)).tolist()
    return scores


def evaluate_multiple_choice(model, tokenizer, spec, task, indices, concrete_direction, device,
                             batch_size=32, autocast_ctx=None, mc_answer="letter"):
    """Whole-text likelihood scoring on task[indices] in one concrete direction: Tally.as_dict() plus
    "predictions": [(index, predicted, answer)]."""
    max_len = model.config.sequence_len + 1  # a row of L tokens feeds L - 1 inputs to the model
    tally, flat, kept = Tally(), [], []
    for index in indices:
        example = task[index]
        rows = choice_rows(spec, tokenizer, example, concrete_direction, mc_answer)
        if any(len(ids) > max_len for ids, _ in rows):
            tally.skipped_too_long += 1
            continue
        kept.append((index, example, len(rows)))
        flat += rows
    scores = sequence_logprobs(model, flat, device, batch_size, autocast_ctx)
    predictions, offset = [], 0
    for index, example, n_choices in kept:
        mine = scores[offset:offset + n_choices]
        offset += n_choices
        predicted = max(range(n_choices), key=lambda k: mine[k])  # ties: the first choice
        tally.add(example, float(predicted == int(example["answer"])))
        predictions.append((index, predicted, int(example["answer"])))
    return {**tally.as_dict(), "predictions": predictions}


# ---- generative --------------------------------------------------------------------------------
def given_and_reference(conversation, concrete_direction):
    """(what the model is given, what it should write), in reading order, for display."""
    messages = normalize_messages(conversation)
    question = turn_content(messages, "user")
    answer = turn_content(messages, "assistant", which="last")
    return by_direction(concrete_direction, forward=(question, answer), backward=(answer, question))


def evaluate_generative(engine, task, indices, concrete_direction, num_samples=1, max_new_tokens=64,
                        temperature=0.0, top_k=None, seed=42, keep_samples=5):
    """pass@num_samples of generations in one concrete direction, scored by task.reward (an
    example's best sample counts). Returns Tally.as_dict() plus "reward_sum" (of each example's mean
    reward), "per_example": [(index, best reward)] and "samples": the first `keep_samples` examples."""
    limit = engine.model.config.sequence_len
    tally, reward_sum, samples, per_example = Tally(), 0.0, [], []
    for index in indices:
        example = task[index]
        prompt, _ = engine.spec.chat_prompt(engine.tokenizer, example, concrete_direction)
        if len(prompt) >= limit:
            tally.skipped_too_long += 1
            continue
        texts = engine.chat(example, direction=concrete_direction, num_samples=num_samples,
                            max_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed + index)
        rewards = [float(task.reward(example, text, concrete_direction)) for text in texts]
        tally.add(example, max(rewards))  # pass@k for 0/1 rewards
        per_example.append((index, max(rewards)))
        reward_sum += sum(rewards) / len(rewards)
        if len(samples) < keep_samples:
            given, reference = given_and_reference(example, concrete_direction)
            samples.append({"index": index, "given": given, "reference": reference,
                            "generated": texts, "rewards": rewards})
    return {**tally.as_dict(), "reward_sum": reward_sum, "samples": samples, "per_example": per_example}
