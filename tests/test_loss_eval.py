"""Tests for nanochat.loss_eval: bits per byte on whole documents, fair across directions."""

import math

import os
import pytest
import torch
import torch.nn.functional as F

from nanochat.common import UserError
from nanochat.loss_eval import arrow_of_time_gap, evaluate_bpb, select_documents
from nanochat.gpt import GPT, config_for_depth

SEQ = 128



@pytest.fixture(scope="module")
def token_bytes(tok):
    return torch.from_numpy(tok.token_byte_lengths().astype("int64"))


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    m = GPT.build(config_for_depth(1, tok.get_vocab_size(), SEQ), "cpu")
    with torch.no_grad():  # non-trivial predictions, so forward and backward losses differ
        for block in m.model.layers:
            block.self_attn.o_proj.weight.normal_(std=0.05)
            block.mlp.down_proj.weight.normal_(std=0.05)
        m.lm_head.weight.normal_(std=0.1)
    return m.eval()


def bpb(model, tok, token_bytes, docs, directions=("forward", "backward"), trained="forward", T=64, batch_size=4):
    return evaluate_bpb(model, tok, token_bytes, docs, list(directions), trained, T, batch_size, "cpu")


def manual_nats(model, row, T, tok, header_len=1):
    """Sum of cross-entropy over the text targets of one oriented row, scored the documented
    way: the first T targets with the document's start as context; each later target in the
    window that first reaches it (windows end T/2 further each time), whose input is the header
    (BOS, marker) then the T - header_len tokens before the window's end. Special targets skipped."""
    specials = set(tok.special_tokens.values())
    stride = max(1, min(T // 2, T - header_len))
    last = len(row) - 1
    nats, done, end = 0.0, 0, min(T, last)
    with torch.no_grad():
        while done < last:
            if done == 0:
                inputs = row[:end]
            else:
                start = end - (T - header_len)
                inputs = row[:header_len] + row[start:end]
            logp = F.log_softmax(model(torch.tensor([inputs]))[0], dim=-1)
            for j in range(done + 1, end + 1):  # target index j in row
                pos = j - 1 if done == 0 else header_len + (j - 1 - (end - (T - header_len)))
                if row[j] not in specials:
                    nats -= logp[pos, row[j]].item()
            done, end = end, min(end + stride, last)
    return nats


def test_select_documents_is_the_start_of_the_val_split(base_dir, tok, corpus_template):
    docs = select_documents(tok, max_tokens=300, split="val")
    expected = [tok.encode(t) for t in corpus_template["val"]]
    assert docs[:-1] == expected[:len(docs) - 1]
    assert docs[-1] == expected[len(docs) - 1][:len(docs[-1])]  # the last one cut to the cap
    assert sum(map(len, docs)) == 300
    # ranks take disjoint shares: every other document
    r0 = select_documents(tok, max_tokens=600, split="val", rank=0, world_size=2)
    r1 = select_documents(tok, max_tokens=600, split="val", rank=1, world_size=2)
    assert r0[:-1] == expected[0::2][:len(r0) - 1] and r1[:-1] == expected[1::2][:len(r1) - 1]


@pytest.mark.parametrize("trained", ["forward", "backward", "bidirectional"])
@pytest.mark.parametrize("T", [16, 64])
def test_denominators_identical_across_directions(corpus_template, tok, token_bytes, model, trained, T):
    texts = corpus_template["val"][:12]
    docs = [tok.encode(t) for t in texts]
    res = bpb(model, tok, token_bytes, docs, trained=trained, T=T)
    fwd, bwd = res["forward"], res["backward"]
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(len(d) for d in docs)
    assert max(len(d) for d in docs) > 16  # with T=16 documents are cut into pieces
    # every text token is a target exactly once in both directions
    assert fwd["bytes"] == bwd["bytes"] == n_bytes
    assert fwd["tokens"] == bwd["tokens"] == n_tokens
    assert fwd["documents"] == bwd["documents"] == 12
    assert fwd["bpb"] != bwd["bpb"]
    for r in (fwd, bwd):
        assert math.isclose(r["bpb"], r["nats"] / (math.log(2) * r["bytes"]), rel_tol=1e-12)


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_bpb_matches_manual_computation_one_doc(corpus_template, tok, token_bytes, model, direction):
    text = max(corpus_template["val"][:20], key=len)
    t = tok.encode(text)
    assert len(t) < SEQ
    body = t if direction == "forward" else t[::-1]
    row = [tok.get_bos_token_id()] + body
    nats = manual_nats(model, row, SEQ, tok)
    res = bpb(model, tok, token_bytes, [t], directions=[direction], trained=direction, T=SEQ)[direction]
    assert res["bytes"] == len(text.encode("utf-8"))
    assert math.isclose(res["nats"], nats, rel_tol=1e-4)
    assert math.isclose(res["bpb"], nats / (math.log(2) * len(text.encode("utf-8"))), rel_tol=1e-4)


def test_bpb_long_document_in_pieces_matches_manual(corpus_template, tok, token_bytes, model):
    text = max(corpus_template["val"], key=len)
    t = tok.encode(text)
    T = 16
    assert len(t) > 3 * T
    row = [tok.get_bos_token_id()] + t[::-1]
    nats = manual_nats(model, row, T, tok)
    res = bpb(model, tok, token_bytes, [t], directions=["backward"], trained="backward", T=T)["backward"]
    assert res["tokens"] == len(t)
    assert math.isclose(res["nats"], nats, rel_tol=1e-4)


def test_bidirectional_bpb_excludes_the_marker(corpus_template, tok, token_bytes, model):
    text = corpus_template["val"][0]
    t = tok.encode(text)
    row = [tok.get_bos_token_id(), tok.get_backward_token_id()] + t[::-1]
    nats = manual_nats(model, row, SEQ, tok, header_len=2)  # the marker target (a special) is skipped
    res = bpb(model, tok, token_bytes, [t], directions=["backward"], trained="bidirectional", T=SEQ)["backward"]
    assert res["tokens"] == len(t)
    assert math.isclose(res["nats"], nats, rel_tol=1e-4)


def test_evaluate_bpb_rejects_non_concrete_direction(tok, token_bytes, model):
    with pytest.raises(UserError):
        bpb(model, tok, token_bytes, [[1, 2, 3]], directions=["bidirectional"])


def test_arrow_of_time_gap():
    res = {"forward": {"bpb": 2.0}, "backward": {"bpb": 2.5}}
    assert arrow_of_time_gap(res) == pytest.approx(0.25)
    assert arrow_of_time_gap({"forward": {"bpb": 2.0}}) is None
    assert arrow_of_time_gap({"backward": {"bpb": 2.0}}) is None
    assert arrow_of_time_gap({"forward": {"bpb": 2.0}, "backward": {"bpb": 1.5}}) == pytest.approx(-0.25)


def test_bidirectional_long_document_windows_keep_the_marker(corpus_template, tok, token_bytes, model):
    # Every continuation window restates [BOS, marker]: a bidirectional model must always know
    # which way it reads (without it, a long document's tail is scored direction-blind).
    text = max(corpus_template["val"], key=len)
    t = tok.encode(text)
    T = 16
    assert len(t) > 3 * T
    for direction, marker in (("forward", tok.get_forward_token_id()), ("backward", tok.get_backward_token_id())):
        body = t if direction == "forward" else t[::-1]
        nats = manual_nats(model, [tok.get_bos_token_id(), marker] + body, T, tok, header_len=2)
        res = bpb(model, tok, token_bytes, [t], directions=[direction], trained="bidirectional", T=T)[direction]
        assert res["tokens"] == len(t)
        assert math.isclose(res["nats"], nats, rel_tol=1e-4)


def test_eval_tokens_caps_what_is_scored(base_dir):
    """--eval_tokens is a cap: a first document longer than it is cut (in reading order)."""
    from nanochat.loss_eval import select_documents
    from nanochat.tokenizer import get_tokenizer
    tok = get_tokenizer()
    docs = select_documents(tok, 10)
    assert sum(map(len, docs)) == 10 and len(docs) == 1
    full = select_documents(tok, 10_000_000)
    assert docs[0] == full[0][:10]
    capped = select_documents(tok, 333)
    assert sum(map(len, capped)) == 333 and capped[:-1] == full[:len(capped) - 1]


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_bpb_by_position_adds_up_to_the_total(corpus_template, tok, token_bytes, model, direction):
    """The position buckets partition the scored tokens: their nats and bytes sum to evaluate_bpb's."""
    from nanochat.loss_eval import evaluate_bpb, evaluate_bpb_by_position, select_documents
    docs = select_documents(tok, 3000, data_dir=os.path.join(corpus_template["dir"], "base_data"))
    docs.append(docs[0] * 5)  # one document longer than the context: continuation windows
    T = 32
    total = evaluate_bpb(model, tok, token_bytes, docs, [direction], "forward", T, 4, "cpu")[direction]
    buckets = evaluate_bpb_by_position(model, tok, token_bytes, docs, direction, "forward", T, 4, "cpu")
    assert [b["from"] for b in buckets] == [0, 4, 16, 32]
    assert sum(b["bytes"] for b in buckets) == total["bytes"]
    assert sum(b["nats"] for b in buckets) == pytest.approx(total["nats"], rel=1e-6)
    assert buckets[-1]["bytes"] > 0  # the long document reaches past position T
