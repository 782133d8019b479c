"""Tests for nanochat.dataset: shards, splits, global indices, the built-in corpus, downloads."""

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat.common import UserError
from nanochat.dataset import (
    DocumentSource,
    data_dir,
    download_shard,
    list_shards,
    shard_filename,
    split_shards,
    write_builtin_corpus,
    write_shards,
)


def read_all(paths):
    return [t for p in paths for t in pq.read_table(p).column("text").to_pylist()]


@pytest.fixture
def small_data(tmp_path):
    """Three shards of 4, 3 and 2 documents: train = 7 docs, val = 2."""
    d = str(tmp_path / "data")
    docs = [f"doc {i}" for i in range(9)]
    write_shards(docs[:4], d, 4)
    write_shards(docs[4:7], d, 3, start_index=1)
    write_shards(docs[7:], d, 2, start_index=2)
    return d, docs


# ---- splits ---------------------------------------------------------------------------------

def test_last_shard_is_validation(small_data):
    d, docs = small_data
    shards = list_shards(d)
    assert [os.path.basename(p) for p in shards] == [shard_filename(i) for i in range(3)]
    assert split_shards("val", d) == shards[-1:]
    assert split_shards("train", d) == shards[:-1]
    assert [t for _, t in DocumentSource("val", d).iter_from()] == docs[7:]
    assert [t for _, t in DocumentSource("train", d).iter_from()] == docs[:7]


def test_base_dir_corpus_split(base_dir, corpus_template):
    assert [t for _, t in DocumentSource("val").iter_from()] == corpus_template["val"]
    assert len(DocumentSource("train")) == len(corpus_template["train"])
    assert data_dir() == os.path.join(base_dir, "base_data")


def test_unknown_split_is_user_error(small_data):
    with pytest.raises(UserError):
        split_shards("test", small_data[0])


@pytest.mark.parametrize("n_shards", [0, 1])
def test_too_few_shards_is_user_error_mentioning_builtin(tmp_path, n_shards):
    d = str(tmp_path / "data")
    if n_shards:
        write_shards(["only"], d, 10)
    with pytest.raises(UserError) as e:
        DocumentSource("train", d)
    assert "--builtin" in str(e.value)


def test_missing_dir_is_user_error_mentioning_builtin(tmp_path):
    with pytest.raises(UserError) as e:
        split_shards("train", str(tmp_path / "does_not_exist"))
    assert "--builtin" in str(e.value)


def test_empty_shard_is_user_error(tmp_path):
    d = str(tmp_path / "data")
    write_shards(["a", "b"], d, 2)
    pq.write_table(pa.table({"text": pa.array([], type=pa.string())}), os.path.join(d, shard_filename(1)))
    with pytest.raises(UserError) as e:
        DocumentSource("val", d)
    assert "empty" in str(e.value)


def test_shard_without_text_column_is_user_error(tmp_path):
    d = str(tmp_path / "data")
    write_shards(["a", "b"], d, 2)
    bad = os.path.join(d, shard_filename(1))
    pq.write_table(pa.table({"content": ["x", "y"]}), bad)
    with pytest.raises(UserError) as e:
        list(DocumentSource("val", d).iter_from())
    assert "'text'" in str(e.value) and bad in str(e.value)


def test_text_column_of_wrong_type_is_user_error(tmp_path):
    d = str(tmp_path / "data")
    write_shards(["a", "b"], d, 2)
    bad = os.path.join(d, shard_filename(1))
    pq.write_table(pa.table({"text": pa.array([1, 2], type=pa.int64())}), bad)
    with pytest.raises(UserError) as e:
        list(DocumentSource("val", d).iter_from())
    assert bad in str(e.value)


def test_non_utf8_text_is_user_error(tmp_path):
    d = str(tmp_path / "data")
    write_shards(["a", "b"], d, 2)
    bad = os.path.join(d, shard_filename(1))
    pq.write_table(pa.table({"text": pa.array([b"ok", b"\xff\xfe"], type=pa.binary())}), bad)
    source = DocumentSource("val", d)
    with pytest.raises(UserError) as e:
        source.get(0)
    assert "UTF-8" in str(e.value) and "row 1" in str(e.value)


