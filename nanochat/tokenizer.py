"""BPE tokenizer: trained with rustbpe, encoded with tiktoken, saved without pickles.

One tokenizer serves all three directions: it holds the markers <|forward|> and <|backward|>
(docs/DESIGN.md §1), and models reverse token ids, never characters. Its merges are fitted to
forward text, or as a control to reversed text or both (train_direction, kept in tokenizer.json).

On disk ($NANOCHAT_BASE_DIR/tokenizer/):
    tokenizer.json      split pattern, special tokens -> ids, vocab size
    ranks.tiktoken      the merges, one "base64(token bytes) rank" per line (tiktoken's format)
    token_bytes.npy     UTF-8 byte length of every token id, 0 for special tokens (for bpb)
"""

import base64
import hashlib
import json
import os

import numpy as np

from nanochat.common import UserError, get_base_dir
from nanochat import conversation as chat_template

# GPT-4's (cl100k) pre-tokenisation pattern: contractions, words with one optional leading
# non-letter, numbers of up to three digits, punctuation runs, newlines and other whitespace.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)

SPECIAL_TOKENS = [
    "<|bos|>",               # document delimiter, first token of every document in every direction
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",   # tool call made by the assistant
    "<|output_start|>", "<|output_end|>",   # tool output returned to the assistant
    "<|forward|>", "<|backward|>",         # direction markers of bidirectional models
]


TRAIN_DIRECTIONS = ("forward", "backward", "both")


def _texts_for_direction(texts, train_direction):
    from nanochat.direction import reverse_text
    for text in texts:
        if train_direction != "backward":
            yield text
        if train_direction != "forward":
            yield reverse_text(text)


def tokenizer_dir(base_dir=None):
    return os.path.join(base_dir or get_base_dir(), "tokenizer")


