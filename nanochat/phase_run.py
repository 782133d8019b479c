"""What every training phase does around its step loop, written once (the phases: nanochat/phases.py).

    with PhaseRun("sft", output_tag, rank, device, resume_from_step=..., overwrite=...) as run:  # locked
        run.prepare()                   # leftovers of a killed save removed; the resume step checked
        ... resolve flags (resolve_flags), build the model (from the parent, or run.resume_meta()) ...
        run.refuse_overwrite()          # existing checkpoints are never overwritten silently
        ... build the data, the optimizers, the Trainer ...
        start = run.restore(trainer, loader, num_iterations, schedule)   # resume: moments, data position
        run.clear()                     # --overwrite deletes what it named; a stale log moves aside
        with run.logs(direction, user_config) as (logger, wandb_run):
            run_loop(..., save=Every(n, lambda step, last: run.save(step, model, ...)))

A later phase opens its run from its parent checkpoint (`open_later_run`) and loads its model with
`model_for_run`. Everything here takes values; the scripts own the flags (docs/SAFETY.md).
"""

import os
from contextlib import contextmanager
from datetime import datetime, timezone

from nanochat import wandb_log
from nanochat.checkpoint_manager import (artifact_dirs, build_model, check_tokenizer_matches, clean_checkpoint_dir,
                                         list_steps, load_checkpoint, load_meta, load_model, remove_steps,
                                         resolve_checkpoint, save_checkpoint)
from nanochat.common import UserError, print0
from nanochat.direction import DirectionSpec
from nanochat.evaluations import remove_records
from nanochat.locking import acquire_run_lock
from nanochat.paths import check_writable, move_aside, remove_stale_temporaries
from nanochat.phases import PHASES
from nanochat.research_logger import ResearchLogger, log_path
from nanochat.tokenizer import get_tokenizer


def check_direction_flag(requested, trained, where):
    """A later phase inherits its direction: --direction is only a check, a contradiction an error."""
    if requested is not None and requested != trained:
        raise UserError(f"--direction={requested} contradicts {where}, which was trained {trained}; "
                        "drop --direction to inherit it")


def resolve_flags(given, defaults, saved, resume_step, checkpoint_dir, same=None):
    """{name: value} of the flags in `defaults` (the model and the data order) from those `given`
    (None = unset): a fresh run takes `defaults`, a resumed one the checkpoint's `saved` values, and an
    explicit different value is refused. `same(name, given, old, values)` may declare two spellings
    equal (base: --total_batch_size=-1 and B*T*world)."""
    saved = saved or {}
    values = {}
    for name, default in defaults.items():
        value = given.get(name) if given.get(name) is not None else saved.get(name)
        values[name] = default if value is None else value
    differ = [f"--{name}={given[name]} (checkpoint: {saved[name]})" for name in defaults
              if given.get(name) is not None and saved.get(name) is not None and given[name] != saved[name]
              and not (same is not None and same(name, given[name], saved[name], values))]
    if differ:
        raise UserError(f"--resume_from_step={resume_step}: {', '.join(differ)} would change the model or the order "
                        f"of the data of the run in {checkpoint_dir}; drop these flags to continue with the "
                        "checkpoint's values, or start a new run under another tag")
    return values


def schedule_changes(schedule, num_iterations, meta):
    """{flag: [checkpoint's value, this run's value]} for the schedule flags ({name: value}) that
    differ on resume (they apply from the resume step; the metadata keeps the record)."""
    saved = meta.get("user_config") or {}
    changed = {n: [saved.get(n), v] for n, v in schedule.items() if n in saved and saved[n] != v}
    if meta.get("num_iterations") is not None and meta["num_iterations"] != num_iterations:
        changed["num_iterations"] = [meta["num_iterations"], num_iterations]
    return changed


def open_later_run(phase, source, model_tag, step, output_tag, direction, rank, device, check_parent=None,
                   **run_options):
    """(run, parent dir, parent step, parent tag): the PhaseRun of a phase after base, saving under
    `output_tag`, else the parent's tag. A fresh run refuses a contradicting `direction`, or one that
    `check_parent(parent's direction)` refuses, before any file is touched."""
    parent_dir, parent_step, parent_tag = resolve_checkpoint(source, model_tag, step)
    run = PhaseRun(phase, output_tag or parent_tag, rank, device, **run_options)
    if not run.resuming:
        trained = DirectionSpec.from_meta(load_meta(parent_dir, parent_step)).direction
        check_direction_flag(direction, trained, f"the parent checkpoint ({parent_dir})")
        if check_parent is not None:
            check_parent(trained)
    return run, parent_dir, parent_step, parent_tag


