"""Checkpoints: atomic writes, pickle-free loads, and direction metadata (docs/DESIGN.md §8).

A checkpoint directory holds, per saved step:
    model_<step>.pt            model state dict (tensors only)
    meta_<step>.json           direction, marker ids, model config, phase, parent, user config...
    optim_<step>_rank<r>.pt    each rank's optimizer and dataloader state (for resuming)

Every file is written to a temporary name and renamed, so a crash mid-save never leaves a
half-written checkpoint under a real name. Loads use torch.load(weights_only=True), which
refuses to execute pickled code.

Where checkpoints live: `source` (base, mid, sft, rl) names a phase directory under the base
dir, `{base,mid,chatsft,chatrl}_checkpoints/<model_tag>/`. When `<model_tag>` is the id of an
experiment (nanochat.experiment_config), the experiment's own checkpoint directory is used
instead: an experiment is the single owner of its checkpoints.
"""

import glob
import json
import os
import pickle
import re

import torch

from nanochat.common import UserError, get_base_dir, print0

SOURCE_DIRS = {"base": "base_checkpoints", "mid": "mid_checkpoints", "sft": "chatsft_checkpoints", "rl": "chatrl_checkpoints"}


def _atomic_write(path, write_fn):
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write_fn(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def model_path(checkpoint_dir, step):
    return os.path.join(checkpoint_dir, f"model_{step:06d}.pt")


def meta_path(checkpoint_dir, step):
    return os.path.join(checkpoint_dir, f"meta_{step:06d}.json")


def optim_path(checkpoint_dir, step, rank):
    return os.path.join(checkpoint_dir, f"optim_{step:06d}_rank{rank}.pt")


def save_checkpoint(checkpoint_dir, step, model_state, optimizer_states, meta, rank=0):
    """Write one step's checkpoint. Rank 0 writes model and meta; every rank its own optimizer
    (and dataloader) state. Meta is written last: its presence marks a complete checkpoint."""
    os.makedirs(checkpoint_dir, exist_ok=True)
    if optimizer_states is not None:
        _atomic_write(optim_path(checkpoint_dir, step, rank), lambda p: torch.save(optimizer_states, p))
    if rank == 0:
        _atomic_write(model_path(checkpoint_dir, step), lambda p: torch.save(model_state, p))

        def write_meta(p):
            with open(p, "w") as f:
                json.dump(meta, f, indent=2, default=str)
        _atomic_write(meta_path(checkpoint_dir, step), write_meta)


def _safe_load(path, device):
    if not os.path.exists(path):
        raise UserError(f"checkpoint file {path} is missing")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError:
        # torch's own text suggests weights_only=False, which is wrong advice for a corrupt file
        # and would execute arbitrary pickled code.
        raise UserError(f"checkpoint file {path} is not a valid torch checkpoint (corrupt or truncated?)")
    except Exception as e:
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise UserError(f"checkpoint file {path} is unreadable (corrupt or truncated?): {type(e).__name__}: {first_line}")


def load_meta(checkpoint_dir, step):
    path = meta_path(checkpoint_dir, step)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"checkpoint metadata {path} is missing")
    except json.JSONDecodeError as e:
        raise UserError(f"checkpoint metadata {path} is corrupt: {e}")


def load_checkpoint(checkpoint_dir, step, device, load_optimizer=False, rank=0):
    """(model_state, optimizer_states or None, meta) of one step."""
    meta = load_meta(checkpoint_dir, step)
    model_state = _safe_load(model_path(checkpoint_dir, step), device)
    optim = _safe_load(optim_path(checkpoint_dir, step, rank), device) if load_optimizer else None
    return model_state, optim, meta


def list_steps(checkpoint_dir):
    """Steps with a complete checkpoint (meta written), ascending."""
    steps = []
    for path in glob.glob(os.path.join(checkpoint_dir, "meta_*.json")):
        m = re.fullmatch(r"meta_(\d+)\.json", os.path.basename(path))
        if m:
            steps.append(int(m.group(1)))
    return sorted(steps)


def find_last_step(checkpoint_dir):
    steps = list_steps(checkpoint_dir)
    if not steps:
        raise UserError(f"no checkpoint in {checkpoint_dir}")
    return steps[-1]


def _experiments(base_dir=None):
    from nanochat.experiment_config import ExperimentConfig
    return ExperimentConfig(base_dir)


def checkpoint_dir_for(source, model_tag, base_dir=None):
    """Where checkpoints of (source, model_tag) are written and read."""
    if source not in SOURCE_DIRS:
        raise UserError(f"unknown checkpoint source {source!r}: use one of {', '.join(SOURCE_DIRS)}")
    experiments = _experiments(base_dir)
    if model_tag and experiments.find_experiment_for_checkpoint_tag(model_tag):
        return experiments.checkpoint_dir(model_tag)
    return os.path.join(base_dir or get_base_dir(), SOURCE_DIRS[source], model_tag)


