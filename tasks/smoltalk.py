"""SmolTalk: general chat conversations for mid-training and SFT (HuggingFaceTB/smol-smoltalk).
Training data only: nothing to verify, so no generation direction and no reward.
"""

from nanochat.common import UserError
from tasks.common import Task
from tasks.hub import load_task_data

SPLITS = ("train", "test")


class SmolTalk(Task):
    """SmolTalk `split` ("train" or "test"); data_files: local copies (see tasks/hub.py)."""

    name = "smoltalk"
    generation_directions = ()

    def __init__(self, split="train", data_files=None, **kwargs):
        super().__init__(**kwargs)
        if split not in SPLITS:
            raise UserError(f"smoltalk has no split {split!r}: use one of {', '.join(SPLITS)}")
        self.split = split
        self.ds = load_task_data(self.name, "HuggingFaceTB/smol-smoltalk", None, split, ("messages",), data_files)

    def num_examples(self):
        return len(self.ds)

    def get_example(self, index):
        # Keep only role and content: Hub rows may carry extra keys per message.
        messages = [{"role": m["role"], "content": m["content"]} for m in self.ds[index]["messages"]]
        return {"messages": messages}

    def reward(self, conversation, generated_text, direction="forward"):
        self.check_reward_direction(direction)  # always raises: smoltalk declares no direction
