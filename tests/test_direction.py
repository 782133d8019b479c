"""Tests for nanochat.direction: orient/restore, reversal, the bidirectional draw, generation."""

import numpy as np
import pytest
import torch

from nanochat.common import UserError
from nanochat.direction import (
    DIRECTIONS,
    DirectionSpec,
    draw_direction,
    orient_text_tokens,
    parse_directions,
    reverse_tokens,
    validate_direction,
    validate_p_backward,
)

BOS, FWD, BWD = 100, 101, 102
TEXT = [5, 9, 2, 7, 7, 3]


def spec_for(direction, **kwargs):
    return DirectionSpec(direction, BOS, FWD, BWD, **kwargs)


# ---- orient / restore -----------------------------------------------------------------------

@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_orient_then_restore_is_identity_one_way(direction):
    spec = spec_for(direction)
    row, concrete = spec.orient(TEXT, doc_index=3)
    assert concrete == direction
    expected_body = TEXT if direction == "forward" else TEXT[::-1]
    assert row == [BOS] + expected_body
    assert spec.restore(row) == (TEXT, direction)


@pytest.mark.parametrize("concrete", ["forward", "backward"])
def test_orient_then_restore_is_identity_bidirectional_both_draws(concrete):
    spec = spec_for("bidirectional")
    row, got = spec.orient(TEXT, concrete_direction=concrete)
    assert got == concrete
    marker = FWD if concrete == "forward" else BWD
    body = TEXT if concrete == "forward" else TEXT[::-1]
    assert row == [BOS, marker] + body
    assert spec.restore(row) == (TEXT, concrete)


def test_bidirectional_orient_by_doc_index_uses_the_draw_and_restores():
    spec = spec_for("bidirectional", seed=11)
    seen = set()
    for i in range(40):
        row, concrete = spec.orient(TEXT, doc_index=i)
        assert concrete == draw_direction(11, i, 0.5)
        assert spec.restore(row) == (TEXT, concrete)
        seen.add(concrete)
    assert seen == {"forward", "backward"}


def test_bidirectional_orient_without_index_or_direction_fails():
    with pytest.raises(ValueError):
        spec_for("bidirectional").orient(TEXT)


def test_restore_rejects_rows_without_bos_or_marker():
    with pytest.raises(ValueError):
        spec_for("forward").restore(TEXT)
    with pytest.raises(ValueError):
        spec_for("bidirectional").restore([BOS] + TEXT)


# ---- reverse_tokens -------------------------------------------------------------------------

def test_reverse_tokens_list_keep_bos_and_not():
    seq = [BOS, 1, 2, 3]
    assert reverse_tokens(seq, keep_bos=True) == [BOS, 3, 2, 1]
    assert reverse_tokens(seq, keep_bos=False) == [3, 2, 1, BOS]
    assert reverse_tokens((1, 2, 3), keep_bos=False) == [3, 2, 1]
    assert reverse_tokens([], keep_bos=True) == []
    assert reverse_tokens([], keep_bos=False) == []


def test_reverse_tokens_tensor_along_last_axis():
    t = torch.tensor([[BOS, 1, 2, 3], [BOS, 4, 5, 6]])
    assert torch.equal(reverse_tokens(t, keep_bos=True), torch.tensor([[BOS, 3, 2, 1], [BOS, 6, 5, 4]]))
    assert torch.equal(reverse_tokens(t, keep_bos=False), torch.tensor([[3, 2, 1, BOS], [6, 5, 4, BOS]]))
    empty = torch.zeros(0, dtype=torch.long)
    assert reverse_tokens(empty, keep_bos=True).shape == (0,)


def test_reverse_tokens_numpy_along_last_axis():
    a = np.array([[BOS, 1, 2, 3], [BOS, 4, 5, 6]])
    np.testing.assert_array_equal(reverse_tokens(a, keep_bos=True), [[BOS, 3, 2, 1], [BOS, 6, 5, 4]])
    np.testing.assert_array_equal(reverse_tokens(a, keep_bos=False), [[3, 2, 1, BOS], [6, 5, 4, BOS]])


@pytest.mark.parametrize("keep_bos", [True, False])
def test_reverse_tokens_is_an_involution(keep_bos):
    seq = [BOS] + TEXT
    assert reverse_tokens(reverse_tokens(seq, keep_bos), keep_bos) == seq
    t = torch.tensor(seq)
    assert torch.equal(reverse_tokens(reverse_tokens(t, keep_bos), keep_bos), t)
    a = np.array(seq)
    np.testing.assert_array_equal(reverse_tokens(reverse_tokens(a, keep_bos), keep_bos), a)
    # and it does change a non-palindromic sequence
    assert reverse_tokens(seq, keep_bos) != seq


def test_orient_text_tokens_validates_concrete_direction():
    assert orient_text_tokens([1, 2, 3], "backward") == [3, 2, 1]
    with pytest.raises(UserError):
        orient_text_tokens([1, 2, 3], "bidirectional")


# ---- invariants across directions on real text ------------------------------------------------