def model_for_run(run, device, source, model_tag, step, direction, parent_dir, parent_experiment=None):
    """(model, tokenizer, direction spec, parent record, resume meta) of a later phase: the parent's
    model (fresh), or this run's own checkpoint, whose recorded parent must be the one named."""
    resume_meta = run.resume_meta()
    if resume_meta is None:
        model, tokenizer, meta = load_model(source, device, phase="train", model_tag=model_tag, step=step)
        parent = {"source": source, "model_tag": meta["model_tag"], "step": meta["step"],
                  "checkpoint_dir": meta["checkpoint_dir"], "experiment": parent_experiment}
        return model, tokenizer, DirectionSpec.from_meta(meta), parent, None
    tokenizer = get_tokenizer()
    model, _ = run.load_resumed_model(tokenizer)
    spec = DirectionSpec.from_meta(resume_meta)
    where = f"the checkpoint being resumed ({run.checkpoint_dir} step {run.resume_step})"
    check_direction_flag(direction, spec.direction, where)
    parent = resume_meta.get("parent") or {}
    if parent.get("checkpoint_dir") not in (None, parent_dir) or (step is not None and step != parent.get("step")):
        raise UserError(f"--resume_from_step={run.resume_step}: {where} continues {parent.get('checkpoint_dir')} step "
                        f"{parent.get('step')}, not {parent_dir}" + (f" step {step}" if step is not None else "") +
                        "; name that parent (or drop --step), or train a new run under another --output_tag")
    return model, tokenizer, spec, parent, resume_meta


