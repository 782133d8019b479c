"""The reversal curse from pretraining (Berglund et al., 2023): facts stated one way, asked both ways.

    python -m scripts.reversal_eval --out_dir=/tmp/reversal --num_facts=100 --num_iterations=600
    python -m scripts.reversal_eval --out_dir=/tmp/mine --facts_file=facts.jsonl

In a fresh base directory, fictitious facts (seeded, or --facts_file) become pretraining documents,
each stated in one order only (half name-first, half description-first); forward, backward and
bidirectional base experiments are trained on them through scripts.run_backward_experiment, and every
fact is asked both ways. One table (model x query direction x subset x question x method) is printed, written to each
model's evaluations/reversal_step<N>.json, and shown with its bar chart in the report
<out_dir>/reports/reversal/report.md. The questions and methods: docs/EVALUATION.md.
"""

import argparse
import json
import os
import random
import shutil
import sys

from nanochat.common import UserError, add_flag, compute_init, print0, run_main
from nanochat.direction import CONCRETE_DIRECTIONS, DIRECTIONS, DirectionSpec, orient_text_tokens, parse_directions
from nanochat.experiment_config import ExperimentConfig
from nanochat.rerank import pick_credit
from nanochat.research.reversal import SUBSETS, build_table, markdown_table

SLOTS = ("{name}", "{description}")
TEMPLATES = {"name_first": "{name} is {description}.", "description_first": "{description} is {name}."}
SYLLABLES = "ka lo mi ra zu te vin dor bel sha nor qui fen tal mar ros gil pa ul bri cor dax eth fy".split()
ROLES = "inventor composer founder keeper mapmaker author painter builder guardian discoverer".split()
ADJECTIVES = "silver hidden frozen crimson silent golden hollow ancient bitter northern velvet broken".split()
NOUNS = "lamp harp tower river garden engine mirror compass lantern bridge orchard clock".split()


def build_parser():
    p = argparse.ArgumentParser(description="The reversal curse from pretraining: train base models on one-way "
                                "facts and ask them both ways (docs/EVALUATION.md)")
    add_flag(p, "out_dir", default="", help="base directory of the benchmark (default: $NANOCHAT_BASE_DIR/reversal)")
    add_flag(p, "facts_file", default="", help="jsonl: name, description, subset (name_first | description_first), "
             "optional phrasings and questions with {name}/{description} slots (default: generated facts)")
    add_flag(p, "num_facts", type=int, default=100, help="generated facts, half per subset")
    add_flag(p, "background_docs", type=int, default=0, help="built-in documents mixed in (0: the facts only)")
    add_flag(p, "copies", type=int, default=1, help="times each fact document is written, each copy in its own "
             "order (base_train reads a fresh order every epoch, so one copy is enough: docs/EVALUATION.md)")
    add_flag(p, "models", default="forward,backward,bidirectional", help="directions to train (tags reversal_<dir>)")
    add_flag(p, "model_tags", default="", help="evaluate these existing base models in --out_dir instead of training")
    add_flag(p, "k", type=int, default=10, help="candidates per ranking question (chance = 1/K)")
    add_flag(p, "depth", type=int, default=2)
    add_flag(p, "max_seq_len", type=int, default=64)
    add_flag(p, "device_batch_size", type=int, default=8)
    add_flag(p, "num_iterations", type=int, default=600)
    add_flag(p, "vocab_size", type=int, default=512)
    add_flag(p, "max_new_tokens", type=int, default=24, help="greedy generation budget per question")
    add_flag(p, "seed", type=int, default=42, help="facts, candidates and model init")
    add_flag(p, "device_type", default="")
    add_flag(p, "overwrite", action="store_true", help="replace existing results (models in --out_dir are reused)")
    return p


# ---- facts --------------------------------------------------------------------------------------
def generate_facts(n, seed):
    """n fictitious facts, alternately name-first and description-first, names and descriptions unique."""
    rng, names, descriptions = random.Random(f"reversal_eval/{seed}"), {}, {}  # dicts: unique, in order
    word = lambda syllables: "".join(rng.choice(SYLLABLES) for _ in range(syllables)).capitalize()  # noqa: E731
    while len(names) < n:
        names[f"{word(2)} {word(rng.choice((2, 3)))}"] = None
    while len(descriptions) < n:
        descriptions[f"the {rng.choice(ROLES)} of the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"] = None
    return [{"name": a, "description": d, "subset": SUBSETS[i % 2]}
            for i, (a, d) in enumerate(zip(names, descriptions))]