def test_token_multiset_and_byte_count_equal_across_directions(tok, corpus_template):
    spec = DirectionSpec.from_tokenizer("bidirectional", tok, seed=3)
    one_way = {d: DirectionSpec.from_tokenizer(d, tok) for d in ("forward", "backward")}
    lengths = tok.token_byte_lengths()
    specials = set(tok.special_tokens.values())
    for text in corpus_template["train"][:20] + ["héllo wörld — ✓ 日本語", "def f(x):\n    return x[::-1]\n"]:
        t = tok.encode(text)
        rows = [one_way["forward"].orient(t)[0], one_way["backward"].orient(t)[0],
                spec.orient(t, concrete_direction="forward")[0], spec.orient(t, concrete_direction="backward")[0]]
        for row in rows:
            assert row[0] == tok.get_bos_token_id()  # BOS first in every direction
            body = [i for i in row if i not in specials]
            assert sorted(body) == sorted(t)
            assert int(lengths[body].sum()) == len(text.encode("utf-8"))


# ---- the bidirectional draw -----------------------------------------------------------------

def test_draw_direction_is_a_pure_function_of_seed_and_index():
    first = [draw_direction(7, i, 0.5) for i in range(500)]
    # a different call order (as another rank would make) gives the same answer per index
    order = list(range(500))[::-1]
    shuffled = {i: draw_direction(7, i, 0.5) for i in order}
    assert [shuffled[i] for i in range(500)] == first
    # "rank" interleaving: rank r of 3 draws indices r, r+3, ...
    by_rank = {}
    for r in range(3):
        for i in range(r, 500, 3):
            by_rank[i] = draw_direction(7, i, 0.5)
    assert [by_rank[i] for i in range(500)] == first


@pytest.mark.parametrize("p", [0.5, 0.2, 0.9])
def test_draw_direction_fraction_matches_p_backward(p):
    n = 10_000
    frac = sum(draw_direction(0, i, p) == "backward" for i in range(n)) / n
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(frac - p) < 5 * sigma


def test_draw_direction_extremes():
    assert all(draw_direction(1, i, 0.0) == "forward" for i in range(2000))
    assert all(draw_direction(1, i, 1.0) == "backward" for i in range(2000))


def test_draw_direction_differs_between_seeds():
    a = [draw_direction(0, i) for i in range(1000)]
    b = [draw_direction(1, i) for i in range(1000)]
    assert a != b
    agree = sum(x == y for x, y in zip(a, b)) / 1000
    assert 0.4 < agree < 0.6  # independent draws agree about half the time


# ---- validation -----------------------------------------------------------------------------

def test_validate_direction_names_valid_values():
    for d in DIRECTIONS:
        assert validate_direction(d) == d
    with pytest.raises(UserError) as e:
        validate_direction("sideways")
    msg = str(e.value)
    assert "sideways" in msg
    for d in DIRECTIONS:
        assert d in msg


def test_parse_directions():
    assert parse_directions("forward, backward") == ["forward", "backward"]
    with pytest.raises(UserError):
        parse_directions("forward,bidirectional")
    with pytest.raises(UserError):
        parse_directions("")


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_validate_p_backward_rejects_out_of_range(bad):
    with pytest.raises(UserError) as e:
        validate_p_backward(bad)
    assert "[0, 1]" in str(e.value)
    assert str(bad) in str(e.value)


def test_validate_p_backward_accepts_bounds():
    assert validate_p_backward(0) == 0.0
    assert validate_p_backward("1") == 1.0


def test_direction_spec_bidirectional_needs_markers():
    with pytest.raises(UserError) as e:
        DirectionSpec("bidirectional", BOS)
    assert "<|forward|>" in str(e.value)
    with pytest.raises(UserError):
        DirectionSpec("bidirectional", BOS, forward_id=FWD)
    # one-way directions do not need them
    assert DirectionSpec("backward", BOS).marker_ids == ()


def test_direction_spec_rejects_bad_direction_and_p():
    with pytest.raises(UserError):
        DirectionSpec("upward", BOS)
    with pytest.raises(UserError):
        DirectionSpec("bidirectional", BOS, FWD, BWD, p_backward=2)


def test_header_and_target_mask():
    assert spec_for("forward").header_len == 1
    bidi = spec_for("bidirectional")
    assert bidi.header_len == 2
    assert set(bidi.marker_ids) == {FWD, BWD}  # never targets
    assert bidi.to_meta()["direction"] == "bidirectional"


# ---- generation -----------------------------------------------------------------------------

def test_generation_forward_continues_the_beginning():
    spec = spec_for("forward")
    given = [1, 2, 3]
    assert spec.generation_prompt(given, "forward") == [BOS, 1, 2, 3]
    gen = [4, 5]
    restored = spec.restore_generation(gen, "forward")
    assert restored == [4, 5]
    assert spec.join_in_reading_order(given, restored, "forward") == [1, 2, 3, 4, 5]


