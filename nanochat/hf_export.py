"""Export a checkpoint to a Hugging Face folder that `transformers` loads as Qwen3ForCausalLM.

The GPT (nanochat/gpt.py) already has Qwen3's layout and parameter names (docs/DESIGN.md §11), so
the state dict is copied as is and only the config has to say the same numbers. The folder holds
model.safetensors, config.json (with nanochat_* fields: direction, marker ids, BOS, chat tokens),
generation_config.json, a `tokenizers` tokenizer.json with the same ids, and a model card saying
how to prompt a backward or bidirectional model (docs/QUICKSTART.md, "Export").
"""

import json
import os

import torch

from nanochat.common import UserError
from nanochat.direction import CONCRETE_DIRECTIONS, DirectionSpec
from nanochat.paths import atomic_write, atomic_write_text, check_writable
from nanochat.phases import CHAT_PHASES

EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---- tokenizer ----------------------------------------------------------------------------------
def byte_to_unicode():
    """The byte-level alphabet of GPT-2 style BPE: every byte maps to one printable character
    (printable ASCII and Latin-1 map to themselves, the rest to code points from 256 up)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    mapping = {b: chr(b) for b in keep}
    mapping.update({b: chr(256 + i) for i, b in enumerate(b for b in range(256) if b not in keep)})
    return mapping


def bpe_merges(mergeable_ranks):
    """Merges equivalent to tiktoken's rank-ordered BPE: for each token (by rank), every split
    into two tokens of the vocabulary, ordered by the merged token's rank and then by the parts'
    ranks. tiktoken merges the adjacent pair whose result has the lowest rank; so does a BPE
    whose merge list is sorted by the result's rank."""
    merges = []
    for token, rank in sorted(mergeable_ranks.items(), key=lambda kv: kv[1]):
        local = []
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in mergeable_ranks and right in mergeable_ranks:
                local.append((mergeable_ranks[left], mergeable_ranks[right], left, right))
        merges += [(left, right) for _, _, left, right in sorted(local)]
    return merges


def tokenizer_json(tokenizer):
    """The `tokenizers` JSON of our tokenizer: same ids for every token and special token."""
    b2u = byte_to_unicode()
    as_text = lambda token: "".join(b2u[b] for b in token)  # noqa: E731
    vocab = {as_text(token): rank for token, rank in tokenizer.mergeable_ranks.items()}
    merges = [[as_text(a), as_text(b)] for a, b in bpe_merges(tokenizer.mergeable_ranks)]
    added = [{"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True}
             for name, i in sorted(tokenizer.special_tokens.items(), key=lambda kv: kv[1])]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        # Split on our regex first (tiktoken's pre-tokenisation), then map bytes to the alphabet.
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": tokenizer.pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        # ignore_merges: a piece that is itself a token is taken whole, as tiktoken does.
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": vocab, "merges": merges},
    }


# ---- config ---------------------------------------------------------------------------------------
# Where a chat turn written in each concrete direction ends (docs/DESIGN.md §5).
CHAT_STOPS = {"forward": "<|assistant_end|>", "backward": "<|user_start|>"}


def stop_token_ids(tokenizer, spec, chat):
    """Where generation ends in the model's orientation: BOS, and for a chat model CHAT_STOPS."""
    stops = [tokenizer.get_bos_token_id()]
    if chat:
        for concrete in spec.generation_directions():
            stops.insert(0, tokenizer.encode_special(CHAT_STOPS[concrete]))
    return stops


def qwen3_config(model_config, tokenizer, meta, dtype_name="float32"):
    c, spec, chat = model_config, DirectionSpec.for_model(meta, tokenizer), meta.get("phase") in CHAT_PHASES
    markers = dict(zip(CONCRETE_DIRECTIONS, tokenizer.get_marker_ids())) if tokenizer.has_direction_markers() else None
    chat_ids = {name: i for name, i in tokenizer.special_tokens.items()
                if name not in ("<|bos|>", "<|forward|>", "<|backward|>")}
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": c.vocab_size,
        "hidden_size": c.n_embd,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "num_key_value_heads": c.n_kv_head,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": c.sequence_len,
        "rms_norm_eps": c.norm_eps,
        # Both spellings: transformers 4.x reads rope_theta, 5.x rope_parameters.
        "rope_theta": c.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": c.n_layer,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": tokenizer.get_bos_token_id(),
        "eos_token_id": stop_token_ids(tokenizer, spec, chat),
        # No pad id: BOS would be the natural one, but transformers masks pad ids it finds in an
        # unmasked prompt, and every prompt starts with BOS. Pass attention_mask when batching.
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
        # nanochat-direction's own fields (transformers keeps unknown config keys as attributes).
        "nanochat_direction": spec.direction,
        "nanochat_marker_ids": markers,
        "nanochat_bos_id": tokenizer.get_bos_token_id(),
        "nanochat_chat_token_ids": chat_ids,
        "nanochat_chat_model": chat,
        "nanochat_checkpoint": {"phase": meta.get("phase"), "model_tag": meta.get("model_tag"), "step": meta.get("step")},
    }


