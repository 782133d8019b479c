"""nanochat.progress: a tqdm bar on a terminal, plain periodic lines otherwise, silent off rank 0."""

import io

from nanochat.progress import progress


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_plain_lines_when_not_a_terminal(monkeypatch):
    monkeypatch.delenv("NANOCHAT_PROGRESS", raising=False)
    out = io.StringIO()
    items = list(progress(range(4), desc="download", unit="shard", interval_s=0, stream=out, min_time_s=0))
    assert items == [0, 1, 2, 3]
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("download: 1/4 shards (25%)") and "elapsed" in lines[0]
    assert lines[-1].startswith("download: 4/4 shards (100%)") and len(lines) == 5  # 4 updates + close
    assert "\r" not in out.getvalue()


def test_plain_lines_are_rate_limited_and_counters_work(monkeypatch):
    monkeypatch.delenv("NANOCHAT_PROGRESS", raising=False)
    out = io.StringIO()
    with progress(total=1000, desc="bpb", unit="doc", interval_s=3600, stream=out, min_time_s=0) as bar:
        for _ in range(100):
            bar.update(10)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bpb: 1000/1000 docs (100%)")


def test_tqdm_bar_on_a_terminal(monkeypatch):
    monkeypatch.delenv("NANOCHAT_PROGRESS", raising=False)
    out = FakeTerminal()
    assert sum(progress(range(5), desc="rollouts", stream=out, min_time_s=0)) == 10
    text = out.getvalue()
    assert "\r" in text and "rollouts: 100%" in text and "5/5" in text


def test_environment_overrides_and_other_ranks_are_silent(monkeypatch):
    out = io.StringIO()
    monkeypatch.setenv("NANOCHAT_PROGRESS", "off")
    assert list(progress([1, 2], stream=out, interval_s=0)) == [1, 2] and out.getvalue() == ""
    monkeypatch.delenv("NANOCHAT_PROGRESS")
    monkeypatch.setenv("RANK", "1")
    assert list(progress([1, 2], stream=FakeTerminal(), interval_s=0)) == [1, 2]
    terminal = FakeTerminal()
    list(progress([1], stream=terminal))
    assert terminal.getvalue() == ""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("NANOCHAT_PROGRESS", "plain")
    plain = FakeTerminal()
    list(progress([1], stream=plain, desc="x", min_time_s=0))
    assert plain.getvalue().startswith("x: 1/1 it")


def test_short_steps_stay_quiet(monkeypatch):
    """A step shorter than min_time_s prints nothing, in either mode (a quick eval in a loop)."""
    monkeypatch.delenv("NANOCHAT_PROGRESS", raising=False)
    plain, terminal = io.StringIO(), FakeTerminal()
    assert list(progress(range(3), stream=plain, interval_s=0, min_time_s=60)) == [0, 1, 2]
    assert list(progress(range(3), stream=terminal, min_time_s=60)) == [0, 1, 2]
    assert plain.getvalue() == "" and terminal.getvalue() == ""


def test_shard_download_reports_progress(tmp_path, capsys, monkeypatch):
    """nanochat.dataset.download_shards through file:// reports through nanochat.progress."""
    monkeypatch.delenv("NANOCHAT_PROGRESS", raising=False)
    from nanochat.dataset import download_shards, write_shards
    remote = str(tmp_path / "remote")
    write_shards([f"doc {i}" for i in range(6)], remote, 2)
    paths = download_shards(3, str(tmp_path / "dest"), base_url="file://" + remote, workers=2, backoff_s=0)
    assert len(paths) == 3
    assert "download: 3/3 shards (100%)" in capsys.readouterr().out
