"""Conversations and the chat template: how a conversation becomes token ids, in reading order.

A conversation is {"messages": [{"role", "content"}, ...]} with alternating user/assistant turns; an
optional leading system message is merged into the first user turn. Rendered in reading order:

    <|bos|> <|user_start|> question <|user_end|> <|assistant_start|> answer <|assistant_end|> ...

This module knows the template's token layout and nothing of directions: nanochat.direction orients
what it renders (backward, bidirectional). `tokenizer` is any object with encode, encode_special and
get_bos_token_id (nanochat.tokenizer.Tokenizer).
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
    turns = [m["content"] for m in messages if m["role"] == role]
    if not turns:
        return None
    return turns[0] if which == "first" else turns[-1]


def render_conversation(tokenizer, conversation, train_on="assistant", closing="end"):
    """(ids, mask) in reading order; mask 1 on the tokens trained on (train_on's turns).

    `closing` says which delimiter of a trained turn is trained with it: 'end' when the turn is
    generated left to right (forward), 'start' when it is generated right to left (backward), so the
    mask always covers what the model writes, including the token that ends its turn in its own
    orientation. Orient the result with nanochat.direction.orient_conversation."""
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
    """(later, slot_end, slot_start) for writing a conversation's first user turn from what follows it.

    `conversation` is the later part of a chat in reading order, starting with the assistant answer
    whose question is written (a leading user turn is that slot: its content is ignored) and ending
    with an assistant answer. `later` is everything after the slot in reading order (no BOS);
    `slot_end` (<|user_end|>) and `slot_start` (<|user_start|>) are the slot's delimiters: a model
    reading right to left is given reversed(later) + [slot_end] and stops at slot_start."""
    messages = conversation["messages"] if isinstance(conversation, dict) else conversation
    messages = [dict(m) for m in messages]
    if messages and messages[0].get("role") == "assistant":
        messages = [{"role": "user", "content": ""}] + messages  # the slot the model writes
    messages = normalize_messages(messages)
    if messages[-1]["role"] != "assistant" or len(messages) < 2:
        raise ValueError("a backward chat prompt needs the assistant's answer as the last message")
    later, _ = render_conversation(tokenizer, {"messages": [{"role": "user", "content": ""}] + messages[1:]})
    later = later[3:]  # drop BOS, <|user_start|>, <|user_end|> of the empty placeholder turn
    return later, tokenizer.encode_special("<|user_end|>"), tokenizer.encode_special("<|user_start|>")
