"""Runtime shared by every script: the base directory, rank-0 printing, devices and DDP, flags.

Everything the framework writes lives under `$NANOCHAT_BASE_DIR` (default `~/.cache/nanochat`; its
layout: README.md). User-facing mistakes raise `UserError`; `run_main` turns one into a single
line on stderr and exit status 2, so scripts never dump a traceback for bad input.
"""

import os
import sys

import torch
import torch.distributed as dist


class UserError(ValueError):
    """A mistake in the user's input or environment: one line, exit status 2 (a ValueError, so
    `except ValueError` around e.g. validate_direction catches it too)."""


def run_main(main):
    """Call `main()`, turning a UserError into one message and a non-zero exit."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        compute_cleanup()
        sys.exit(2)


def get_base_dir():
    base = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    if os.path.exists(base) and not os.path.isdir(base):
        raise UserError(f"the base dir {base} (NANOCHAT_BASE_DIR) is a file, not a directory: point "
                        "NANOCHAT_BASE_DIR at a directory")
    try:
        os.makedirs(base, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the base dir {base} (NANOCHAT_BASE_DIR): {e.strerror or e}") from None
    return base


def get_rank():
    return int(os.environ.get("RANK", 0))


def print0(*values, **options):
    """print() on rank 0 only, flushed so progress shows up under torchrun and pipes."""
    if get_rank() == 0:
        options.setdefault("flush", True)
        print(*values, **options)


def autodetect_device_type():
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def is_ddp_env():
    # torchrun sets these for every worker; a plain `python -m` run has none of them.
    return all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))


def compute_init(device_type=""):
    """(ddp, rank, local_rank, world_size, device): the device and, under torchrun, the process group
    (nccl on CUDA, gloo on CPU: the distributed path runs on a laptop with --nproc_per_node=2)."""
    device_type = device_type or autodetect_device_type()
    if device_type not in ("cuda", "mps", "cpu"):
        raise UserError(f"unknown --device_type {device_type!r}: use cuda, mps or cpu (or leave empty to autodetect)")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device_type=cuda but no CUDA device is visible; use --device_type=cpu")
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device_type=mps but MPS is not available; use --device_type=cpu")
    ddp = is_ddp_env()
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device(device_type)
    if ddp and world_size > 1 and not dist.is_initialized():
        if device_type == "mps":
            raise UserError("multi-process training is not supported on MPS; use cuda or cpu")
        backend = "nccl" if device_type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device_type == "cuda" else {}
        dist.init_process_group(backend=backend, **kwargs)
        dist.barrier()
    return ddp and world_size > 1, rank, local_rank, world_size, device


def compute_cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def add_flag(parser, name, **kwargs):
    """Register `--name_with_underscores` with its kebab-case alias `--name-with-underscores`."""
    flags = [f"--{name}"]
    if "_" in name:
        flags.append(f"--{name.replace('_', '-')}")
    return parser.add_argument(*flags, dest=name, **kwargs)


def check_number(name, value, low=None, high=None, integer=False, off=None):
    """`value` if it is a finite number in [low, high] (an integer if `integer`), or the flag's "off"
    sentinel `off` (e.g. -1 for top-k); one UserError naming `name` otherwise (docs/SAFETY.md).
    NaN fails every comparison, so `not low <= v` (never `v < low`) is what refuses it."""
    import math
    if off is not None and value == off and not isinstance(value, bool):
        return value
    ok_type = isinstance(value, (int, float)) and not isinstance(value, bool)
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    if not ok_type or (isinstance(value, float) and not math.isfinite(value)) or (integer and value != int(value)):
        kind = "an integer" if integer else "a finite number"
        raise UserError(f"{name} must be {kind}, not {shown}")
    if (low is not None and not value >= low) or (high is not None and not value <= high):
        bounds = (f"between {low} and {high}" if low is not None and high is not None
                  else f">= {low}" if low is not None else f"<= {high}")
        raise UserError(f"{name}={shown} is out of range: it must be {bounds}"
                        + (f" (or {off} for off)" if off is not None else ""))
    return int(value) if integer else value


def check_sampling(temperature, top_k):
    """(temperature, top_k) unchanged if temperature is finite and >= 0, top-k >= 0 or -1 (off)."""
    check_number("--temperature", temperature, low=0.0)
    check_number("--top_k", top_k, low=0, integer=True, off=-1)
    return temperature, top_k
