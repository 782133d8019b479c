"""tasks/arithmetic_unseen.py: the test split shares no problem and no product with training."""

import pytest

from nanochat.common import UserError
from tasks.registry import get_task


def _problems(task):
    out = []
    for i in range(len(task)):
        messages = task[i]["messages"]
        a, b = (int(x) for x in messages[0]["content"][len("What is "):-1].split("*"))
        assert int(messages[1]["content"]) == a * b
        out.append((a, b))
    return out


@pytest.mark.parametrize("kwargs", [{}, {"max_factor": 20, "split_seed": 3, "test_fraction": 0.3}])
def test_split_shares_no_problem_and_no_product(kwargs):
    train, test = _problems(get_task("arithmetic_unseen", "train", **kwargs)), \
        _problems(get_task("arithmetic_unseen", "test", **kwargs))
    assert not set(train) & set(test)
    assert not {a * b for a, b in train} & {a * b for a, b in test}
    # every ordered problem is in exactly one split, listed once
    lo, hi = 2, kwargs.get("max_factor", 40)
    assert sorted(train + test) == [(a, b) for a in range(lo, hi + 1) for b in range(lo, hi + 1)]
    if not kwargs:
        assert len(test) >= 300  # hundreds of unseen test problems by default


def test_order_is_seeded_and_size_slices():
    a, b = get_task("arithmetic_unseen", "test", seed=1), get_task("arithmetic_unseen", "test", seed=1)
    assert [a[i] for i in range(5)] == [b[i] for i in range(5)]
    small = get_task("arithmetic_unseen", "test", size=7, seed=1)
    assert len(small) == 7 and small[6] == a[6]
    assert small.reward(small[0], small[0]["messages"][1]["content"]) == 1.0


def test_bad_arguments():
    with pytest.raises(UserError, match="test_fraction"):
        get_task("arithmetic_unseen", "test", test_fraction=1.5)
    with pytest.raises(UserError, match="no split"):
        get_task("arithmetic_unseen", "dev")
