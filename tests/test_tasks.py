"""Tasks: synthetic two-way tasks, Hub loaders on local fixtures, mixtures, rewards, rendering.

Nothing here touches the network: `datasets.load_dataset` is wrapped so that only the local
builders (json, parquet) run; any Hub name raises ConnectionError at once, as it would offline
(after ~25 s of retries). The `datasets` cache goes to a temporary directory.
"""

import json
import os
import time

import pytest

from nanochat.common import UserError
from tasks.arc import ARC
from tasks.arithmetic import TwoWayArithmetic, first_integer, first_product_expression
from tasks.common import TaskMixture
from tasks.gsm8k import GSM8K, final_number
from tasks.hub import DATA_DIR_ENV
from tasks.mmlu import MMLU
from tasks.registry import PHASES, TASKS, check_task_direction, default_mixture, get_task
from tasks.reversal import ReversalFacts, make_facts, mentions

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "tasks")
HUB_TASKS = ("gsm8k", "arc_easy", "arc_challenge", "mmlu", "smoltalk")
HUB_IDS = {"gsm8k": "openai/gsm8k", "arc_easy": "allenai/ai2_arc", "arc_challenge": "allenai/ai2_arc",
           "mmlu": "cais/mmlu", "smoltalk": "HuggingFaceTB/smol-smoltalk"}


@pytest.fixture(autouse=True)
def offline_datasets(tmp_path, monkeypatch):
    """Local builders only, cache in tmp_path, no data dir from the environment."""
    import datasets
    import datasets.config
    real_load = datasets.load_dataset
    hub_calls = []

    def load_dataset(path, *args, **kwargs):
        if path in ("json", "parquet"):
            return real_load(path, *args, **kwargs)
        hub_calls.append((path, args, kwargs))
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets_cache"))
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    return hub_calls


def fixture_task(name, split="test", **kwargs):
    return get_task(name, split, data_files=os.path.join(FIXTURES, name), **kwargs)


def conv(question, answer):
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def as_key(example):
    return json.dumps(example, sort_keys=True)


# ---- slicing, sequences, mixtures ---------------------------------------------------------------
def test_slicing_and_len():
    full = TwoWayArithmetic(size=10)
    assert len(full) == 10 and [full[i] for i in range(10)] == list(full)
    part = TwoWayArithmetic(size=10, start=2, stop=8, step=2)
    assert len(part) == 3
    assert [part[i] for i in range(3)] == [full[2], full[4], full[6]]
    assert part[-1] == full[6]
    with pytest.raises(IndexError):
        part[3]
    assert len(TwoWayArithmetic(size=10, start=8, stop=100)) == 2
    assert len(TwoWayArithmetic(size=10, start=12)) == 0
    assert len(TwoWayArithmetic(size=0)) == 0


def test_mixture_determinism_and_coverage():
    tasks = [TwoWayArithmetic(size=50), ReversalFacts(size=10)]
    m1, m2 = TaskMixture(tasks, seed=3), TaskMixture(tasks, seed=3)
    assert list(m1) == list(m2)
    assert list(TaskMixture(tasks, seed=4)) != list(m1)
    # Every example of every task exactly once, and really shuffled together.
    assert sorted(map(as_key, m1)) == sorted(map(as_key, list(tasks[0]) + list(tasks[1])))
    assert list(m1)[:50] != list(tasks[0])


@pytest.mark.parametrize("phase", PHASES)
def test_default_mixture(phase):
    mix = default_mixture(phase, "forward", "train")
    again = default_mixture(phase, "forward", "train")
    assert len(mix) > 0 and [as_key(e) for e in mix] == [as_key(e) for e in again]
    assert {t.name for t in mix.tasks} == {"arithmetic", "reversal"}
    assert sorted(map(as_key, mix)) == sorted(as_key(e) for t in mix.tasks for e in t)
    # The data does not depend on the direction (orientation comes later, nanochat.direction).
    for direction in ("backward", "bidirectional"):
        assert [mix[i] for i in range(20)] == [default_mixture(phase, direction, "train")[i] for i in range(20)]
    # The test split probes the facts the train split taught.
    test = default_mixture(phase, "forward", "test")
    train_facts = next(t for t in mix.tasks if t.name == "reversal").facts
    test_facts = next(t for t in test.tasks if t.name == "reversal").facts
    assert train_facts == test_facts and len(test) < len(mix)


