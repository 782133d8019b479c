"""CORE-style few-shot benchmark for base models, scored in every concrete direction (docs/DESIGN.md §7).

Tasks come from the DCLM "CORE" bundle (downloaded once to $NANOCHAT_BASE_DIR/eval_bundle/, or
--bundle_dir). Each option's whole text is tokenised once in reading order and oriented by
nanochat.direction, so both readings hold the same tokens; options are ranked by summed log-likelihood.
CORE = mean centred accuracy per direction. The choices and their caveats: docs/EVALUATION.md.
"""

import csv
import json
import math
import os
import random
import shutil
import time
import zipfile
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanochat.common import UserError, get_base_dir, print0
from nanochat.dataset import fetch  # the download with retries that data shards use
from nanochat.direction import CONCRETE_DIRECTIONS, DirectionSpec, by_direction, concrete_directions, \
    orient_text_tokens, validate_direction
from nanochat.evaluations import latest_record, record_path, write_record
from nanochat.loss_eval import padded_batch

BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
FEWSHOT_SEPARATOR = "\n\n"
CORE_TRAINING_MAX_PER_TASK = 500  # items per task when base_train runs CORE (--core_metric_every)


# ---- the bundle ------------------------------------------------------------------------------------
def default_bundle_dir(base_dir=None):
    return os.path.join(base_dir or get_base_dir(), "eval_bundle")


def _is_bundle(path):
    return os.path.isfile(os.path.join(path, "core.yaml")) and os.path.isfile(os.path.join(path, "eval_meta_data.csv"))


def download_bundle(url=BUNDLE_URL, base_dir=None, max_attempts=3, backoff_s=1.0):
    """Download the bundle zip (with retries) and unpack it to <base_dir>/eval_bundle/, through temporary
    names renamed at the end (never a half bundle that looks complete); a one-line UserError if it cannot."""
    base_dir = base_dir or get_base_dir()
    target = default_bundle_dir(base_dir)
    zip_tmp = os.path.join(base_dir, f"eval_bundle.zip.tmp{os.getpid()}")
    unpack_tmp = os.path.join(base_dir, f"eval_bundle.tmp{os.getpid()}")
    print0(f"downloading the CORE eval bundle from {url}")
    try:
        fetch(url, zip_tmp, max_attempts, backoff_s, validate=lambda path: zipfile.ZipFile(path).close(),
               offline_hint=f"unpack a copy so that {os.path.join(target, 'core.yaml')} exists (scripts.base_eval "
                            "also takes --bundle_dir=<dir with core.yaml>), or check --bundle_url")
        with zipfile.ZipFile(zip_tmp) as z:
            z.extractall(unpack_tmp)
        # The archive holds either the bundle's files or one folder that holds them.
        inner = [unpack_tmp] + [os.path.join(unpack_tmp, d) for d in sorted(os.listdir(unpack_tmp))]
        root = next((d for d in inner if _is_bundle(d)), None)
        if root is None:
            raise UserError(f"the archive from {url} has no core.yaml and eval_meta_data.csv: not a CORE bundle")
        if os.path.exists(target):
            raise UserError(f"{target} exists but is not a complete bundle (no core.yaml or eval_meta_data.csv); "
                            "remove it and run again")
        os.replace(root, target)
    finally:
        shutil.rmtree(unpack_tmp, ignore_errors=True)
        if os.path.exists(zip_tmp):
            os.remove(zip_tmp)
    print0(f"CORE eval bundle ready in {target}")
    return target


def ensure_bundle(bundle_dir=None, url=BUNDLE_URL, base_dir=None):
    """A usable bundle directory: `bundle_dir` if given (never downloaded into), else the cached
    <base_dir>/eval_bundle/, downloaded on first use."""
    if bundle_dir:
        if not _is_bundle(bundle_dir):
            raise UserError(f"--bundle_dir={bundle_dir} is not a CORE bundle: it needs core.yaml and eval_meta_data.csv")
        return bundle_dir
    cached = default_bundle_dir(base_dir)
    if _is_bundle(cached):
        return cached
    return download_bundle(url, base_dir)