def test_generation_backward_writes_what_precedes_the_ending():
    spec = spec_for("backward")
    ending = [7, 8, 9]
    assert spec.generation_prompt(ending, "backward") == [BOS, 9, 8, 7]
    # the model, reading right to left, generates the token before 7 first: 6 then 5
    generated = [6, 5]
    restored = spec.restore_generation(generated, "backward")
    assert restored == [5, 6]
    full = spec.join_in_reading_order(ending, restored, "backward")
    assert full == [5, 6, 7, 8, 9]  # the generation appears BEFORE the given ending


def test_generation_bidirectional_puts_marker_after_bos():
    spec = spec_for("bidirectional")
    assert spec.generation_prompt([1, 2], "forward") == [BOS, FWD, 1, 2]
    assert spec.generation_prompt([1, 2], "backward") == [BOS, BWD, 2, 1]


def test_position_directions_in_a_packed_bidirectional_row():
    spec = spec_for("bidirectional")
    row = [BOS, FWD, 1, 2, BOS, BWD, 3, 4, 5, BOS, FWD, 6]
    assert spec.position_directions(row) == ["forward"] * 4 + ["backward"] * 5 + ["forward"] * 3


def test_position_directions_one_way():
    assert spec_for("backward").position_directions([BOS, 1, 2, BOS, 3]) == ["backward"] * 5
    assert spec_for("forward").position_directions([BOS, 1]) == ["forward"] * 2


def test_spec_meta_round_trip_and_generation_policy():
    from nanochat.common import UserError
    from nanochat.direction import DirectionSpec
    bidi = DirectionSpec("bidirectional", 1, 7, 8, seed=3, p_backward=0.25)
    again = DirectionSpec.from_meta({"direction_spec": bidi.to_meta()})
    assert again.to_meta() == bidi.to_meta()
    legacy = DirectionSpec.from_meta({"direction": "bidirectional", "bos_id": 1,
                                      "marker_ids": {"forward": 7, "backward": 8}})
    assert (legacy.forward_id, legacy.backward_id, legacy.bos_id) == (7, 8, 1)
    assert bidi.generation_directions() == ["forward", "backward"]
    assert bidi.generation_direction() == "forward" and bidi.generation_direction("backward") == "backward"
    bwd = DirectionSpec("backward", 1)
    assert bwd.generation_directions() == ["backward"] and bwd.generation_direction() == "backward"
    with pytest.raises(UserError) as e:
        bwd.generation_direction("forward")
    assert "only a bidirectional model does both" in str(e.value)
    with pytest.raises(UserError):
        bidi.generation_direction("sideways")
    with pytest.raises(UserError):
        DirectionSpec.from_meta({"direction_spec": {}})


def test_is_two_way_only_for_a_model_that_generates_both_directions():
    from nanochat.direction import concrete_directions, is_two_way
    assert [d for d in DIRECTIONS if is_two_way(d)] == ["bidirectional"]
    for d in DIRECTIONS:  # the same policy as the directions the model generates
        assert is_two_way(d) == (len(concrete_directions(d)) == 2)
    with pytest.raises(UserError, match="unknown direction"):
        is_two_way("sideways")


def test_by_direction_picks_one_value_and_refuses_anything_else():
    from nanochat.direction import by_direction, default_train_on
    assert by_direction("forward", forward="a", backward="b") == "a"
    assert by_direction("backward", forward="a", backward="b") == "b"
    for bad in ("bidirectional", "Forward", None, "sideways"):
        with pytest.raises(UserError, match="unknown direction"):
            by_direction(bad, forward="a", backward="b")
    # The helpers built on it no longer read an unknown value as backward.
    with pytest.raises(UserError, match="unknown direction"):
        default_train_on("sideways")
    with pytest.raises(UserError, match="unknown direction"):
        DirectionSpec.join_in_reading_order([1], [2], "sideways")
    with pytest.raises(UserError, match="unknown direction"):
        spec_for("bidirectional").marker_for("sideways")
    assert DirectionSpec.join_in_reading_order([1], [2], "backward") == [2, 1]


def test_for_model_reads_the_checkpoint_spec_or_a_bare_direction(tok):
    fwd_id, bwd_id = tok.get_marker_ids()
    bos = tok.get_bos_token_id()
    assert DirectionSpec.for_model(None, tok).direction == "forward"
    assert DirectionSpec.for_model({"step": 3}, tok).direction == "forward"
    bare = DirectionSpec.for_model({"direction": "bidirectional"}, tok)  # user code, tests
    assert (bare.bos_id, bare.forward_id, bare.backward_id) == (bos, fwd_id, bwd_id)
    # A checkpoint's recorded spec wins over the tokenizer (its seed and p_backward come along).
    recorded = DirectionSpec("bidirectional", bos, fwd_id, bwd_id, seed=5, p_backward=0.25)
    assert DirectionSpec.for_model({"direction_spec": recorded.to_meta()}, tok).to_meta() == recorded.to_meta()
    legacy = DirectionSpec.for_model({"direction": "backward", "bos_id": bos}, tok)
    assert legacy.direction == "backward" and legacy.generation_directions() == ["backward"]
    with pytest.raises(UserError, match="unknown direction"):
        DirectionSpec.for_model({"direction": "sideways"}, tok)
