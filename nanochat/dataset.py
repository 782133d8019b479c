"""Pretraining documents: parquet shards with a `text` column in $NANOCHAT_BASE_DIR/base_data/;
the last shard (sorted by name) is validation, the others train.

    python -m nanochat.dataset -n 8        # download 8 shards of a public pretraining set (online)
    python -m nanochat.dataset --builtin   # write shards from this Python's standard library (offline)
    python -m nanochat.dataset --builtin=shakespeare [--text_file=tinyshakespeare.txt]   # English plays

A document's *global index* is its position in the split (shard order, then row order); the
bidirectional draw and the sharding over ranks are functions of it.
"""

import argparse
import bisect
import os
import random
import re
import shutil
import sys
import sysconfig
import time
import urllib.request

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.common import UserError, get_base_dir, run_main
from nanochat.paths import atomic_write, check_writable

# A public, pre-shuffled FineWeb-Edu release in ~100 MB parquet shards with a `text` column.
DEFAULT_BASE_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
MAX_SHARD = 1822


def shard_filename(index):
    return f"shard_{index:05d}.parquet"


def data_dir(base_dir=None):
    return os.path.join(base_dir or get_base_dir(), "base_data")


def list_shards(directory=None):
    directory = directory or data_dir()
    if not os.path.isdir(directory):
        return []
    return sorted(os.path.join(directory, f) for f in os.listdir(directory) if f.endswith(".parquet"))


def split_shards(split, directory=None):
    if split not in ("train", "val"):
        raise UserError(f"unknown split {split!r}: use 'train' or 'val'")
    directory = directory or data_dir()
    shards = list_shards(directory)
    if len(shards) < 2:
        found = "no shards" if not shards else "only one shard"
        raise UserError(f"{found} in {directory}: need at least two (the last is validation). Run "
                        "`python -m nanochat.dataset --builtin` (offline) or `python -m nanochat.dataset -n 8`")
    return shards[-1:] if split == "val" else shards[:-1]


def _open_shard(path):
    try:
        return pq.ParquetFile(path)
    except Exception as e:
        raise UserError(f"cannot read shard {path}: {e}. Delete it and re-create the data")


def _read_texts(path):
    """The `text` column of a shard as Python strings, validated as UTF-8."""
    pf = _open_shard(path)
    if "text" not in pf.schema_arrow.names:
        raise UserError(f"shard {path} has no 'text' column (columns: {pf.schema_arrow.names}); "
                        "pretraining shards need one string column named 'text'")
    column = pf.read(columns=["text"]).column("text")
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
            or pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        raise UserError(f"shard {path}: column 'text' has type {column.type}; pretraining shards need a string column")
    try:
        values = column.to_pylist()  # a string column is decoded (and checked) here
    except (UnicodeDecodeError, pa.ArrowException) as e:
        raise UserError(f"shard {path} holds text that is not valid UTF-8 ({e}); fix or remove the shard")
    texts = []
    for row, value in enumerate(values):
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"shard {path}, row {row}: text is not valid UTF-8 ({e}); fix or remove it")
        texts.append(value or "")
    return texts


class DocumentSource:
    """Random and sequential access to one split's documents by global index. Up to
    `cache_shards` shards are held in memory (the most recently used)."""

    def __init__(self, split, directory=None, cache_shards=1):
        self.split = split
        self.shards = split_shards(split, directory)
        self.row_counts = []
        for path in self.shards:
            n = _open_shard(path).metadata.num_rows
            if n == 0:
                raise UserError(f"shard {path} is empty (0 rows); delete it or re-create the data")
            self.row_counts.append(n)
        self.starts = [sum(self.row_counts[:i]) for i in range(len(self.shards))]
        self.n_docs = sum(self.row_counts)
        self.cache_shards = max(1, int(cache_shards))
        self._cache = {}  # shard index -> texts, in order of last use

    def __len__(self):
        return self.n_docs

    def _shard_texts(self, shard_index):
        texts = self._cache.pop(shard_index, None)
        if texts is None:
            texts = _read_texts(self.shards[shard_index])
            while len(self._cache) >= self.cache_shards:
                del self._cache[next(iter(self._cache))]  # the least recently used
        self._cache[shard_index] = texts
        return texts

    def get(self, index):
        index = index % self.n_docs
        s = bisect.bisect_right(self.starts, index) - 1
        return self._shard_texts(s)[index - self.starts[s]]

    def iter_from(self):
        """Yield (global_index, text) of every document in storage order, one pass."""
        for s, first in enumerate(self.starts):
            for i, text in enumerate(self._shard_texts(s)):
                yield first + i, text


