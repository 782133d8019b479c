"""Checkpoints: atomic writes, pickle-free loads, and direction metadata (docs/DESIGN.md §8,
docs/SAFETY.md). A checkpoint directory holds, per saved step:
    model_<step>.pt            model state dict (tensors only, loaded with weights_only=True)
    meta_<step>.json           direction, model config, tokenizer fingerprint, phase, parent, user config...
    optim_<step>_rank<r>.pt    each rank's optimizer and dataloader state (for resuming)

Where checkpoints live: `source` (base, mid, sft, rl) names a phase directory under the base dir,
`{base,mid,chatsft,chatrl}_checkpoints/<model_tag>/`; when `<model_tag>` is an experiment id
(nanochat.experiment_config), the experiment's own checkpoint directory, its single owner.
"""

import json
import math
import os
import pickle
import re

import torch

from nanochat.phases import PHASES
from nanochat.common import UserError, get_base_dir, print0
from nanochat.direction import DirectionSpec, is_two_way
from nanochat.experiment_config import ExperimentConfig
from nanochat.gpt import GPT, GPTConfig
from nanochat.paths import atomic_write, remove_stale_temporaries, validate_name
from nanochat.tokenizer import get_tokenizer

SOURCE_DIRS = {p.name: p.checkpoint_dir for p in PHASES.values()}  # nanochat/phases.py
# A model config is checked against its weights before anything is allocated; beyond this many
# parameters a meta file is taken to be corrupt rather than tried.
MAX_PARAMS = 10**12
_SIZE_FIELDS = ("vocab_size", "sequence_len", "n_layer", "n_head", "n_kv_head", "n_embd", "intermediate_size")
_STEP_FILE = re.compile(r"(?:model|meta|optim)_(\d+)(?:_rank\d+)?\.(?:pt|json)")


def model_path(checkpoint_dir, step):
    return os.path.join(checkpoint_dir, f"model_{step:06d}.pt")


def meta_path(checkpoint_dir, step):
    return os.path.join(checkpoint_dir, f"meta_{step:06d}.json")


def optim_path(checkpoint_dir, step, rank):
    return os.path.join(checkpoint_dir, f"optim_{step:06d}_rank{rank}.pt")


class NonFiniteWeights(UserError):
    """The weights hold NaN or inf: the step is not saved."""


RESUME_HINT = "rerun (resume from the last saved step with --resume_from_step)"


def save_checkpoint(checkpoint_dir, step, model_state, optimizer_states, meta, rank=0):
    """Write one step: rank 0 the model and then the meta (whose presence marks a complete
    checkpoint), every rank its optimizer state. Non-finite weights are refused before anything is
    written; a failed write (disk full) removes this step's files."""
    for name, tensor in model_state.items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise NonFiniteWeights(f"the weights are not finite at step {step} ({name} holds NaN or inf): "
                                   "that step is not saved")
    os.makedirs(checkpoint_dir, exist_ok=True)
    written = []
    try:
        if optimizer_states is not None:
            written.append(optim_path(checkpoint_dir, step, rank))
            atomic_write(written[-1], lambda p: torch.save(optimizer_states, p), RESUME_HINT)
        if rank == 0:
            written.append(model_path(checkpoint_dir, step))
            atomic_write(written[-1], lambda p: torch.save(model_state, p), RESUME_HINT)

            def write_meta(p):
                with open(p, "w") as f:
                    json.dump(meta, f, indent=2, default=str)
                    f.flush()
                    os.fsync(f.fileno())
            atomic_write(meta_path(checkpoint_dir, step), write_meta, RESUME_HINT)
    except BaseException:
        for path in written:  # an incomplete step must not look like a checkpoint (or fill the disk)
            if os.path.exists(path):
                os.remove(path)
        raise


def _step_files(checkpoint_dir):
    """[(name, step)] of the checkpoint files in `checkpoint_dir`, meta files first."""
    if not os.path.isdir(checkpoint_dir):
        return []
    names = sorted(os.listdir(checkpoint_dir), key=lambda n: (not n.startswith("meta_"), n))
    return [(n, int(m.group(1))) for n in names if (m := _STEP_FILE.fullmatch(n))]


def remove_steps(checkpoint_dir, steps):
    """Delete every file of the given steps (meta first, so a step is never half-listed)."""
    for name, step in _step_files(checkpoint_dir):
        if step in steps:
            os.remove(os.path.join(checkpoint_dir, name))


