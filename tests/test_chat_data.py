"""Conversations in every direction: rendering, masks that travel with their tokens, and the
mid/SFT batches built from them (docs/DESIGN.md §4)."""

import pytest
import torch

from nanochat.chat_data import ConversationBatches
from nanochat.common import UserError
from nanochat.direction import DirectionSpec, orient_conversation, validate_train_on
from tasks.arithmetic import TwoWayArithmetic

CONV = {"messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "What is 7*8?"},
                     {"role": "assistant", "content": "56"},
                     {"role": "user", "content": "And 2*3?"},
                     {"role": "assistant", "content": "6"}]}


def spans(tok, ids, mask):
    """The decoded text of each maximal run of mask-1 tokens."""
    out, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            out.append(tok.decode(cur))
            cur = []
    if cur:
        out.append(tok.decode(cur))
    return out


def test_render_merges_system_and_masks_assistant_by_default(tok):
    ids, mask = tok.render_conversation(CONV)
    assert ids[0] == tok.get_bos_token_id() and mask[0] == 0
    assert tok.decode(ids).startswith("<|bos|><|user_start|>Be brief.\n\nWhat is 7*8?<|user_end|>")
    assert spans(tok, ids, mask) == ["56<|assistant_end|>", "6<|assistant_end|>"]
    assert len(ids) == len(mask)


def test_render_user_policy_trains_the_closing_delimiter_of_its_orientation(tok):
    ids, mask = tok.render_conversation(CONV, train_on="user", closing="start")
    assert spans(tok, ids, mask) == ["<|user_start|>Be brief.\n\nWhat is 7*8?", "<|user_start|>And 2*3?"]
    _, all_mask = tok.render_conversation(CONV, train_on="all")
    assert all_mask[0] == 0 and all(all_mask[1:])


@pytest.mark.parametrize("direction", ["forward", "backward", "bidirectional"])
def test_conversation_rows_round_trip_in_every_direction(tok, direction):
    spec = DirectionSpec.from_tokenizer(direction, tok)
    ref_ids, _ = tok.render_conversation(CONV)
    draws = ["forward", "backward"] if direction == "bidirectional" else [direction]
    for concrete in draws:
        ids, mask, got = spec.conversation_row(tok, CONV, concrete_direction=concrete)
        assert got == concrete and len(ids) == len(mask)
        back_ids, back_mask, back_dir = spec.restore_conversation(ids, mask)
        assert back_ids == ref_ids and back_dir == concrete
        # the mask restored to reading order is exactly the one rendered for that policy
        policy = "assistant" if concrete == "forward" else "user"
        closing = "end" if concrete == "forward" else "start"
        assert back_mask == tok.render_conversation(CONV, train_on=policy, closing=closing)[1]
        if direction == "bidirectional":
            marker = tok.get_forward_token_id() if concrete == "forward" else tok.get_backward_token_id()
            assert ids[1] == marker and mask[1] == 0


def test_backward_row_reads_answer_then_trains_on_the_question(tok):
    spec = DirectionSpec.from_tokenizer("backward", tok)
    single = {"messages": CONV["messages"][1:3]}
    ids, mask, _ = spec.conversation_row(tok, single)
    assert ids[0] == tok.get_bos_token_id()
    assert ids[1] == tok.encode_special("<|assistant_end|>")  # the answer comes first, reversed
    trained = [i for i, m in zip(ids, mask) if m]
    # in model order the trained tokens are the question reversed, then <|user_start|> (its stop)
    question = tok.encode("What is 7*8?")
    assert trained == question[::-1] + [tok.encode_special("<|user_start|>")]


def test_orient_conversation_keeps_each_mask_bit_with_its_token():
    ids, mask = [100, 1, 2, 3, 4], [0, 0, 1, 1, 0]
    out_ids, out_mask = orient_conversation(ids, mask, "backward", marker_id=999)
    assert out_ids == [100, 999, 4, 3, 2, 1] and out_mask == [0, 0, 0, 1, 1, 0]
    assert dict(zip(ids, mask)) == {i: m for i, m in zip(out_ids, out_mask) if i != 999}


def test_train_on_validation():
    assert validate_train_on("auto") is None and validate_train_on("user") == "user"
    with pytest.raises(UserError, match="assistant"):
        validate_train_on("answers")


def decode_rows(tok, x, y):
    return [(tok.decode(r.tolist()), r.tolist(), t.tolist()) for r, t in zip(x, y)]


def test_backward_sft_batch_decodes_as_reversed_conversation_with_loss_on_questions(tok):
    task = TwoWayArithmetic("train", size=50)
    batches = ConversationBatches(task, tok, "backward", B=4, T=48, mode="pad")
    x, y = next(batches)
    assert x.shape == y.shape == (4, 48)
    user_start = tok.encode_special("<|user_start|>")
    for i, (text, inputs, targets) in enumerate(decode_rows(tok, x, y)):
        conv = task[i]
        answer, question = conv["messages"][1]["content"], conv["messages"][0]["content"]
        expected = ("<|bos|><|assistant_end|>" + tok.decode(tok.encode(answer)[::-1]) + "<|assistant_start|><|user_end|>"
                    + tok.decode(tok.encode(question)[::-1]) + "<|user_start|>")
        assert text.startswith(expected)
        trained = [t for t in targets if t >= 0]
        assert trained == tok.encode(question)[::-1] + [user_start]


