"""Tests for nanochat.rl and scripts/chat_rl.py: the update rule, prompts and rewards in every
direction, tiny end-to-end runs that save RL checkpoints, and the bad inputs."""

import json
import os

import pytest
import torch

from conftest import (assert_one_line_error, copy_base, run_inprocess, run_script, save_random_parents, snapshot,
                      tiny_model)
from nanochat.checkpoint_manager import artifact_dirs, list_steps, load_meta
from nanochat.common import UserError
from nanochat.direction import DirectionSpec
from nanochat.rl import Group, completion_logprobs, group_advantages, pass_at_k, policy_gradient_loss, sample_group
from nanochat.tokenizer import get_tokenizer
from scripts.chat_rl import main as chat_rl_main
from tasks.arithmetic import TwoWayArithmetic

SEQ_LEN = 48


@pytest.fixture(scope="module")
def parents(corpus_template, tmp_path_factory):
    """A base dir with one untrained tiny base checkpoint per direction (tags fwd, bwd, bidi; step 3)."""
    return save_random_parents(copy_base(corpus_template["dir"], tmp_path_factory, "rl"), SEQ_LEN)


# ---- the update rule ------------------------------------------------------------------------

def test_group_advantages_normalise_within_each_group():
    adv = group_advantages([[1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    assert adv[0].tolist() == pytest.approx([1.0, -1.0, -1.0, 1.0], abs=1e-5)
    mean, std = 0.25, (0.25 * 0.75) ** 0.5  # population std of [1, 0, 0, 0]
    assert adv[1].tolist() == pytest.approx([(1 - mean) / std] + [-mean / std] * 3, abs=1e-5)
    assert adv.sum(dim=-1).tolist() == pytest.approx([0.0, 0.0], abs=1e-5)


@pytest.mark.parametrize("rewards", [[0.0] * 4, [1.0] * 4, [0.5, 0.5]])
def test_zero_variance_group_has_zero_advantage(rewards):
    assert group_advantages(rewards).tolist() == [0.0] * len(rewards)


def test_pass_at_k():
    assert pass_at_k([0.0, 1.0, 0.0]) == 1.0
    assert pass_at_k([0.0, 0.0]) == 0.0


def test_loss_is_advantage_weighted_log_prob_over_tokens():
    token_logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    loss = policy_gradient_loss(token_logp, mask, torch.tensor([1.0, -1.0]), num_tokens=5)
    assert float(loss) == pytest.approx(-(1.0 * -3.0 + -1.0 * -1.5) / 5)


def test_completion_logprobs_match_the_model_and_count_the_stop_action():
    vocab = 40
    model = tiny_model(vocab, SEQ_LEN)
    prompt, completions, stopped, stops = [1, 5, 6], [[7, 8, 9], [10]], [True, False], (2, 3)
    token_logp, mask = completion_logprobs(model, prompt, completions, stopped, stops, "cpu")
    assert mask.tolist() == [[1, 1, 1, 1], [1, 0, 0, 0]]  # row 0: 3 tokens + stop; row 1: cut, no stop
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt + completions[0]])), dim=-1)[0]
    expected = [logp[2 + j, t].item() for j, t in enumerate(completions[0])]
    expected.append(torch.logsumexp(logp[5, list(stops)], dim=0).item())  # p(any stop token)
    assert token_logp[0].tolist() == pytest.approx(expected, abs=1e-5)
    assert token_logp[1, 1:].tolist() == [0.0, 0.0, 0.0]


def test_a_gradient_step_favours_the_positive_advantage_completion():
    """One SGD step on the loss raises log p of the rewarded completion and lowers the other's."""
    model = tiny_model(40, SEQ_LEN, seed=1)
    prompt, completions, stopped, stops = [1, 5], [[7, 8], [9, 10]], [True, True], (2,)

    def seq_logp():
        lp, m = completion_logprobs(model, prompt, completions, stopped, stops, "cpu")
        return (lp * m).sum(dim=-1)

    before = seq_logp().detach()
    lp, m = completion_logprobs(model, prompt, completions, stopped, stops, "cpu")
    policy_gradient_loss(lp, m, group_advantages([1.0, 0.0]), int(m.sum())).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.5 * p.grad
    after = seq_logp().detach()
    assert after[0] > before[0] and after[1] < before[1]


# ---- prompts and rewards in each direction --------------------------------------------------

class FakeEngine:
    """Records the prompt; 'generates' fixed completions (in model orientation)."""

    def __init__(self, model, tokenizer, completions):
        self.model, self.tokenizer, self.completions, self.calls = model, tokenizer, completions, []

    def generate(self, prompt, **kwargs):
        self.calls.append((list(prompt), kwargs))
        return [list(c) for c in self.completions]