def clean_checkpoint_dir(checkpoint_dir):
    """Remove (and return the names of) what a killed save left: temporary files, and model/optimizer
    files of a step without meta (never complete). Call it holding the run lock."""
    removed = remove_stale_temporaries(checkpoint_dir)
    complete = set(list_steps(checkpoint_dir))
    for name, step in _step_files(checkpoint_dir):
        if not name.startswith("meta_") and step not in complete:
            os.remove(os.path.join(checkpoint_dir, name))
            removed.append(name)
    return removed


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
    """A step's metadata, with "direction" (the name) derived from "direction_spec"."""
    path = meta_path(checkpoint_dir, step)
    try:
        with open(path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise UserError(f"checkpoint metadata {path} is missing")
    except json.JSONDecodeError as e:
        raise UserError(f"checkpoint metadata {path} is corrupt: {e}")
    if not isinstance(meta, dict):
        raise UserError(f"checkpoint metadata {path} is corrupt: not a JSON object")
    if (meta.get("direction_spec") or {}).get("direction") is not None:
        meta["direction"] = meta["direction_spec"]["direction"]
    return meta


def load_checkpoint(checkpoint_dir, step, device, load_optimizer=False, rank=0):
    """(model_state, optimizer_states or None, meta) of one step."""
    meta = load_meta(checkpoint_dir, step)
    model_state = _safe_load(model_path(checkpoint_dir, step), device)
    optim = _safe_load(optim_path(checkpoint_dir, step, rank), device) if load_optimizer else None
    return model_state, optim, meta


def list_steps(checkpoint_dir):
    """Steps with a complete checkpoint (meta written), ascending."""
    return sorted(step for name, step in _step_files(checkpoint_dir) if re.fullmatch(r"meta_\d+\.json", name))


def find_last_step(checkpoint_dir):
    steps = list_steps(checkpoint_dir)
    if not steps:
        raise UserError(f"no checkpoint in {checkpoint_dir}")
    return steps[-1]


def _check_source(source):
    if source not in SOURCE_DIRS:
        raise UserError(f"unknown checkpoint source {source!r}: use one of {', '.join(SOURCE_DIRS)}")


def checkpoint_dir_for(source, model_tag, base_dir=None):
    """Where checkpoints of (source, model_tag) are written and read."""
    return artifact_dirs(source, model_tag, base_dir)["checkpoints"]


def artifact_dirs(source, model_tag, base_dir=None):
    """Where one run keeps its files: {'run', 'checkpoints', 'logs', 'evaluations'}: an experiment's
    own directories, or inside a plain run's checkpoint directory. `model_tag` must be a plain name
    (nanochat.paths.validate_name): a tag never escapes its phase directory."""
    _check_source(source)
    validate_name(model_tag, "model tag")
    experiments = ExperimentConfig(base_dir)
    if experiments.exists(model_tag):
        return {"run": experiments.experiment_dir(model_tag), "checkpoints": experiments.checkpoint_dir(model_tag),
                "logs": experiments.logs_dir(model_tag), "evaluations": experiments.evaluations_dir(model_tag)}
    ckpt = os.path.join(base_dir or get_base_dir(), SOURCE_DIRS[source], model_tag)
    return {"run": ckpt, "checkpoints": ckpt, "logs": os.path.join(ckpt, "logs"),
            "evaluations": os.path.join(ckpt, "evaluations")}


def list_tags(source, base_dir=None):
    """Model tags with at least one checkpoint for `source`, newest first."""
    root = os.path.join(base_dir or get_base_dir(), SOURCE_DIRS[source])
    candidates = [(t, os.path.join(root, t)) for t in os.listdir(root)] if os.path.isdir(root) else []
    experiments = ExperimentConfig(base_dir)
    for exp_id in experiments.list_experiments():  # experiment phases are named like sources
        if experiments.load_config(exp_id).get("phase") == source:
            candidates.append((exp_id, experiments.checkpoint_dir(exp_id)))
    found = [(os.path.getmtime(d), t) for t, d in candidates if os.path.isdir(d) and list_steps(d)]
    return [t for _, t in sorted(found, reverse=True)]


def resolve_checkpoint(source, model_tag=None, step=None, base_dir=None):
    """(checkpoint_dir, step, model_tag) for a source, defaulting to the newest tag / last step."""
    _check_source(source)
    if model_tag is None:
        tags = list_tags(source, base_dir)
        if not tags:
            raise UserError(f"no {source} checkpoints under {base_dir or get_base_dir()}: train one first")
        model_tag = tags[0]
        print0(f"no --model_tag given: using the newest {source} checkpoint '{model_tag}'")
    directory = checkpoint_dir_for(source, model_tag, base_dir)
    steps = list_steps(directory)
    if not steps:
        known = list_tags(source, base_dir)
        hint = f"known {source} tags: {', '.join(known)}" if known else f"there are no {source} checkpoints yet"
        raise UserError(f"no {source} checkpoint with tag '{model_tag}' (looked in {directory}); {hint}")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise UserError(f"{directory} has no checkpoint at step {step}; steps: {steps}")
    return directory, step, model_tag


def build_model(checkpoint_dir, step, device, phase="eval"):
    """(model, meta) from a checkpoint directory; phase 'eval' or 'train' sets the module mode."""
    if phase not in ("eval", "train"):
        raise ValueError(f"phase must be 'eval' or 'train', not {phase!r}")
    model_state, _, meta = load_checkpoint(checkpoint_dir, step, device)
    if "direction" not in meta or "model_config" not in meta:
        raise UserError(f"checkpoint metadata in {checkpoint_dir} lacks 'direction'/'model_config': not a nanochat checkpoint")
    try:
        config = GPTConfig(**meta["model_config"])
    except TypeError as e:
        raise UserError(f"checkpoint metadata in {checkpoint_dir} has a model config this code does not know: {e}")
    _check_config_fits_weights(config, model_state, meta_path(checkpoint_dir, step))
    model = GPT.build(config, device)
    try:
        model.load_state_dict(model_state, strict=True)
    except RuntimeError as e:
        raise UserError(f"checkpoint {model_path(checkpoint_dir, step)} does not match its model config: {e}")
    model.train() if phase == "train" else model.eval()
    return model, meta


def _check_config_fits_weights(config, model_state, where):
    """Compare the config's parameter shapes (built on the meta device: nothing is allocated)
    with the saved tensors, so an absurd or tampered config is refused before any allocation."""
    sizes = {k: getattr(config, k) for k in _SIZE_FIELDS}
    bad = {k: v for k, v in sizes.items() if not isinstance(v, int) or isinstance(v, bool) or v <= 0}
    if bad:
        raise UserError(f"{where}: the model config has sizes that are not positive integers: {bad}")
    try:
        with torch.device("meta"):
            skeleton = GPT(config)
    except Exception as e:
        raise UserError(f"{where}: the model config {config.to_dict()} cannot be built: {type(e).__name__}: {e}")
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    total = sum(math.prod(s) for s in expected.values())
    if total > MAX_PARAMS:
        raise UserError(f"{where}: the model config asks for {total:.3g} parameters: the metadata is corrupt")
    saved = {k: tuple(v.shape) for k, v in model_state.items() if torch.is_tensor(v)}
    if expected != saved:
        differ = sorted(k for k in set(expected) | set(saved) if expected.get(k) != saved.get(k))
        sample = ", ".join(f"{k}: config {expected.get(k)} vs saved {saved.get(k)}" for k in differ[:3])
        raise UserError(f"{where}: the model config does not match the saved weights ({sample}"
                        f"{', ...' if len(differ) > 3 else ''}): the checkpoint is corrupt or was edited")


def check_tokenizer_matches(meta, tokenizer):
    """A model is only meaningful with the token ids it was trained with: the vocabulary size, the
    direction's marker and BOS ids and the tokenizer's fingerprint must be the ones recorded."""
    if meta.get("vocab_size") is not None and meta["vocab_size"] != tokenizer.get_vocab_size():
        raise UserError(f"the checkpoint was trained with a {meta['vocab_size']}-token vocabulary but the tokenizer "
                        f"has {tokenizer.get_vocab_size()}: the tokenizer changed since training")
    if meta.get("direction") is not None and is_two_way(meta["direction"]):
        spec = DirectionSpec.from_meta(meta)
        fwd, bwd = tokenizer.get_marker_ids()
        if (spec.forward_id, spec.backward_id) != (fwd, bwd):
            raise UserError(f"the checkpoint's marker ids (forward={spec.forward_id}, backward={spec.backward_id}) "
                            f"differ from the tokenizer's (forward={fwd}, backward={bwd}): the tokenizer changed "
                            "since training")
    saved, current = meta.get("tokenizer_fingerprint"), tokenizer.fingerprint()
    if saved is not None and saved != current:
        raise UserError(f"the tokenizer differs from the one this checkpoint was trained with (fingerprint "
                        f"{current[:12]} vs {saved[:12]}): it was retrained or edited since; restore that tokenizer "
                        "or train a new model")
    bos = (meta.get("direction_spec") or {}).get("bos_id")
    if bos is not None and bos != tokenizer.get_bos_token_id():
        raise UserError(f"the checkpoint was trained with BOS id {bos} but the tokenizer's is "
                        f"{tokenizer.get_bos_token_id()}: the tokenizer changed since training")


def load_model(source, device, phase="eval", model_tag=None, step=None, base_dir=None):
    """(model, tokenizer, meta) for a source ('base', 'mid', 'sft', 'rl')."""
    directory, step, model_tag = resolve_checkpoint(source, model_tag, step, base_dir)
    model, meta = build_model(directory, step, device, phase)
    tokenizer = get_tokenizer(base_dir)
    check_tokenizer_matches(meta, tokenizer)
    # Where this run lives is what the tag resolved to, never what a (copied, edited) meta file says;
    # the recorded tag is kept as saved_model_tag.
    if "model_tag" in meta:
        meta["saved_model_tag"] = meta["model_tag"]
    dirs = artifact_dirs(source, model_tag, base_dir)
    meta.update(model_tag=model_tag, checkpoint_dir=directory, run_dir=dirs["run"],
                evaluations_dir=dirs["evaluations"], step=step)
    return model, tokenizer, meta
