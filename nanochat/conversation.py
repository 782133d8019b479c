"""The chat template: a conversation {"messages": [{"role", "content"}, ...]} (alternating user and
assistant turns, a leading system message merged into the first user turn) as token ids in reading order:

    <|bos|> <|user_start|> question <|user_end|> <|assistant_start|> answer <|assistant_end|> ...

Nothing here knows directions: nanochat.direction orients what this renders.
"""

TRAIN_ON_CHOICES = ("assistant", "user", "all")


def normalize_messages(conversation):
    """Validated list of {"role", "content"} with the system message merged into the first user turn."""
    messages = conversation["messages"] if isinstance(conversation, dict) else conversation
    messages = [dict(m) for m in messages]
    if messages and messages[0]["role"] == "system":
        if len(messages) < 2 or messages[1]["role"] != "user":
            raise ValueError("a system message must be followed by a user message")
        messages[1]["content"] = messages[0]["content"] + "\n\n" + messages[1]["content"]
        messages = messages[1:]
    if not messages:
        raise ValueError("a conversation needs at least one message")
    for i, m in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise ValueError(f"message {i} has role {m['role']!r}; turns must alternate user/assistant, user first")
        if not isinstance(m["content"], str):
            raise ValueError(f"message {i}: content must be a string")
    return messages


def turn_content(conversation, role, which="first"):
    """Content of the first (or last) turn of `role` in reading order, or None."""
    messages = conversation["messages"] if isinstance(conversation, dict) else conversation
    turns = [m["content"] for m in messages if m["role"] == role] or [None]
    return turns[0] if which == "first" else turns[-1]


def render_conversation(tokenizer, conversation, train_on="assistant", closing="end"):
    """(ids, mask) in reading order; mask 1 on the tokens of train_on's turns. `closing` is the
    delimiter trained with a turn: 'end' when it is written left to right (forward), 'start' right
    to left (backward), so the mask covers the token that ends the turn in the model's orientation."""
    if train_on not in TRAIN_ON_CHOICES:
        raise ValueError(f"train_on must be one of {TRAIN_ON_CHOICES}, not {train_on!r}")
    ids, mask = [tokenizer.get_bos_token_id()], [0]
    for m in normalize_messages(conversation):
        role = m["role"]
        trained = train_on == "all" or train_on == role
        start, end = tokenizer.encode_special(f"<|{role}_start|>"), tokenizer.encode_special(f"<|{role}_end|>")
        content = tokenizer.encode(m["content"])
        ids += [start] + content + [end]
        if trained:
            mask += [1 if closing == "start" or train_on == "all" else 0] + [1] * len(content)
            mask += [1 if closing == "end" or train_on == "all" else 0]
        else:
            mask += [0] * (len(content) + 2)
    return ids, mask


def render_for_completion(tokenizer, conversation):
    """Forward prompt for the last assistant turn: the conversation without it, ending with
    <|assistant_start|> (the model writes the answer and <|assistant_end|>)."""
    messages = normalize_messages(conversation)
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    ids, _ = render_conversation(tokenizer, {"messages": messages})
    return ids + [tokenizer.encode_special("<|assistant_start|>")]


def answer_context(tokenizer, conversation):
    """(context, stop) for writing the next assistant answer left to right: the history after BOS up
    to and including <|assistant_start|> (a trailing assistant turn is dropped), and <|assistant_end|>."""
    return render_for_completion(tokenizer, conversation)[1:], tokenizer.encode_special("<|assistant_end|>")


def question_context(tokenizer, conversation):
    """(later, slot_end, slot_start) for writing a conversation's first user turn from what follows
    it (the backward chat of docs/DIRECTIONS.md): `later` is everything after that slot in reading
    order, without BOS; slot_end and slot_start are <|user_end|> and <|user_start|>."""
    messages = list(conversation["messages"] if isinstance(conversation, dict) else conversation)
    if messages and messages[0].get("role") == "assistant":
        messages = [{"role": "user", "content": ""}] + messages  # the slot the model writes
    messages = normalize_messages(messages)
    if messages[-1]["role"] != "assistant" or len(messages) < 2:
        raise ValueError("a backward chat prompt needs the assistant's answer as the last message")
    later, _ = render_conversation(tokenizer, {"messages": [{"role": "user", "content": ""}] + messages[1:]})
    later = later[3:]  # drop BOS, <|user_start|>, <|user_end|>: the empty first turn is the slot the model writes
    return later, tokenizer.encode_special("<|user_end|>"), tokenizer.encode_special("<|user_start|>")