def test_bidirectional_batches_hold_both_kinds_with_markers_never_targets(tok):
    task = TwoWayArithmetic("train", size=200)
    fwd, bwd = tok.get_marker_ids()
    batches = ConversationBatches(task, tok, "bidirectional", B=16, T=48, mode="pad", p_backward=0.5, seed=1)
    x, y = next(batches)
    markers = x[:, 1].tolist()
    assert set(markers) == {fwd, bwd}
    assert not torch.isin(y, torch.tensor([fwd, bwd])).any()
    assert (y[:, 0] == -1).all()  # BOS -> marker is never trained
    for row, inputs in zip(batches.last_directions, x.tolist()):
        assert inputs[1] == (fwd if row[0] == "forward" else bwd)


def test_packed_mid_batches_start_each_row_with_bos_and_are_full(tok):
    task = TwoWayArithmetic("train", size=100)
    batches = ConversationBatches(task, tok, "forward", B=3, T=64, mode="pack", train_on="all")
    x, y = next(batches)
    bos = tok.get_bos_token_id()
    assert (x[:, 0] == bos).all()
    assert (x == bos).sum(dim=1).min() >= 2  # several conversations per row
    assert (y >= 0).float().mean() > 0.85    # train_on=all: nearly every target is trained (not: BOS, continuation context)


def test_sharded_streams_equal_accumulation_streams(tok):
    task = TwoWayArithmetic("train", size=64)
    kw = dict(B=2, T=32, mode="pad")
    single = ConversationBatches(task, tok, "backward", grad_accum_steps=2, **kw)
    r0 = ConversationBatches(task, tok, "backward", rank=0, world_size=2, **kw)
    r1 = ConversationBatches(task, tok, "backward", rank=1, world_size=2, **kw)
    a, b = next(single), next(single)
    assert torch.equal(a[0], next(r0)[0]) and torch.equal(b[0], next(r1)[0])


@pytest.mark.parametrize("direction", ["forward", "backward", "bidirectional"])
def test_packed_rows_lose_no_token_of_long_conversations(tok, direction):
    """Rows much shorter than a conversation: the trained targets, row after row, are exactly
    the trained tokens of the conversations in order (nothing cropped, nothing trained twice),
    and each continuation restates its header and context."""
    task = TwoWayArithmetic("train", size=40)
    T = 12
    batches = ConversationBatches(task, tok, direction, B=2, T=T, mode="pack", seed=4)
    spec = batches.spec
    expected = []
    for index in range(len(task)):
        ids, mask, _ = spec.conversation_row(tok, task[index], doc_index=index)
        expected += [t for t, m in zip(ids, mask) if m]
    got, carried = [], 0
    while len(got) < len(expected):
        x, y = next(batches)
        assert (x[:, 0] == tok.get_bos_token_id()).all()
        got += [t for t in y.flatten().tolist() if t >= 0]
        carried += batches.streams[0].carry is not None
    assert got[:len(expected)] == expected
    assert carried > 0  # conversations did continue across rows
    # resume mid-conversation: the same following batches
    while batches.streams[0].carry is None:
        next(batches)
    state = batches.state_dict()
    again = ConversationBatches(task, tok, direction, B=2, T=T, mode="pack", seed=4)
    again.load_state_dict(state)
    for _ in range(3):
        (xa, ya), (xb, yb) = next(batches), next(again)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_shuffled_conversations_take_a_fresh_order_each_epoch(tok):
    """With shuffle, each epoch reads every example once, in an order drawn from (seed, epoch):
    the same in every direction and after a resume mid-epoch; ranks read disjoint shares."""
    task = TwoWayArithmetic("train", size=24)
    kw = dict(B=1, T=48, mode="pad", seed=3, shuffle=True)

    def read(batches, n):
        out = []
        for _ in range(n):
            stream = batches.streams[batches.next_stream]
            epoch, position = stream.epoch, stream.cursor
            if position >= len(task):
                epoch, position = epoch + 1, stream.offset
            out.append((epoch, stream.order.index(epoch, position)))
            next(batches)
        return out

    orders = {d: read(ConversationBatches(task, tok, d, **kw), 48) for d in ("forward", "backward", "bidirectional")}
    assert orders["forward"] == orders["backward"] == orders["bidirectional"]
    epochs = [[i for e, i in orders["forward"] if e == k] for k in (0, 1)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(24))
    assert epochs[0] != epochs[1] and epochs[0] != list(range(24))
    assert [i for _, i in read(ConversationBatches(task, tok, "forward", **{**kw, "shuffle": False}), 24)] == list(range(24))
    # resume mid-epoch
    batches = ConversationBatches(task, tok, "backward", **kw)
    read(batches, 10)
    state = batches.state_dict()
    again = ConversationBatches(task, tok, "backward", **kw)
    again.load_state_dict(state)
    for _ in range(20):
        (xa, ya), (xb, yb) = next(batches), next(again)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    with pytest.raises(UserError):
        ConversationBatches(task, tok, "backward", **{**kw, "shuffle": False}).load_state_dict(state)
    # two ranks: disjoint, complete shares of an epoch
    shares = [{i for e, i in read(ConversationBatches(task, tok, "forward", rank=r, world_size=2, **kw), 12)}
              for r in (0, 1)]
    assert not shares[0] & shares[1] and shares[0] | shares[1] == set(range(24))
