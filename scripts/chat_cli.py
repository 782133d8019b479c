"""Talk to a chat checkpoint from the terminal, in the model's direction (docs/DESIGN.md §5).

    python -m scripts.chat_cli --model_tag=d4_fwd                 # interactive
    python -m scripts.chat_cli --model_tag=d4_bwd -p "The answer is 56."

Forward, you type a question and the model answers; backward, you type the answer and the model
writes the question before it; a bidirectional model starts forward (/forward, /backward switch).
Multi-turn, through the same nanochat.engine.ChatHistory as scripts/chat_web.py: docs/QUICKSTART.md, "Chat".
"""

import argparse
import sys

from nanochat.checkpoint_manager import load_model
from nanochat.common import UserError, add_flag, check_sampling, compute_init, run_main
from nanochat.engine import ChatHistory, Engine

# Per concrete direction: what the user types, what the model writes, which exchanges
# ChatHistory.fit drops first (the farthest from the new turn), and whether the reply can be shown
# as it is written (a backward question is written right to left, so it is shown when complete).
ROLES = {
    "forward": {"typed": "question", "a_typed": "a question", "label": "assistant", "dropped": "oldest",
                "live": True},
    "backward": {"typed": "answer", "a_typed": "an answer", "label": "question (generated, precedes your answer)",
                 "dropped": "latest", "live": False},
}
# Tokens kept free for the reply when old exchanges are dropped to fit the context.
MIN_ROOM = 32
HELP = ("commands: /forward, /backward (bidirectional models), /clear (forget the conversation), "
        "/help, /quit")


def build_parser():
    p = argparse.ArgumentParser(description="Chat with a checkpoint (forward: answers; backward: questions)")
    add_flag(p, "source", default="sft", help="checkpoint source: base | mid | sft | rl")
    add_flag(p, "model_tag", default=None, help="tag or experiment id (default: newest)")
    add_flag(p, "step", type=int, default=None, help="checkpoint step (default: last)")
    add_flag(p, "direction", default=None, help="initial mode: forward | backward (default: the model's; "
             "forward for bidirectional)")
    p.add_argument("-p", "--prompt", dest="prompt", default=None,
                   help="one-shot: a question (forward) or an answer (backward); print the reply and exit")
    add_flag(p, "temperature", type=float, default=0.6)
    add_flag(p, "top_k", type=int, default=50, help="-1 = off")
    add_flag(p, "max_tokens", type=int, default=256, help="tokens to generate at most")
    add_flag(p, "seed", type=int, default=42)
    add_flag(p, "device_type", default="")
    return p


class ChatSession:
    """The REPL state: the engine, the conversation so far (in its direction) and the exchange count."""

    def __init__(self, engine, direction, args, out=sys.stdout):
        self.engine, self.args, self.out = engine, args, out
        self.history = ChatHistory(direction)
        self.exchanges = 0

    @property
    def direction(self):
        return self.history.direction

    def prompt_string(self):
        return f"[{self.direction}] {ROLES[self.direction]['typed']}> "

    def say(self, text):
        print(text, file=self.out, flush=True)

    def switch(self, direction):
        try:
            direction = self.engine.spec.generation_direction(direction)
        except UserError as e:
            self.say(f"error: {e}; staying {self.direction}")
            return
        had_history = bool(self.history.messages)
        self.history = ChatHistory(direction)  # a conversation has one direction: start over
        self.say(f"mode: {direction}{' (conversation cleared)' if had_history else ''} "
                 f"(type {ROLES[direction]['a_typed']})")

    def exchange(self, text):
        """Print the other side of `text`, labelled, and keep the exchange in the history. On a terminal
        a forward answer appears as it is written; a backward question is written right to left, so it
        is printed when complete (the same tokens: Engine.chat_stream draws as Engine.chat does)."""
        dropped = self.history.fit(self.engine, text, min(self.args.max_tokens, MIN_ROOM))
        if dropped:
            self.say(f"(dropped the {ROLES[self.direction]['dropped']} {dropped} exchange(s): the conversation no "
                     "longer fits the context)")
        live = ROLES[self.direction]["live"] and getattr(self.out, "isatty", lambda: False)()
        sampling = dict(max_tokens=self.args.max_tokens, temperature=self.args.temperature,
                        top_k=None if self.args.top_k < 0 else self.args.top_k, seed=self.args.seed + self.exchanges)
        self.out.write(f"{ROLES[self.direction]['label']}: ")
        shown = generated = ""
        for generated in self.engine.chat_stream(self.history.request(text), self.direction, **sampling):
            visible = generated.lstrip()
            if live and visible.startswith(shown) and not visible.endswith("\ufffd"):  # whole characters only
                self.out.write(visible[len(shown):])
                self.out.flush()
                shown = visible
        self.say(generated.strip()[len(shown):])
        self.exchanges += 1
        self.history.record(text, generated.strip())

    def handle(self, line):
        """Process one input line; False when the session should end."""
        line = line.strip()
        if not line:
            return True
        if line.startswith("/"):
            command = line.split()[0].lower()
            if command in ("/quit", "/exit"):
                return False
            if command in ("/forward", "/backward"):
                self.switch(command[1:])
            elif command == "/clear":
                self.history = ChatHistory(self.direction)
                self.say("cleared: the conversation starts over")
            elif command == "/help":
                self.say(HELP)
            else:
                self.say(f"unknown command {command}; {HELP}")
            return True
        try:
            self.exchange(line)
        except UserError as e:  # e.g. an input too long for the context: report it, keep going
            self.say(f"error: {e}")
        return True

    def read_line(self, stdin):
        """The next input line, '' at end of input: input() on a terminal (readline editing), else readline()."""
        if stdin is sys.stdin and stdin.isatty():
            try:
                return input(self.prompt_string()) + "\n"
            except EOFError:
                return ""
        self.out.write(self.prompt_string())
        self.out.flush()
        return stdin.readline()

    def loop(self, stdin=sys.stdin):
        self.say(f"chat: a {self.engine.direction} model; {HELP}")
        if self.direction == "backward":
            self.say("backward: type the assistant's ANSWER; the model writes the question that precedes it; "
                     "each next answer you type comes earlier in the same conversation")
        if stdin is sys.stdin and stdin.isatty():
            try:
                import readline  # noqa: F401  (enables line editing in input())
            except ImportError:
                pass
        try:
            while True:
                line = self.read_line(stdin)
                if not line:  # end of input
                    self.say("")
                    break
                if not self.handle(line):
                    break
        except KeyboardInterrupt:
            self.say("")


def main(argv=None, stdin=None, out=None):
    args = build_parser().parse_args(argv)
    if args.max_tokens < 1:
        raise UserError("--max_tokens must be positive")
    check_sampling(args.temperature, args.top_k)
    if args.prompt is not None and not args.prompt.strip():
        raise UserError("-p is empty: give a question (forward) or an answer (backward)")
    _, _, _, _, device = compute_init(args.device_type)
    model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
    engine = Engine(model, tokenizer, meta)
    try:
        direction = engine.spec.generation_direction(args.direction)  # --direction, or the model's default
    except UserError as e:
        raise UserError(f"--direction={args.direction}: {e}")
    session = ChatSession(engine, direction, args, out or sys.stdout)
    if args.prompt is not None:
        session.exchange(args.prompt)
        return
    session.loop(stdin or sys.stdin)


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