# Shards totalling up to this many bytes on disk are permuted together (one window of the epoch
# order): a small corpus (a book, the built-in ones) is fully permuted every epoch, a large one is
# read window by window with two windows in memory (docs/DIRECTIONS.md).
SHUFFLE_WINDOW_BYTES = 256 << 20


def shuffle_window(shards, budget=SHUFFLE_WINDOW_BYTES):
    """How many shards one window holds: as many as fit in `budget` bytes (the largest counted), at least one."""
    total, k = 0, 0
    for size in sorted((os.path.getsize(p) for p in shards), reverse=True):
        if k and total + size > budget:
            break
        total, k = total + size, k + 1
    return k


class DocumentOrder:
    """Position in an epoch -> global document index. With `shuffle`, a function of (seed, epoch)
    only: shards in a seeded permutation, `window` at a time, each window's documents permuted;
    without it, storage order (docs/DIRECTIONS.md, "The order of documents")."""

    def __init__(self, row_counts, seed=0, shuffle=True, window=2):
        if int(window) < 1:
            raise UserError(f"shuffle window of {window} shards: must be >= 1")
        self.row_counts, self.seed, self.shuffle, self.window = list(row_counts), int(seed), bool(shuffle), int(window)
        self.starts = [sum(self.row_counts[:i]) for i in range(len(self.row_counts))]
        self._epoch, self._windows, self._window_starts, self._perms = None, None, None, {}

    def __len__(self):
        return sum(self.row_counts)

    def _rng(self, *keys):
        return np.random.default_rng([0x5EED0DE5, self.seed & 0xFFFFFFFF, *keys])

    def _plan(self, epoch):
        """The epoch's windows: lists of shard indices, and the position where each window starts."""
        if self._epoch != epoch:
            shards = self._rng(int(epoch)).permutation(len(self.row_counts)).tolist()
            self._windows = [shards[i:i + self.window] for i in range(0, len(shards), self.window)]
            sizes = [sum(self.row_counts[s] for s in w) for w in self._windows]
            self._window_starts = [sum(sizes[:i]) for i in range(len(sizes))]
            self._epoch, self._perms = epoch, {}
        return self._windows, self._window_starts

    def _window_order(self, epoch, w):
        perm = self._perms.get(w)
        if perm is None:
            windows, _ = self._plan(epoch)
            indices = np.concatenate([np.arange(self.starts[s], self.starts[s] + self.row_counts[s])
                                      for s in windows[w]])
            perm = indices[self._rng(int(epoch), w).permutation(len(indices))]
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            self._perms[w] = perm
        return perm

    def index(self, epoch, position):
        """The global index of the document read at `position` (0 <= position < len) of `epoch`."""
        if not self.shuffle:
            return position
        _, window_starts = self._plan(epoch)
        w = bisect.bisect_right(window_starts, position) - 1
        return int(self._window_order(epoch, w)[position - window_starts[w]])

    def epoch_order(self, epoch):
        """All of the epoch's global indices in reading order (tests, small corpora)."""
        return [self.index(epoch, p) for p in range(len(self))]


# ---- Offline built-in corpus: this Python's standard library, cut into documents ----

def _stdlib_files():
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__", "dist-packages"))
        paths.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    return root, sorted(paths)


# A blank line followed by a top-level statement, or by a (method) def/class/decorator at any
# indentation: the natural seams of Python source.
_STATEMENT_START = re.compile(r"\n\n(?=[^\s#]|[ \t]*(?:async def |def |class |@))")


def _merge(pieces, max_chars, sep_chars=0):
    """Consecutive pieces joined by blank lines into documents of up to ~max_chars (blank ones dropped)."""
    docs, current = [], ""
    for piece in pieces:
        if current and len(current) + len(piece) + sep_chars > max_chars:
            docs.append(current)
            current = ""
        current = piece if not current else current + "\n\n" + piece
    docs.append(current)
    return [d for d in docs if d.strip()]


