"""Tests for nanochat.direction_dataloader: orientation before packing, markers, sharding, resume.

The corpus is the generated one of conftest (`corpus_template["train"]`): every document starts
"Story <i>:" and ends "The end.", so forward and backward rows are told apart by their content.
"""

import itertools
import os
import random
import shutil

import pytest
import torch

from nanochat.common import UserError
from nanochat.direction import draw_direction
from nanochat.direction_dataloader import DirectionAwareLoader, direction_aware_dataloader
from nanochat.tokenizer import get_tokenizer

B, T = 4, 64



@pytest.fixture(scope="module")
def known(corpus_template, tok):
    """Token lists of the training documents, forward and reversed, with prefix sets."""
    docs = [tok.encode(t) for t in corpus_template["train"]]
    fwd = [tuple(d) for d in docs]
    bwd = [tuple(reversed(d)) for d in docs]

    def prefixes(seqs):
        return {s[:n] for s in seqs for n in range(1, len(s) + 1)}

    return {
        "docs": docs,
        "tok": tok,
        "bos": tok.get_bos_token_id(),
        "markers": tok.get_marker_ids(),
        "fwd_prefixes": prefixes(fwd),
        "bwd_prefixes": prefixes(bwd),
        "fwd_index": {d: i for i, d in enumerate(fwd)},  # whole document -> global index
        "bwd_index": {d: i for i, d in enumerate(bwd)},
    }


def make_loader(direction="forward", **kwargs):
    kwargs.setdefault("device", "cpu")
    kwargs.setdefault("tokenizer_threads", 1)
    return DirectionAwareLoader(kwargs.pop("B", B), kwargs.pop("T", T), kwargs.pop("split", "train"),
                                direction, **kwargs)


def take(loader, n):
    return list(itertools.islice(loader, n))


def take_traced(loader, n):
    """n batches, each with the loader's placements: [(x, y, placements per row)]."""
    out = []
    for _ in range(n):
        x, y = next(loader)
        out.append((x, y, loader.last_placements))
    return out


def oriented(known, doc_index, concrete):
    doc = known["docs"][doc_index]
    return list(doc) if concrete == "forward" else list(reversed(doc))


def check_traced(traced, known, direction, seed=0, p_backward=0.5, context_tokens=None):
    """Check every row of every batch against the documents it claims to hold; returns
    {(doc_index, epoch): [(body_start, body_end), ...]} of the text trained.

    - a row starts with BOS; each document piece starts with BOS (+ the marker of its draw);
    - the tokens before a piece's first new target are its header and the text just before it;
    - the targets of new tokens are exactly the oriented document's tokens; every other target
      is -1 or a BOS (the end of the document before it); a marker is never a target."""
    bos, markers = known["bos"], known["markers"]
    trained = {}
    for x, y, placements in traced:
        rows = x.tolist()
        tgts = y.tolist()
        for r, placed in enumerate(placements):
            row, tgt = rows[r], tgts[r]
            assert row[0] == bos
            expected = [-1] * T
            for start, doc_index, epoch, b0, b1 in placed:
                concrete = direction
                if direction == "bidirectional":
                    concrete = draw_direction(seed, doc_index, p_backward, epoch=epoch)
                body = oriented(known, doc_index, concrete)
                header = [bos] if direction != "bidirectional" else [bos, markers[concrete == "backward"]]
                ctx = start - len(header) - [p for p in range(start - 1, -1, -1) if row[p] == bos and
                                             (p + len(header) <= start)][0]
                hpos = start - len(header) - ctx
                assert row[hpos:hpos + len(header)] == header[:T - hpos]
                if context_tokens is not None:
                    assert ctx <= min(context_tokens, b0)
                    if start + (b1 - b0) < T + 1:  # a piece that was not cut at the row's end
                        assert ctx == min(context_tokens, b0)
                assert row[start - ctx:start] == body[b0 - ctx:b0]  # context: the text just before
                for k in range(b0, b1):
                    expected[start + (k - b0) - 1] = body[k]
                if hpos > 0:
                    expected[hpos - 1] = bos
                trained.setdefault((doc_index, epoch), []).append((b0, b1))
            last_end = max(start + (b1 - b0) for start, _, _, b0, b1 in placed)
            if last_end <= T and tgt[last_end - 1] == bos:  # a header alone closes the row (no room
                assert T + 1 - last_end <= len(markers) and all(e == -1 for e in expected[last_end - 1:])
                expected[last_end - 1] = bos  # for text after it): its BOS ends the previous document
            assert tgt == expected
        assert not torch.isin(y, torch.tensor(markers)).any()
    return trained


