"""Evaluation records: one JSON file per evaluation, `<run>/evaluations/<kind>_step<NNNNNN>.json`; the one
place that names, writes, lists and cleans them. A kind says what was measured: a plain name (`bpb`, `core`)
or a family and a detail (`direction_<task>`, `rerank_<task>`, `consistency_pair_<backward tag>`). A kind is
letters, digits, '.', '_' and '-' (a full match), so a record's name is always one file inside evaluations/.
"""

import json
import os
import re

from nanochat.common import UserError
from nanochat.paths import atomic_write_json, check_writable

_KIND = re.compile(r"[A-Za-z0-9_.-]+")
_SECTION = re.compile(r"(nanochat|tasks|scripts)(\.[A-Za-z_][A-Za-z0-9_]*)+")  # a module of this project
_RECORD = re.compile(r"([A-Za-z0-9_.-]+)_step(\d+)\.json")


def kind_name(family, detail=None):
    """`family` or `<family>_<detail>`, the detail made file-name safe (other characters become '_')."""
    return family if detail is None else f"{family}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', str(detail))}"


def record_path(evaluations_dir, kind, step):
    """evaluations/<kind>_step<NNNNNN>.json; a kind that is not a plain name is a UserError."""
    if not isinstance(kind, str) or not _KIND.fullmatch(kind):
        raise UserError(f"evaluation kind {kind!r} cannot be part of a file name: use letters, digits, '.', '_', '-'")
    return os.path.join(evaluations_dir, f"{kind}_step{int(step):06d}.json")


def refuse_existing(paths, overwrite):
    """Before any work: refuse to replace an existing record without --overwrite, or to start with an
    evaluations directory that cannot be written (one line now, not after the results are computed)."""
    existing = [p for p in paths if os.path.exists(p)]
    if existing and not overwrite:
        raise UserError(f"{existing[0]} already exists; pass --overwrite to replace it")
    for directory in sorted({os.path.dirname(p) for p in paths}):
        check_writable(directory, "the evaluations directory")


def write_record(path, record, section=None):
    """The record as JSON at `path` (a record_path), atomically: readers see the old file or the new one.
    `section` names the module whose markdown_section(run_name, evaluations_dir, plots_dir) shows it in
    a report (nanochat/research/report.py finds it in the record: a new metric is listed nowhere else)."""
    if section is not None:
        record = {**record, "report_section": section}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_json(path, record)
    return path


def _records(evaluations_dir):
    """[(kind, step, path)] of every record in the directory."""
    if not os.path.isdir(evaluations_dir):
        return []
    return [(m.group(1), int(m.group(2)), os.path.join(evaluations_dir, name))
            for name in os.listdir(evaluations_dir) if (m := _RECORD.fullmatch(name))]


def list_records(evaluations_dir, kind):
    """[(step, path)] of one kind's records, by increasing step."""
    return sorted((step, path) for k, step, path in _records(evaluations_dir) if k == kind)


def list_family(evaluations_dir, family):
    """[(step, detail, path)] of the kinds `family` (detail None) and `<family>_<detail>`, by step then detail."""
    found = [(step, None if k == family else k[len(family) + 1:], path) for k, step, path in _records(evaluations_dir)
             if k == family or k.startswith(family + "_")]
    return sorted(found, key=lambda t: (t[0], t[1] or ""))


def latest_record(evaluations_dir, kind):
    """(step, path) of the kind's newest record, or None."""
    found = list_records(evaluations_dir, kind)
    return found[-1] if found else None


def latest_of_each(evaluations_dir, family):
    """{detail: (step, path)}: the newest record of each `<family>_<detail>` kind, by detail."""
    # Listed by increasing step: the last one of each detail wins.
    latest = {detail: (step, path) for step, detail, path in list_family(evaluations_dir, family)
              if detail is not None}
    return dict(sorted(latest.items()))


def report_sections(evaluations_dir):
    """The modules the directory's records name as their report section, in record order."""
    names = []
    for _, _, path in sorted(_records(evaluations_dir), key=lambda r: os.path.basename(r[2])):
        try:
            with open(path, encoding="utf-8") as f:
                name = json.load(f).get("report_section")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(name, str) and _SECTION.fullmatch(name) and name not in names:
            names.append(name)
    return names


def remove_records(evaluations_dir, steps, kinds=None):
    """Delete the records of the given steps (of `kinds` only, when given); returns their file names."""
    steps, removed = set(steps), []
    for k, step, path in sorted(_records(evaluations_dir), key=lambda t: os.path.basename(t[2])):
        if step in steps and (kinds is None or k in kinds):
            os.remove(path)
            removed.append(os.path.basename(path))
    return removed