def _split_source(text, max_chars):
    """Cut a module into documents at statement seams, merged up to ~max_chars (a seamless run
    longer than that is cut at line ends). Whole files would make a small-context model see file
    heads forward and file tails backward; short documents are seen whole in both directions."""
    pieces = []
    for piece in _STATEMENT_START.split(text):
        while len(piece) > max_chars:
            cut = piece.rfind("\n", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            pieces.append(piece[:cut])
            piece = piece[cut:].lstrip("\n")
        pieces.append(piece)
    return _merge(pieces, max_chars)


def builtin_documents(max_chars_per_doc=2000):
    root, paths = _stdlib_files()
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (UnicodeDecodeError, OSError):
            continue
        rel = os.path.relpath(path, root)
        for doc in _split_source(text, max_chars_per_doc):
            yield f"# {rel}\n{doc}"


def write_shards(documents, directory, docs_per_shard, start_index=0):
    """Write an iterable of strings as parquet shards; returns the paths written."""
    os.makedirs(directory, exist_ok=True)
    docs = list(documents)
    paths = []
    try:
        for k, first in enumerate(range(0, len(docs), docs_per_shard)):
            path = os.path.join(directory, shard_filename(start_index + k))
            batch = docs[first:first + docs_per_shard]
            atomic_write(path, lambda tmp: pq.write_table(pa.table({"text": batch}), tmp, row_group_size=1024))
            paths.append(path)
    except UserError:  # disk full: no partial corpus whose last shard would pass for validation
        for path in paths:
            os.remove(path)
        raise
    return paths


def write_builtin_corpus(directory=None, docs_per_shard=4000, max_docs=None, overwrite=False):
    directory = directory or data_dir()
    _refuse_existing(directory, overwrite)
    # A fixed shuffle so the validation shard samples the whole library, not its last modules.
    documents = list(builtin_documents())
    random.Random(1234).shuffle(documents)
    paths = write_shards(documents[:max_docs], directory, docs_per_shard)
    if len(paths) < 2:
        raise UserError("the built-in corpus produced fewer than two shards; lower --docs_per_shard")
    return paths


# ---- Built-in English corpus: Shakespeare (public domain), for arrow-of-time studies on English ----

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
BUILTIN_CORPORA = ("stdlib", "shakespeare")


def shakespeare_documents(text, max_chars=1500):
    """Cut the plays into documents of consecutive whole speeches (a speech: "NAME:" then its
    lines, speeches separated by blank lines), merged up to ~max_chars: short dialogue passages,
    read in their order. A speech is never split, so each document begins with a speaker."""
    return _merge([s.strip("\n") for s in re.split(r"\n\s*\n", text) if s.strip()], max_chars, sep_chars=2)


def read_shakespeare(text_file=None, cache_dir=None, url=SHAKESPEARE_URL, max_attempts=5, backoff_s=2.0):
    """The corpus text: `text_file` when given, else a cached download of the public tiny-shakespeare file."""
    if text_file:
        if not os.path.isfile(text_file):
            raise UserError(f"--text_file {text_file} does not exist")
        with open(text_file, encoding="utf-8") as f:
            return f.read()
    cache_dir = cache_dir or os.path.join(get_base_dir(), "corpora")
    path = os.path.join(cache_dir, "tinyshakespeare.txt")
    if not os.path.exists(path):
        os.makedirs(cache_dir, exist_ok=True)
        fetch(url, path, max_attempts, backoff_s, validate=lambda p: open(p, encoding="utf-8").read(1),
               offline_hint="pass --text_file=<a local copy of tinyshakespeare.txt>")
    with open(path, encoding="utf-8") as f:
        return f.read()


def write_shakespeare_corpus(directory=None, text_file=None, docs_per_shard=200, overwrite=False, val_fraction=0.1,
                             keep_order=False):
    """Train shards, then a validation shard holding the *last* 10% of the passages (held-out
    scenes and plays, not passages interleaved with the training text). Train passages are
    shuffled with a fixed seed, or kept in the plays' order (`keep_order`: an ordered corpus)."""
    directory = directory or data_dir()
    _refuse_existing(directory, overwrite)
    docs = shakespeare_documents(read_shakespeare(text_file))
    n_val = max(1, int(len(docs) * val_fraction))
    train, val = docs[:-n_val], docs[-n_val:]
    if not keep_order:
        random.Random(1234).shuffle(train)
    paths = write_shards(train, directory, docs_per_shard)
    paths += write_shards(val, directory, len(val), start_index=len(paths))
    return paths


def _refuse_existing(directory, overwrite):
    existing = list_shards(directory)
    if existing and not overwrite:
        raise UserError(f"{directory} already holds {len(existing)} shard(s); not overwriting. "
                        "Pass --overwrite to replace them, or set NANOCHAT_BASE_DIR elsewhere")
    check_writable(directory, "the data directory")  # before anything is deleted or written
    for path in existing:
        os.remove(path)


# ---- Online download with retries ----

def fetch(url, path, max_attempts, backoff_s, validate, offline_hint):
    """Download `url` to `path` through a temp file, retrying with exponential backoff; `validate`
    reads the temp file so that a truncated download fails here."""
    tmp = path + ".tmp"
    for attempt in range(1, max_attempts + 1):
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
                shutil.copyfileobj(response, f, 1 << 20)
            validate(tmp)
            os.replace(tmp, path)
            return path
        except Exception as e:
            if os.path.exists(tmp):
                os.remove(tmp)
            if attempt == max_attempts:
                raise UserError(f"could not download {url} after {max_attempts} attempts: {e}. Offline? {offline_hint}")
            wait = backoff_s * 2 ** (attempt - 1)
            print(f"download of {url} failed ({e}); retry {attempt}/{max_attempts - 1} in {wait:.0f}s", flush=True)
            time.sleep(wait)


def download_shard(index, directory=None, base_url=DEFAULT_BASE_URL, max_attempts=5, backoff_s=2.0):
    """Fetch one shard; skips shards already present; writes to a temp file then renames."""
    directory = directory or data_dir()
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, shard_filename(index))
    if os.path.exists(path):
        return path
    url = f"{base_url.rstrip('/')}/{shard_filename(index)}"
    return fetch(url, path, max_attempts, backoff_s, validate=pq.ParquetFile,
                  offline_hint="Use `python -m nanochat.dataset --builtin`")