def test_binary_column_with_valid_utf8_is_decoded(tmp_path):
    d = str(tmp_path / "data")
    write_shards(["a", "b"], d, 2)
    pq.write_table(pa.table({"text": pa.array(["é".encode(), b"x"], type=pa.binary())}), os.path.join(d, shard_filename(1)))
    assert [t for _, t in DocumentSource("val", d).iter_from()] == ["é", "x"]


def test_unreadable_shard_is_user_error(tmp_path):
    d = str(tmp_path / "data")
    write_shards(["a", "b"], d, 2)
    with open(os.path.join(d, shard_filename(1)), "wb") as f:
        f.write(b"not a parquet file")
    with pytest.raises(UserError):
        DocumentSource("val", d)


# ---- global indices -------------------------------------------------------------------------

def test_global_index_get_and_iter_from_agree(small_data):
    d, docs = small_data
    source = DocumentSource("train", d)
    assert len(source) == 7
    pairs = list(source.iter_from())
    assert pairs == [(i, docs[i]) for i in range(7)]
    for i in range(7):
        assert source.get(i) == docs[i]
    assert source.get(7) == docs[0]  # wraps around (epochs)


# ---- built-in corpus ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def builtin_dirs(tmp_path_factory):
    a = str(tmp_path_factory.mktemp("builtin_a"))
    b = str(tmp_path_factory.mktemp("builtin_b"))
    pa_ = write_builtin_corpus(a, docs_per_shard=100, max_docs=300)
    pb_ = write_builtin_corpus(b, docs_per_shard=100, max_docs=300)
    return a, pa_, b, pb_


def test_builtin_corpus_writes_shards(builtin_dirs):
    a, paths, _, _ = builtin_dirs
    assert len(paths) >= 2
    assert paths == list_shards(a)
    texts = read_all(paths)
    assert len(texts) == 300
    assert all(isinstance(t, str) and t.strip() for t in texts)
    assert all(t.startswith("# ") for t in texts)  # each document names its module
    assert len(DocumentSource("train", a)) + len(DocumentSource("val", a)) == 300
    assert not [f for f in os.listdir(a) if ".tmp" in f]


def test_builtin_corpus_is_deterministic(builtin_dirs):
    a, pa_, b, pb_ = builtin_dirs
    assert [os.path.basename(p) for p in pa_] == [os.path.basename(p) for p in pb_]
    assert read_all(pa_) == read_all(pb_)


def test_builtin_corpus_refuses_to_overwrite(builtin_dirs, tmp_path):
    a, paths, _, _ = builtin_dirs
    before = read_all(paths)
    with pytest.raises(UserError) as e:
        write_builtin_corpus(a, docs_per_shard=100, max_docs=300)
    assert "overwrite" in str(e.value)
    assert read_all(list_shards(a)) == before


def test_builtin_corpus_overwrite_replaces(tmp_path):
    d = str(tmp_path / "data")
    write_shards([f"old {i}" for i in range(5)], d, 1)  # five stale shards
    paths = write_builtin_corpus(d, docs_per_shard=50, max_docs=100, overwrite=True)
    assert list_shards(d) == paths and len(paths) == 2
    assert not any(t.startswith("old ") for t in read_all(paths))


# ---- download -------------------------------------------------------------------------------

@pytest.fixture
def remote(tmp_path):
    """A local directory served through file:// holding shards 0 and 1."""
    d = str(tmp_path / "remote")
    write_shards([f"remote {i}" for i in range(4)], d, 2)
    return d


def test_download_shard_from_file_url(remote, tmp_path):
    dest = str(tmp_path / "dest")
    path = download_shard(1, dest, base_url="file://" + remote, backoff_s=0)
    assert path == os.path.join(dest, shard_filename(1))
    assert read_all([path]) == ["remote 2", "remote 3"]
    assert sorted(os.listdir(dest)) == [shard_filename(1)]  # no temp file left


def test_download_shard_skips_existing(remote, tmp_path):
    dest = str(tmp_path / "dest")
    write_shards(["local"], dest, 1)  # shard_00000 already present
    path = download_shard(0, dest, base_url="file://" + remote, backoff_s=0)
    assert read_all([path]) == ["local"]