def test_default_mixture_errors():
    with pytest.raises(UserError, match="phase"):
        default_mixture("pretrain", "forward")
    with pytest.raises(UserError, match="direction"):
        default_mixture("sft", "sideways")
    with pytest.raises(UserError, match="split"):
        default_mixture("sft", "forward", "validation")


def test_get_task_unknown():
    with pytest.raises(UserError, match="unknown task 'nope'.*arithmetic"):
        get_task("nope")
    assert set(TASKS) == {"arithmetic", "arithmetic_unseen", "reversal", "gsm8k", "arc_easy", "arc_challenge", "mmlu",
                          "smoltalk"}


# ---- arithmetic ---------------------------------------------------------------------------------
def test_arithmetic_examples_deterministic_and_splits_disjoint():
    a = TwoWayArithmetic("train", size=200, seed=1)
    assert list(a) == list(TwoWayArithmetic("train", size=200, seed=1))
    # Example i does not depend on the size (nor on slicing): a pure function of (split, seed, i).
    assert TwoWayArithmetic("train", size=1000, seed=1)[150] == a[150]
    assert list(TwoWayArithmetic("train", size=200, seed=2)) != list(a)
    assert list(TwoWayArithmetic("test", size=200, seed=1)) != list(a)
    # Separate seed streams, not separate problems: with a wide factor range the two splits
    # share problems only by chance (300 x 300 draws from ~1e6 problems: about 0.1 expected).
    wide_train = {e["messages"][0]["content"] for e in TwoWayArithmetic("train", 300, seed=0, max_factor=999)}
    wide_test = {e["messages"][0]["content"] for e in TwoWayArithmetic("test", 300, seed=0, max_factor=999)}
    assert len(wide_train & wide_test) <= 2
    for e in a:
        x, y = first_product_expression(e["messages"][0]["content"])
        assert 2 <= x <= 12 and 2 <= y <= 12
        assert e["messages"][0]["content"] == f"What is {x}*{y}?" and e["messages"][1]["content"] == str(x * y)


def test_arithmetic_constructor_errors():
    with pytest.raises(UserError, match="min_factor"):
        TwoWayArithmetic(min_factor=1)
    with pytest.raises(UserError, match="split"):
        TwoWayArithmetic("validation")


def test_arithmetic_forward_reward():
    task = TwoWayArithmetic()
    c = conv("What is 7*8?", "56")
    assert task.generation_directions == ("forward", "backward")
    for right in ["56", " 56", "56.", "56, because 7*8 is 56", "The answer is 56"]:
        assert task.reward(c, right, "forward") == 1.0, right
    for wrong in ["54", "-56", "5 6", "560", "7*8", "", "no idea", "٥٦", None, "9" * 5000, "\x00\xff"]:
        assert task.reward(c, wrong, "forward") == 0.0, repr(wrong)[:40]


def test_arithmetic_backward_reward():
    task = TwoWayArithmetic()
    c = conv("What is 4*6?", "24")
    accepted = ["What is 4*6?", "4*6", "6*4", " 6 * 4 ", "What is 3*8?", "2*12", "12 x 2", "8×3",
                "What is 3*8.", "what is 2 X 12?"]
    for text in accepted:
        assert task.reward(c, text, "backward") == 1.0, text
    rejected = ["What is 1*24?", "24*1", "5*5", "2*3*4", "-4*-6", "-4*6", "4.0*6", "4*6.5", "What is 24?",
                "5*5 or 4*6",  # only the first expression counts: guessing many earns nothing
                "", "garbage ***", None, "9" * 5000 + "*2", "2*" + "9" * 30, "0x18", "0*24"]
    for text in rejected:
        assert task.reward(c, text, "backward") == 0.0, repr(text)[:40]


def test_arithmetic_reward_direction_errors():
    task = TwoWayArithmetic()
    with pytest.raises(UserError, match="forward, backward"):
        task.reward(conv("What is 2*3?", "6"), "6", "bidirectional")
    with pytest.raises(UserError, match="unknown direction"):
        task.reward(conv("What is 2*3?", "6"), "6", "sideways")


def test_number_parsers():
    assert first_integer("x = -12 and 5") == -12
    assert first_integer("none") is None and first_integer(None) is None and first_integer(3) is None
    assert first_product_expression("so 3 * 5 = 15") == [3, 5]
    assert first_product_expression("2*3*4") == [2, 3, 4]
    assert first_product_expression("nothing") is None