# A forward chat prompt in transformers' chat-template form: the same ids as our rendering
# (tokenizer.render_for_completion), a system message merged into the first user turn. Only the
# forward direction can be a template: a backward prompt reverses token ids, not text.
CHAT_TEMPLATE = (
    "{{- '<|bos|>' -}}{%- if nanochat_marker is defined and nanochat_marker -%}<|forward|>{%- endif -%}"
    "{%- set ns = namespace(prefix='') -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{%- set ns.prefix = m['content'] + '\n\n' -%}"
    "{%- elif m['role'] == 'user' -%}<|user_start|>{{- ns.prefix + m['content'] -}}<|user_end|>{%- set ns.prefix = '' -%}"
    "{%- elif m['role'] == 'assistant' -%}<|assistant_start|>{{- m['content'] -}}<|assistant_end|>"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant_start|>{%- endif -%}"
)


# ---- model card -----------------------------------------------------------------------------------
# The card (nanochat/hf_card.md) spells out DirectionSpec's reversal in its `generate` for a user who has
# transformers but not this package; tests/test_export_hf.py runs it as printed and checks it generates
# what our Engine does.
DIRECTION_TEXT = {
    "forward": "Give it the beginning of a text; it continues it (an ordinary language model).",
    "backward": "It was trained on token sequences reversed document by document: give it the *ending* "
                "of a text, reversed, and it writes what comes *before* it, right to left.",
    "bidirectional": "It was trained on both: each document forward after `<|forward|>` or reversed after "
                     "`<|backward|>`. The marker right after BOS chooses the direction.",
}

USAGE = {
    "forward": 'generate("Once upon a time", "forward")',
    "backward": 'generate("and they lived happily ever after.", "backward")   # writes what precedes it',
    "bidirectional": 'generate("Once upon a time", "forward")\ngenerate("happily ever after.", "backward")',
}


def model_card(model_config, tokenizer, meta, folder):
    direction = DirectionSpec.for_model(meta, tokenizer).direction
    chat = meta.get("phase") in CHAT_PHASES
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_card.md"), encoding="utf-8") as f:
        card, chat_text = f.read().split("<!-- the chat section, for chat checkpoints -->\n")
    return card.format(
        name=meta.get("model_tag") or "nanochat-direction model", direction=direction, phase=meta.get("phase"),
        step=meta.get("step"), n_layer=model_config.n_layer, n_embd=model_config.n_embd,
        context=model_config.sequence_len, direction_text=DIRECTION_TEXT[direction],
        bos=tokenizer.get_bos_token_id(), folder=folder,
        usage="```python\n" + USAGE[direction] + "\n```\n",
        chat_text=chat_text if chat else "This is a base checkpoint: it has not been trained on conversations.\n")


# ---- the export -----------------------------------------------------------------------------------
def check_export(out_dir, dtype="float32", overwrite=False):
    """Refuse an unknown --dtype, or an --out that is a file, lies under a file, cannot be written, or
    is a non-empty folder (unless overwrite): one clear line, before the model is loaded or anything written."""
    if dtype not in EXPORT_DTYPES:
        raise UserError(f"--dtype={dtype!r}: use one of {', '.join(EXPORT_DTYPES)}")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out={out_dir} is a file, not a folder: choose another --out")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise UserError(f"{out_dir} exists and is not empty: choose another --out or pass --overwrite")
    check_writable(out_dir, "the export folder")


def export(model, tokenizer, meta, out_dir, dtype="float32", overwrite=False):
    """Write the folder; refuses a non-empty `out_dir` unless overwrite. Returns the file list.
    A failed write (disk full) removes the files this export wrote: no half export is left."""
    from safetensors.torch import save_file
    check_export(out_dir, dtype, overwrite)
    state = {k.removeprefix("_orig_mod."): v.detach().to("cpu", EXPORT_DTYPES[dtype]).contiguous()
             for k, v in model.state_dict().items()}
    cfg = qwen3_config(model.config, tokenizer, meta, dtype)
    bos = tokenizer.get_bos_token_id()
    specials = {"bos_token": "<|bos|>", "eos_token": "<|bos|>", "pad_token": "<|bos|>", "additional_special_tokens":
                [n for n in sorted(tokenizer.special_tokens, key=tokenizer.special_tokens.get) if n != "<|bos|>"]}
    files = {
        "config.json": cfg,
        "generation_config.json": {"bos_token_id": bos, "eos_token_id": cfg["eos_token_id"], "do_sample": True,
                                   "temperature": 0.8, "top_k": 50},
        "tokenizer.json": tokenizer_json(tokenizer),
        "tokenizer_config.json": {"tokenizer_class": "PreTrainedTokenizerFast", **specials,
                                  "model_max_length": model.config.sequence_len, "add_bos_token": False,
                                  "clean_up_tokenization_spaces": False},
        "special_tokens_map.json": specials,
    }
    spec = DirectionSpec.for_model(meta, tokenizer)
    if meta.get("phase") in CHAT_PHASES and "forward" in spec.generation_directions():
        # The template writes BOS, then <|forward|> exactly when the spec's forward header has a marker.
        marker = len(spec.header("forward")) > 1
        files["tokenizer_config.json"]["chat_template"] = CHAT_TEMPLATE.replace(
            "nanochat_marker is defined and nanochat_marker", "true" if marker else "false")
    written = []
    try:
        for name, content in files.items():
            written.append(name)
            atomic_write_text(os.path.join(out_dir, name), json.dumps(content, indent=2, ensure_ascii=False))
        written.append("model.safetensors")
        atomic_write(os.path.join(out_dir, "model.safetensors"),
                     lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
        written.append("README.md")
        atomic_write_text(os.path.join(out_dir, "README.md"), model_card(model.config, tokenizer, meta, out_dir))
    except BaseException:
        for name in written:
            if os.path.exists(os.path.join(out_dir, name)):
                os.remove(os.path.join(out_dir, name))
        raise
    return written
