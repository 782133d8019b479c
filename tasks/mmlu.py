"""MMLU: 57 subjects of multiple-choice questions (cais/mmlu, config "all"), rendered as in
tasks/multiple_choice.py with the subject as a preamble.
"""

from tasks.multiple_choice import MultipleChoiceTask, multiple_choice_conversation

SPLITS = ("auxiliary_train", "dev", "validation", "test")


class MMLU(MultipleChoiceTask):
    """MMLU `split`; data_files: local copies (see tasks/hub.py)."""

    name = "mmlu"

    def __init__(self, split="test", data_files=None, **kwargs):
        super().__init__(split, "cais/mmlu", "all", ("question", "choices", "answer"), data_files, SPLITS, **kwargs)

    def get_example(self, index):
        row = self.ds[index]
        subject = (row.get("subject") or "").replace("_", " ").strip()
        preamble = f"The following is a multiple choice question about {subject}." if subject else None
        conversation = multiple_choice_conversation(row["question"], row["choices"], int(row["answer"]), preamble)
        conversation["subject"] = row.get("subject") or ""
        return conversation
