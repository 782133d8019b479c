"""Experiments: the one owner of the `experiments/` directory layout.

An experiment is one training run of one phase in one direction, in `<base_dir>/experiments/<id>/`
(config.json, parent_link.json for a child, checkpoints/, logs/, evaluations/). Every non-base
experiment names its parent, so experiments form a forest (`children`, `lineage`). Nobody else
joins paths into `experiments/`: scripts ask `checkpoint_dir(id)`, `logs_dir(id)` and friends.
Writes are atomic; under torchrun only rank 0 creates or updates experiments. The layout and the
plan's spellings: docs/EXPERIMENTS.md ("The experiment directory").
"""

import json
import os
import subprocess
from datetime import datetime, timezone
from pathlib import Path

from nanochat.paths import atomic_write_json, validate_name
from nanochat.phases import PHASE_NAMES, PHASES as PHASE_TABLE
from nanochat.common import UserError, get_base_dir
from nanochat.direction import validate_direction

PHASES = PHASE_NAMES  # nanochat/phases.py
STATUSES = ("created", "running", "completed", "failed")  # in any order: a failed run is resumed, say
EXPERIMENTS_DIRNAME = "experiments"

# Fields that say what an experiment *is*; changing them after creation would break the lineage
# (a child trained from a forward parent cannot become the child of a backward one).
_IDENTITY_FIELDS = ("experiment_id", "phase", "direction", "depth", "parent_experiment", "created_at")


def _utc_now():
    return datetime.now(timezone.utc)


def _git_code_version():
    """{"commit": <HEAD hash>, "dirty": bool} of the repo holding this package (not the cwd), or None."""
    package_dir = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=package_dir, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=package_dir,
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(status.strip())} if commit else None


def read_json(path, what="", fix="fix or remove it"):
    """A JSON file's content; a corrupt file is one UserError saying `fix`."""
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise UserError(f"{what}{path} is not valid JSON ({e}); {fix}") from None


