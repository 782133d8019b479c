"""Loading task data through `datasets.load_dataset` (and HubTask, the tasks made of its rows): from the
Hugging Face Hub online, from local files offline (tests that load a fixture run the same code).

Local files, in this order: the task's `data_files` argument (a file, a glob, a list of files, or a
directory holding the split's files, SPLIT_FILE_PATTERNS); then $NANOCHAT_TASK_DATA_DIR/<task name>/.
Otherwise the Hub; when that fails, one UserError says how to point at local files. Local files keep
the Hub dataset's own columns (a parquet file downloaded from the Hub works as is).
"""

import glob
import os

from nanochat.common import UserError
from tasks.common import Task

DATA_DIR_ENV = "NANOCHAT_TASK_DATA_DIR"
FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# Inside a directory, the split's files: one JSON(L) or parquet file, or Hub-style parquet shards.
SPLIT_FILE_PATTERNS = ("{split}.jsonl", "{split}.json", "{split}.parquet", "{split}-*.parquet",
                       "{split}/*.parquet")


def split_files_in(directory, split):
    """The first pattern of SPLIT_FILE_PATTERNS with matches in `directory` (sorted), or []."""
    for pattern in SPLIT_FILE_PATTERNS:
        found = sorted(glob.glob(os.path.join(glob.escape(directory), pattern.format(split=split))))
        if found:
            return found
    return []


def _files_from_argument(task_name, split, data_files):
    if isinstance(data_files, (str, os.PathLike)):
        path = os.fspath(data_files)
        if os.path.isdir(path):
            files = split_files_in(path, split)
            if not files:
                looked = ", ".join(p.format(split=split) for p in SPLIT_FILE_PATTERNS)
                raise UserError(f"{task_name}: no files for split {split!r} in {path} (looked for {looked})")
            return files
        files = sorted(glob.glob(path))
        if not files:
            raise UserError(f"{task_name}: data_files={path!r} matches no file")
        return files
    files = [os.fspath(f) for f in data_files]
    missing = [f for f in files if not os.path.isfile(f)]
    if not files or missing:
        raise UserError(f"{task_name}: data file(s) not found: {', '.join(missing) or '(empty list)'}")
    return files


def _format_of(task_name, files):
    formats = {FORMATS.get(os.path.splitext(f)[1].lower()) for f in files}
    if None in formats or len(formats) != 1:
        raise UserError(f"{task_name}: local data must be all .jsonl/.json or all .parquet files, got "
                        f"{', '.join(os.path.basename(f) for f in files)}")
    return formats.pop()


def _check_columns(task_name, dataset, columns, source):
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise UserError(f"{task_name}: {source} lacks column(s) {', '.join(missing)} "
                        f"(has {', '.join(dataset.column_names)}); keep the Hub dataset's own columns")
    return dataset


def load_task_data(task_name, hub_path, hub_config, split, columns, data_files=None):
    """The `split` of a task's data as a `datasets.Dataset`, checked to hold `columns`. task_name: the
    registry name (its $NANOCHAT_TASK_DATA_DIR folder); hub_path, hub_config: e.g. "openai/gsm8k", "main"."""
    import datasets  # imported here: it is slow to import and only tasks with data need it
    # Our own progress output is enough; datasets' bars and retry warnings would bury errors.
    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()

    env_dir = os.environ.get(DATA_DIR_ENV)
    if data_files is not None:
        files = _files_from_argument(task_name, split, data_files)
    elif env_dir:
        files = split_files_in(os.path.join(env_dir, task_name), split)
    else:
        files = []

    if files:
        fmt = _format_of(task_name, files)
        try:
            dataset = datasets.load_dataset(fmt, data_files={split: files}, split=split)
        except (OSError, datasets.exceptions.DatasetsError) as e:
            raise UserError(f"{task_name}: could not read {', '.join(files)} as {fmt}: {type(e).__name__}: {e}") from e
        return _check_columns(task_name, dataset, columns, ", ".join(files))

    hub_args = (hub_path,) if hub_config is None else (hub_path, hub_config)
    try:
        dataset = datasets.load_dataset(*hub_args, split=split)
    except (OSError, ConnectionError, datasets.exceptions.DatasetsError) as e:
        looked = (f" (nothing for it under ${DATA_DIR_ENV}={env_dir}: looked for "
                  f"{os.path.join(env_dir, task_name, split + '.jsonl')} or .parquet)" if env_dir else "")
        raise UserError(
            f"could not load {task_name} from the Hugging Face Hub ({'/'.join(hub_args)}, split {split}): "
            f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}{looked}. Offline, point at local copies with the dataset's own columns: "
            f"pass data_files=<file, glob or directory>, or set {DATA_DIR_ENV}=<dir> holding "
            f"{task_name}/{split}.jsonl (or .parquet)") from e
    return _check_columns(task_name, dataset, columns, "/".join(hub_args))


class HubTask(Task):
    """A task whose examples are the rows of one split of a data set (`self.ds`, from load_task_data)."""

    def __init__(self, split, hub_path, hub_config, columns, data_files=None, splits=("train", "test"), **kwargs):
        super().__init__(**kwargs)
        if split not in splits:
            raise UserError(f"{self.name} has no split {split!r}: use one of {', '.join(splits)}")
        self.split = split
        self.ds = load_task_data(self.name, hub_path, hub_config, split, columns, data_files)

    def num_examples(self):
        return len(self.ds)
