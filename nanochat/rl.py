"""Reinforcement learning on verifiable tasks, in the parent checkpoint's direction: on-policy policy
gradient with group-normalised advantages (GRPO-style, no KL term, one optimizer step per rollout).
Generated tokens are restored to reading order before `task.reward` sees them. The algorithm, why
it, what log p covers (the stop action), directions and the distributed step: docs/DESIGN.md §6.
"""

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanochat.direction import by_direction
from nanochat.progress import progress
from nanochat.training import Trainer, TrainingDiverged, sync_gradients

ADVANTAGE_EPS = 1e-6


# ---- the update rule ------------------------------------------------------------------------

def group_advantages(rewards, eps=ADVANTAGE_EPS):
    """(r - mean) / (population std + eps) within each group (the last axis of `rewards`); a group
    whose rewards are all equal gets exactly 0."""
    r = torch.as_tensor(rewards, dtype=torch.float32)
    mean = r.mean(dim=-1, keepdim=True)
    std = r.std(dim=-1, keepdim=True, correction=0)
    return (r - mean) / (std + eps)


def completion_logprobs(model, prompt, completions, stopped, stop_ids, device):
    """(per-token log p with gradient, mask), both (G, L+1), of a group of completions of one prompt:
    column j < len(completion) is generated token j, column len(completion) the stop action
    (p(any of stop_ids), if the completion stopped), the rest padding (mask 0)."""
    P = len(prompt)
    L = max(len(c) for c in completions)
    pad = prompt[0]
    rows = [list(prompt) + list(c) + [pad] * (L - len(c)) for c in completions]
    x = torch.tensor(rows, dtype=torch.long, device=device)
    logits = model(x)[:, P - 1:, :]                     # (G, L+1, V): position P-1+j predicts column j
    logp = torch.log_softmax(logits.float(), dim=-1)
    targets = torch.tensor([list(c) + [pad] * (L + 1 - len(c)) for c in completions], dtype=torch.long, device=device)
    token_logp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    stop_logp = torch.logsumexp(logp[..., list(stop_ids)], dim=-1)
    lengths = torch.tensor([len(c) for c in completions], device=device)
    cols = torch.arange(L + 1, device=device)
    is_token = cols[None, :] < lengths[:, None]
    is_stop = (cols[None, :] == lengths[:, None]) & torch.tensor(list(stopped), dtype=torch.bool, device=device)[:, None]
    per_token = torch.where(is_stop, stop_logp, token_logp)
    mask = (is_token | is_stop).float()
    return per_token * mask, mask


def policy_gradient_loss(token_logp, mask, advantages, num_tokens):
    """-sum(advantage x log p over each completion's tokens) / num_tokens (the step's tokens)."""
    per_completion = (token_logp * mask).sum(dim=-1)
    return -(advantages.to(per_completion.device) * per_completion).sum() / max(1, num_tokens)


def pass_at_k(group_rewards):
    """Best reward among a prompt's k samples (for 0/1 rewards: 1 if any sample is right)."""
    return max(group_rewards) if group_rewards else 0.0


# ---- rollouts -------------------------------------------------------------------------------

@dataclass
class Group:
    """G completions of one prompt, in model orientation, with their rewards."""
    direction: str
    prompt: list
    stop_ids: tuple
    completions: list
    stopped: list
    texts: list
    rewards: list

    @property
    def num_tokens(self):
        return sum(len(c) + int(s) for c, s in zip(self.completions, self.stopped))


def sample_group(engine, spec, task, example_index, direction, num_samples, max_new_tokens, temperature, top_k, seed):
    """Prompt the model with one task example in `direction`, sample, restore, reward."""
    conversation = task[example_index]
    prompt, stops = spec.chat_prompt(engine.tokenizer, conversation, direction)
    room = min(max_new_tokens, engine.model.config.sequence_len - len(prompt))
    completions = engine.generate(prompt, num_samples=num_samples, max_tokens=max_new_tokens, temperature=temperature,
                                  top_k=top_k, seed=seed, stop_tokens=stops)
    # Engine.generate drops the stop token; a completion shorter than the room it had stopped.
    stopped = [len(c) < room for c in completions]
    texts = [engine.tokenizer.decode(spec.restore_generation(c, direction)) for c in completions]
    rewards = [float(task.reward(conversation, t, direction)) for t in texts]
    return Group(direction, prompt, tuple(stops), completions, stopped, texts, rewards)


def sample_seed(seed, index, salt=0):
    # Distinct, reproducible sampling seeds per example (and per purpose: train vs eval).
    return (int(seed) * 1_000_003 + int(salt) * 7_919 + int(index)) % (2 ** 63)


@torch.no_grad()
def evaluate(engine, spec, task, directions, num_examples, k, max_new_tokens, temperature, top_k, seed,
             rank=0, world_size=1, autocast=None):
    """Per direction: mean reward, pass@k over prompts and each prompt's mean reward, on the first
    `num_examples` test examples, with the same seeds every time (before/after differ in weights only)."""
    device = engine.device
    n = min(num_examples, len(task))
    out = {}
    for direction in directions:
        per_prompt = torch.zeros(2, n, dtype=torch.float64, device=device)  # mean reward, best reward
        for i in progress(range(rank, n, world_size), desc=f"rl eval {direction}", unit="prompt"):
            with autocast or nullcontext():
                g = sample_group(engine, spec, task, i, direction, k, max_new_tokens, temperature, top_k,
                                 sample_seed(seed, i, salt=by_direction(direction, forward=1, backward=2)))
            per_prompt[0, i], per_prompt[1, i] = sum(g.rewards) / k, pass_at_k(g.rewards)
        if world_size > 1 and dist.is_initialized():
            dist.all_reduce(per_prompt)  # each prompt was filled by exactly one rank
        out[direction] = {"mean_reward": per_prompt[0].mean().item(), "pass_at_k": per_prompt[1].mean().item(),
                          "prompts": n, "samples": n * k, "per_prompt_reward": per_prompt[0].tolist()}
    return out


