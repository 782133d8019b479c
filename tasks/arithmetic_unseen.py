"""Two-way arithmetic whose test problems never occur in training: the split is by product.

Every product of two factors in [min_factor, max_factor] goes to the test split with probability
`test_fraction` (a pure function of the product and `split_seed`), and a problem a*b to the split of its
product: no test product, nor any factor pair of one, is ever a training answer or question, in either
direction. Default factors 2..40: 1190 train and 331 test problems (109 products). Each split lists its
problems once in a seeded order; `size` takes the first `size` (wrapping around when it is larger).
"""

import random

from nanochat.common import UserError
from tasks.arithmetic import TwoWayArithmetic


def split_of_product(product, split_seed=0, test_fraction=0.2):
    return "test" if random.Random(f"arithmetic_unseen/{split_seed}/{product}").random() < test_fraction else "train"


class UnseenProductArithmetic(TwoWayArithmetic):
    """Problems a*b split by product: the test split's products are never trained on."""

    name = "arithmetic_unseen"

    def __init__(self, split="train", size=None, seed=0, min_factor=2, max_factor=40, test_fraction=0.2,
                 split_seed=0, **kwargs):
        super().__init__(split, 0, seed, min_factor, max_factor, **kwargs)
        if not 0 < test_fraction < 1:
            raise UserError(f"arithmetic_unseen needs 0 < test_fraction < 1, not {test_fraction}")
        factors = range(self.min_factor, self.max_factor + 1)
        self.problems = [(a, b) for a in factors for b in factors
                         if split_of_product(a * b, split_seed, test_fraction) == split]
        if not self.problems:
            raise UserError(f"arithmetic_unseen: no {split} problems with factors {min_factor}..{max_factor}")
        random.Random(f"arithmetic_unseen/order/{split}/{seed}").shuffle(self.problems)
        self.size = len(self.problems) if size is None else int(size)
        if self.size < 0:
            raise UserError(f"arithmetic_unseen size must be >= 0, not {size}")

    def get_example(self, index):
        a, b = self.problems[index % len(self.problems)]
        return {"messages": [{"role": "user", "content": f"What is {a}*{b}?"},
                             {"role": "assistant", "content": str(a * b)}]}