def _first_slot(template):
    return min(SLOTS, key=template.index)


def check_facts(facts, where="facts"):
    """Fill in default phrasings and questions; one UserError for the first bad fact."""
    for i, f in enumerate(facts, 1):
        def bad(msg):
            raise UserError(f"{where}: fact {i}: {msg}")
        if not isinstance(f, dict) or not all(isinstance(f.get(k), str) and f[k].strip()
                                              for k in ("name", "description")):
            bad("needs non-empty string fields 'name' and 'description'")
        if f.get("subset") not in SUBSETS:
            bad(f"subset must be one of {', '.join(SUBSETS)}, not {f.get('subset')!r}")
        f.setdefault("phrasings", [TEMPLATES[f["subset"]]])
        f.setdefault("questions", list(TEMPLATES.values()))
        for key in ("phrasings", "questions"):
            if not f[key] or any(not isinstance(t, str) or any(t.count(s) != 1 for s in SLOTS) for t in f[key]):
                bad(f"'{key}' must be a non-empty list of strings with {{name}} and {{description}} once each")
        if any(_first_slot(t) != "{" + f["subset"].split("_")[0] + "}" for t in f["phrasings"]):
            bad(f"a {f['subset']} fact is stated in that order only: every phrasing must put that slot first")
    for key in ("name", "description"):
        if len({f[key] for f in facts}) != len(facts):
            raise UserError(f"{where}: every fact needs its own {key} (duplicates make ranking ambiguous)")
    return facts


def load_facts(path):
    def parse(n, line):
        try:
            return json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: not JSON ({e})")
    with open(path) as fh:
        return check_facts([parse(n, line) for n, line in enumerate(fh, 1) if line.strip()], path)


def fill(text, fact):
    return text.replace("{name}", fact["name"]).replace("{description}", fact["description"])


def split_at(template, fact, slot):
    """(text before, entity with the space before it, text after) of the filled template around `slot`."""
    before, after = template.split(slot, 1)
    before, after = fill(before, fact), fill(after, fact)
    space = " " if before.endswith(" ") else ""
    return before[:len(before) - len(space)], space + fact[slot[1:-1]], after


# ---- questions ----------------------------------------------------------------------------------
def questions(facts, k, seed):
    """Every (fact, template, query direction): forward asks the later slot, backward the earlier one;
    `same` if that is the entity training put second. Candidates: it + K-1 of the subset, fixed."""
    out = []
    for i, f in enumerate(facts):
        trained_second = "{description}" if f["subset"] == "name_first" else "{name}"
        for kind, templates in (("held-in", f["phrasings"]), ("question", f["questions"])):
            for j, t in enumerate(templates):
                for query in CONCRETE_DIRECTIONS:
                    slot = max(SLOTS, key=t.index) if query == "forward" else _first_slot(t)
                    pool = [g[slot[1:-1]] for g in facts if g["subset"] == f["subset"] and g is not f]
                    others = random.Random(f"{seed}/{i}/{kind}/{j}/{slot}").sample(pool, k - 1)
                    question = kind if kind == "held-in" else ("same" if slot == trained_second else "reversed")
                    out.append({"fact": i, "subset": f["subset"], "query": query, "question": question,
                                "template": t, "slot": slot, "candidates": [f[slot[1:-1]]] + others})
    return out


def _rows(tokenizer, spec, template, fact, slot, candidates, reading, whole):
    """One row per candidate in `slot`, in `reading`; the mask covers the candidate or (whole) all text."""
    before, entity, after = split_at(template, fact, slot)
    space = entity[:len(entity) - len(entity.lstrip())]
    rows = []
    for c in candidates:
        pieces = [tokenizer.encode(x) if x else [] for x in (before, space + c, after)]
        mask = [int(whole or i == 1) for i, piece in enumerate(pieces) for _ in piece]
        header = spec.header(reading)
        rows.append((header + orient_text_tokens(pieces[0] + pieces[1] + pieces[2], reading),
                     [0] * len(header) + orient_text_tokens(mask, reading)))
    return rows