class ExperimentConfig:
    """Creates, reads and links experiments under `<base_dir>/experiments/`."""

    def __init__(self, base_dir=None):
        base_dir = os.fspath(base_dir) if base_dir is not None else get_base_dir()
        if os.path.basename(os.path.normpath(base_dir)) == EXPERIMENTS_DIRNAME:
            # The plan's spelling: the experiments folder itself (base/"experiments").
            self.root = os.path.abspath(base_dir)  # abspath: "experiments" alone has a base dir too
            self.base_dir = os.path.dirname(self.root)
        else:
            self.base_dir = base_dir
            self.root = os.path.join(base_dir, EXPERIMENTS_DIRNAME)

    # ------------------------------------------------------------------ layout (paths only)

    @staticmethod
    def validate_id(experiment_id):
        return validate_name(experiment_id, "experiment id")

    def experiment_dir(self, experiment_id):
        return os.path.join(self.root, self.validate_id(experiment_id))

    def config_path(self, experiment_id):
        return os.path.join(self.experiment_dir(experiment_id), "config.json")

    def parent_link_path(self, experiment_id):
        return os.path.join(self.experiment_dir(experiment_id), "parent_link.json")

    def checkpoint_dir(self, experiment_id):
        return os.path.join(self.experiment_dir(experiment_id), "checkpoints")

    def logs_dir(self, experiment_id):
        return os.path.join(self.experiment_dir(experiment_id), "logs")

    def evaluations_dir(self, experiment_id):
        return os.path.join(self.experiment_dir(experiment_id), "evaluations")

    # ------------------------------------------------------------------ queries

    def exists(self, experiment_id):
        """True if `experiment_id` is a valid id with a config.json (a query: never raises)."""
        try:
            return os.path.isfile(self.config_path(experiment_id))
        except UserError:
            return False

    def list_experiments(self):
        if not os.path.isdir(self.root):
            return []
        return sorted(name for name in os.listdir(self.root) if self.exists(name))

    def _as_id(self, experiment):
        """An experiment id, or the directory create_experiment returned (a Path) -> its id."""
        return Path(experiment).name if isinstance(experiment, os.PathLike) else experiment

    def load_config(self, experiment_id):
        """The experiment's config.json as a dict; `experiment_id` may be the id or the Path
        create_experiment returned."""
        experiment_id = self._as_id(experiment_id)
        path = self.config_path(experiment_id)
        if not os.path.isfile(path):
            raise UserError(f"no experiment {experiment_id!r} under {self.root} ({self._known_hint()})")
        return read_json(path, "experiment config ")

    def _known_hint(self):
        known = self.list_experiments()
        if not known:
            return "there are no experiments yet"
        if len(known) <= 10:  # few enough to read
            return "known experiments: " + ", ".join(known)
        return f"{len(known)} experiments exist; list them with list_experiments()"

    def load_parent_link(self, experiment_id):
        """The child's parent_link.json as a dict ({"parent_experiment", "parent_experiment_id",
        "parent_phase", "parent_checkpoint_path"}), or None for a root experiment."""
        experiment_id = self._as_id(experiment_id)
        self.load_config(experiment_id)  # a clear error for an unknown experiment
        path = self.parent_link_path(experiment_id)
        if not os.path.isfile(path):
            return None
        return read_json(path)

    def _family(self):
        """(configs by id, {parent id: [child ids]}), both oldest first; a self-parent is no parent."""
        configs = {i: self.load_config(i) for i in self.list_experiments()}
        configs = dict(sorted(configs.items(), key=lambda item: (item[1].get("created_at") or "", item[0])))
        children_of = {}
        for i, cfg in configs.items():
            if cfg.get("parent_experiment") != i:
                children_of.setdefault(cfg.get("parent_experiment"), []).append(i)
        return configs, children_of

    def children(self, experiment_id):
        """Ids of the experiments whose parent is `experiment_id`, oldest first."""
        return self._family()[1].get(experiment_id, [])

    # ------------------------------------------------------------------ writes

    def update_config(self, experiment_id, **fields):
        """Merge `fields` into the experiment's config (atomically) and return the new config."""
        changed_identity = sorted(k for k in fields if k in _IDENTITY_FIELDS)
        if changed_identity:
            raise UserError(f"cannot change {', '.join(changed_identity)} of experiment {experiment_id!r}: "
                            "they define what it is; create a new experiment instead")
        if "status" in fields and fields["status"] not in STATUSES:
            raise UserError(f"unknown experiment status {fields['status']!r}: must be one of {', '.join(STATUSES)}")
        config = self.load_config(experiment_id)
        config.update(fields)
        config["updated_at"] = _utc_now().isoformat(timespec="seconds")
        atomic_write_json(self.config_path(experiment_id), config)
        return config

    def _unique_default_id(self, phase, depth, direction):
        stem = f"{phase}_d{depth}_{direction}_{_utc_now().strftime('%Y%m%d_%H%M%S')}"
        candidate, n = stem, 2
        while os.path.exists(self.experiment_dir(candidate)):
            candidate, n = f"{stem}_{n}", n + 1
        return candidate

    def refuse_shadowing(self, experiment_id):
        """A new experiment id must not be the tag of a plain run (<base_dir>/<phase folder>/<id>
        with checkpoints): as an experiment it would shadow that run, whose checkpoints every script
        would stop finding (nanochat/checkpoint_manager.py resolves an experiment id first)."""
        for phase in PHASE_TABLE.values():
            plain = os.path.join(self.base_dir, phase.checkpoint_dir, experiment_id)
            if os.path.isdir(plain) and any(n.startswith("meta_") and n.endswith(".json") for n in os.listdir(plain)):
                raise UserError(f"experiment id {experiment_id!r} is also the tag of the {phase.name} run in {plain}: "
                                "as an experiment it would shadow that run; choose another experiment id")

    def check_same(self, experiment_id, **wanted):
        """Refuse existing experiment `experiment_id` when a field of its config differs from `wanted`."""
        existing = self.load_config(experiment_id)
        differ = [f"{name} {existing.get(name)!r} (not {value!r})" for name, value in wanted.items()
                  if existing.get(name) != value]
        if differ:
            raise UserError(f"experiment {experiment_id!r} already exists with a different config: "
                            f"{', '.join(differ)}; choose another experiment id")

    def create_experiment(self, phase, direction, depth, parent_experiment=None, experiment_id=None,
                          resume=False, **flags):
        """Create experiment `<id>` (resume=True: reuse it) and return its directory as a pathlib.Path.

        `flags` (the run's training flags) are recorded verbatim. A child inherits the parent's
        direction and depth when they are None; contradicting them is an error.
        """
        if phase not in PHASES:
            raise UserError(f"unknown phase {phase!r}: must be one of {', '.join(PHASES)}")
        if phase != "base" and parent_experiment is None:
            raise UserError(f"a {phase} experiment continues from an earlier one: pass its parent experiment id")

        parent = None
        if parent_experiment is not None:
            self.validate_id(parent_experiment)
            if not self.exists(parent_experiment):
                raise UserError(f"parent experiment {parent_experiment!r} does not exist under {self.root} "
                                f"({self._known_hint()})")
            parent = self.load_config(parent_experiment)
            if direction is None:
                direction = parent["direction"]
            elif direction != parent["direction"]:
                raise UserError(f"direction {direction!r} contradicts parent experiment {parent_experiment!r}, "
                                f"which is {parent['direction']!r}: omit the direction to inherit it")
            if depth is None:
                depth = parent.get("depth")
            elif parent.get("depth") is not None and depth != parent["depth"]:
                raise UserError(f"depth {depth} contradicts parent experiment {parent_experiment!r}, "
                                f"which has depth {parent['depth']}: a later phase keeps the model's size")
        validate_direction(direction)
        if not isinstance(depth, int) or isinstance(depth, bool) or depth <= 0:
            raise UserError(f"depth must be a positive integer, got {depth!r}")

        if experiment_id is None:
            experiment_id = self._unique_default_id(phase, depth, direction)
        self.validate_id(experiment_id)
        if experiment_id == parent_experiment:
            raise UserError(f"experiment {experiment_id!r} cannot be its own parent")

        if self.exists(experiment_id):
            if not resume:
                raise UserError(f"experiment {experiment_id!r} already exists; pass resume to continue it, "
                                "or choose another id")
            self.check_same(experiment_id, phase=phase, direction=direction, depth=depth,
                            parent_experiment=parent_experiment)
            return Path(self.experiment_dir(experiment_id))
        self.refuse_shadowing(experiment_id)

        now = _utc_now().isoformat(timespec="seconds")
        config = {
            "experiment_id": experiment_id,
            "phase": phase,
            "direction": direction,
            "depth": depth,
            "flags": dict(flags),
            "seed": flags.get("seed"),
            "parent_experiment": parent_experiment,
            "code_version": _git_code_version(),
            "created_at": now,
            "updated_at": now,
            "status": "created",
        }
        for sub in (self.checkpoint_dir(experiment_id), self.logs_dir(experiment_id),
                    self.evaluations_dir(experiment_id)):
            os.makedirs(sub, exist_ok=True)
        atomic_write_json(self.config_path(experiment_id), config)
        if parent is not None:
            atomic_write_json(self.parent_link_path(experiment_id), {
                "parent_experiment": parent_experiment,
                "parent_experiment_id": parent_experiment,  # the original plan's key
                "parent_phase": parent.get("phase"),
                "parent_checkpoint_path": self.checkpoint_dir(parent_experiment)})
        return Path(self.experiment_dir(experiment_id))

    # ------------------------------------------------------------------ lineage

    def lineage(self, experiment_id=None):
        """The experiments as a forest: [root node], each {"id", "phase", "direction", "status", "children"}.

        With an id, only the tree holding it (from its root ancestor) is returned, as a one-element
        list. An experiment whose parent has been deleted becomes a root.
        """
        configs, children_of = self._family()

        def node(i, seen):
            seen = seen | {i}  # guards against a hand-edited cycle
            cfg = configs[i]
            return {"id": i, "phase": cfg.get("phase"), "direction": cfg.get("direction"),
                    "status": cfg.get("status"),
                    "children": [node(c, seen) for c in children_of.get(i, []) if c not in seen]}

        if experiment_id is None:
            return [node(i, frozenset()) for i, cfg in configs.items()
                    if cfg.get("parent_experiment") not in configs or cfg.get("parent_experiment") == i]

        self.load_config(experiment_id)  # clear error if it does not exist
        root, visited = experiment_id, {experiment_id}
        while (parent := configs[root].get("parent_experiment")) in configs and parent not in visited:
            root = parent
            visited.add(root)
        return [node(root, frozenset())]


def format_lineage(tree):
    """Render a lineage forest as an indented text tree, one experiment per line:

        base_fwd (base, forward, completed)
          ├─ mid_a (mid, forward, running)
          │    └─ sft_a (sft, forward, created)
          └─ mid_b (mid, forward, created)
    """
    lines = []

    def label(n):
        return f"{n['id']} ({n.get('phase')}, {n.get('direction')}, {n.get('status')})"

    def walk(children, prefix):
        for k, child in enumerate(children):
            last = k == len(children) - 1
            lines.append(f"{prefix}{'└─' if last else '├─'} {label(child)}")
            walk(child.get("children", []), prefix + ("     " if last else "│    "))

    for root in tree:
        lines.append(label(root))
        walk(root.get("children", []), "  ")
    return "\n".join(lines)