# ---- reversal facts ------------------------------------------------------------------------------
def test_reversal_facts_are_unique_and_seeded():
    facts = make_facts(300, seed=0)
    assert len({n for n, _ in facts}) == 300 and len({d for _, d in facts}) == 300
    assert make_facts(50, seed=0) == facts[:50]          # prefix-stable
    assert make_facts(50, seed=1) != facts[:50]
    with pytest.raises(UserError, match="at most"):
        make_facts(100_000)


def test_reversal_trained_one_way_tested_both():
    train, test = ReversalFacts("train", size=20), ReversalFacts("test", size=20)
    assert train.facts == test.facts
    assert len(train) == 60 and len(test) == 40
    train_questions = {e["messages"][0]["content"] for e in train}
    for e in train:
        name, description = train.facts[e["fact"]]
        assert e["probe"] == "train" and e["question_entity"] == name
        assert name in e["messages"][0]["content"]
        assert e["messages"][1]["content"] == f"{name} is {description}."   # name first, always
    probes = {"as_trained": 0, "reversed": 0}
    for e in test:
        name, description = test.facts[e["fact"]]
        probes[e["probe"]] += 1
        question, answer = (m["content"] for m in e["messages"])
        if e["probe"] == "as_trained":
            assert (e["question_entity"], e["answer_entity"]) == (name, description)
            assert question in train_questions                   # asked as it was taught
        else:
            assert (e["question_entity"], e["answer_entity"]) == (description, name)
            assert question not in train_questions               # never seen in training
            assert question == f"Who is {description}?" and answer == f"{name}."
        # The given side never contains what is to be written, in either direction.
        assert not mentions(question, e["answer_entity"]) and not mentions(answer, e["question_entity"])
    assert probes == {"as_trained": 20, "reversed": 20}


def test_reversal_description_first_swaps_probes():
    train = ReversalFacts("train", size=5, direction_of_training="description_first")
    test = ReversalFacts("test", size=5, direction_of_training="description_first")
    name, description = train.facts[0]
    assert train[0]["messages"][1]["content"] == f"{description[0].upper() + description[1:]} is {name}."
    reversed_probe = next(e for e in test if e["probe"] == "reversed" and e["fact"] == 0)
    assert reversed_probe["messages"][0]["content"] == f"Who is {name}?"
    with pytest.raises(UserError, match="direction_of_training"):
        ReversalFacts(direction_of_training="both")


def test_reversal_rewards():
    test = ReversalFacts("test", size=3)
    name, description = test.facts[1]
    as_trained, reversed_probe = test[2], test[3]
    assert test.reward(reversed_probe, f"That was {name}.", "forward") == 1.0
    assert test.reward(reversed_probe, f"that was {name.upper()}", "forward") == 1.0
    assert test.reward(reversed_probe, test.facts[0][0], "forward") == 0.0
    assert test.reward(reversed_probe, name.split()[0], "forward") == 0.0   # half a name is not the name
    assert test.reward(as_trained, description, "forward") == 1.0
    assert test.reward(as_trained, f"{name} is   {description.upper()}", "forward") == 1.0
    # Backward: the model was given the answer and wrote the question.
    assert test.reward(reversed_probe, f"Who is {description}?", "backward") == 1.0
    assert test.reward(reversed_probe, f"Who is {name}?", "backward") == 0.0
    assert test.reward(as_trained, f"Who is {name}?", "backward") == 1.0
    for garbage in ["", None, "((((", "\x00"]:
        assert test.reward(reversed_probe, garbage, "forward") == 0.0
    assert not mentions("Tam Velor", "Tam Vel") and mentions("Tam  vel!", "Tam Vel")


# ---- Hub loaders on local fixtures -------------------------------------------------------------
def test_gsm8k_fixture():
    task = fixture_task("gsm8k")
    assert len(task) == 3 and task.eval_type == "generative" and task.generation_directions == ("forward",)
    e = task[0]
    assert e["messages"][0]["content"].startswith("Mira buys 3 packs")
    solution = e["messages"][1]["content"]
    assert "<<" not in solution and solution.endswith("#### 26") and "3*12 = 36 pencils" in solution
    assert task.reward(e, "She has 26 pencils left.\n#### 26", "forward") == 1.0
    assert task.reward(e, "36 - 10 = 26", "forward") == 1.0            # no ####: the last number
    assert task.reward(e, "#### 26.0", "forward") == 1.0
    assert task.reward(e, "#### 25", "forward") == 0.0
    assert task.reward(e, "26 ... #### 36", "forward") == 0.0
    assert task.reward(e, "garbage", "forward") == 0.0 and task.reward(e, None, "forward") == 0.0
    assert task.reward(task[2], "He has $3,150 left. #### $3,150", "forward") == 1.0
    assert len(fixture_task("gsm8k", "train")) == 3
    assert final_number("#### -4") == final_number("-4.00") and final_number("x") is None