def evaluate_model(model, tokenizer, spec, facts, qs, device, max_new_tokens, batch_size=64):
    """Records (query direction, subset, question, method, fact, value) in the directions the model
    reads. Whole text scores the forward questions' texts (the answer last) in every reading."""
    from nanochat.chat_eval_lib import sequence_logprobs
    from nanochat.engine import Engine
    engine, readable = Engine(model, tokenizer, spec=spec), spec.generation_directions()
    records, rows = [], []
    for q in qs:
        f, key = facts[q["fact"]], (q["subset"], q["question"], q["fact"])
        if q["query"] in readable:
            before, entity, after = split_at(q["template"], f, q["slot"])
            given = before if q["query"] == "forward" else after
            text = engine.complete(given, direction=q["query"], max_tokens=max_new_tokens, temperature=0.0)[0]
            records.append((q["query"], *key[:2], "generation", key[2], float(entity.strip() in text["generated"])))
            records.append((q["query"], *key[:2], "rank_conditional", key[2], None))
            rows += _rows(tokenizer, spec, q["template"], f, q["slot"], q["candidates"], q["query"], False)
        if q["query"] == "forward":
            for reading in readable:
                records.append((reading, *key[:2], "rank_whole_text", key[2], None))
                rows += _rows(tokenizer, spec, q["template"], f, q["slot"], q["candidates"], reading, True)
    longest = max(len(ids) for ids, _ in rows)
    if longest > model.config.sequence_len + 1:
        raise UserError(f"a question of {longest} tokens does not fit the model's {model.config.sequence_len}-token "
                        "context: train with a larger --max_seq_len")
    scores, k = sequence_logprobs(model, rows, device, batch_size), len(qs[0]["candidates"])
    ranked = iter(pick_credit(scores[i:i + k], [1.0] + [0.0] * (k - 1)) for i in range(0, len(scores), k))
    return [r if r[-1] is not None else r[:-1] + (next(ranked),) for r in records]


