"""Weights & Biases, optional: `--run=dummy` (the default) disables it; WANDB_MODE=offline works
without a network (upload later with `wandb sync`). Tests never need an account."""

import os


class _Wandb:
    """.log(dict) and .finish() on a wandb run; both do nothing without one (run=None)."""

    def __init__(self, run=None):
        self.run = run

    def log(self, metrics):
        if self.run is None:
            return
        flat = {}
        for k, v in metrics.items():
            if isinstance(v, dict):
                flat.update({f"{k}/{kk}": vv for kk, vv in v.items()})
            else:
                flat[k] = v
        self.run.log(flat)

    def finish(self):
        if self.run is not None:
            self.run.finish()


def init(run_name, config, master=True, project="nanochat-direction"):
    """A logger with .log(dict) and .finish(); a no-op unless this is rank 0 of a named run."""
    if not master or not run_name or run_name == "dummy" or os.environ.get("WANDB_MODE") == "disabled":
        return _Wandb()
    import wandb
    return _Wandb(wandb.init(project=project, name=run_name, config=config))
