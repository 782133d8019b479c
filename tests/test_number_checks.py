"""One range check for the numbers that reach sampling (nanochat.common.check_number /
check_sampling), used by every generating entry point before any model loads, and names matched
in full (a trailing newline is no name). docs/SAFETY.md, "Numbers and names"."""

import math

import pytest

from nanochat.common import UserError, check_number, check_sampling


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -1.0, -1e-9, "0.5", None, True, [1]])
def test_bad_temperatures_are_refused(value):
    with pytest.raises(UserError, match="--temperature"):
        check_sampling(value, 50)


@pytest.mark.parametrize("top_k", [-5, -2, 2.5, math.nan, "3"])
def test_bad_top_k_is_refused(top_k):
    with pytest.raises(UserError, match="--top_k"):
        check_sampling(1.0, top_k)


def test_good_values_pass_unchanged():
    assert check_sampling(0.0, -1) == (0.0, -1) and check_sampling(1.5, 0) == (1.5, 0)
    assert check_number("n", 3.0, 1, 4, integer=True) == 3
    with pytest.raises(UserError, match=r"n=5 is out of range: it must be between 1 and 4"):
        check_number("n", 5, 1, 4)
    with pytest.raises(UserError, match=r"n=1000000000000000000000000000000000000\.\.\. is out of range"):
        check_number("n", 10 ** 400, 1, 4, integer=True)  # no OverflowError, no 400-digit message


SCRIPTS = ["scripts.rerank", "scripts.chat_eval", "scripts.chat_cli", "scripts.direction_eval", "scripts.chat_web"]
EXTRA = {"scripts.rerank": ["--forward_tag=f", "--backward_tag=b", "--num_samples=1"]}


@pytest.mark.parametrize("module", SCRIPTS)
@pytest.mark.parametrize("temperature,message", [("nan", "not nan"), ("inf", "not inf"), ("-1", "out of range")])
def test_every_sampling_entry_point_checks_before_loading(module, temperature, message, tmp_path, monkeypatch):
    """An empty base dir: a check made after loading would say 'no checkpoint' instead."""
    import importlib
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    main = importlib.import_module(module).main
    with pytest.raises(UserError, match=f"--temperature.*{message}"):
        main([f"--temperature={temperature}", "--device_type=cpu"] + EXTRA.get(module, []))
    with pytest.raises(UserError, match="--top_k=-5 is out of range"):
        main(["--top_k=-5", "--device_type=cpu"] + EXTRA.get(module, []))


def test_the_engine_refuses_a_nan_temperature():
    """The library's last line: a caller that skipped the flag check gets the same clear error."""
    from nanochat.engine import Engine
    engine = Engine.__new__(Engine)
    with pytest.raises(UserError, match="temperature must be a finite number"):
        next(Engine._steps(engine, [1, 2], 1, 4, math.nan, None, 0, (), True))


@pytest.mark.parametrize("name", ["nl\n", "a\nb", "x/y", "../x", ".hidden", "", "a" * 129, "tab\t"])
def test_names_are_matched_in_full(name):
    from nanochat.paths import validate_name
    with pytest.raises(UserError):
        validate_name(name)
    assert validate_name("d4_bidi-2.x") == "d4_bidi-2.x"


def test_experiment_ids_and_log_names_are_matched_in_full(tmp_path):
    from nanochat.experiment_config import ExperimentConfig
    from nanochat.research_logger import ResearchLogger
    with pytest.raises(UserError):
        ExperimentConfig.validate_id("exp\n")
    with pytest.raises(UserError):
        ResearchLogger(str(tmp_path), phase="base\n")
