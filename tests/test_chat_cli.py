"""scripts.chat_cli: one-shot and interactive chat in the model's direction (docs/DESIGN.md §5).

Forward, the user's text is a question and the reply the answer; backward, the user's text is
the answer and the reply the generated question, labelled as such; a bidirectional model
switches with /forward and /backward; a one-way model refuses the other direction. Uses the
session's tiny base checkpoints (tests/conftest.py)."""

import io
import sys

import pytest

from conftest import TRAINED_TAGS as TAGS, assert_one_line_error, run_inprocess

BACKWARD_LABEL = "question (generated, precedes your answer):"


@pytest.fixture(scope="module")
def models(trained):
    return trained["dir"]  # read-only: chatting writes nothing


@pytest.fixture
def env(models, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", models)
    return models


def chat(*args, stdin=None):
    """Run chat_cli in-process; returns what it printed."""
    from scripts.chat_cli import main
    out = io.StringIO()
    main(["--source=base", "--device_type=cpu", "--max_tokens=6", *args], stdin=stdin, out=out)
    return out.getvalue()


def test_one_shot_forward_prints_the_answer(env):
    out = chat(f"--model_tag={TAGS['forward']}", "-p", "What is 7*8?")
    assert out.startswith("assistant:"), out


def test_one_shot_backward_prints_the_generated_question(env):
    out = chat(f"--model_tag={TAGS['backward']}", "-p", "56", "--temperature=0")
    assert out.startswith(BACKWARD_LABEL), out
    # A bidirectional model asked for backward labels it the same way; the same seed repeats.
    bidi = chat(f"--model_tag={TAGS['bidirectional']}", "--direction=backward", "-p", "56", "--seed=3")
    assert bidi.startswith(BACKWARD_LABEL) and bidi == chat(f"--model_tag={TAGS['bidirectional']}",
                                                             "--direction=backward", "-p", "56", "--seed=3")


def test_forward_model_refuses_backward_and_keeps_going(env):
    out = chat(f"--model_tag={TAGS['forward']}", stdin=io.StringIO("/backward\nWhat is 2*3?\n/quit\nnot read\n"))
    assert "cannot generate backward" in out
    assert out.count("[forward] question> ") == 3  # after /backward, after the question, before /quit
    assert "[backward]" not in out and "assistant:" in out and BACKWARD_LABEL not in out


def test_repl_switches_directions_through_stdin(env, monkeypatch):
    """The interactive loop as a user drives it: the command reading sys.stdin, a pipe (not a
    terminal: no readline, the prompt still printed)."""
    session = "What is 2*3?\n/backward\n6\n/clear\n/forward\nWhat is 3*3?\n/nonsense\n/quit\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(session))
    result = run_inprocess("scripts.chat_cli", "--source=base", f"--model_tag={TAGS['bidirectional']}",
                           "--device_type=cpu", "--max_tokens=6", base_dir=env)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    order = ["[forward] question> assistant:", "[forward] question> mode: backward",
             f"[backward] answer> {BACKWARD_LABEL}", "[backward] answer> cleared",
             "[backward] answer> mode: forward", "[forward] question> assistant:",
             "[forward] question> unknown command"]
    positions = [out.find(fragment) for fragment in order]
    assert -1 not in positions and positions[:5] == sorted(positions[:5]), out
    assert out.rfind("[forward] question> assistant:") > positions[4]


def test_bad_inputs_exit_with_one_error_line(env):
    missing = run_inprocess("scripts.chat_cli", "--source=base", "--model_tag=no_such_model", "-p", "hi", base_dir=env)
    assert_one_line_error(missing, "no base checkpoint with tag 'no_such_model'")
    from nanochat.common import UserError
    with pytest.raises(UserError, match="--direction=backward: this model was trained forward: it cannot generate"):
        chat(f"--model_tag={TAGS['forward']}", "--direction=backward", "-p", "56")
    with pytest.raises(UserError, match="-p is empty"):
        chat(f"--model_tag={TAGS['forward']}", "-p", " ")


# ---- multi-turn (nanochat.engine.ChatHistory, the path the web page uses too) ------------------
def spy_prompts(monkeypatch):
    """Record every prompt the engine is asked to continue (the CLI streams every reply)."""
    from nanochat.engine import Engine
    prompts, original = [], Engine.stream

    def spy(self, prompt, *a, **kw):
        prompts.append(list(prompt))
        return original(self, prompt, *a, **kw)
    monkeypatch.setattr(Engine, "stream", spy)
    return prompts


def test_forward_chat_keeps_history_and_clear_forgets_it(env, monkeypatch):
    from nanochat.tokenizer import get_tokenizer
    tok = get_tokenizer()
    prompts = spy_prompts(monkeypatch)
    out = chat(f"--model_tag={TAGS['forward']}", "--temperature=0",
               stdin=io.StringIO("first question\nsecond question\n/clear\nthird question\n"))
    assert out.count("assistant:") == 3 and "cleared" in out
    first, second, third = prompts
    assert second[:len(first)] == first  # the first exchange (question and answer) is the context
    q2 = tok.encode("second question")
    assert second[-len(q2) - 3:] == [tok.encode_special("<|user_start|>")] + q2 + first[-2:]  # ... <|user_end|> <|assistant_start|>
    assert tok.encode_special("<|assistant_end|>") in second[len(first):]  # the first answer, closed
    assert third == first[:-len(tok.encode("first question")) - 2] + tok.encode("third question") + first[-2:]


def test_backward_chat_prepends_each_new_exchange(env, monkeypatch):
    """Backward: the user types an answer, the model writes its question; the next answer is an
    earlier one, and the model sees the later exchange (reversed, after BOS) as its context."""
    from nanochat.direction import DirectionSpec
    from nanochat.tokenizer import get_tokenizer
    tok = get_tokenizer()
    prompts = spy_prompts(monkeypatch)
    out = chat(f"--model_tag={TAGS['backward']}", "--temperature=0",
               stdin=io.StringIO("the last answer\nan earlier answer\n"))
    assert out.count(BACKWARD_LABEL) == 2
    first, second = prompts
    # The second prompt starts with the first one's ending (the later answer, reversed) ...
    assert second[:len(first) - 1] == first[:-1]
    # ... and equals the reversed rendering of [slot, earlier answer, generated question, last answer].
    spec = DirectionSpec.from_tokenizer("backward", tok)
    generated = out.split(BACKWARD_LABEL)[1].split("\n")[0].strip()
    conv = {"messages": [{"role": "assistant", "content": "an earlier answer"},
                         {"role": "user", "content": generated}, {"role": "assistant", "content": "the last answer"}]}
    assert second == spec.chat_prompt(tok, conv, "backward")[0]
    user_start = tok.encode_special("<|user_start|>")
    assert second.count(user_start) == 1 and second[-1] == tok.encode_special("<|user_end|>")


def test_old_exchanges_are_dropped_when_the_context_is_full(env, monkeypatch):
    from nanochat.engine import ChatHistory, Engine
    from nanochat.checkpoint_manager import load_model
    model, tok, meta = load_model("base", "cpu", model_tag=TAGS["forward"])
    engine = Engine(model, tok, meta)
    history = ChatHistory("forward")
    for i in range(6):
        history.record(f"q{i}", f"a{i}")
    dropped = history.fit(engine, "new question", room=8)
    assert 0 < dropped < 6 and history.messages[-1]["content"] == "a5"  # the newest stay
    assert engine.chat_prompt_len(history.request("new question"), "forward") + 8 <= model.config.sequence_len
    backward = ChatHistory("backward", [{"role": "user", "content": f"q{i}"} if j == 0 else
                                        {"role": "assistant", "content": f"a{i}"}
                                        for i in range(6) for j in range(2)])
    backward_engine = Engine(*load_model("base", "cpu", model_tag=TAGS["backward"]))
    assert backward.fit(backward_engine, "an answer", room=8) > 0 and backward.messages[0]["content"] == "q0"  # nearest stay
    from nanochat.common import UserError
    with pytest.raises(UserError, match="too long"):
        ChatHistory("forward").fit(engine, "word " * 100, room=8)


class CountingOutput(io.StringIO):
    writes = 0

    def write(self, text):
        self.writes += 1
        return super().write(text)


class FakeTerminal(CountingOutput):
    def isatty(self):
        return True


def test_a_terminal_sees_the_same_answer_streamed(env):
    """On a terminal the forward answer is written as it is generated (Engine.chat_stream); the
    printed text equals the non-streamed reply for the same seed."""
    from scripts.chat_cli import main
    for model in (TAGS["forward"], TAGS["bidirectional"]):
        args = ["--source=base", "--device_type=cpu", "--max_tokens=8", f"--model_tag={model}", "--seed=11"]
        plain, terminal = CountingOutput(), FakeTerminal()
        main(args, stdin=io.StringIO("What is 2*3?\nAnd 3*3?\n"), out=plain)
        main(args, stdin=io.StringIO("What is 2*3?\nAnd 3*3?\n"), out=terminal)
        assert plain.getvalue().count("assistant:") == 2
        assert terminal.writes >= plain.writes + 4  # each answer written in pieces, not as one line
        assert [line.rstrip() for line in terminal.getvalue().splitlines()] == \
            [line.rstrip() for line in plain.getvalue().splitlines()]
