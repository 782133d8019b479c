"""The Task interface: a sized, sliceable collection of conversations with a way to score them.

A conversation is {"messages": [{"role": "user"|"assistant"|"system", "content": str}, ...]};
multiple-choice tasks add "choices" (list of strings) and "answer" (index of the right one)
and put the full question in the user turn.

Directions (DESIGN.md §6): a task declares `generation_directions`, the concrete directions in
which its generated side can be verified. Forward: the model is given the user turn and writes
the answer (`reward(conversation, answer_text)`). Backward: the model is given the assistant's
answer and writes the question (`reward(conversation, question_text)` with direction
"backward"). Rewards always see text in reading order.
"""

import random


class Task:
    """Subclasses implement `num_examples()` and `get_example(index)`; slicing is shared."""

    eval_type = "generative"             # or "categorical" (multiple choice)
    generation_directions = ("forward",)  # where reward() can verify a generation

    def __init__(self, start=0, stop=None, step=1):
        self.start, self.stop, self.step = start, stop, step

    def num_examples(self):
        raise NotImplementedError

    def get_example(self, index):
        raise NotImplementedError

    def __len__(self):
        stop = self.num_examples() if self.stop is None else min(self.stop, self.num_examples())
        return max(0, (stop - self.start + self.step - 1) // self.step)

    def __getitem__(self, i):
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.get_example(self.start + i * self.step)

    def reward(self, conversation, generated_text, direction="forward"):
        """1.0 if the generated side is right, else 0.0 (generative tasks)."""
        raise NotImplementedError(f"{type(self).__name__} has no reward")

    def supports(self, direction):
        return direction in self.generation_directions


class TaskMixture(Task):
    """Several tasks shuffled together deterministically (for mid/SFT training data)."""

    def __init__(self, tasks, seed=42, **kwargs):
        super().__init__(**kwargs)
        self.tasks = list(tasks)
        self.index = [(t, i) for t, task in enumerate(self.tasks) for i in range(len(task))]
        random.Random(seed).shuffle(self.index)

    def num_examples(self):
        return len(self.index)

    def get_example(self, index):
        t, i = self.index[index]
        return self.tasks[t][i]


class TaskSequence(Task):
    """Tasks one after another (curricula)."""

    def __init__(self, tasks, **kwargs):
        super().__init__(**kwargs)
        self.tasks = list(tasks)

    def num_examples(self):
        return sum(len(t) for t in self.tasks)

    def get_example(self, index):
        for task in self.tasks:
            if index < len(task):
                return task[index]
            index -= len(task)
        raise IndexError(index)