class RecordingArithmetic(TwoWayArithmetic):
    def __init__(self):
        super().__init__("test", size=1)
        self.seen = []

    def get_example(self, index):
        return {"messages": [{"role": "user", "content": "What is 6*7?"}, {"role": "assistant", "content": "42"}]}

    def reward(self, conversation, generated_text, direction="forward"):
        self.seen.append((generated_text, direction))
        return super().reward(conversation, generated_text, direction)


@pytest.mark.parametrize("trained", ["backward", "bidirectional"])
def test_backward_prompt_gives_the_answer_and_the_reward_sees_the_question_in_reading_order(parents, trained):
    tok = get_tokenizer(parents)
    spec = DirectionSpec.from_tokenizer(trained, tok)
    special = tok.encode_special
    right, wrong = "What is 3*14?", "What is 5*9?"
    # The model writes the question right to left: its tokens come out reversed.
    completions = [tok.encode(right)[::-1], tok.encode(wrong)[::-1][:3]]
    engine = FakeEngine(tiny_model(tok.get_vocab_size(), SEQ_LEN), tok, completions)
    task = RecordingArithmetic()
    group = sample_group(engine, spec, task, 0, "backward", num_samples=2, max_new_tokens=len(completions[0]) + 1,
                         temperature=1.0, top_k=None, seed=0)

    prompt, kwargs = engine.calls[0]
    header = [tok.get_bos_token_id()] + ([spec.backward_id] if trained == "bidirectional" else [])
    answer = [special("<|assistant_start|>")] + tok.encode("42") + [special("<|assistant_end|>")]
    assert prompt == header + answer[::-1] + [special("<|user_end|>")]  # given the answer, reversed
    assert special("<|user_start|>") in kwargs["stop_tokens"]             # the question ends at its start
    assert task.seen == [(right, "backward"), (tok.decode(tok.encode(wrong)[-3:]), "backward")]
    assert group.texts[0] == right
    assert group.rewards == [1.0, 0.0]  # 3*14 = 42 is a right factorisation; a fragment is not
    assert group.stopped == [True, True] and group.num_tokens == len(completions[0]) + 3 + 2


def test_forward_prompt_asks_the_question_and_rewards_the_answer(parents):
    tok = get_tokenizer(parents)
    spec = DirectionSpec.from_tokenizer("forward", tok)
    engine = FakeEngine(tiny_model(tok.get_vocab_size(), SEQ_LEN), tok, [tok.encode("42"), tok.encode("41")])
    task = RecordingArithmetic()
    group = sample_group(engine, spec, task, 0, "forward", num_samples=2, max_new_tokens=2, temperature=1.0,
                         top_k=None, seed=0)
    prompt, kwargs = engine.calls[0]
    assert prompt[-1] == tok.encode_special("<|assistant_start|>") and tok.decode(prompt).count("What is 6*7?") == 1
    assert tok.encode_special("<|assistant_end|>") in kwargs["stop_tokens"]
    assert group.rewards == [1.0, 0.0]
    # Completions that fill the room they had were cut, not stopped (room: 2 new tokens).
    assert group.stopped == [len(tok.encode("42")) < 2, len(tok.encode("41")) < 2]


# ---- tiny end-to-end runs -------------------------------------------------------------------

TINY_RL = ["--source=base", "--num_iterations=2", "--examples_per_step=2", "--num_samples=2", "--max_new_tokens=4",
           "--eval_examples=2", "--eval_k=2", "--eval_every=1", "--device_type=cpu"]


@pytest.mark.parametrize("tag,direction", [("fwd", "forward"), ("bwd", "backward"), ("bidi", "bidirectional")])
def test_tiny_rl_run_saves_an_rl_checkpoint(parents, monkeypatch, capsys, tag, direction):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", parents)
    out_tag = f"{tag}_rl"
    chat_rl_main(TINY_RL + [f"--model_tag={tag}", f"--output_tag={out_tag}", "--research_log=1",
                            "--parent_experiment=some_sft_run"])
    printed = capsys.readouterr().out
    assert "eval" in printed and "pass@2" in printed and "reward" in printed
    dirs = artifact_dirs("rl", out_tag, parents)
    assert dirs["checkpoints"] == os.path.join(parents, "chatrl_checkpoints", out_tag)
    assert list_steps(dirs["checkpoints"]) == [2]
    meta = load_meta(dirs["checkpoints"], 2)
    assert meta["phase"] == "rl" and meta["direction"] == direction
    assert meta["parent"] == {"source": "base", "model_tag": tag, "step": 3, "experiment": "some_sft_run",
                              "checkpoint_dir": os.path.join(parents, "base_checkpoints", tag)}
    parent_meta = load_meta(os.path.join(parents, "base_checkpoints", tag), 3)
    assert DirectionSpec.from_meta(meta).marker_ids == DirectionSpec.from_meta(parent_meta).marker_ids
    expected = ["forward", "backward"] if direction == "bidirectional" else [direction]
    assert meta["task_directions"] == expected
    for when in ("before", "after"):
        assert list(meta["rewards"][when]) == expected
        for r in meta["rewards"][when].values():
            assert 0.0 <= r["mean_reward"] <= r["pass_at_k"] <= 1.0 and r["samples"] == 4
    assert os.path.exists(os.path.join(dirs["run"], "logs", "rl.h5"))

    # A second run into the same tag is refused before anything is written.
    before = snapshot(parents)
    with pytest.raises(UserError, match="already holds rl checkpoints"):
        chat_rl_main(TINY_RL + [f"--model_tag={tag}", f"--output_tag={out_tag}"])
    assert snapshot(parents) == before


