"""ARC (AI2 Reasoning Challenge): grade-school science, multiple choice (allenai/ai2_arc,
"ARC-Easy" and "ARC-Challenge"). Answer labels are letters or, in a few rows, digits; both are
rendered as letters A, B, ... in order (tasks/multiple_choice.py).
"""

from nanochat.common import UserError
from tasks.multiple_choice import MultipleChoiceTask, multiple_choice_conversation

SPLITS = ("train", "validation", "test")
SUBSETS = {"ARC-Easy": "arc_easy", "ARC-Challenge": "arc_challenge"}


class ARC(MultipleChoiceTask):
    """ARC `subset` ("ARC-Easy" or "ARC-Challenge"), `split` (train, validation, test);
    data_files: local copies (see tasks/hub.py); the registry names are arc_easy/arc_challenge."""

    def __init__(self, subset="ARC-Easy", split="train", data_files=None, **kwargs):
        if subset not in SUBSETS:
            raise UserError(f"ARC has no subset {subset!r}: use one of {', '.join(SUBSETS)}")
        self.subset, self.name = subset, SUBSETS[subset]
        super().__init__(split, "allenai/ai2_arc", subset, ("question", "choices", "answerKey"), data_files, SPLITS,
                         **kwargs)

    def get_example(self, index):
        row = self.ds[index]
        labels = list(row["choices"]["label"])
        if row["answerKey"] not in labels:
            raise ValueError(f"{self.name} row {index}: answerKey {row['answerKey']!r} is not one of {labels}")
        conversation = multiple_choice_conversation(row["question"], row["choices"]["text"],
                                                    labels.index(row["answerKey"]))
        conversation["subset"] = self.subset
        return conversation