def download_shards(num_shards, directory=None, base_url=DEFAULT_BASE_URL, workers=4, max_attempts=5, backoff_s=2.0):
    if num_shards < 2 and num_shards != -1:
        raise UserError("-n must be at least 2 (the last shard is validation), or -1 for all")
    n = MAX_SHARD + 1 if num_shards == -1 else min(num_shards, MAX_SHARD + 1)
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(download_shard, i, directory, base_url, max_attempts, backoff_s) for i in range(n)]
        from nanochat.progress import progress  # a bar on a terminal, periodic lines in logs
        return [fut.result() for fut in progress(futures, desc="download", unit="shard", min_time_s=0)]


def main(argv=None):
    parser = argparse.ArgumentParser(description="Prepare pretraining shards in $NANOCHAT_BASE_DIR/base_data")
    parser.add_argument("-n", "--num_shards", "--num-shards", type=int, default=None,
                        help="download this many shards (-1 = all); the last one is validation")
    parser.add_argument("--builtin", nargs="?", const="stdlib", default=None, choices=BUILTIN_CORPORA,
                        help="write a built-in corpus: stdlib (this Python's standard library, offline; the "
                             "default) or shakespeare (English plays; --text_file or a cached download)")
    parser.add_argument("--text_file", "--text-file", default=None,
                        help="--builtin=shakespeare: a local copy of tinyshakespeare.txt (no download)")
    parser.add_argument("--keep_order", "--keep-order", action="store_true",
                        help="--builtin=shakespeare: train passages in the plays' order (an ordered corpus)")
    parser.add_argument("--max_docs", "--max-docs", type=int, default=None, help="cap on built-in documents")
    parser.add_argument("--docs_per_shard", "--docs-per-shard", type=int, default=4000)
    parser.add_argument("--overwrite", action="store_true", help="replace existing shards (built-in only)")
    parser.add_argument("--base_url", "--base-url", default=DEFAULT_BASE_URL)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--data_dir", "--data-dir", default=None, help="default: $NANOCHAT_BASE_DIR/base_data")
    prepare_data(**vars(parser.parse_args(argv)))


def prepare_data(num_shards=None, builtin=None, text_file=None, max_docs=None, docs_per_shard=4000, overwrite=False,
                 base_url=DEFAULT_BASE_URL, workers=4, data_dir=None, keep_order=False):
    """The data command: a built-in corpus written offline, or `num_shards` downloaded shards."""
    if (builtin is not None) == (num_shards is not None):
        raise UserError("give exactly one of --builtin (offline corpus) or -n N (download N shards)")
    t0 = time.time()
    if (text_file or keep_order) and builtin != "shakespeare":
        raise UserError("--text_file and --keep_order go with --builtin=shakespeare")
    if builtin == "shakespeare":
        paths = write_shakespeare_corpus(data_dir, text_file, overwrite=overwrite, keep_order=keep_order)
    elif builtin:
        paths = write_builtin_corpus(data_dir, docs_per_shard, max_docs, overwrite)
    else:
        paths = download_shards(num_shards, data_dir, base_url, workers)
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in paths)
    print(f"{len(paths)} shards, {rows} documents in {os.path.dirname(paths[0])} ({time.time() - t0:.1f}s); "
          f"validation shard: {os.path.basename(paths[-1])}")


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