def test_arc_fixtures():
    easy, challenge = fixture_task("arc_easy"), fixture_task("arc_challenge")
    assert easy.name == "arc_easy" and challenge.name == "arc_challenge"
    assert easy.eval_type == challenge.eval_type == "categorical"
    assert len(easy) == len(challenge) == 4
    e = easy[0]
    assert e["choices"] == ["A", "B", "C", "D"] and e["answer"] == 0 and e["choice_texts"][0] == "light energy"
    user = e["messages"][0]["content"]
    assert user.startswith("Which form of energy") and "\nA. light energy\nB. sound energy" in user
    assert e["messages"][1]["content"] == "A"
    # Digit labels ("1".."3") are rendered as letters; the answer index follows the label.
    digits = easy[2]
    assert digits["choices"] == ["A", "B", "C"] and digits["answer"] == 2 and digits["messages"][1]["content"] == "C"
    assert easy[3]["choices"] == list("ABCDE") and easy[3]["messages"][1]["content"] == "D"
    assert easy.reward(e, "A", "forward") == 1.0 and easy.reward(e, "The answer is A.", "forward") == 1.0
    assert easy.reward(e, "B", "forward") == 0.0 and easy.reward(e, "", "forward") == 0.0
    assert challenge[0] == {**easy[3], "subset": "ARC-Challenge"}
    with pytest.raises(UserError, match="cannot be generated backward"):
        easy.reward(e, "A", "backward")


def test_mmlu_fixture():
    task = fixture_task("mmlu")
    assert len(task) == 3 and task.eval_type == "categorical"
    e = task[1]
    assert e["answer"] == 2 and e["choices"] == ["A", "B", "C", "D"] and e["subject"] == "college_biology"
    assert e["messages"][0]["content"].startswith("The following is a multiple choice question about college biology.")
    assert "C. mitochondrion" in e["messages"][0]["content"] and e["messages"][1]["content"] == "C"
    assert task.reward(e, "C", "forward") == 1.0 and task.reward(e, "A", "forward") == 0.0
    with pytest.raises(UserError, match="mmlu has no split"):
        get_task("mmlu", "train", data_files=os.path.join(FIXTURES, "mmlu"))


