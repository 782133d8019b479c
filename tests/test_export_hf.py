"""scripts.export_hf / nanochat.hf_export: a checkpoint exported as a Hugging Face folder loads in
transformers as Qwen3ForCausalLM with the same logits (fp32, max abs diff <= 1e-4) on oriented
sequences of every direction, the same greedy tokens, and a tokenizer with the same ids
(special tokens included). Models are tiny with random weights (the export must be exact for
any weights), one with grouped-query attention."""

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the hf extra is not installed: pip install -e '.[hf]'")

from conftest import make_documents  # noqa: E402
from nanochat.checkpoint_manager import checkpoint_dir_for, save_checkpoint  # noqa: E402
from nanochat.direction import DirectionSpec  # noqa: E402
from nanochat.engine import Engine  # noqa: E402
from nanochat.gpt import GPT, GPTConfig  # noqa: E402


def save_random_model(source, tag, direction, tok, n_head=4, n_kv_head=2, seed=0):
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=tok.get_vocab_size(), sequence_len=64, n_layer=2, n_head=n_head,
                       n_kv_head=n_kv_head, n_embd=64, intermediate_size=128, rope_theta=5000.0, norm_eps=1e-5)
    model = GPT.build(config, "cpu")
    with torch.no_grad():
        for p in model.parameters():  # random everywhere (norm weights too), not the zero-init start
            p.normal_(1.0 if p.ndim == 1 else 0.0, 0.3)
    # The direction goes in as one thing, as the training scripts write it (DirectionSpec.to_meta).
    meta = {"phase": source if source != "sft" else "sft", "model_tag": tag,
            "model_config": config.to_dict(), "vocab_size": tok.get_vocab_size(),
            "direction_spec": DirectionSpec.from_tokenizer(direction, tok).to_meta()}
    save_checkpoint(checkpoint_dir_for(source, tag), 5, model.state_dict(), None, meta)
    return model.eval()


def export(*args):
    from scripts.export_hf import main
    main(list(args))


def test_bidirectional_export_reproduces_logits_and_greedy_tokens(tok, base_dir, tmp_path):
    model = save_random_model("base", "hf_bidi", "bidirectional", tok)
    out = str(tmp_path / "hf_bidi")
    export("--source=base", "--model_tag=hf_bidi", f"--out={out}")
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md"} <= set(os.listdir(out))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == "Qwen3ForCausalLM"
    spec = DirectionSpec.from_tokenizer("bidirectional", tok)
    docs = make_documents(3, seed=4)
    rows = [spec.orient(tok.encode(d)[:40], concrete_direction=c)[0] for d in docs for c in ("forward", "backward")]
    worst = 0.0
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row])
            worst = max(worst, (hf(ids).logits.float() - model(ids)).abs().max().item())
    assert worst <= 1e-4, worst
    engine = Engine(model, tok, {"direction": "bidirectional"})
    for row in rows[:2]:
        ours = engine.generate(row, max_tokens=12, temperature=0.0)[0]
        prompt = torch.tensor([row])
        theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                             eos_token_id=None)[0, len(row):].tolist()
        assert ours == theirs
    config = json.load(open(os.path.join(out, "config.json")))
    fwd, bwd = tok.get_marker_ids()
    assert config["nanochat_direction"] == "bidirectional"
    assert config["nanochat_marker_ids"] == {"forward": fwd, "backward": bwd}
    assert hf.config.nanochat_bos_id == tok.get_bos_token_id()
    assert (hf.config.head_dim, hf.config.num_key_value_heads, hf.config.rms_norm_eps) == (16, 2, 1e-5)
    card = open(os.path.join(out, "README.md")).read()
    assert "Training direction: bidirectional" in card and "ids[::-1]" in card
    # The card's prompting code runs as printed, and agrees with our engine in both directions.
    code = card.split("```python\n")[1].split("```")[0]
    scope = {}
    exec(code, scope)
    for direction in ("forward", "backward"):
        ours = engine.complete("alice reads", direction=direction, max_tokens=6, temperature=0.0)[0]["generated"]
        assert scope["generate"]("alice reads", direction, max_new_tokens=6) == ours


def test_tokenizer_loads_with_the_same_ids(tok, base_dir, tmp_path):
    save_random_model("sft", "hf_bwd", "backward", tok, n_head=2, n_kv_head=2)
    out = str(tmp_path / "hf_bwd")
    export("--source=sft", "--model_tag=hf_bwd", f"--out={out}")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    texts = make_documents(20, seed=9) + ["  indented\n\n\tlines  and   spaces ", "naïve café – ünïcödé 😀 日本語",
                                          "it's 12345 o'clock!!! don't", "x\r\n\r\ny  z", ""]
    for text in texts:
        assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text), text
        assert hf_tok.decode(tok.encode(text)) == text
    for name, i in tok.special_tokens.items():
        assert hf_tok.convert_tokens_to_ids(name) == i
    assert hf_tok.bos_token_id == tok.get_bos_token_id() and len(hf_tok) == tok.get_vocab_size()
    # In HF a special token's spelling in the text is the special token (ours encodes it as text).
    assert hf_tok.encode("<|user_start|>hi", add_special_tokens=False)[0] == tok.encode_special("<|user_start|>")
    config = json.load(open(os.path.join(out, "config.json")))
    generation = json.load(open(os.path.join(out, "generation_config.json")))
    # A backward chat model stops after writing the question (at <|user_start|>) or at BOS.
    assert generation["eos_token_id"] == [tok.encode_special("<|user_start|>"), tok.get_bos_token_id()]
    assert config["nanochat_direction"] == "backward" and config["nanochat_chat_model"] is True
    assert "reversed" in open(os.path.join(out, "README.md")).read()


def test_existing_output_folder_is_not_overwritten(tok, base_dir, tmp_path):
    from nanochat.common import UserError
    save_random_model("base", "hf_fwd", "forward", tok)
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        export("--source=base", "--model_tag=hf_fwd", f"--out={out}")
    assert (out / "notes.txt").read_text() == "mine" and not (out / "config.json").exists()
    export("--source=base", "--model_tag=hf_fwd", f"--out={out}", "--overwrite", "--dtype=bfloat16")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16
    with pytest.raises(UserError, match="--dtype"):
        export("--source=base", "--model_tag=hf_fwd", f"--out={tmp_path / 'x'}", "--dtype=int8")


def test_forward_chat_template_gives_our_prompt_ids(tok, base_dir, tmp_path):
    save_random_model("sft", "hf_chat", "bidirectional", tok, n_head=2, n_kv_head=2)
    out = str(tmp_path / "hf_chat")
    export("--source=sft", "--model_tag=hf_chat", f"--out={out}")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    spec = DirectionSpec.from_tokenizer("bidirectional", tok)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2*3?"},
                {"role": "assistant", "content": "6"}, {"role": "user", "content": "And 3*3?"}]
    text = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert hf_tok.encode(text, add_special_tokens=False) == spec.chat_prompt(tok, {"messages": messages}, "forward")[0]