def test_download_missing_shard_fails_after_retries(remote, tmp_path, capsys):
    dest = str(tmp_path / "dest")
    with pytest.raises(UserError) as e:
        download_shard(7, dest, base_url="file://" + remote, max_attempts=3, backoff_s=0)
    assert shard_filename(7) in str(e.value) and "3 attempts" in str(e.value)
    assert capsys.readouterr().out.count("retry") == 2
    assert os.listdir(dest) == []


def test_download_corrupt_shard_fails(remote, tmp_path):
    with open(os.path.join(remote, shard_filename(5)), "wb") as f:
        f.write(b"PAR1 truncated")
    dest = str(tmp_path / "dest")
    with pytest.raises(UserError):
        download_shard(5, dest, base_url="file://" + remote, max_attempts=2, backoff_s=0)
    assert os.listdir(dest) == []


# ---- built-in English corpus (Shakespeare) --------------------------------------------------

def _plays(n_speeches=300):
    """A generated text in tiny-shakespeare's format: "NAME:" then lines; blank line between speeches."""
    names = ["ROMEO", "JULIET", "First Citizen", "MENENIUS"]
    return "\n\n".join(f"{names[i % 4]}:\nSpeech {i} begins here,\nand speech {i} ends here." for i in range(n_speeches)) + "\n"


def test_shakespeare_documents_are_whole_speeches_in_order():
    from nanochat.dataset import shakespeare_documents
    text = _plays()
    docs = shakespeare_documents(text, max_chars=300)
    assert all(len(d) <= 300 for d in docs)
    assert all(d.split("\n")[0].endswith(":") for d in docs)  # every document starts with a speaker
    assert "\n\n".join(docs) == text.strip("\n")  # nothing lost, nothing reordered


def test_shakespeare_corpus_from_text_file_holds_out_the_last_passages(tmp_path):
    from nanochat.dataset import shakespeare_documents, write_shakespeare_corpus
    src = tmp_path / "plays.txt"
    src.write_text(_plays())
    d = str(tmp_path / "data")
    paths = write_shakespeare_corpus(d, text_file=str(src), docs_per_shard=20)
    docs = shakespeare_documents(_plays())
    val = read_all(paths[-1:])
    assert val == docs[-len(val):] and len(val) == max(1, int(len(docs) * 0.1))
    assert sorted(read_all(paths[:-1])) == sorted(docs[:-len(val)])
    with pytest.raises(UserError):  # never overwrite silently
        write_shakespeare_corpus(d, text_file=str(src))
    assert read_all(paths[:-1]) != docs[:-len(val)]  # shuffled when built, by default
    ordered = write_shakespeare_corpus(str(tmp_path / "ordered"), text_file=str(src), docs_per_shard=20,
                                       keep_order=True)
    assert read_all(ordered[:-1]) == docs[:-len(val)] and read_all(ordered[-1:]) == val  # the plays' order


def test_shakespeare_download_path_uses_file_url_and_cache(tmp_path):
    from nanochat.dataset import read_shakespeare
    src = tmp_path / "remote.txt"
    src.write_text(_plays(10))
    cache = str(tmp_path / "cache")
    assert read_shakespeare(cache_dir=cache, url="file://" + str(src), backoff_s=0) == _plays(10)
    src.unlink()  # now served from the cache
    assert read_shakespeare(cache_dir=cache, url="file://" + str(src), backoff_s=0) == _plays(10)
    with pytest.raises(UserError) as e:
        read_shakespeare(cache_dir=str(tmp_path / "other"), url="file://" + str(src), max_attempts=1)
    assert "--text_file" in str(e.value)


def test_dataset_cli_builtin_shakespeare(tmp_path):
    from nanochat.dataset import main
    src = tmp_path / "plays.txt"
    src.write_text(_plays())
    d = str(tmp_path / "data")
    main(["--builtin=shakespeare", "--text_file", str(src), "--data_dir", d])
    assert len(list_shards(d)) >= 2
    with pytest.raises(UserError):
        main(["--builtin", "--text_file", str(src), "--data_dir", str(tmp_path / "x")])