class PhaseRun:
    """One run of one phase: its directories, lock, overwrite guard, resume, logs and checkpoints."""

    def __init__(self, phase, output_tag, rank, device, resume_from_step=-1, overwrite=False, research_log=-1,
                 wandb_run="dummy", log_flush_every=100):
        self.phase = PHASES[phase]
        self.tag, self.rank, self.device = output_tag, rank, device
        self.overwrite, self.log_flush_every = overwrite, log_flush_every
        # --research_log: 1 on, 0 off, -1 = on when --run names a wandb run
        self.research_log = research_log == 1 or (research_log == -1 and wandb_run != "dummy")
        self.wandb_run = wandb_run
        self.master = rank == 0
        self.dirs = artifact_dirs(phase, output_tag)  # refuses a tag that is not a plain name
        self.checkpoint_dir = self.dirs["checkpoints"]
        self.resume_step, self.resuming = resume_from_step, resume_from_step >= 0
        self.existing, self.later, self.schedule_history, self._lock = [], [], [], None

    # ---- before training ----------------------------------------------------------------------
    def __enter__(self):
        if self.master:  # before hours of training, not at the first save
            check_writable(self.checkpoint_dir, "the checkpoint directory")
            # One writer per run: a second process on this run fails here, at once, naming the holder.
            self._lock = acquire_run_lock(self.dirs["run"], f"{self.phase.name} run {self.tag!r}")
        return self

    def __exit__(self, *exc):
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def prepare(self):
        """Remove what a killed save left, and check the resume step exists."""
        if self.master:
            removed = (clean_checkpoint_dir(self.checkpoint_dir) + remove_stale_temporaries(self.dirs["evaluations"])
                       + remove_stale_temporaries(self.dirs["logs"]))
            if removed:
                print0(f"removed what an interrupted save left behind: {', '.join(removed)}")
        self.existing = list_steps(self.checkpoint_dir)
        if self.resuming and self.resume_step not in self.existing:
            raise UserError(f"--resume_from_step={self.resume_step}: {self.checkpoint_dir} has checkpoints at steps "
                            f"{self.existing or 'none'}")
        self.later = [s for s in self.existing if s > self.resume_step] if self.resuming else self.existing

    def resume_meta(self):
        return load_meta(self.checkpoint_dir, self.resume_step) if self.resuming else None

    def load_resumed_model(self, tokenizer):
        """(model, meta) of this run's own checkpoint at the resume step, for the tokenizer given."""
        model, meta = build_model(self.checkpoint_dir, self.resume_step, self.device, phase="train")
        check_tokenizer_matches(meta, tokenizer)
        return model, meta

    def refuse_overwrite(self):
        """Checkpoints this run would overwrite are refused unless --overwrite names them."""
        if not self.later or self.overwrite:
            return
        if self.resuming:
            raise UserError(f"{self.checkpoint_dir} has checkpoints after step {self.resume_step} (steps {self.later}) "
                            f"that this run would overwrite; resume from --resume_from_step={self.later[-1]}, or pass "
                            f"--overwrite to delete steps {self.later} and their evaluations")
        raise UserError(f"{self.checkpoint_dir} already holds {self.phase.name} checkpoints (steps {self.existing}); "
                        f"resume with --resume_from_step={self.existing[-1]}, choose another tag, or pass "
                        "--overwrite to delete them and start again")

    def restore(self, trainer, loader, num_iterations, schedule):
        """The step to start from (0 when fresh). Resuming, the saved moments and data position
        continue; this run's `schedule` ({flag: value}) applies from the resume step."""
        if not self.resuming:
            return 0
        meta = self.resume_meta()
        _, state, _ = load_checkpoint(self.checkpoint_dir, self.resume_step, self.device, load_optimizer=True,
                                      rank=self.rank)
        saved_direction, trained = (state.get("dataloader") or {}).get("direction"), meta["direction"]
        if saved_direction is not None and saved_direction != trained:
            raise UserError(f"checkpoint step {self.resume_step} in {self.checkpoint_dir} is inconsistent: its meta "
                            f"says direction {trained} but its saved dataloader state is {saved_direction}; its "
                            "files were mixed up or edited: resume from another step")
        trainer.load_optimizer_state(state["optimizers"])
        if loader is not None and state.get("dataloader") is not None:
            loader.load_state_dict(state["dataloader"])
        changed = schedule_changes(schedule, num_iterations, meta)
        self.schedule_history = list(meta.get("schedule_history") or [])
        if changed:
            self.schedule_history.append({"from_step": self.resume_step, "changed": changed})
            print0(f"resuming with changed schedule flags, applied from step {self.resume_step}: "
                   + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))
        print0(f"resumed from step {self.resume_step}")
        return self.resume_step

    def clear(self):
        """Just before training: delete what --overwrite named; move aside a research log with no
        checkpoint to continue from."""
        if not self.master:
            return
        if self.later:
            remove_steps(self.checkpoint_dir, self.later)
            gone = remove_records(self.dirs["evaluations"], self.later)
            print0(f"--overwrite: deleted checkpoint steps {self.later} of {self.checkpoint_dir}"
                   + (f" and their evaluations {gone}" if gone else ""))
        log = log_path(self.dirs["run"], self.phase.log_name)
        if not self.resuming and os.path.exists(log):
            moved = move_aside(log)
            print0(f"a previous {self.phase.name} run left the research log {log} without a checkpoint to resume "
                   f"from; moved it aside to {moved} and starting a new log")

    # ---- during training ----------------------------------------------------------------------
    @contextmanager
    def logs(self, direction, user_config, wandb_config=None, snapshot_every=1000):
        """(research logger or None, wandb run) for the loop; both closed on the way out."""
        logger = None
        if self.research_log and self.master:
            logger = ResearchLogger(self.dirs["run"], phase=self.phase.log_name,
                                    flush_every=self.log_flush_every, snapshot_every=snapshot_every,
                                    resume=self.resuming, resume_from_step=self.resume_step if self.resuming else None,
                                    metadata={"direction": direction, "model_tag": self.tag, **user_config})
            if logger.resume_gap is not None:
                print0(f"warning: the research log {logger.path} ends at step {logger.resume_gap[0]} but training "
                       f"resumes from step {logger.resume_gap[1]}: the steps in between are missing from it")
        wb = wandb_log.init(self.wandb_run, config=wandb_config or user_config, master=self.master)
        try:
            yield logger, wb
        finally:
            if logger is not None:
                logger.close()
            wb.finish()

    def meta(self, spec, model, tokenizer, user_config, parent, **fields):
        """The metadata every checkpoint records (the direction as spec.to_meta() under
        "direction_spec"); `fields` adds the phase's own."""
        return {"phase": self.phase.name, "direction_spec": spec.to_meta(), "model_tag": self.tag,
                "model_config": model.config.to_dict(), "vocab_size": tokenizer.get_vocab_size(),
                "tokenizer_fingerprint": tokenizer.fingerprint(), "user_config": user_config,
                "parent": parent, "schedule_history": self.schedule_history, **fields}

    def save(self, step, model, optimizer_state, data_state, meta):
        """One checkpoint: weights, this rank's optimizer and data state, and `meta` stamped with the step."""
        meta = dict(meta, step=step, saved_at=datetime.now(timezone.utc).isoformat())
        state = {"optimizers": optimizer_state}
        if data_state is not None:
            state["dataloader"] = data_state
        save_checkpoint(self.checkpoint_dir, step, model.state_dict(), state, meta, rank=self.rank)
        print0(f"saved {self.phase.name} checkpoint step {step} to {self.checkpoint_dir} "
               f"(direction: {meta['direction_spec']['direction']})")
