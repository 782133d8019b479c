"""Multiple-choice rendering and scoring, shared by ARC and MMLU.

One example is one conversation: the user turn holds the optional preamble, the question, the lettered
choices ("A. <text>", one per line) and "Answer with the letter of the correct choice."; the assistant
answers with the letter. It carries "choices" (the letters), "choice_texts" and "answer" (the right
index); likelihood scoring puts each choice in as the answer (docs/EVALUATION.md).
"""

import re

from tasks.hub import HubTask

LETTERS = "ABCDEFGHIJ"
_INSTRUCTION = "Answer with the letter of the correct choice."
_STANDALONE_LETTER = re.compile(r"(?<![A-Za-z])([A-J])(?![A-Za-z])")


def multiple_choice_conversation(question, choice_texts, answer, preamble=None):
    """The conversation of one multiple-choice question (see the module docstring)."""
    if not 2 <= len(choice_texts) <= len(LETTERS):
        raise ValueError(f"a multiple-choice question needs 2 to {len(LETTERS)} choices, got {len(choice_texts)}")
    if not 0 <= answer < len(choice_texts):
        raise ValueError(f"answer index {answer} is out of range for {len(choice_texts)} choices")
    letters = list(LETTERS[:len(choice_texts)])
    listing = "\n".join(f"{letter}. {text}" for letter, text in zip(letters, choice_texts))
    parts = ([preamble] if preamble else []) + [question.strip(), listing, _INSTRUCTION]
    return {
        "messages": [
            {"role": "user", "content": "\n\n".join(parts)},
            {"role": "assistant", "content": letters[answer]},
        ],
        "choices": letters,
        "choice_texts": [str(t) for t in choice_texts],
        "answer": int(answer),
    }


class MultipleChoiceTask(HubTask):
    """Categorical (choices compared by likelihood); a generated answer (forward only) is right iff its
    first standalone letter among the choices' letters is the answer's."""

    eval_type = "categorical"
    generation_directions = ("forward",)

    def reward(self, conversation, generated_text, direction="forward"):
        self.check_reward_direction(direction)
        if not isinstance(generated_text, str):
            return 0.0
        letters = conversation["choices"]
        for match in _STANDALONE_LETTER.finditer(generated_text):
            if match.group(1) in letters:
                return 1.0 if match.group(1) == letters[conversation["answer"]] else 0.0
        return 0.0