def test_bad_inputs_exit_with_one_error_line(parents):
    cases = [
        (["--model_tag=nope"], ("no base checkpoint with tag 'nope'",)),
        (["--model_tag=bwd", "--direction=forward"], ("--direction=forward contradicts", "backward")),
        (["--model_tag=bwd", "--task=gsm8k"], ("gsm8k", "cannot be generated backward")),
    ]
    before = snapshot(parents)
    results = [run_inprocess("scripts.chat_rl", *TINY_RL, *c[0], "--output_tag=bad", base_dir=parents) for c in cases]
    for (_, fragments), result in zip(cases, results):
        assert_one_line_error(result, *fragments)
    assert snapshot(parents) == before
    assert not os.path.exists(os.path.join(parents, "chatrl_checkpoints", "bad"))


def test_flag_spellings_and_invalid_numbers(parents, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", parents)
    from scripts.chat_rl import build_parser, check_args
    a = build_parser().parse_args(["--num-samples=3", "--examples-per-step=4", "--init-lr-frac=0.1"])
    b = build_parser().parse_args(["--num_samples=3", "--examples_per_step=4", "--init_lr_frac=0.1"])
    assert vars(a) == vars(b)
    with pytest.raises(UserError, match="num_samples"):
        check_args(build_parser().parse_args(["--num_samples=1"]))
    with pytest.raises(UserError, match="temperature"):
        check_args(build_parser().parse_args(["--temperature=0"]))


@pytest.mark.slow  # torchrun, after a 250-step SFT that makes a parent right now and then
def test_torchrun_step_equals_the_single_process_step(parents, monkeypatch):
    """Two ranks split the prompts; the loss is normalised by all ranks' tokens and gradients are
    averaged, so the weights after RL under torchrun equal a single process's."""
    from scripts.chat_sft import main as chat_sft_main
    monkeypatch.setenv("NANOCHAT_BASE_DIR", parents)
    # A parent that is right now and then, so that some groups have a reward spread (and a gradient).
    chat_sft_main(["--source=base", "--model_tag=fwd", "--output_tag=fwd_sft", "--tasks=arithmetic",
                   "--num_iterations=250", "--init_lr_frac=0.5", "--max_seq_len=32", "--device_batch_size=16",
                   "--eval_every=-1", "--log_every=1000", "--device_type=cpu", "--shuffle=0"])
    rl = ["--source=sft", "--model_tag=fwd_sft", "--num_iterations=2", "--examples_per_step=8", "--num_samples=8",
          "--max_new_tokens=4", "--eval_examples=2", "--eval_k=2", "--init_lr_frac=0.5", "--device_type=cpu"]
    result = run_script("scripts.chat_rl", *rl, "--output_tag=rl_ddp", base_dir=parents, torchrun_nproc=2, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    chat_rl_main(rl + ["--output_tag=rl_single"])
    load = lambda tag, step: torch.load(os.path.join(parents, tag, f"model_{step:06d}.pt"), weights_only=True)
    ddp, single = load("chatrl_checkpoints/rl_ddp", 2), load("chatrl_checkpoints/rl_single", 2)
    parent = load("chatsft_checkpoints/fwd_sft", 250)
    assert any(not torch.equal(single[k], parent[k]) for k in single), "RL did not change the weights"
    for k in single:
        torch.testing.assert_close(ddp[k], single[k], rtol=0, atol=1e-6)
    assert load_meta(os.path.join(parents, "chatrl_checkpoints", "rl_ddp"), 2)["world_size"] == 2
    assert os.path.exists(os.path.join(parents, "chatrl_checkpoints", "rl_ddp", "optim_000002_rank1.pt"))