def load_task_list(bundle_dir):
    """[{label, task_type, num_fewshot, delimiter, data_path, random_baseline}] of core.yaml."""
    import yaml
    with open(os.path.join(bundle_dir, "core.yaml")) as f:
        config = yaml.safe_load(f) or {}
    baselines = {}
    with open(os.path.join(bundle_dir, "eval_meta_data.csv"), newline="") as f:
        for row in csv.DictReader(f):
            baselines[row["Eval Task"].strip()] = float(row["Random baseline"])
    tasks = []
    for entry in config.get("icl_tasks", []):
        label, task_type = entry["label"], entry["icl_task_type"]
        if task_type not in TASK_TYPES:
            raise UserError(f"{bundle_dir}/core.yaml: task {label} has type {task_type!r}; known: {', '.join(TASK_TYPES)}")
        if label not in baselines:
            raise UserError(f"{bundle_dir}/eval_meta_data.csv has no random baseline for task {label}")
        shots = entry.get("num_fewshot", [0])
        tasks.append({"label": label, "task_type": task_type,
                      "num_fewshot": int(shots[0] if isinstance(shots, list) else shots),
                      "delimiter": entry.get("continuation_delimiter", " "),
                      "data_path": os.path.join(bundle_dir, "eval_data", entry["dataset_uri"].removeprefix("eval_data/")),
                      "random_baseline": baselines[label] / 100.0})
    if not tasks:
        raise UserError(f"{bundle_dir}/core.yaml lists no icl_tasks")
    return tasks


def load_items(task):
    """The task's items as [{"options": [(context, continuation)], "gold": index}]."""
    items = []
    with open(task["data_path"]) as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            if task["task_type"] == "multiple_choice":
                items.append({"options": [(row["query"], c) for c in row["choices"]], "gold": int(row["gold"])})
            elif task["task_type"] == "schema":
                items.append({"options": [(c, row["continuation"]) for c in row["context_options"]],
                              "gold": int(row["gold"])})
            else:
                items.append({"options": [(row["context"], row["continuation"])], "gold": 0})
    return items


# ---- rows -------------------------------------------------------------------------------------------
def split_at_delimiter(context, delimiter, continuation):
    """(given text, continuation text) of one option. The delimiter's trailing spaces move to the
    continuation: "Answer:" + " Paris" tokenise as in running text (a space joins the next word)."""
    stripped = delimiter.rstrip(" ")
    return context + stripped, delimiter[len(stripped):] + continuation


def _fewshot_indices(label, index, n_items, num_fewshot):
    # Deterministic per (task, item): the same demonstrations in every direction, rank and run.
    rng = random.Random(f"core/{label}/{index}")
    others = [i for i in range(n_items) if i != index]
    return rng.sample(others, min(num_fewshot, len(others)))


def item_rows(tokenizer, spec, task, items, index, concrete_direction, seq_len):
    """(rows, n_shots, target_len) for the options of items[index], or None if the item cannot fit. A
    row is (ids, roles): 'item' for the item's tokens, 'context' for header, demonstrations and
    separators; target_len: the number of continuation tokens (language_modeling)."""
    enc = tokenizer.encode
    delim = task["delimiter"]
    item = items[index]
    options = [split_at_delimiter(c, delim, k) for c, k in item["options"]]
    encoded = [(enc(g), enc(k)) for g, k in options]
    demos = []
    for j in _fewshot_indices(task["label"], index, len(items), task["num_fewshot"]):
        demo = items[j]
        context, continuation = demo["options"][demo["gold"]]
        given, cont = split_at_delimiter(context, delim, continuation)
        demos.append(enc(given) + enc(cont))
    sep = enc(FEWSHOT_SEPARATOR)
    room = seq_len + 1 - spec.header_len  # a row of L tokens feeds L - 1 inputs
    longest = max(len(g) + len(k) for g, k in encoded)
    if longest > room:
        return None
    while demos and longest + sum(len(d) + len(sep) for d in demos) > room:
        demos.pop()  # the same demonstrations are dropped in both directions
    rows = []
    for given, cont in encoded:
        item_tokens = given + cont
        # Reading order: the demonstrations where the evaluated reading meets them first, each
        # joined to its neighbour by the separator (demo, sep, ..., item forward; item, sep,
        # demo, ... backward). The backward text is the mirror arrangement, not the same text.
        if by_direction(concrete_direction, forward=True, backward=False):
            context = [t for d in demos for t in d + sep]
            text, roles = context + item_tokens, ["context"] * len(context) + ["item"] * len(item_tokens)
        else:
            context = [t for d in demos for t in sep + d]
            text, roles = item_tokens + context, ["item"] * len(item_tokens) + ["context"] * len(context)
        ids, _ = spec.orient(text, concrete_direction=concrete_direction)
        roles = ["context"] * spec.header_len + orient_text_tokens(roles, concrete_direction)
        rows.append((ids, roles))
    return rows, len(demos), len(encoded[0][1])


