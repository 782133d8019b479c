"""Tests for nanochat.direction_dataloader: orientation before packing, markers, sharding, resume.

The corpus is the generated one of conftest (`corpus_template["train"]`): every document starts
"Story <i>:" and ends "The end.", so forward and backward rows are told apart by their content.
"""

import itertools

import pytest
import torch

from nanochat.common import UserError
from nanochat.direction import draw_direction
from nanochat.direction_dataloader import DirectionAwareLoader, direction_aware_dataloader
from nanochat.tokenizer import get_tokenizer

B, T = 4, 64



@pytest.fixture(scope="module")
def known(corpus_template):
    """Token lists of the training documents, forward and reversed, with prefix sets."""
    tok = get_tokenizer(corpus_template["dir"])
    docs = [tok.encode(t) for t in corpus_template["train"]]
    fwd = [tuple(d) for d in docs]
    bwd = [tuple(reversed(d)) for d in docs]

    def prefixes(seqs):
        return {s[:n] for s in seqs for n in range(1, len(s) + 1)}

    return {
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


def full_rows(inputs, targets):
    """The packed rows (T+1 tokens) behind a batch; when the last target is a masked marker its
    identity is unknown, so that row is returned without it."""
    rows = []
    for x, y in zip(inputs.tolist(), targets.tolist()):
        rows.append(x + [y[-1]] if y[-1] != -1 else x)
    return rows


def segments(row, bos, markers=()):
    """Split a row at BOS into (marker or None, body tokens, is_last) triples."""
    starts = [i for i, t in enumerate(row) if t == bos]
    out = []
    for k, s in enumerate(starts):
        end = starts[k + 1] if k + 1 < len(starts) else len(row)
        seg = row[s + 1:end]
        marker = None
        if markers and seg and seg[0] in markers:
            marker, seg = seg[0], seg[1:]
        out.append((marker, tuple(seg), end == len(row)))
    return out


def take(loader, n):
    return list(itertools.islice(loader, n))


# ---- content of rows ------------------------------------------------------------------------

def check_basic_shapes(batches, bos, rows=B):
    for x, y in batches:
        assert x.shape == (rows, T) and y.shape == (rows, T)
        assert x.dtype == torch.long and y.dtype == torch.long
        assert (x[:, 0] == bos).all()  # every row starts with a document's BOS


def test_forward_rows_are_prefixes_of_forward_documents(base_dir, known):
    batches = take(make_loader("forward"), 20)
    check_basic_shapes(batches, known["bos"])
    n_whole = 0
    for x, y in batches:
        assert (y != -1).all()  # one-way data has no masked targets
        assert torch.equal(y[:, :-1], x[:, 1:])  # targets are the inputs shifted by one
        for row in full_rows(x, y):
            assert len(row) == T + 1
            segs = segments(row, known["bos"])
            for marker, body, is_last in segs:
                assert marker is None
                if body:
                    assert body in known["fwd_prefixes"]
                if not is_last:  # only the document at the row's end may be cropped
                    assert body in known["fwd_index"]
                    n_whole += 1
    assert n_whole >= len(batches) * B // 2


def test_backward_rows_are_prefixes_of_reversed_documents(base_dir, known):
    batches = take(make_loader("backward"), 20)
    check_basic_shapes(batches, known["bos"])
    n_checked = 0
    for x, y in batches:
        assert (y != -1).all()
        assert torch.equal(y[:, :-1], x[:, 1:])
        for row in full_rows(x, y):
            for marker, body, is_last in segments(row, known["bos"]):
                assert marker is None
                if body:
                    assert body in known["bwd_prefixes"]
                if len(body) >= 3:
                    # reversed text reads " end. The ..." first: never the start of a forward document
                    assert body not in known["fwd_prefixes"]
                    n_checked += 1
                if not is_last:
                    assert body in known["bwd_index"]
    assert n_checked >= len(batches) * B


def test_forward_and_backward_decode_differently(base_dir, known):
    tok = known["tok"]
    fx, _ = next(make_loader("forward"))
    bx, _ = next(make_loader("backward"))
    assert tok.decode(fx[0, 1:8].tolist()).startswith("Story")
    assert not tok.decode(bx[0, 1:8].tolist()).startswith("Story")


def check_bidirectional(batches, known, seed, p_backward):
    bos, (fwd_id, bwd_id) = known["bos"], known["markers"]
    markers = (fwd_id, bwd_id)
    counts = {"forward": 0, "backward": 0}
    for x, y in batches:
        xl, yl = x.tolist(), y.tolist()
        for r in range(x.size(0)):
            row_in, row_tgt = xl[r], yl[r]
            # every BOS with room after it is followed by a marker
            for i, t in enumerate(row_in):
                if t == bos and i + 1 < T:
                    assert row_in[i + 1] in markers, (r, i)
            # targets == -1 exactly where the next token is a marker; elsewhere the shifted input
            for i in range(T - 1):
                if row_in[i + 1] in markers:
                    assert row_tgt[i] == -1
                else:
                    assert row_tgt[i] == row_in[i + 1]
            # the last target: a masked marker can only follow BOS
            assert row_tgt[-1] not in markers
            if row_tgt[-1] == -1:
                assert row_in[-1] == bos
        assert not torch.isin(y, torch.tensor(markers)).any()
        for row in full_rows(x, y):
            for marker, body, is_last in segments(row, bos, markers):
                if not body:
                    continue
                assert marker in markers
                concrete = "forward" if marker == fwd_id else "backward"
                prefixes = known["fwd_prefixes"] if concrete == "forward" else known["bwd_prefixes"]
                assert body in prefixes
                counts[concrete] += 1
                if not is_last:  # a whole document: its draw must be the deterministic one
                    index = known["fwd_index" if concrete == "forward" else "bwd_index"][body]
                    assert draw_direction(seed, index, p_backward) == concrete
    return counts


@pytest.mark.parametrize("p_backward", [0.5, 0.2])
def test_bidirectional_rows_markers_and_fraction(base_dir, known, p_backward):
    seed = 5
    batches = take(make_loader("bidirectional", seed=seed, p_backward=p_backward, B=8), 40)
    check_basic_shapes(batches, known["bos"], rows=8)
    counts = check_bidirectional(batches, known, seed, p_backward)
    n = counts["forward"] + counts["backward"]
    assert n >= 400
    frac = counts["backward"] / n
    assert abs(frac - p_backward) < 0.1, counts


@pytest.mark.parametrize("p_backward,expected", [(0.0, "forward"), (1.0, "backward")])
def test_bidirectional_extreme_p(base_dir, known, p_backward, expected):
    batches = take(make_loader("bidirectional", p_backward=p_backward), 5)
    counts = check_bidirectional(batches, known, 0, p_backward)
    assert counts[expected] > 0
    assert sum(counts.values()) == counts[expected]


def test_factory_function_matches_class(base_dir):
    a = take(direction_aware_dataloader(B, T, "train", "backward", device="cpu"), 3)
    b = take(make_loader("backward"), 3)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_val_split_reads_validation_documents(base_dir, corpus_template, known):
    tok = known["tok"]
    val_fwd = {tuple(tok.encode(t)) for t in corpus_template["val"]}
    x, y = next(make_loader("forward", split="val"))
    for row in full_rows(x, y):
        for _, body, is_last in segments(row, known["bos"]):
            if not is_last:
                assert body in val_fwd and body not in known["fwd_index"]


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
        check_bidirectional(rank1, known, seed=0, p_backward=0.5)


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