def check_once_per_epoch(trained, known, epochs, n_docs):
    """Every document of the completed epochs is trained exactly once, start to end."""
    for epoch in epochs:
        for d in range(n_docs):
            spans = sorted(trained.get((d, epoch), []))
            assert spans, (d, epoch)
            assert spans[0][0] == 0 and spans[-1][1] == len(known["docs"][d]), (d, epoch, spans)
            for (_, e0), (s1, _) in zip(spans, spans[1:]):
                assert e0 == s1, (d, epoch, spans)  # contiguous, no overlap, no gap


# ---- content of rows ------------------------------------------------------------------------

@pytest.mark.parametrize("direction", ["forward", "backward", "bidirectional"])
def test_rows_hold_oriented_documents(base_dir, known, direction):
    loader = make_loader(direction, seed=5)
    traced = take_traced(loader, 20)
    trained = check_traced(traced, known, direction, seed=5, context_tokens=T // 8)
    assert len(trained) >= 20 * B // 2


def test_forward_and_backward_decode_differently(base_dir, known):
    tok = known["tok"]
    fx, _ = next(make_loader("forward"))
    bx, _ = next(make_loader("backward"))
    assert tok.decode(fx[0, 1:8].tolist()).startswith("Story")
    assert not tok.decode(bx[0, 1:8].tolist()).startswith("Story")


@pytest.mark.parametrize("p_backward", [0.5, 0.2])
def test_bidirectional_fraction(base_dir, known, p_backward):
    seed = 5
    loader = make_loader("bidirectional", seed=seed, p_backward=p_backward, B=8)
    traced = take_traced(loader, 40)
    trained = check_traced(traced, known, "bidirectional", seed=seed, p_backward=p_backward)
    draws = [draw_direction(seed, d, p_backward, epoch=e) for d, e in trained]
    assert len(draws) >= 300
    assert abs(draws.count("backward") / len(draws) - p_backward) < 0.1


@pytest.mark.parametrize("p_backward,expected", [(0.0, "forward"), (1.0, "backward")])
def test_bidirectional_extreme_p(base_dir, known, p_backward, expected):
    fwd_id, bwd_id = known["markers"]
    x, _ = next(make_loader("bidirectional", p_backward=p_backward))
    present = set(x.flatten().tolist())
    assert (fwd_id in present) == (expected == "forward")
    assert (bwd_id in present) == (expected == "backward")


# ---- long documents: no token discarded (docs/DESIGN.md §2) ------------------------------------

@pytest.fixture
def long_docs_dir(corpus_template, tmp_path, monkeypatch):
    """A base dir whose documents (~300-600 tokens) are far longer than the rows (T=64): 24 of
    them, each line carrying its document and line number."""
    from nanochat.dataset import write_shards
    d = str(tmp_path / "long_base")
    shutil.copytree(corpus_template["dir"], d)
    shutil.rmtree(os.path.join(d, "base_data"))
    rng = random.Random(7)
    docs = []
    for i in range(24):
        lines = [f"line {i}.{k}: " + " ".join(rng.choice(corpus_template["train"]).split()[2:8])
                 for k in range(rng.randint(12, 30))]
        docs.append("\n".join(lines))
    write_shards(docs, os.path.join(d, "base_data"), 12)
    write_shards(docs[:4], os.path.join(d, "base_data"), 4, start_index=2)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", d)
    return d, docs


@pytest.fixture
def long_known(long_docs_dir):
    d, texts = long_docs_dir
    tok = get_tokenizer(d)
    return {"tok": tok, "bos": tok.get_bos_token_id(), "markers": tok.get_marker_ids(),
            "docs": [tok.encode(t) for t in texts]}


@pytest.mark.parametrize("direction", ["forward", "backward", "bidirectional"])
def test_every_text_token_is_a_target_once_per_epoch(long_known, direction):
    docs = long_known["docs"]
    assert min(len(t) for t in docs) > 3 * T  # documents much longer than a row
    loader = make_loader(direction, B=2, grad_accum_steps=2, seed=1)
    n_tokens = sum(len(t) for t in docs)
    traced = take_traced(loader, int(3.2 * n_tokens / (2 * T)))  # > 2 epochs of text over both streams
    trained = check_traced(traced, long_known, direction, seed=1, context_tokens=T // 8)
    check_once_per_epoch(trained, long_known, epochs=(0, 1), n_docs=len(docs))


def test_forward_and_backward_train_on_the_same_text(long_known):
    """Two epochs of batches: the text targets, restored to reading order, are the whole corpus
    twice, for forward and backward alike (the old cropping loader saw 13% of it, disjointly)."""
    docs = long_known["docs"]
    seen = {}
    for direction in ("forward", "backward"):
        loader = make_loader(direction, B=2, seed=1)
        traced = take_traced(loader, int(3.2 * sum(map(len, docs)) / (2 * T)))
        trained = check_traced(traced, long_known, direction)
        positions = set()
        for (d, epoch), spans in trained.items():
            for b0, b1 in spans:
                for k in range(b0, b1):  # body position k -> reading-order position
                    positions.add((epoch, d, k if direction == "forward" else len(docs[d]) - 1 - k))
        seen[direction] = {p for p in positions if p[0] < 2}
    total = 2 * sum(len(t) for t in docs)
    assert len(seen["forward"]) == total and seen["forward"] == seen["backward"]


def test_bidirectional_documents_change_direction_between_epochs(long_known):
    draws = [[draw_direction(3, d, 0.5, epoch=e) for d in range(2000)] for e in (0, 1)]
    changed = sum(a != b for a, b in zip(*draws)) / 2000
    assert 0.45 < changed < 0.55
    loader = make_loader("bidirectional", B=2, seed=3)
    traced = take_traced(loader, int(2.6 * sum(map(len, long_known["docs"])) / (2 * T)))
    trained = check_traced(traced, long_known, "bidirectional", seed=3)
    flips = [draw_direction(3, d, 0.5, 0) != draw_direction(3, d, 0.5, 1) for d in range(24)]
    assert any(flips) and not all(flips)
    assert all((d, 1) in trained for d in range(24))


def test_context_tokens_zero_restates_only_the_header(long_known):
    loader = make_loader("backward", context_tokens=0)
    check_traced(take_traced(loader, 10), long_known, "backward", context_tokens=0)


def test_giant_document_is_buffered_once(long_docs_dir, monkeypatch):
    """A document larger than the token buffer is held once (not once per buffered slot) and is
    tokenized in pieces."""
    import nanochat.direction_dataloader as dl
    monkeypatch.setattr(dl, "MAX_ENCODE_CHARS", 200)
    loader = make_loader("forward", buffer_tokens=100)
    next(loader)
    stream = loader.streams[0]
    assert len(stream.pieces) <= 2 and len({p.doc_index for p in stream.pieces}) == len(stream.pieces)
    text = "first line\n" * 50
    tok = loader.spec  # noqa: F841 (the loader's tokenizer encodes in pieces cut after newlines)
    assert dl._split_long_text(text, 200)[0].endswith("\n")
    assert "".join(dl._split_long_text(text, 200)) == text


def test_factory_function_matches_class(base_dir):
    a = take(direction_aware_dataloader(B, T, "train", "backward", device="cpu"), 3)
    b = take(make_loader("backward"), 3)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_val_split_reads_validation_documents(base_dir, corpus_template, known):
    tok = known["tok"]
    val = [tok.encode(t) for t in corpus_template["val"]]
    loader = make_loader("forward", split="val")
    traced = take_traced(loader, 2)
    check_traced(traced, dict(known, docs=val), "forward")


# ---- sharding and resume --------------------------------------------------------------------

@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
def test_two_ranks_equal_one_rank_accumulating_two(base_dir, known, direction):
    n = 6
    single = take(make_loader(direction, grad_accum_steps=2, rank=0, world_size=1), 2 * n)
    rank0 = take(make_loader(direction, rank=0, world_size=2), n)
    rank1 = take(make_loader(direction, rank=1, world_size=2), n)
    for k in range(n):
        for a, ranked in enumerate((rank0, rank1)):
            assert torch.equal(single[2 * k + a][0], ranked[k][0])
            assert torch.equal(single[2 * k + a][1], ranked[k][1])
    assert not torch.equal(rank0[0][0], rank1[0][0])
    if direction == "bidirectional":
        # rank 1 reads odd global indices; its draws are those of the global index (seed 0)
        loader = make_loader(direction, rank=1, world_size=2)
        trained = check_traced(take_traced(loader, n), known, direction)
        assert all(d % 2 == 1 for d, _ in trained)


def test_two_ranks_accumulating_equal_one_rank_accumulating_four(base_dir):
    # micro-batch slot s = rank * grad_accum_steps + a: rank r's a-th micro-batch of step k is
    # the single loader's micro-batch 4k + 2r + a
    n = 3
    single = take(make_loader("bidirectional", grad_accum_steps=4, world_size=1), 4 * n)
    ranks = [take(make_loader("bidirectional", grad_accum_steps=2, rank=r, world_size=2), 2 * n) for r in (0, 1)]
    for k in range(n):
        for r in (0, 1):
            for a in (0, 1):
                assert torch.equal(single[4 * k + 2 * r + a][0], ranks[r][2 * k + a][0])
                assert torch.equal(single[4 * k + 2 * r + a][1], ranks[r][2 * k + a][1])


def test_world_size_from_environment(base_dir, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    env_loader = make_loader("forward")
    assert (env_loader.rank, env_loader.world_size) == (1, 2)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    explicit = make_loader("forward", rank=1, world_size=2)
    for (xa, _), (xb, _) in zip(take(env_loader, 3), take(explicit, 3)):
        assert torch.equal(xa, xb)


@pytest.mark.parametrize("direction,k", [("forward", 3), ("bidirectional", 5), ("backward", 160)])
def test_resume_gives_identical_batches(base_dir, direction, k):
    # A small buffer and tokenizer batch make the state hold a partly read stream; k=160 runs past
    # the end of an epoch (300 documents per stream, ~1.5 per row).
    opts = dict(grad_accum_steps=2, buffer_docs=16, tokenizer_batch_size=8, seed=3)
    reference = make_loader(direction, **opts)
    take(reference, k)
    state = reference.state_dict()
    expected = take(reference, 6)
    resumed = make_loader(direction, resume_state=state, **opts)
    got = take(resumed, 6)
    for (xe, ye), (xg, yg) in zip(expected, got):
        assert torch.equal(xe, xg) and torch.equal(ye, yg)
    if k == 160:
        assert max(s["epoch"] for s in state["streams"]) >= 1


def test_resume_state_with_other_layout_is_user_error(base_dir):
    loader = make_loader("forward", grad_accum_steps=2)
    next(loader)
    with pytest.raises(UserError) as e:
        make_loader("forward", resume_state=loader.state_dict())
    assert "grad_accum" in str(e.value)


def test_resume_state_with_other_layout_is_rejected(base_dir):
    loader = make_loader("forward", grad_accum_steps=2)
    next(loader)
    with pytest.raises(Exception) as e:
        make_loader("forward", resume_state=loader.state_dict())
    assert "grad_accum" in str(e.value) and "(1, 2)" in str(e.value)


def test_more_streams_than_documents_is_user_error(base_dir, corpus_template):
    n_val = len(corpus_template["val"])
    with pytest.raises(UserError) as e:
        make_loader("forward", split="val", grad_accum_steps=n_val + 1)
    assert "fewer processes" in str(e.value)


# ---- bad options ----------------------------------------------------------------------------

@pytest.mark.parametrize("p_backward", [-0.5, 1.01])
def test_bad_p_backward_is_user_error(base_dir, p_backward):
    with pytest.raises(UserError):
        make_loader("bidirectional", p_backward=p_backward)


def test_bad_direction_is_user_error(base_dir):
    with pytest.raises(UserError) as e:
        make_loader("reverse")
    assert "bidirectional" in str(e.value)


@pytest.mark.parametrize("direction", ["backward", "bidirectional"])
def test_resume_mid_document_gives_identical_batches(long_known, direction):
    opts = dict(B=2, grad_accum_steps=2, buffer_docs=4, tokenizer_batch_size=2, seed=2)
    reference = make_loader(direction, **opts)
    take(reference, 7)
    state = reference.state_dict()
    assert any(s["carry"] and s["carry"][2] > 0 for s in state["streams"])  # a document half trained
    expected = take(reference, 8)
    got = take(make_loader(direction, resume_state=state, **opts), 8)
    for (xe, ye), (xg, yg) in zip(expected, got):
        assert torch.equal(xe, xg) and torch.equal(ye, yg)


def test_a_giant_document_alone_in_the_split_trains_at_once(corpus_template, tmp_path, monkeypatch):
    """Issue: one 54 MB document alone in the train split gave no step in 300 s (it was re-read
    and buffered 256 times). Now it is read once, tokenized in pieces, and rows flow at once."""
    from nanochat.dataset import write_shards
    d = str(tmp_path / "giant")
    shutil.copytree(corpus_template["dir"], d)
    shutil.rmtree(os.path.join(d, "base_data"))
    giant = "\n".join(corpus_template["train"] * 8)  # ~1.3 MB, > MAX_ENCODE_CHARS
    write_shards([giant], os.path.join(d, "base_data"), 1)
    write_shards(corpus_template["val"], os.path.join(d, "base_data"), 200, start_index=1)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", d)
    loader = make_loader("backward", B=4)
    batches = take(loader, 5)
    stream = loader.streams[0]
    assert len(stream.pieces) + (stream.carry is not None) == 1  # held once
    assert all(torch.equal(b[0][:, 0], torch.full((4,), stream.spec.bos_id)) for b in batches)
    tok = get_tokenizer(d)
    whole = tok.encode(giant)
    # tokenized in pieces cut after newlines: the same tokens as whole, give or take the cut points
    assert abs(len(stream.carry.row) - 1 - len(whole)) <= 4


# ---- the order of documents in an epoch (--shuffle) -------------------------------------------

def read_order(traced):
    """Global document indices in the order their first piece of each epoch appears: [(epoch, doc)]."""
    seen, order = set(), []
    for _, _, placements in traced:
        for placed in placements:
            for _, doc_index, epoch, b0, _ in placed:
                if b0 == 0 and (epoch, doc_index) not in seen:
                    seen.add((epoch, doc_index))
                    order.append((epoch, doc_index))
    return order


def test_document_order_is_a_fresh_permutation_each_epoch():
    from nanochat.dataset import DocumentOrder
    counts = [7, 5, 9, 3, 6]
    order = DocumentOrder(counts, seed=4, shuffle=True, window=2)
    epochs = [order.epoch_order(e) for e in range(3)]
    for e in epochs:
        assert sorted(e) == list(range(sum(counts)))  # every document once per epoch
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    assert DocumentOrder(counts, seed=4, window=2).epoch_order(1) == epochs[1]  # a function of (seed, epoch)
    assert DocumentOrder(counts, seed=5, window=2).epoch_order(1) != epochs[1]
    assert DocumentOrder(counts, seed=4, shuffle=False).epoch_order(2) == list(range(sum(counts)))
    # windows: the documents of two shards are read together, one window after another
    starts = [0, 7, 12, 21, 24]
    shard_of = lambda i: max(s for s, st in enumerate(starts) if st <= i)  # noqa: E731
    windows, _ = order._plan(0)
    pos = 0
    for window in windows:
        size = sum(counts[s] for s in window)
        assert {shard_of(i) for i in epochs[0][pos:pos + size]} == set(window)
        pos += size
    with pytest.raises(UserError):
        DocumentOrder(counts, window=0)


def test_document_source_holds_a_bounded_number_of_shards(long_docs_dir):
    from nanochat.dataset import DocumentSource
    d, docs = long_docs_dir
    source = DocumentSource("train", os.path.join(d, "base_data"), cache_shards=1)
    assert [source.get(i) for i in (13, 0, 23, 5)] == [docs[i] for i in (13, 0, 23, 5)]
    assert len(source._cache) == 1


@pytest.mark.parametrize("direction", ["forward", "backward", "bidirectional"])
def test_shuffled_epochs_cover_every_token_once(long_known, direction):
    docs = long_known["docs"]
    loader = make_loader(direction, B=2, grad_accum_steps=2, seed=1, shuffle=True, window_shards=1)
    traced = take_traced(loader, int(3.2 * sum(len(t) for t in docs) / (2 * T)))
    trained = check_traced(traced, long_known, direction, seed=1, context_tokens=T // 8)
    check_once_per_epoch(trained, long_known, epochs=(0, 1), n_docs=len(docs))
    order = read_order(traced)
    first, second = ([d for e, d in order if e == k] for k in (0, 1))
    assert first != second  # two epochs read the documents in different orders
    assert first != sorted(first)  # and not in storage order


def test_shuffled_order_is_the_same_in_every_direction(long_known):
    """The documents are read in the same sequence whatever the direction (packing may then place
    a bidirectional row's documents a little differently: its headers are one token longer)."""
    orders, packed = {}, {}
    for direction in ("forward", "backward", "bidirectional"):
        loader = make_loader(direction, B=2, seed=6, shuffle=True, grad_accum_steps=2)
        packed[direction] = read_order(take_traced(loader, 30))
        orders[direction] = []
        for stream in loader.streams:
            for epoch in (0, 1):
                stream.epoch = epoch
                orders[direction].append([i for _, i, _ in stream._read_from(stream.offset)])
    assert orders["forward"] == orders["backward"] == orders["bidirectional"]
    assert packed["forward"] == packed["backward"]
    assert sorted(orders["forward"][0] + orders["forward"][2]) == list(range(24))  # two streams, one epoch
    other_seed = read_order(take_traced(make_loader("forward", B=2, seed=7, shuffle=True), 40))
    assert other_seed[:20] != orders["forward"][:20]


@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
def test_shuffled_resume_mid_epoch_gives_identical_batches(long_known, direction):
    opts = dict(B=2, grad_accum_steps=2, buffer_docs=4, tokenizer_batch_size=2, seed=2, shuffle=True,
                window_shards=1)
    reference = make_loader(direction, **opts)
    take(reference, 9)
    state = reference.state_dict()
    assert state["shuffle"] is True and all(0 < s["cursor"] < 24 for s in state["streams"])
    expected = take(reference, 40)  # through the end of the epoch and into the next
    got = take(make_loader(direction, resume_state=state, **opts), 40)
    for (xe, ye), (xg, yg) in zip(expected, got):
        assert torch.equal(xe, xg) and torch.equal(ye, yg)
    with pytest.raises(UserError) as e:
        make_loader(direction, resume_state=state, **{**opts, "shuffle": False})
    assert "--shuffle" in str(e.value)


def test_shuffled_ranks_read_disjoint_complete_shares(long_known):
    docs = long_known["docs"]
    n_batches = int(1.6 * sum(map(len, docs)) / (2 * 2 * T))  # past an epoch of text per rank
    shares = []
    for rank in (0, 1):
        loader = make_loader("forward", B=2, rank=rank, world_size=2, seed=3, shuffle=True)
        shares.append({d for e, d in read_order(take_traced(loader, n_batches)) if e == 0})
    assert not shares[0] & shares[1]
    assert shares[0] | shares[1] == set(range(len(docs)))
    single = take(make_loader("forward", B=2, grad_accum_steps=2, seed=3, shuffle=True), 8)
    ranked = [take(make_loader("forward", B=2, rank=r, world_size=2, seed=3, shuffle=True), 4) for r in (0, 1)]
    for k in range(4):
        for r in (0, 1):
            assert torch.equal(single[2 * k + r][0], ranked[r][k][0])


def test_unshuffled_loader_reads_storage_order(long_known):
    order = read_order(take_traced(make_loader("forward", B=2, seed=1, shuffle=False), 30))
    first = [d for e, d in order if e == 0]
    assert first == sorted(first) and len(first) >= 6


def test_shuffle_window_holds_the_shards_that_fit_in_the_budget(long_docs_dir):
    """A small corpus is permuted whole (one window of all its shards); a budget below two shards'
    size gives windows of one shard, never zero."""
    from nanochat.dataset import shuffle_window, split_shards
    d, _ = long_docs_dir
    shards = split_shards("train", os.path.join(d, "base_data"))
    assert len(shards) == 2
    assert shuffle_window(shards) == 2
    one = os.path.getsize(shards[0])
    assert shuffle_window(shards, budget=one + os.path.getsize(shards[1]) - 1) == 1
    assert shuffle_window(shards, budget=1) == 1
    loader = make_loader("forward", shuffle=True)
    assert loader.shuffle_window == 2 and loader.streams[0].source.cache_shards == 4
