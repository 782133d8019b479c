"""Tests for nanochat.muon: the update equals torch.optim.Muon's rule, batched or not."""

import copy

import pytest
import torch

from nanochat.muon import ADJUST_LR_FNS, Muon, orthogonalize


def test_orthogonalize_gives_near_orthogonal_rows_and_batches_like_one_by_one():
    torch.manual_seed(0)
    G = torch.randn(3, 16, 40)
    X = orthogonalize(G)
    # Newton-Schulz (quintic) drives singular values into roughly [0.7, 1.2], not exactly 1
    s = torch.linalg.svdvals(X)
    assert s.min() > 0.5 and s.max() < 1.3
    for i in range(3):
        assert torch.allclose(orthogonalize(G[i]), X[i], atol=1e-5)
    tall = orthogonalize(G[0].T)
    assert torch.allclose(tall, X[0].T, atol=1e-5)  # a tall matrix is handled through its transpose


@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_steps_match_torch_muon(adjust, nesterov):
    """Same momentum, Nesterov, weight decay and lr conventions as torch.optim.Muon; torch runs the
    iteration in bfloat16, ours in float32 on CPU, so they agree to bfloat16 precision."""
    torch.manual_seed(1)
    shapes = [(32, 32), (32, 32), (64, 32), (32, 64)]
    ours = [torch.nn.Parameter(torch.randn(*s)) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    kw = dict(lr=0.05, momentum=0.9, nesterov=nesterov, weight_decay=0.1, adjust_lr_fn=adjust)
    opt_ours, opt_ref = Muon(ours, **kw), torch.optim.Muon(ref, **kw)
    start = [p.detach().clone() for p in ours]
    for step in range(3):
        grads = [torch.randn(*s) for s in shapes]
        for p, q, g in zip(ours, ref, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt_ours.step()
        opt_ref.step()
    for p, q, p0 in zip(ours, ref, start):
        moved = (q - p0).norm()
        assert moved > 0
        assert (p - q).norm() / moved < 0.02


def test_adjusted_lr_conventions():
    assert ADJUST_LR_FNS["original"](0.02, 128, 512) == 0.02
    assert ADJUST_LR_FNS["original"](0.02, 512, 128) == pytest.approx(0.04)
    assert ADJUST_LR_FNS["match_rms_adamw"](0.02, 128, 512) == pytest.approx(0.02 * 0.2 * 512 ** 0.5)
    with pytest.raises(ValueError):
        Muon([torch.nn.Parameter(torch.zeros(2, 2))], adjust_lr_fn="other")
    with pytest.raises(ValueError):
        Muon([torch.nn.Parameter(torch.zeros(2))])


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(2)
    a = [torch.nn.Parameter(torch.randn(8, 8)) for _ in range(2)]
    opt = Muon(a, lr=0.1)
    for p in a:
        p.grad = torch.randn(8, 8)
    opt.step()
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_b = Muon(b, lr=0.1)
    opt_b.load_state_dict(copy.deepcopy(opt.state_dict()))  # as from a checkpoint file
    g = [torch.randn(8, 8) for _ in range(2)]
    for p, q, gg in zip(a, b, g):
        p.grad, q.grad = gg.clone(), gg.clone()
    opt.step()
    opt_b.step()
    assert all(torch.equal(p, q) for p, q in zip(a, b))
