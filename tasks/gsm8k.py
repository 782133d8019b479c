"""GSM8K: grade-school math word problems with worked solutions (openai/gsm8k, "main").

The solution ("... #### 72") is the assistant's content, its "<<48/2=24>>" calculator annotations
dropped (plain text, no tool calls). Forward only: an answer can be checked, a question cannot. Reward:
1.0 iff the generation's final number equals the reference's.
"""

import re
from decimal import Decimal, InvalidOperation

from tasks.hub import HubTask

_CALCULATOR = re.compile(r"<<[^<>]*>>")
_NUMBER = re.compile(r"-?\$?[0-9][0-9,]*(?:\.[0-9]+)?")


def final_number(text):
    """The final number of a solution as a Decimal: the first number after the last "####" if
    there is one, else the last number in the text; None if there is none."""
    if not isinstance(text, str):
        return None
    if "####" in text:
        match = _NUMBER.search(text.rsplit("####", 1)[1])
        candidates = [match.group()] if match else []
    else:
        candidates = _NUMBER.findall(text)
    if not candidates:
        return None
    try:
        return Decimal(candidates[-1].replace(",", "").replace("$", ""))
    except InvalidOperation:
        return None


class GSM8K(HubTask):
    """GSM8K `split` ("train" or "test"); data_files: local copies (see tasks/hub.py)."""

    name = "gsm8k"
    generation_directions = ("forward",)

    def __init__(self, split="train", data_files=None, **kwargs):
        super().__init__(split, "openai/gsm8k", "main", ("question", "answer"), data_files, **kwargs)

    def get_example(self, index):
        row = self.ds[index]
        solution = _CALCULATOR.sub("", row["answer"]).strip()
        return {"messages": [{"role": "user", "content": row["question"].strip()},
                             {"role": "assistant", "content": solution}]}

    def reward(self, conversation, generated_text, direction="forward"):
        self.check_reward_direction(direction)
        reference = final_number(conversation["messages"][-1]["content"])
        predicted = final_number(generated_text)
        return 1.0 if reference is not None and predicted == reference else 0.0
