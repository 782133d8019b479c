"""Data-parallel training on CPU (gloo, two processes under torchrun) is the same computation as
one process accumulating the same global batch (docs/DESIGN.md §11, direction_dataloader docstring)."""

import os
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import run_script
from test_cli_errors import copy_base

STEPS = 5
STEP_LINE = re.compile(r"^step (\d+)/\d+ \| loss ([0-9.]+)", re.M)


def train_args(direction, tag):
    return [f"--direction={direction}", "--depth=2", "--device_type=cpu", "--device_batch_size=2",
            "--total_batch_size=256", "--max_seq_len=64", f"--num_iterations={STEPS}", "--eval_every=-1",
            "--eval_tokens=256", f"--model_tag={tag}"]


def step_losses(stdout):
    return {int(s): float(loss) for s, loss in STEP_LINE.findall(stdout)}


@pytest.fixture(scope="module", params=["forward", "bidirectional"])
def ddp_pair(request, corpus_template, tmp_path_factory):
    """The same run twice, side by side: torchrun with 2 ranks x 1 micro-batch ('ddp') and one
    process with 2 accumulated micro-batches ('single')."""
    direction = request.param
    base = copy_base(corpus_template["dir"], tmp_path_factory, f"ddp_{direction}")
    with ThreadPoolExecutor(max_workers=2) as pool:
        ddp = pool.submit(run_script, "scripts.base_train", *train_args(direction, "ddp"), base_dir=base,
                          torchrun_nproc=2)
        single = pool.submit(run_script, "scripts.base_train", *train_args(direction, "single"), base_dir=base)
        ddp, single = ddp.result(), single.result()
    assert ddp.returncode == 0, ddp.stdout[-2000:] + ddp.stderr[-4000:]
    assert single.returncode == 0, single.stderr
    return direction, base, ddp, single


@pytest.mark.slow  # torchrun: two processes
def test_layouts_differ_as_requested(ddp_pair):
    from nanochat.checkpoint_manager import load_meta
    _, base, ddp, single = ddp_pair
    assert "world=2 grad_accum=1" in ddp.stdout
    assert "world=1 grad_accum=2" in single.stdout
    meta_ddp = load_meta(os.path.join(base, "base_checkpoints", "ddp"), STEPS)
    meta_single = load_meta(os.path.join(base, "base_checkpoints", "single"), STEPS)
    assert (meta_ddp["world_size"], meta_ddp["grad_accum_steps"]) == (2, 1)
    assert (meta_single["world_size"], meta_single["grad_accum_steps"]) == (1, 2)
    assert meta_ddp["tokens_per_step"] == meta_single["tokens_per_step"] == 256
    # Every rank keeps its own optimizer and dataloader state, needed to resume.
    files = os.listdir(os.path.join(base, "base_checkpoints", "ddp"))
    assert {f"optim_{STEPS:06d}_rank0.pt", f"optim_{STEPS:06d}_rank1.pt"} <= set(files)


@pytest.mark.slow  # torchrun: two processes
def test_ddp_losses_match_gradient_accumulation(ddp_pair):
    _, _, ddp, single = ddp_pair
    losses_ddp, losses_single = step_losses(ddp.stdout), step_losses(single.stdout)
    # Rank 0 alone prints: exactly one line per step.
    assert sorted(losses_ddp) == list(range(1, STEPS + 1)), ddp.stdout
    assert sorted(losses_single) == list(range(1, STEPS + 1))
    for step in losses_single:
        # Printed with 4 decimals: allow the rounding of the last digit on top of 1e-4 relative.
        assert losses_ddp[step] == pytest.approx(losses_single[step], rel=1e-4, abs=1e-4), step
    assert losses_single[STEPS] < losses_single[1]


@pytest.mark.slow  # torchrun: two processes
def test_ddp_weights_match_gradient_accumulation(ddp_pair):
    from nanochat.checkpoint_manager import model_path
    _, base, _, _ = ddp_pair
    load = lambda tag: torch.load(model_path(os.path.join(base, "base_checkpoints", tag), STEPS),  # noqa: E731
                                  weights_only=True)
    w_ddp, w_single = load("ddp"), load("single")
    assert w_ddp.keys() == w_single.keys()
    for name in w_single:
        torch.testing.assert_close(w_ddp[name], w_single[name], rtol=1e-4, atol=1e-5, msg=name)


def test_evaluation_documents_do_not_depend_on_world_size(corpus_template):
    from nanochat.loss_eval import select_documents
    from nanochat.tokenizer import get_tokenizer
    data = os.path.join(corpus_template["dir"], "base_data")
    tokenizer = get_tokenizer(corpus_template["dir"])
    one = select_documents(tokenizer, 1000, "val", 0, 1, data_dir=data)
    shares = [select_documents(tokenizer, 1000, "val", rank, 2, data_dir=data) for rank in (0, 1)]
    assert all(shares), "each rank scores some documents"
    assert sorted(map(tuple, shares[0] + shares[1])) == sorted(map(tuple, one))


@pytest.mark.slow  # torchrun: two processes
def test_ddp_validation_bpb_matches_one_process(ddp_pair):
    # The final evaluation scores the same documents whatever the number of processes.
    from nanochat.checkpoint_manager import load_meta
    direction, base, _, _ = ddp_pair
    meta = {tag: load_meta(os.path.join(base, "base_checkpoints", tag), STEPS) for tag in ("ddp", "single")}
    keys = {f"val_bpb_{d}" for d in (("forward", "backward") if direction == "bidirectional" else ("forward",))}
    assert keys <= set(meta["single"]) and keys <= set(meta["ddp"])
    for key in keys:
        assert meta["ddp"][key] == pytest.approx(meta["single"][key], rel=1e-5), key