def artifact_dirs(source, model_tag, base_dir=None):
    """Where one run keeps its files: {'run', 'checkpoints', 'logs', 'evaluations'}.

    For an experiment these are the experiment's own directories; for a plain tagged run they
    sit inside its checkpoint directory."""
    experiments = _experiments(base_dir)
    if model_tag and experiments.find_experiment_for_checkpoint_tag(model_tag):
        return {"run": experiments.experiment_dir(model_tag), "checkpoints": experiments.checkpoint_dir(model_tag),
                "logs": experiments.logs_dir(model_tag), "evaluations": experiments.evaluations_dir(model_tag)}
    ckpt = checkpoint_dir_for(source, model_tag, base_dir)
    return {"run": ckpt, "checkpoints": ckpt, "logs": os.path.join(ckpt, "logs"),
            "evaluations": os.path.join(ckpt, "evaluations")}


def list_tags(source, base_dir=None):
    """Model tags with at least one checkpoint for `source`, newest first."""
    root = os.path.join(base_dir or get_base_dir(), SOURCE_DIRS[source])
    candidates = []
    if os.path.isdir(root):
        candidates += [(t, os.path.join(root, t)) for t in os.listdir(root)]
    experiments = _experiments(base_dir)
    for exp_id in experiments.list_experiments():  # experiment phases are named like sources
        if experiments.load_config(exp_id).get("phase") == source:
            candidates.append((exp_id, experiments.checkpoint_dir(exp_id)))
    found = [(os.path.getmtime(d), t) for t, d in candidates if os.path.isdir(d) and list_steps(d)]
    return [t for _, t in sorted(found, reverse=True)]


def resolve_checkpoint(source, model_tag=None, step=None, base_dir=None):
    """(checkpoint_dir, step, model_tag) for a source, defaulting to the newest tag / last step."""
    if source not in SOURCE_DIRS:
        raise UserError(f"unknown checkpoint source {source!r}: use one of {', '.join(SOURCE_DIRS)}")
    if model_tag is None:
        tags = list_tags(source, base_dir)
        if not tags:
            raise UserError(f"no {source} checkpoints under {base_dir or get_base_dir()}: train one first")
        model_tag = tags[0]
        print0(f"no --model_tag given: using the newest {source} checkpoint '{model_tag}'")
    directory = checkpoint_dir_for(source, model_tag, base_dir)
    if not os.path.isdir(directory) or not list_steps(directory):
        known = list_tags(source, base_dir)
        hint = f"known {source} tags: {', '.join(known)}" if known else f"there are no {source} checkpoints yet"
        raise UserError(f"no {source} checkpoint with tag '{model_tag}' (looked in {directory}); {hint}")
    if step is None:
        step = find_last_step(directory)
    elif step not in list_steps(directory):
        raise UserError(f"{directory} has no checkpoint at step {step}; steps: {list_steps(directory)}")
    return directory, step, model_tag


def build_model(checkpoint_dir, step, device, phase="eval"):
    """(model, meta) from a checkpoint directory; phase 'eval' or 'train' sets the module mode."""
    from nanochat.gpt import GPT, GPTConfig
    if phase not in ("eval", "train"):
        raise ValueError(f"phase must be 'eval' or 'train', not {phase!r}")
    model_state, _, meta = load_checkpoint(checkpoint_dir, step, device)
    if "direction" not in meta or "model_config" not in meta:
        raise UserError(f"checkpoint metadata in {checkpoint_dir} lacks 'direction'/'model_config': not a nanochat checkpoint")
    try:
        config = GPTConfig(**meta["model_config"])
    except TypeError as e:
        raise UserError(f"checkpoint metadata in {checkpoint_dir} has a model config this code does not know: {e}")
    model = GPT.build(config, device)
    # torch.compile prefixes names with "_orig_mod."; accept checkpoints written either way.
    model_state = {k.removeprefix("_orig_mod."): v for k, v in model_state.items()}
    try:
        model.load_state_dict(model_state, strict=True)
    except RuntimeError as e:
        raise UserError(f"checkpoint {model_path(checkpoint_dir, step)} does not match its model config: {e}")
    model.train() if phase == "train" else model.eval()
    return model, meta


def check_tokenizer_matches(meta, tokenizer):
    """A model is only meaningful with the token ids it was trained with."""
    if meta.get("vocab_size") is not None and meta["vocab_size"] != tokenizer.get_vocab_size():
        raise UserError(f"the checkpoint was trained with a {meta['vocab_size']}-token vocabulary but the tokenizer "
                        f"has {tokenizer.get_vocab_size()}: the tokenizer changed since training")
    markers = meta.get("marker_ids") or {}
    if meta.get("direction") == "bidirectional":
        fwd, bwd = tokenizer.get_marker_ids()
        if (markers.get("forward"), markers.get("backward")) != (fwd, bwd):
            raise UserError(f"the checkpoint's marker ids {markers} differ from the tokenizer's "
                            f"(forward={fwd}, backward={bwd}): the tokenizer changed since training")


def load_model(source, device, phase="eval", model_tag=None, step=None, base_dir=None):
    """(model, tokenizer, meta) for a source ('base', 'mid', 'sft', 'rl'); meta['direction'] is
    the direction the model was trained in."""
    from nanochat.tokenizer import get_tokenizer
    directory, step, model_tag = resolve_checkpoint(source, model_tag, step, base_dir)
    model, meta = build_model(directory, step, device, phase)
    tokenizer = get_tokenizer(base_dir)
    check_tokenizer_matches(meta, tokenizer)
    meta.setdefault("model_tag", model_tag)
    meta["checkpoint_dir"] = directory
    meta["step"] = step
    return model, tokenizer, meta