class Tokenizer:
    def __init__(self, mergeable_ranks, special_tokens, pattern=SPLIT_PATTERN, train_direction="forward"):
        import tiktoken
        self.pattern = pattern
        self.mergeable_ranks = mergeable_ranks
        self.special_tokens = dict(special_tokens)
        self.train_direction = train_direction  # the text the merges were fitted to (TRAIN_DIRECTIONS)
        self._fingerprint = None
        self.enc = tiktoken.Encoding(name="nanochat", pat_str=pattern, mergeable_ranks=mergeable_ranks,
                                     special_tokens=self.special_tokens)

    # ---- training and persistence -------------------------------------------------------
    @classmethod
    def train_from_iterator(cls, text_iterator, vocab_size, special_tokens=SPECIAL_TOKENS, train_direction="forward"):
        """Fit the merges to the texts (forward), to them with characters reversed (backward), or to
        both: the tokenizer control of docs/DESIGN.md §2 (docs/EVALUATION.md)."""
        import rustbpe
        if train_direction not in TRAIN_DIRECTIONS:
            raise UserError(f"--train_direction={train_direction!r}: use one of {', '.join(TRAIN_DIRECTIONS)}")
        text_iterator = _texts_for_direction(text_iterator, train_direction)
        n_merge_vocab = vocab_size - len(special_tokens)
        if n_merge_vocab < 256:
            raise UserError(f"--vocab_size={vocab_size} is too small: it needs 256 byte tokens plus "
                            f"{len(special_tokens)} special tokens")
        bpe = rustbpe.Tokenizer()
        bpe.train_from_iterator(text_iterator, n_merge_vocab, pattern=SPLIT_PATTERN)
        ranks = {bytes(k): v for k, v in bpe.get_mergeable_ranks()}
        if len(ranks) < n_merge_vocab:
            print(f"warning: the training text only supported {len(ranks)} of the {n_merge_vocab} requested "
                  f"non-special tokens; the vocabulary is smaller than --vocab_size", flush=True)
        offset = len(ranks)
        specials = {name: offset + i for i, name in enumerate(special_tokens)}
        return cls(ranks, specials, pattern=bpe.get_pattern(), train_direction=train_direction)

    def save(self, directory):
        """The three files, each through paths.atomic_write, nested so that every file is written
        to its temporary name before any is renamed: a full or read-only disk leaves the previous
        tokenizer (or nothing) and no temporary file. tokenizer.json, renamed last, records the
        fingerprint the loader checks the other two against."""
        from nanochat.paths import atomic_write, check_writable
        check_writable(directory, "the tokenizer directory")
        meta = {"pattern": self.pattern, "special_tokens": self.special_tokens, "vocab_size": self.get_vocab_size(),
                "train_direction": self.train_direction, "fingerprint": self.fingerprint()}

        def write_ranks(path):
            with open(path, "w") as f:
                for token, rank in sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1]):
                    f.write(f"{base64.b64encode(token).decode()} {rank}\n")

        def write_token_bytes(path):
            with open(path, "wb") as f:  # a file object: np.save would append ".npy" to a temporary name
                np.save(f, self.token_byte_lengths())
            atomic_write(os.path.join(directory, "ranks.tiktoken"), write_ranks)

        def write_meta(path):
            with open(path, "w") as f:
                json.dump(meta, f, indent=2)
            atomic_write(os.path.join(directory, "token_bytes.npy"), write_token_bytes)
        atomic_write(os.path.join(directory, "tokenizer.json"), write_meta)

    @classmethod
    def load(cls, directory):
        """Read and verify the three files (docs/SAFETY.md): any defect is one UserError naming the
        file and the rebuild command, at load time rather than after training steps ran."""
        meta_path = os.path.join(directory, "tokenizer.json")
        if not os.path.exists(meta_path):
            raise UserError(f"no tokenizer in {directory}: train one with `python -m scripts.tok_train`")
        retrain = "rebuild it with `python -m scripts.tok_train --overwrite` (and retrain models that used the old one)"
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            specials, pattern = meta["special_tokens"], meta["pattern"]
            if not isinstance(specials, dict) or not isinstance(pattern, str):
                raise TypeError("special_tokens must be an object and pattern a string")
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"tokenizer file {meta_path} is corrupt ({type(e).__name__}: {e}); {retrain}") from None
        ranks = {}
        ranks_path = os.path.join(directory, "ranks.tiktoken")
        if not os.path.exists(ranks_path):
            raise UserError(f"tokenizer in {directory} is incomplete ({ranks_path} is missing); {retrain}")
        with open(ranks_path, "rb") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        tok, rank = line.split()
                        ranks[base64.b64decode(tok, validate=True)] = int(rank)
                    except ValueError:
                        raise UserError(f"tokenizer file {ranks_path} is corrupt at line {number} "
                                        f"({line.strip()[:40].decode(errors='replace')!r}); {retrain}") from None
        _check_ids(ranks, specials, meta, meta_path, ranks_path, retrain)
        try:
            tokenizer = cls(ranks, specials, pattern=pattern, train_direction=meta.get("train_direction", "forward"))
        except Exception as e:  # tiktoken: a bad regex or inconsistent ranks/special ids
            raise UserError(f"tokenizer in {directory} cannot be built ({type(e).__name__}: "
                            f"{(str(e).splitlines() or [''])[0]}); {retrain}") from None
        recorded = meta.get("fingerprint")  # tokenizers saved before it was recorded: the checks above
        if recorded is not None and recorded != tokenizer.fingerprint():
            raise UserError(f"tokenizer files in {directory} do not belong together: {ranks_path} and {meta_path} "
                            f"differ from what was saved (fingerprint {tokenizer.fingerprint()[:12]} != recorded "
                            f"{str(recorded)[:12]}); {retrain}")
        _check_token_bytes(os.path.join(directory, "token_bytes.npy"), tokenizer, retrain)
        return tokenizer

    def fingerprint(self):
        """sha256 of what defines the token ids (merge ranks, special tokens, split pattern): recorded in
        every checkpoint's meta and compared on load, so a retrained tokenizer of the same size is caught."""
        if self._fingerprint is None:
            h = hashlib.sha256(self.pattern.encode())
            for name, token_id in sorted(self.special_tokens.items()):
                h.update(f"\0{name}\0{token_id}".encode())
            for token, rank in sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1]):
                h.update(b"\0" + base64.b64encode(token) + f" {rank}".encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    # ---- vocabulary ----------------------------------------------------------------------
    def get_vocab_size(self):
        return self.enc.n_vocab

    def encode_special(self, name):
        if name not in self.special_tokens:
            raise UserError(f"the tokenizer has no special token {name}; known: {sorted(self.special_tokens)}")
        return self.special_tokens[name]

    def get_bos_token_id(self):
        return self.encode_special("<|bos|>")

    def has_direction_markers(self):
        return "<|forward|>" in self.special_tokens and "<|backward|>" in self.special_tokens

    def get_marker_ids(self):
        if not self.has_direction_markers():
            raise UserError("this tokenizer has no <|forward|>/<|backward|> marker tokens, which bidirectional "
                            "models need; retrain it with `python -m scripts.tok_train`")
        return self.special_tokens["<|forward|>"], self.special_tokens["<|backward|>"]

    def get_forward_token_id(self):
        return self.get_marker_ids()[0]

    def get_backward_token_id(self):
        return self.get_marker_ids()[1]

    def token_byte_lengths(self):
        """UTF-8 byte length of each token id; 0 for special tokens, so they drop out of bpb."""
        lengths = np.zeros(self.get_vocab_size(), dtype=np.int32)
        for token, rank in self.mergeable_ranks.items():
            lengths[rank] = len(token)
        return lengths

    # ---- encoding ------------------------------------------------------------------------
    def _as_id(self, tok):
        return self.encode_special(tok) if isinstance(tok, str) else int(tok)

    def encode(self, text, prepend=None, append=None, num_threads=8):
        """Encode a string (-> list of ids) or a list of strings (-> list of lists). Special-token
        spellings in the text are ordinary text; `prepend` / `append` add one special token (name or id)."""
        pre = [] if prepend is None else [self._as_id(prepend)]
        post = [] if append is None else [self._as_id(append)]
        if isinstance(text, str):
            return pre + self.enc.encode_ordinary(text) + post
        if isinstance(text, (list, tuple)):
            batch = self.enc.encode_ordinary_batch(list(text), num_threads=num_threads)
            return [pre + ids + post for ids in batch] if pre or post else batch
        raise TypeError(f"encode() takes a string or a list of strings, not {type(text).__name__}")

    # ---- conversations: the plan's interface to nanochat/conversation.py (the chat template) ----
    def render_conversation(self, conversation, train_on="assistant", closing="end"):
        """(ids, mask) in reading order: nanochat.conversation.render_conversation."""
        return chat_template.render_conversation(self, conversation, train_on, closing)

    def render_for_completion(self, conversation):
        """Forward prompt for the last assistant turn: nanochat.conversation.render_for_completion."""
        return chat_template.render_for_completion(self, conversation)

    def decode(self, ids):
        return self.enc.decode([int(i) for i in ids])


def _check_ids(ranks, specials, meta, meta_path, ranks_path, retrain):
    """Ranks 0..n-1 with every single byte among them (byte-level BPE encodes any text), special
    ids unique and n, n+1, ... (never a byte/merge id), and the vocabulary size tokenizer.json
    recorded: a truncated ranks file or an edited tokenizer.json is caught here, not in training."""
    n, ids = len(ranks), list(specials.values())
    recorded = meta.get("vocab_size")
    if recorded is not None and recorded != n + len(ids):
        raise UserError(f"tokenizer files in {os.path.dirname(meta_path)} disagree: {meta_path} records "
                        f"{recorded} tokens but {ranks_path} has {n} ranks + {len(ids)} special tokens (truncated?); "
                        f"{retrain}")
    if sorted(ranks.values()) != list(range(n)):
        raise UserError(f"tokenizer file {ranks_path} is corrupt: its {n} ranks are not 0..{n - 1} "
                        f"(duplicated or missing ranks); {retrain}")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise UserError(f"tokenizer file {ranks_path} is corrupt: {len(missing)} of the 256 byte tokens are missing "
                        f"(the first is byte {missing[0]}); {retrain}")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids) or sorted(ids) != list(range(n, n + len(ids))):
        raise UserError(f"tokenizer file {meta_path} is corrupt: special token ids {sorted(ids, key=str)} must be unique "
                        f"and follow the {n} byte/merge ids ({n}..{n + len(ids) - 1}); {retrain}")