@torch.no_grad()
def score_rows(model, rows, target_lens, device, batch_size=16, autocast_ctx=None):
    """For each row (ids, roles): (log-likelihood of its 'item' tokens in nats, whether its last
    target_len item tokens in the row are all greedy predictions)."""
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        lens = target_lens[start:start + batch_size]
        x, y = padded_batch([(ids[:-1], ids[1:]) for ids, _ in chunk], 0)
        x, y = x.to(device), y.to(device)
        with autocast_ctx if autocast_ctx is not None else nullcontext():
            logits = model(x)
        token_logp = -F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-1,
                                      reduction="none").view(y.shape).double().cpu()
        greedy = (logits.argmax(dim=-1) == y).cpu()
        for r, (ids, roles) in enumerate(chunk):
            positions = [i - 1 for i in range(1, len(ids)) if roles[i] == "item"]  # target i at input i-1
            ll = float(token_logp[r, positions].sum())
            last = positions[-lens[r]:] if lens[r] else []
            out.append((ll, bool(greedy[r, last].all()) if last else False))
    return out


def evaluate_task(model, tokenizer, task, items, trained_direction, concrete_direction, device, seq_len,
                  batch_size=16, autocast_ctx=None, rank=0, world_size=1):
    """{"correct", "count", "skipped", "shots"} of one task in one concrete direction, summed
    over ranks (items are split index % world_size)."""
    spec = DirectionSpec.from_tokenizer(trained_direction, tokenizer)
    flat, lens, owners = [], [], []
    skipped = shots = 0
    for index in range(rank, len(items), world_size):
        built = item_rows(tokenizer, spec, task, items, index, concrete_direction, seq_len)
        if built is None:
            skipped += 1
            continue
        rows, n_shots, target_len = built
        shots += n_shots
        owners.append((index, len(rows)))
        flat += rows
        lens += [target_len if task["task_type"] == "language_modeling" else 0] * len(rows)
    scores = score_rows(model, flat, lens, device, batch_size, autocast_ctx)
    correct, offset = 0.0, 0
    for index, n in owners:
        mine = scores[offset:offset + n]
        offset += n
        if task["task_type"] == "language_modeling":
            correct += float(mine[0][1])
        else:
            best = max(s for s, _ in mine)
            winners = [k for k, (s, _) in enumerate(mine) if s == best]
            # An exact tie is shared among the tied options (the expected accuracy of a random pick).
            correct += (items[index]["gold"] in winners) / len(winners)
    totals = torch.tensor([correct, len(owners), skipped, shots], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    correct, count, skipped, shots = totals.tolist()
    return {"correct": correct, "count": int(count), "skipped": int(skipped),
            "mean_shots": shots / count if count else 0.0}


def centered_accuracy(accuracy, random_baseline):
    """(accuracy - baseline) / (1 - baseline): 0 at random guessing, 1 when always right."""
    return (accuracy - random_baseline) / (1.0 - random_baseline)


class CoreBenchmark:
    """The tasks of one bundle, loaded once (optionally a subset and at most max_per_task items
    each, the first ones of the file), evaluated on any model in any concrete direction."""

    def __init__(self, bundle_dir, max_per_task=-1, labels=None):
        self.bundle_dir = bundle_dir
        tasks = load_task_list(bundle_dir)
        if labels:
            known = {t["label"] for t in tasks}
            unknown = [name for name in labels if name not in known]
            if unknown:
                raise UserError(f"unknown CORE task(s) {', '.join(unknown)}; the bundle has {', '.join(sorted(known))}")
            tasks = [t for t in tasks if t["label"] in labels]
        self.tasks = []
        for task in tasks:
            if not os.path.isfile(task["data_path"]):
                raise UserError(f"CORE task {task['label']}: {task['data_path']} is missing from the bundle")
            self.tasks.append((task, load_items(task)[:max_per_task if max_per_task > 0 else None]))

    @classmethod
    def prepare(cls, bundle_dir=None, bundle_url=BUNDLE_URL, max_per_task=-1, labels=None, needed_by=None):
        """Load the bundle (downloading it on first use); `needed_by` (e.g. a flag) prefixes errors."""
        try:
            return cls(ensure_bundle(bundle_dir, bundle_url), max_per_task, labels)
        except UserError as e:
            if needed_by is None:
                raise
            raise UserError(f"{needed_by}: {e}") from None

    def evaluate(self, model, tokenizer, trained_direction, directions, device, seq_len, batch_size=16,
                 autocast_ctx=None, rank=0, world_size=1, log=print0):
        """{"tasks": {label: {type, shots, random_baseline, items, results: {direction: {accuracy,
        centered, ...}}}}, "core": {direction: mean centred accuracy}}."""
        tasks_out = {}
        for task, items in self.tasks:
            t0 = time.time()
            per_direction = {}
            for direction in directions:
                validate_direction(direction, CONCRETE_DIRECTIONS)
                r = evaluate_task(model, tokenizer, task, items, trained_direction, direction, device, seq_len,
                                  batch_size, autocast_ctx, rank, world_size)
                acc = r["correct"] / r["count"] if r["count"] else float("nan")
                per_direction[direction] = dict(r, accuracy=acc, centered=centered_accuracy(acc, task["random_baseline"]))
            tasks_out[task["label"]] = {"task_type": task["task_type"], "num_fewshot": task["num_fewshot"],
                                        "random_baseline": task["random_baseline"], "items": len(items),
                                        "results": per_direction}
            log(f"CORE {task['label']:<28} " + " | ".join(
                f"{d}: acc {r['accuracy']:.4f} centred {r['centered']:+.4f}" for d, r in per_direction.items())
                + f" ({time.time() - t0:.1f}s)")
        core = {}
        for direction in directions:
            values = [t["results"][direction]["centered"] for t in tasks_out.values()]
            values = [v for v in values if not math.isnan(v)]
            core[direction] = sum(values) / len(values) if values else float("nan")
        return {"tasks": tasks_out, "core": core, "native_directions": concrete_directions(trained_direction)}

    def evaluate_during_training(self, model, tokenizer, trained_direction, device, seq_len, batch_size,
                                 autocast_ctx, step, evaluations_dir, rank=0, world_size=1, meta=None):
        """CORE in the model's own directions during training: {"core_<direction>": value} to log; rank 0
        also writes evaluations/core_step<step>.json (a rerun of the same step replaces it)."""
        directions = concrete_directions(trained_direction)
        results = self.evaluate(model, tokenizer, trained_direction, directions, device, seq_len,
                                batch_size, autocast_ctx, rank, world_size)
        if rank == 0:
            write_record(record_path(evaluations_dir, "core", step),
                         dict(meta or {}, eval="core", step=step, trained_direction=trained_direction,
                              bundle_dir=self.bundle_dir, max_seq_len=seq_len, **results))
        print0(f"step {step:05d} | " + " | ".join(f"CORE {d}: {v:.4f}" for d, v in results["core"].items()))
        return {f"core_{d}": v for d, v in results["core"].items()}


# ---- the terminal and the report --------------------------------------------------------------------
def format_table(results):
    """The per-task table and the CORE line as Markdown (the terminal and the report's section)."""
    directions = list(results["core"])
    native = set(results.get("native_directions", directions))
    head = " | ".join(f"acc {d}{'' if d in native else ' (cross)'} | centred {d}" for d in directions)
    lines = [f"| task | type | shots | random | {head} |", "|---|---|---|---|" + "---|---|" * len(directions)]
    for label, t in results["tasks"].items():
        cells = " | ".join(f"{t['results'][d]['accuracy']:.4f} | {t['results'][d]['centered']:+.4f}"
                           for d in directions)
        lines.append(f"| {label} | {t['task_type']} | {t['num_fewshot']} | {t['random_baseline']:.3f} | {cells} |")
    core = " | ".join(f" | **{results['core'][d]:+.4f}**" for d in directions)
    return "\n".join(lines + [f"| **CORE (mean centred accuracy)** | | | | {core} |"])


SECTION_TITLE = "CORE benchmark (in each direction)"


def markdown_section(run_name, evaluations_dir, plots_dir):
    """The report's CORE section for one run (the latest core_step*.json), or None if none
    (nanochat/research/report.py REPORT_SECTIONS)."""
    latest = latest_record(evaluations_dir, "core")
    if latest is None:
        return None
    step, path = latest
    with open(path) as f:
        record = json.load(f)
    return (f"Step {step}, trained {record.get('trained_direction', '?')}: few-shot in-context tasks scored by "
            "whole-text likelihood in each direction (docs/DESIGN.md §7; nanochat/core_eval.py); centred accuracy = "
            "(accuracy - random) / (1 - random); (cross) = a direction the model was not trained in.\n\n"
            + format_table(record) + "\n")
