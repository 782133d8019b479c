"""Two-way arithmetic: a synthetic task that can be generated and rewarded in both directions.

    user:      What is 7*8?
    assistant: 56

Forward the model writes the product; backward, given "56", it writes the question before it, and
any factorisation with both factors > 1 is right ("7*8", "8*7", "4*14"): factoring, the hard direction,
and a task whose *beginning* can be verified, so RL runs offline on backward models (docs/DESIGN.md §6).
Example i is a pure function of (split, seed, i); train and test draw from separate seed streams. With
the default factors (2..12) there are only 121 problems, so the test split repeats training problems
(tasks/arithmetic_unseen.py splits by product instead).
"""

import random
import re

from nanochat.common import UserError
from nanochat.conversation import turn_content
from tasks.common import Task

SPLITS = ("train", "test")

# Numbers longer than this are never a valid answer here; refusing them also keeps int() away
# from Python's limit on converting very long digit strings (a ValueError on garbage input).
MAX_DIGITS = 18

# A product expression "x*y": '*', 'x', 'X', '×' or '·' between non-negative integers. A run of
# factors is matched whole, so "2*3*4" is one three-factor expression, not "2*3". A digit, '.'
# or '-' just before the run means it belongs to a longer, decimal or negative number.
_MULTIPLY = r"\s*[*xX×·]\s*"
_EXPRESSION = re.compile(r"(?<![0-9.\-])([0-9]+(?:" + _MULTIPLY + r"[0-9]+)+)(?![0-9]|\.[0-9])")
_FACTOR = re.compile(r"[0-9]+")
_INTEGER = re.compile(r"-?[0-9]+")


def first_integer(text):
    """The first integer in `text` (a leading '-' counts), or None."""
    if not isinstance(text, str):
        return None
    match = _INTEGER.search(text)
    if match is None or len(match.group().lstrip("-")) > MAX_DIGITS:
        return None
    return int(match.group())


def first_product_expression(text):
    """The factors of the first "x*y"-style expression in `text` (a list of ints), or None."""
    if not isinstance(text, str):
        return None
    match = _EXPRESSION.search(text)
    if match is None:
        return None
    factors = _FACTOR.findall(match.group(1))
    if any(len(f) > MAX_DIGITS for f in factors):
        return None
    return [int(f) for f in factors]


class TwoWayArithmetic(Task):
    """`size` multiplication problems a*b with a, b uniform in [min_factor, max_factor].

    generation_directions: forward (write the product) and backward (write a factorisation).
    """

    name = "arithmetic"
    generation_directions = ("forward", "backward")

    def __init__(self, split="train", size=1000, seed=0, min_factor=2, max_factor=12, **kwargs):
        super().__init__(**kwargs)
        if split not in SPLITS:
            raise UserError(f"arithmetic has no split {split!r}: use one of {', '.join(SPLITS)}")
        if not 2 <= min_factor <= max_factor:
            raise UserError(f"arithmetic needs 2 <= min_factor <= max_factor (got {min_factor}, {max_factor}): "
                            "a factor of 1 would make every number its own trivial factorisation")
        if size < 0:
            raise UserError(f"arithmetic size must be >= 0, not {size}")
        self.split, self.size, self.seed = split, int(size), int(seed)
        self.min_factor, self.max_factor = int(min_factor), int(max_factor)

    def num_examples(self):
        return self.size

    def get_example(self, index):
        # A string seed is hashed with SHA-512 by `random`: stable across processes and Python
        # hash randomisation; including the split keeps train and test streams apart.
        rng = random.Random(f"arithmetic/{self.split}/{self.seed}/{index}")
        a = rng.randint(self.min_factor, self.max_factor)
        b = rng.randint(self.min_factor, self.max_factor)
        return {
            "messages": [
                {"role": "user", "content": f"What is {a}*{b}?"},
                {"role": "assistant", "content": str(a * b)},
            ],
        }

    def reward(self, conversation, generated_text, direction="forward"):
        """forward: 1.0 iff the first integer of the generated answer is a*b.
        backward: 1.0 iff the first product expression of the generated question is x*y with
        integers x, y > 1 and x*y equal to the given answer (any factorisation). Only the
        first expression counts, so listing many guesses earns nothing."""
        self.check_reward_direction(direction)
        question = turn_content(conversation, "user")
        answer = turn_content(conversation, "assistant", which="last")
        if question is None or answer is None:
            raise ValueError("an arithmetic conversation needs a user question and an assistant answer")
        problem = first_product_expression(question)
        if problem is None or len(problem) != 2:
            raise ValueError(f"not an arithmetic question: {question!r}")
        (a, b), product = problem, int(answer)
        if direction == "forward":
            return 1.0 if first_integer(generated_text) == a * b else 0.0
        factors = first_product_expression(generated_text)
        if factors is None or len(factors) != 2:
            return 0.0
        x, y = factors
        return 1.0 if x > 1 and y > 1 and x * y == product else 0.0
