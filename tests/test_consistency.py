"""nanochat.consistency: per-document bits per byte in both readings, with loss_eval's windows.

Per-document sums add up to evaluate_bpb's totals in each direction (long documents included),
byte counts are the same both ways, the statistics are what they say, and the plot and the
report section are written."""

import json
import os

import numpy as np
import pytest
import torch

from nanochat.consistency import (consistency_record, consistency_stats, markdown_section, per_document_bpb,
                                  write_consistency)
from nanochat.evaluations import list_family, record_path
from nanochat.gpt import GPT, config_for_depth
from nanochat.loss_eval import evaluate_bpb
from nanochat.tokenizer import get_token_bytes

T = 16  # shorter than most documents: several windows per document


@pytest.fixture(scope="module")
def setup(corpus_template, tok):
    docs = tok.encode(corpus_template["val"][:12])
    torch.manual_seed(0)
    model = GPT.build(config_for_depth(1, tok.get_vocab_size(), T), torch.device("cpu"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model.eval()
    token_bytes = get_token_bytes(base_dir=corpus_template["dir"])
    return tok, docs, model, token_bytes, corpus_template["val"][:12]


@pytest.mark.parametrize("trained", ["bidirectional", "forward"])
def test_per_document_sums_match_evaluate_bpb(setup, trained):
    tok, docs, model, token_bytes, texts = setup
    # Every document is longer than T, so each fills its own rows in evaluate_bpb too: equal sums.
    assert min(len(d) for d in docs) > T
    totals = evaluate_bpb(model, tok, token_bytes, docs, ["forward", "backward"], trained, T, 4, torch.device("cpu"))
    per_doc = {}
    for d in ("forward", "backward"):
        nats, nbytes = per_document_bpb(model, tok, token_bytes, docs, trained, d, T, 4, torch.device("cpu"))
        assert len(nats) == len(docs)
        assert sum(nats) == pytest.approx(totals[d]["nats"], rel=1e-6)
        assert sum(nbytes) == totals[d]["bytes"]
        per_doc[d] = (nats, nbytes)
    # Each document's byte count is its UTF-8 size, the same in both readings.
    assert per_doc["forward"][1] == per_doc["backward"][1] == [len(t.encode("utf-8")) for t in texts]


def test_stats():
    s = consistency_stats([1.0, 2.0, 3.0], [1.5, 2.5, 2.0])
    assert s["documents"] == 3
    assert s["mean_abs_diff"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert s["mean_diff"] == pytest.approx(0.0)
    assert s["correlation"] == pytest.approx(np.corrcoef([1, 2, 3], [1.5, 2.5, 2.0])[0, 1])
    same = consistency_stats([1.0, 2.0, 4.0], [1.0, 2.0, 4.0])
    assert same["mean_abs_diff"] == 0.0 and same["correlation"] == pytest.approx(1.0)


def test_record_plot_and_report_section(setup, tmp_path):
    tok, docs, model, token_bytes, _ = setup
    readings = {d: per_document_bpb(model, tok, token_bytes, docs, "bidirectional", d, T, 4, torch.device("cpu"))
                for d in ("forward", "backward")}
    record = consistency_record("bidirectional", readings["forward"], readings["backward"], readings["forward"][1],
                                label="tiny")
    assert record["stats"]["documents"] == len(docs)
    assert record["per_document"]["bpb_forward"][0] == pytest.approx(
        readings["forward"][0][0] / (np.log(2) * readings["forward"][1][0]))
    evaluations = str(tmp_path / "evaluations")
    path = record_path(evaluations, "consistency", 5)
    pair_path = record_path(evaluations, "consistency_pair_bwd", 5)
    write_consistency(path, record, "tiny")
    write_consistency(pair_path, dict(record, kind="pair", label="tiny + bwd"), "pair")
    assert sorted(os.listdir(evaluations)) == ["consistency_pair_bwd_step000005.json", "consistency_pair_bwd_step000005.png",
                                               "consistency_step000005.json", "consistency_step000005.png"]
    assert [(s, p) for s, p, _ in list_family(evaluations, "consistency")] == [(5, None), (5, "pair_bwd")]
    with open(path) as f:
        assert json.load(f)["stats"] == record["stats"]
    plots = str(tmp_path / "report" / "plots")
    text = markdown_section("tiny", evaluations, plots)
    assert "| tiny |" in text and "| tiny + bwd |" in text and f"{record['stats']['mean_abs_diff']:.4f}" in text
    assert sorted(os.listdir(plots)) == ["tiny_consistency_pair_bwd_step000005.png", "tiny_consistency_step000005.png"]
    assert "](tiny_consistency_step000005.png)" in text
    assert markdown_section("tiny", str(tmp_path / "none"), plots) is None
    with pytest.raises(ValueError):
        consistency_record("pair", readings["forward"], ([0.0], [1]), [1])