def test_smoltalk_fixture():
    task = fixture_task("smoltalk")
    assert len(task) == 3 and task.generation_directions == ()
    e = task[1]
    assert [m["role"] for m in e["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert e["messages"][-1] == {"role": "assistant", "content": "Rome."}
    with pytest.raises(UserError, match="smoltalk has no reward"):
        task.reward(e, "Rome", "forward")


def test_data_dir_from_environment(monkeypatch, offline_datasets):
    monkeypatch.setenv(DATA_DIR_ENV, FIXTURES)
    for name in HUB_TASKS:
        assert len(get_task(name, "test")) >= 3
    assert offline_datasets == []       # nothing went to the Hub


def test_parquet_and_file_arguments(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [json.loads(line) for line in open(os.path.join(FIXTURES, "mmlu", "test.jsonl"))]
    shard_dir = tmp_path / "mmlu"
    shard_dir.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), shard_dir / "test-00000-of-00001.parquet")  # Hub shard naming
    from_parquet = MMLU("test", data_files=str(shard_dir))
    from_json = MMLU("test", data_files=os.path.join(FIXTURES, "mmlu", "test.jsonl"))
    assert list(from_parquet) == list(from_json)
    glob_files = GSM8K("test", data_files=os.path.join(FIXTURES, "gsm8k", "te*.jsonl"))
    list_files = GSM8K("test", data_files=[os.path.join(FIXTURES, "gsm8k", "test.jsonl")])
    assert list(glob_files) == list(list_files)


def test_local_data_errors(tmp_path):
    with pytest.raises(UserError, match="matches no file"):
        GSM8K("test", data_files=str(tmp_path / "missing.jsonl"))
    with pytest.raises(UserError, match="no files for split 'test'"):
        GSM8K("test", data_files=str(tmp_path))
    with pytest.raises(UserError, match="not found"):
        GSM8K("test", data_files=[str(tmp_path / "missing.jsonl")])
    with pytest.raises(UserError, match="lacks column.*answer"):
        GSM8K("test", data_files=os.path.join(FIXTURES, "smoltalk"))
    bad = tmp_path / "test.csv"
    bad.write_text("question,answer\n")
    with pytest.raises(UserError, match=r"\.jsonl"):
        GSM8K("test", data_files=str(bad))
    broken = tmp_path / "test.jsonl"
    broken.write_text("{not json\n")
    with pytest.raises(UserError, match="could not read"):
        GSM8K("test", data_files=str(broken))
    with pytest.raises(UserError, match="ARC has no subset"):
        ARC("ARC-Hard", "test", data_files=str(tmp_path))
    with pytest.raises(UserError, match="gsm8k has no split"):
        GSM8K("validation")


@pytest.mark.parametrize("name", HUB_TASKS)
def test_failed_online_load_is_user_error(name, offline_datasets):
    t0 = time.time()
    with pytest.raises(UserError) as info:
        get_task(name, "test")
    assert time.time() - t0 < 5
    message = str(info.value)
    assert HUB_IDS[name] in message and "data_files" in message and DATA_DIR_ENV in message
    assert f"{name}/test.jsonl" in message and "ConnectionError" in message
    assert offline_datasets and offline_datasets[0][0] == HUB_IDS[name]


def test_failed_online_load_names_the_empty_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(UserError, match=f"nothing for it under \\${DATA_DIR_ENV}"):
        GSM8K("test")


# ---- directions and rendering --------------------------------------------------------------------
def test_check_task_direction():
    gsm8k, arithmetic = fixture_task("gsm8k"), TwoWayArithmetic(size=1)
    with pytest.raises(UserError) as info:
        check_task_direction(gsm8k, "backward")
    assert str(info.value) == ("task gsm8k cannot be generated backward: it declares only forward (a backward "
                               "model needs a task whose beginning can be verified, e.g. arithmetic)")
    assert check_task_direction(gsm8k, "forward") == ["forward"]
    assert check_task_direction(gsm8k, "bidirectional") == ["forward"]
    assert check_task_direction(arithmetic, "backward") == ["backward"]
    assert check_task_direction(arithmetic, "bidirectional") == ["forward", "backward"]
    assert check_task_direction(ReversalFacts(size=1), "backward") == ["backward"]
    with pytest.raises(UserError, match="cannot be generated backward"):
        check_task_direction(fixture_task("mmlu"), "backward")
    with pytest.raises(UserError, match="smoltalk has no reward"):
        check_task_direction(fixture_task("smoltalk"), "bidirectional")
    with pytest.raises(UserError, match="unknown direction"):
        check_task_direction(arithmetic, "sideways")


def test_every_task_renders(base_dir):
    from nanochat.direction import DirectionSpec
    from nanochat.tokenizer import get_tokenizer
    tok = get_tokenizer(base_dir)
    tasks = [TwoWayArithmetic(size=3), ReversalFacts("train", size=2), ReversalFacts("test", size=2)]
    tasks += [fixture_task(name) for name in HUB_TASKS]
    specs = {d: DirectionSpec.from_tokenizer(d, tok) for d in ("forward", "backward", "bidirectional")}
    for task in tasks:
        for i in range(len(task)):
            example = task[i]
            ids, mask = tok.render_conversation(example)
            assert len(ids) == len(mask) and ids[0] == tok.get_bos_token_id() and sum(mask) > 0
            assert example["messages"][-1]["content"] in tok.decode(ids)
            for direction, spec in specs.items():
                row, row_mask, concrete = spec.conversation_row(tok, example, doc_index=i)
                assert len(row) == len(row_mask) and sum(row_mask) > 0
                back, back_mask, _ = spec.restore_conversation(row, row_mask)
                assert back == ids
            if len(example["messages"]) == 2:   # a single exchange: either side can be generated
                for concrete in task.generation_directions:
                    prompt, stops = specs["bidirectional"].chat_prompt(tok, example, concrete)
                    assert prompt[0] == tok.get_bos_token_id() and stops
