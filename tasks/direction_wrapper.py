"""One task seen in one evaluated direction: the plan's DirectionTaskWrapper (docs/EVALUATION.md).

    wrapper = DirectionTaskWrapper(task, "backward", tokenizer, model_direction="bidirectional")
    conversation = wrapper[0]                          # reading order, exactly the task's example
    ids = wrapper.render_for_eval(conversation, model, tokenizer)   # what likelihood scoring reads
    rows = wrapper.render_choices(conversation)        # multiple choice: one (ids, mask) per choice
    prompt, stops = wrapper.render_prompt(conversation)  # generation, native directions only

Every row comes from nanochat.direction.DirectionSpec; `wrapper.scoring` says what applies.
"""

from nanochat.common import UserError
from nanochat.direction import CONCRETE_DIRECTIONS, DIRECTIONS, DirectionSpec, validate_direction


class DirectionTaskWrapper:
    """`task` evaluated in the concrete `direction`, for a model trained in `model_direction` (its name,
    or its DirectionSpec, e.g. an Engine's `spec`; left out: a one-way model, whose rows have no marker)."""

    def __init__(self, task, direction="forward", tokenizer=None, model_direction=None):
        if direction == "bidirectional":
            raise UserError("DirectionTaskWrapper evaluates one concrete direction (forward or backward); for a "
                            "bidirectional model pass model_direction='bidirectional' and wrap once per direction")
        self.direction = validate_direction(direction, CONCRETE_DIRECTIONS)
        if tokenizer is None:
            raise UserError("DirectionTaskWrapper needs the tokenizer (token ids, BOS and the direction markers)")
        self.task, self.tokenizer = task, tokenizer
        if isinstance(model_direction, DirectionSpec):
            self.spec, self.model_direction = model_direction, model_direction.direction
        else:
            self.model_direction = None if model_direction is None else validate_direction(model_direction, DIRECTIONS)
            # A one-way model of unknown direction reads `direction` rows with no marker: the spec
            # of a model trained in `direction` builds exactly those.
            self.spec = DirectionSpec.from_tokenizer(model_direction or direction, tokenizer)

    def __len__(self):
        return len(self.task)

    def __getitem__(self, idx):
        """The task's conversation, in reading order (orientation happens when it is rendered)."""
        return self.task[idx]

    # ---- what is scored ----------------------------------------------------------------------
    @property
    def not_applicable_reason(self):
        """Why no accuracy is computed in this direction (None when one is)."""
        if self.task.eval_type == "categorical":
            return None
        name = self.task.name
        if self.model_direction is None:
            return (f"task {name} is generative: whether the model can generate {self.direction} depends on the "
                    "direction it was trained in; pass model_direction (or an Engine) to know")
        if self.direction not in self.spec.generation_directions():
            return (f"a {self.model_direction} model was never trained to generate {self.direction}: generated "
                    f"text would say nothing about the task, so only likelihood is reported")
        if self.direction not in self.task.generation_directions:
            declared = " and ".join(self.task.generation_directions) or "no direction"
            return (f"task {name} can only check generations {declared}: a {self.direction} generation "
                    "(the model writes the question before a given answer) cannot be verified")
        return None

    @property
    def scoring(self):
        if self.task.eval_type == "categorical":
            return "multiple_choice"
        return "generation" if self.not_applicable_reason is None else "likelihood_only"

    # ---- rendering ---------------------------------------------------------------------------
    def render_for_eval(self, conversation, model=None, tokenizer=None):
        """The whole conversation (reference answer included) as the model reads it in this direction,
        [BOS] (+ marker) first: what likelihood scoring reads. `model` (the plan's signature) only
        checks that the row fits its context."""
        tokenizer = tokenizer or self.tokenizer
        ids, _, _ = self.spec.conversation_row(tokenizer, conversation, concrete_direction=self.direction,
                                               train_on="all")
        limit = getattr(getattr(model, "config", None), "sequence_len", None)
        if limit is not None and len(ids) > limit + 1:
            raise UserError(f"the rendered conversation has {len(ids)} tokens: more than the model's "
                            f"{limit}-token context can score")
        return ids

    def render_choices(self, conversation, mc_answer="letter"):
        """Multiple choice: chat_eval_lib.choice_rows in this direction."""
        from nanochat.chat_eval_lib import choice_rows
        if self.task.eval_type != "categorical":
            raise UserError(f"task {self.task.name} is not multiple choice: it has no choices")
        return choice_rows(self.spec, self.tokenizer, conversation, self.direction, mc_answer)

    def render_prompt(self, conversation):
        """(prompt ids, stop ids) for generating this direction's side (docs/DESIGN.md §5):
        forward the answer after the question, backward the question before the answer."""
        if self.model_direction is None:
            raise UserError("render_prompt needs model_direction: the prompt of a bidirectional model has a marker")
        return self.spec.chat_prompt(self.tokenizer, conversation, self.direction)
