"""The Task interface: a sized, sliceable collection of conversations with a way to score them.

A conversation is {"messages": [{"role": "user"|"assistant"|"system", "content": str}, ...]};
multiple-choice tasks add "choices" and "answer" (the right one's index). `generation_directions`
are the concrete directions in which a generation can be verified (docs/DESIGN.md §6): forward the
model writes the answer, backward the question. Rewards always see text in reading order.
"""

import random

from nanochat.common import UserError
from nanochat.direction import CONCRETE_DIRECTIONS, DirectionSpec, concrete_directions, validate_direction


class Task:
    """Subclasses implement `num_examples()` and `get_example(index)`; slicing is shared."""

    name = "task"                         # the registry name, used in error messages
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

    def check_reward_direction(self, direction):
        """For reward(): `direction` must be concrete (forward/backward) and declared."""
        validate_direction(direction, CONCRETE_DIRECTIONS)
        check_task_direction(self, direction)

    def in_direction(self, direction, tokenizer, model_direction=None):
        """This task evaluated in the concrete `direction` (tasks/direction_wrapper.py) for a model
        trained in `model_direction`; nanochat asks the task for it, so it never imports tasks."""
        from tasks.direction_wrapper import DirectionTaskWrapper
        return DirectionTaskWrapper(self, direction, tokenizer, model_direction=model_direction)


def check_task_direction(task, direction):
    """The concrete directions in which `task` can be generated and rewarded for a model of
    `direction` (a name or the model's DirectionSpec): those the task declares and the model
    generates (docs/DESIGN.md §6); a UserError if there are none."""
    if isinstance(direction, DirectionSpec):
        native, direction = direction.generation_directions(), direction.direction
    else:
        native = concrete_directions(direction)  # the same policy for a bare name (validated there)
    declared = tuple(task.generation_directions)
    usable = [d for d in native if d in declared]
    if usable:
        return usable
    if not declared:
        raise UserError(f"task {task.name} has no reward: it is training data only, not a task that can "
                        "be generated and verified (use arithmetic or reversal for RL)")
    wanted = " or ".join(native)
    hint = (" (a backward model needs a task whose beginning can be verified, e.g. arithmetic)"
            if direction == "backward" else "")
    raise UserError(f"task {task.name} cannot be generated {wanted}: it declares only "
                    f"{' and '.join(declared)}{hint}")


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