def _check_token_bytes(path, tokenizer, retrain):
    """token_bytes.npy must be a plain (unpickled) integer array equal to the ranks' byte lengths."""
    if not os.path.exists(path):
        raise UserError(f"tokenizer file {path} is missing; {retrain}")
    try:
        lengths = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:  # pickled, random bytes, truncated
        raise UserError(f"tokenizer file {path} is not a valid .npy array ({type(e).__name__}: "
                        f"{(str(e).splitlines() or [''])[0][:80]}); {retrain}") from None
    expected = tokenizer.token_byte_lengths()
    if not np.issubdtype(lengths.dtype, np.integer) or lengths.shape != expected.shape:
        raise UserError(f"tokenizer file {path} holds a {lengths.dtype} array of shape {lengths.shape}; expected "
                        f"integers of shape {expected.shape} (one per token id); {retrain}")
    if not np.array_equal(lengths, expected):
        bad = int(np.flatnonzero(lengths != expected)[0])
        raise UserError(f"tokenizer file {path} does not match ranks.tiktoken (token {bad}: {int(lengths[bad])} "
                        f"bytes recorded, {int(expected[bad])} in the ranks); {retrain}")


def get_tokenizer(base_dir=None):
    return Tokenizer.load(tokenizer_dir(base_dir))


def get_token_bytes(device="cpu", base_dir=None):
    """Per-token UTF-8 byte lengths as a torch tensor (for bits-per-byte); loading the tokenizer
    verifies that token_bytes.npy holds exactly these."""
    import torch
    lengths = get_tokenizer(base_dir).token_byte_lengths()
    return torch.from_numpy(lengths.astype(np.int64)).to(device)