# ---- data and models ----------------------------------------------------------------------------
def write_corpus(facts, copies, background_docs, seed):
    """base_data/: every phrasing of every fact `copies` times, each copy in its own order (+ built-in
    documents); the validation shard only feeds base_train's bpb line."""
    from nanochat.dataset import builtin_documents, data_dir, write_shards
    rng, once = random.Random(seed), [fill(t, f) for f in facts for t in f["phrasings"]]
    docs, val = [d for _ in range(copies) for d in rng.sample(once, len(once))], once[:max(1, len(once) // 10)]
    if background_docs:
        background = list(builtin_documents())
        random.Random(1234).shuffle(background)
        val, docs = background[:max(1, background_docs // 10)], docs + background[:background_docs]
        rng.shuffle(docs)
    write_shards(docs, data_dir(), len(docs))
    write_shards(val, data_dir(), len(val), start_index=1)


TRAIN_FLAGS = ("max_seq_len", "device_batch_size", "num_iterations", "seed", "device_type")


def train_models(args, directions):
    """One base experiment per direction through the orchestrator (a training log, so the report can show
    it); an experiment that finished earlier is reused."""
    from scripts import run_backward_experiment
    for direction in directions:
        flags = dict(phase="base", direction=direction, depth=args.depth, experiment_id=f"reversal_{direction}",
                     eval_directions="none", total_batch_size=-1, eval_every=-1, sample_every=-1,
                     eval_tokens=args.device_batch_size * args.max_seq_len, log_every=max(1, args.num_iterations // 4),
                     **{k: getattr(args, k) for k in TRAIN_FLAGS})
        run_backward_experiment.main([f"--{k}={v}" for k, v in flags.items() if v != ""])


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.k < 2:
        raise UserError(f"--k={args.k}: ranking needs at least 2 candidates (chance = 1/K)")
    for name in ("num_facts", "copies", "depth", "max_seq_len", "device_batch_size", "num_iterations", "vocab_size",
                 "max_new_tokens", "background_docs"):
        if getattr(args, name) < (name != "background_docs"):
            raise UserError(f"--{name} must be {'>= 0' if name == 'background_docs' else 'positive'}")
    from nanochat.common import get_base_dir
    out_dir = os.path.abspath(args.out_dir or os.path.join(get_base_dir(), "reversal"))
    facts = load_facts(args.facts_file) if args.facts_file else check_facts(generate_facts(args.num_facts, args.seed))
    for subset in SUBSETS:
        n = sum(f["subset"] == subset for f in facts)
        if n < args.k:
            raise UserError(f"subset {subset} has {n} facts, fewer than --k={args.k} candidates (all from the same "
                            "subset): add facts or lower --k")
    directions = parse_directions(args.models, DIRECTIONS) if not args.model_tags else []
    saved = os.path.join(out_dir, "reversal_facts.jsonl")
    facts_text = "".join(json.dumps(f, sort_keys=True) + "\n" for f in facts)
    if os.path.exists(saved) and open(saved).read() != facts_text:
        raise UserError(f"{out_dir} was built with other facts ({saved}): use a fresh --out_dir")
    previous = os.environ.get("NANOCHAT_BASE_DIR")
    os.environ["NANOCHAT_BASE_DIR"] = out_dir  # every stage below reads its base directory from here
    try:
        return run(args, out_dir, facts, directions, saved, facts_text)
    finally:
        os.environ.pop("NANOCHAT_BASE_DIR") if previous is None else os.environ.update(NANOCHAT_BASE_DIR=previous)


def run(args, out_dir, facts, directions, saved, facts_text):
    from nanochat.checkpoint_manager import artifact_dirs, load_model, resolve_checkpoint
    from nanochat.evaluations import record_path, refuse_existing, write_record
    tags = [t.strip() for t in args.model_tags.split(",") if t.strip()] or [f"reversal_{d}" for d in directions]
    if args.model_tags:
        found = [resolve_checkpoint("base", t) for t in tags]  # an unknown tag: one clear error, before any work
    else:
        from nanochat.checkpoint_manager import SOURCE_DIRS
        for tag in tags:
            if os.path.isdir(os.path.join(out_dir, SOURCE_DIRS["base"], tag)):
                raise UserError(f"{out_dir} holds a plain base run {tag} (made by an older reversal_eval): use a "
                                "fresh --out_dir, or evaluate those models with --model_tags")
        os.makedirs(out_dir, exist_ok=True)
        if not os.path.isdir(os.path.join(out_dir, "base_data")):
            write_corpus(facts, args.copies, args.background_docs, args.seed)
        with open(saved, "w") as fh:
            fh.write(facts_text)
        if not os.path.exists(os.path.join(out_dir, "tokenizer", "tokenizer.json")):
            from scripts import tok_train
            tok_train.main([f"--vocab_size={args.vocab_size}"])
        train_models(args, directions)
        found = [resolve_checkpoint("base", t) for t in tags]
    paths = [record_path(artifact_dirs("base", tag)["evaluations"], "reversal", step) for _, step, tag in found]
    refuse_existing(paths, args.overwrite)
    report_dir = os.path.join(out_dir, "reports", "reversal")
    if os.path.exists(report_dir) and not args.overwrite:
        raise UserError(f"{report_dir} already exists; pass --overwrite to replace it")
    _, _, _, _, device = compute_init(args.device_type)
    qs, per_model = questions(facts, args.k, args.seed), []
    for _, step, tag in found:
        model, tokenizer, meta = load_model("base", device, model_tag=tag, step=step)
        spec = DirectionSpec.for_model(meta, tokenizer)
        per_model.append((tag, spec.direction, evaluate_model(model, tokenizer, spec, facts, qs, device,
                                                              args.max_new_tokens)))
    rows = build_table(per_model, args.k)
    print0(f"\nreversal curse: {len(facts)} facts, each stated one way in pretraining, asked both ways\n\n"
           + markdown_table(rows, args.k))
    record = {"eval": "reversal", "k": args.k, "chance": 1 / args.k, "facts": len(facts), "seed": args.seed,
              "facts_file": args.facts_file or None, "out_dir": out_dir, "rows": rows,
              "models": {tag: step for _, step, tag in found}}
    for path in paths:
        write_record(path, record, section="nanochat.research.reversal")
        print0(f"wrote {path}")
    if all(ExperimentConfig().exists(tag) for tag in tags):  # the report needs their training logs
        from nanochat.research.report import generate_research_report
        shutil.rmtree(report_dir, ignore_errors=True)  # only reached with --overwrite when it exists
        print0(f"report: {generate_research_report(tags, output_dir=report_dir, title='The reversal curse')}")
    else:
        print0("no report: the models are not experiments (scripts.run_backward_experiment makes them)")
    return record


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
