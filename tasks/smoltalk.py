"""SmolTalk: general chat conversations for mid-training and SFT (HuggingFaceTB/smol-smoltalk).
Training data only: nothing to verify, so no generation direction and no reward.
"""

from tasks.hub import HubTask


class SmolTalk(HubTask):
    """SmolTalk `split` ("train" or "test"); data_files: local copies (see tasks/hub.py)."""

    name = "smoltalk"
    generation_directions = ()

    def __init__(self, split="train", data_files=None, **kwargs):
        super().__init__(split, "HuggingFaceTB/smol-smoltalk", None, ("messages",), data_files, **kwargs)

    def get_example(self, index):
        # Keep only role and content: Hub rows may carry extra keys per message.
        messages = [{"role": m["role"], "content": m["content"]} for m in self.ds[index]["messages"]]
        return {"messages": messages}

    def reward(self, conversation, generated_text, direction="forward"):
        self.check_reward_direction(direction)  # always raises: smoltalk declares no direction