def paired_change(before, after):
    """(mean change, standard error) of the per-prompt mean reward between two evaluations of the
    same prompts: a paired difference, so prompt difficulty cancels."""
    diff = torch.tensor(after["per_prompt_reward"], dtype=torch.float64) - torch.tensor(before["per_prompt_reward"],
                                                                                       dtype=torch.float64)
    se = diff.std(correction=1).item() / math.sqrt(len(diff)) if len(diff) > 1 else float("nan")
    return diff.mean().item(), se


def format_eval(results, k):
    return "; ".join(f"{d}: mean reward {r['mean_reward']:.4f}, pass@{k} {r['pass_at_k']:.4f} "
                     f"({r['prompts']} prompts x {k} samples)" for d, r in results.items())


# ---- the RL step ------------------------------------------------------------------------------

@dataclass
class Rollouts:
    """What one RL step samples: `examples_per_step` prompts (all ranks), `num_samples` completions
    each (top_k None = the whole vocabulary), reproducible from `seed`."""
    task: object
    directions: list
    examples_per_step: int
    num_samples: int
    max_new_tokens: int
    temperature: float
    top_k: int
    seed: int

    @property
    def sampling(self):
        return dict(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k)


class RLTrainer(Trainer):
    """One RL step per `step` call (for training.run_loop): rollouts with the current weights, then
    one optimizer step. Step s's examples are s * examples_per_step + j: the step is the data
    position. `first_reward` / `last_reward`: mean training reward of the first and latest step."""

    def __init__(self, model, optimizers, engine, spec, rollouts, world_size, device, autocast, lr_schedule,
                 lr_scale=1.0):
        super().__init__(model, optimizers, None, 1, 0, device, world_size=world_size, lr_schedule=lr_schedule,
                         lr_scale=lr_scale)
        self.engine, self.spec, self.rollouts = engine, spec, rollouts
        self.autocast = autocast
        self.local_examples = rollouts.examples_per_step // world_size
        self.rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.first_reward = self.last_reward = None

    def step(self, step, want_layer_grads=False, timing=False):
        ro, model, world_size, device = self.rollouts, self.model, self.world_size, self.device
        t0 = time.time()
        # 1. Rollouts with the current weights (no gradient).
        model.eval()
        groups = []
        for j in progress(range(self.local_examples), desc=f"step {step} rollouts", unit="prompt", min_time_s=10):
            index = step * ro.examples_per_step + j * world_size + self.rank  # global example index
            # The one direction the task allows, else the model's draw for this example.
            direction = ro.directions[0] if len(ro.directions) == 1 else self.spec.concrete_direction_for(index)
            with self.autocast:
                groups.append(sample_group(self.engine, self.spec, ro.task, index % len(ro.task), direction,
                                           ro.num_samples, seed=sample_seed(ro.seed, index), **ro.sampling))
        # 2. One gradient step on them: advantages within each group, loss over the step's tokens
        # (all ranks' tokens: with the world_size factor undone by sync_gradients' mean, a step under
        # torchrun computes exactly the single-process gradient).
        model.train()
        num_tokens = _all_reduce_sum([sum(g.num_tokens for g in groups)], device)[0]
        local_loss = 0.0
        for g in groups:
            advantages = group_advantages(g.rewards)
            with self.autocast:
                token_logp, mask = completion_logprobs(model, g.prompt, g.completions, g.stopped, g.stop_ids, device)
            loss = policy_gradient_loss(token_logp, mask, advantages, num_tokens)
            (loss * world_size).backward()
            local_loss += float(loss.detach())
        sync_gradients(self.params, world_size)
        mult = self.set_lr(step)
        for opt in self.optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        # Step statistics over all ranks: loss, then reward sum and count overall and per direction.
        stats = [local_loss]
        for d in [None] + list(ro.directions):
            rewards = [r for g in groups if d in (None, g.direction) for r in g.rewards]
            stats += [sum(rewards), len(rewards)]
        stats = _all_reduce_sum(stats, device)
        bad = [name for name, v in (("loss", stats[0]), ("reward", stats[1])) if not math.isfinite(v)]
        if bad:
            raise TrainingDiverged(f"RL diverged at step {step + 1}: {' and '.join(bad)} not finite; "
                                   "lower --init_lr_frac")
        dt = time.time() - t0
        metrics = {"reward": stats[1] / max(1.0, stats[2]), "loss": stats[0], "lr_mult": mult,
                   "tokens": int(num_tokens), "dt": dt, "tok_per_s": num_tokens / max(dt, 1e-9)}
        if len(ro.directions) > 1:
            for i, d in enumerate(ro.directions):
                reward_sum, count = stats[3 + 2 * i], stats[4 + 2 * i]
                metrics[f"reward_{d}"] = reward_sum / count if count else float("nan")
        if self.first_reward is None:
            self.first_reward = metrics["reward"]
        self.last_reward = metrics["reward"]
        return metrics


def flat_eval(results):
    """{'<direction>_mean_reward': .., '<direction>_pass_at_k': ..}: an evaluation as scalar metrics."""
    return {f"{d}_{k}": v for d, r in results.items() for k, v in r.items() if k in ("mean_reward", "pass_at_k")}


def _all_reduce_sum(values, device):
    """Element-wise sum of a list of floats over ranks (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
