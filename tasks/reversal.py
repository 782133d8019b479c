"""Reversal-curse facts: fictitious people and what they are known for (docs/EVALUATION.md, "The reversal
task for the chat phases"). The train split states every fact in ONE order only, the test split asks it
both ways (Berglund et al., 2023); the facts depend only on `seed`. Rewards see reading order (DESIGN.md §6).
"""

import random
import re

from nanochat.common import UserError
from nanochat.direction import by_direction
from tasks.common import Task

SPLITS = ("train", "test")
TRAINING_ORDERS = ("name_first", "description_first")

# Made-up names and places: syllables that read as names in no particular language.
_NAME_SYLLABLES = ["va", "lo", "ren", "mi", "ta", "sel", "dor", "ka", "ri", "ven", "tho", "an",
                   "el", "ma", "zo", "qui", "bra", "ny", "fe", "lu", "gar", "is", "om", "tre"]
_NAME_ENDINGS = ["", "", "a", "n", "s", "th", "el", "o"]
_PLACE_ENDINGS = ["in", "ar", "ost", "eth", "ia", "um", "ford", "wick"]
N_PLACES = 120

_MATERIALS = ["glass", "copper", "amber", "silver", "woollen", "paper", "iron", "crystal", "cedar", "brass"]
_DEVICES = ["compass", "lantern", "loom", "clock", "telescope", "kettle", "harp", "map", "sail", "bell"]
_INSTITUTIONS = ["academy", "library", "observatory", "guild", "museum", "orchestra"]
_BUILDINGS = ["tower", "cathedral", "lighthouse", "bridge", "harbour", "theatre"]
_PIECES = ["symphony", "lullaby", "anthem", "sonata"]

_DESCRIPTION_TEMPLATES = [
    ("the inventor of the {material} {device}", ("material", "device")),
    ("the first mayor of {place}", ("place",)),
    ("the founder of the {place} {institution}", ("place", "institution")),
    ("the architect of the {place} {building}", ("place", "building")),
    ("the composer of the {place} {piece}", ("place", "piece")),
]
_SLOT_VALUES = {"material": _MATERIALS, "device": _DEVICES, "institution": _INSTITUTIONS,
                "building": _BUILDINGS, "piece": _PIECES}

# Training phrasings: several questions about the entity the fact starts with, one answer order.
_TRAIN_QUESTIONS = ["Who is {x}?", "What is {x} known for?", "Tell me about {x}."]
_PROBE_QUESTION = "Who is {x}?"


def _capitalize(text):
    return text[:1].upper() + text[1:]


def _made_up_word(rng, n_syllables, endings):
    return "".join(rng.choice(_NAME_SYLLABLES) for _ in range(n_syllables)) + rng.choice(endings)


def make_facts(n, seed=0):
    """n (name, description) pairs, all names distinct and all descriptions distinct; a pure
    function of seed, and prefix-stable: the first k facts are the same for every n >= k."""
    rng = random.Random(f"reversal/{seed}")
    places = set()
    while len(places) < N_PLACES:
        places.add(_capitalize(_made_up_word(rng, rng.randint(2, 3), _PLACE_ENDINGS)))
    places = sorted(places)
    # Rejection sampling slows down near the number of distinct descriptions; stay well below.
    capacity = (len(_MATERIALS) * len(_DEVICES) + N_PLACES * (
        1 + len(_INSTITUTIONS) + len(_BUILDINGS) + len(_PIECES))) // 2
    if n > capacity:
        raise UserError(f"reversal facts: at most {capacity} facts per seed, asked for {n}")
    names, descriptions, facts = set(), set(), []
    while len(facts) < n:
        name = (_capitalize(_made_up_word(rng, 2, _NAME_ENDINGS)) + " "
                + _capitalize(_made_up_word(rng, rng.randint(2, 3), _NAME_ENDINGS)))
        template, slots = rng.choice(_DESCRIPTION_TEMPLATES)
        values = {s: rng.choice(places if s == "place" else _SLOT_VALUES[s]) for s in slots}
        description = template.format(**values)
        # Names and descriptions must be unique (and name words never reused as places) so that
        # each probe has exactly one right answer.
        if name in names or description in descriptions or any(w in places for w in name.split()):
            continue
        names.add(name)
        descriptions.add(description)
        facts.append((name, description))
    return facts


def mentions(text, entity):
    """True iff `entity` appears in `text` as whole words, ignoring case and whitespace runs."""
    if not isinstance(text, str) or not entity:
        return False
    words = [re.escape(w) for w in entity.split()]
    pattern = r"(?<!\w)" + r"\s+".join(words) + r"(?!\w)"
    return re.search(pattern, text, flags=re.IGNORECASE) is not None


class ReversalFacts(Task):
    """`size` fictitious facts; train: each stated one way (3 paraphrased questions, 3*size examples);
    test: each probed both ways (as_trained then reversed, 2*size examples)."""

    name = "reversal"
    generation_directions = ("forward", "backward")

    def __init__(self, split="train", size=100, seed=0, direction_of_training="name_first", **kwargs):
        super().__init__(**kwargs)
        if split not in SPLITS:
            raise UserError(f"reversal has no split {split!r}: use one of {', '.join(SPLITS)}")
        if direction_of_training not in TRAINING_ORDERS:
            raise UserError(f"reversal: direction_of_training={direction_of_training!r}, use one of "
                            f"{', '.join(TRAINING_ORDERS)}")
        if size < 0:
            raise UserError(f"reversal size must be >= 0, not {size}")
        self.split, self.size, self.seed = split, int(size), int(seed)
        self.direction_of_training = direction_of_training
        self.facts = make_facts(self.size, self.seed)

    def num_examples(self):
        per_fact = len(_TRAIN_QUESTIONS) if self.split == "train" else 2
        return per_fact * self.size

    def _ordered(self, fact_index, as_trained):
        """(question_entity, answer_entity): the training order, or its reverse."""
        name, description = self.facts[fact_index]
        name_first = (self.direction_of_training == "name_first") == as_trained
        return (name, description) if name_first else (description, name)

    def get_example(self, index):
        if self.split == "train":
            # Fact-major order: the paraphrases of one fact are adjacent; mixtures shuffle.
            fact, paraphrase = divmod(index, len(_TRAIN_QUESTIONS))
            x, y = self._ordered(fact, as_trained=True)
            question = _TRAIN_QUESTIONS[paraphrase].format(x=x)
            answer, probe = f"{_capitalize(x)} is {y}.", "train"
        else:
            fact, which = divmod(index, 2)
            probe = "as_trained" if which == 0 else "reversed"
            x, y = self._ordered(fact, as_trained=(which == 0))
            question, answer = _PROBE_QUESTION.format(x=x), f"{_capitalize(y)}."
        return {
            "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "fact": fact, "probe": probe, "question_entity": x, "answer_entity": y,
        }

    def reward(self, conversation, generated_text, direction="forward"):
        """forward: the answer must name `answer_entity`; backward: the question must name
        `question_entity`."""
        self.check_reward_direction(direction)
        key = by_direction(direction, forward="answer_entity", backward="question_entity")
        return 1.0 if mentions(generated_text, conversation[key]) else 0.0
