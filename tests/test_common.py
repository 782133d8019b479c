"""nanochat.common: the base dir."""

import pytest

from nanochat.common import UserError


def test_base_dir_that_is_a_file_is_one_clear_error(tmp_path, monkeypatch):
    from nanochat.common import get_base_dir
    path = tmp_path / "file"
    path.write_text("x")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(path))
    with pytest.raises(UserError, match="is a file, not a directory"):
        get_base_dir()
