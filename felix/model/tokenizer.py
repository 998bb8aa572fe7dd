"""Felix's tokenizer: byte-level BPE (GPT-2 style byte alphabet) trained with HF `tokenizers`.

Byte-level means every string round-trips and the byte tokens are GPT-2's ``bytes_to_unicode`` symbols, which
is what a GGUF ``tokenizer.ggml.model = "gpt2"`` export needs (see docs/platform-notes.md). Special tokens come first in the
vocabulary (ids 0..): bos, eos, pad and the chat role markers of felix/data/corpus.py. Saved as ``tokenizer.json``
beside a checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from felix.model.chat import ASSISTANT, END, SYSTEM, USER
from felix.core.files import atomic_write, file_sha256  # noqa: F401  (file_sha256: how a tokenizer file is identified)
from felix.core.files import read_text
from felix.core.quail import build_whitelist

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = (BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, END)
TOKENIZER_FILE = "tokenizer.json"


class TokenizerError(ValueError):
    """A tokenizer file cannot be used: not UTF-8, not a `tokenizers` JSON document, or without Felix's specials."""


class Tokenizer:
    """A thin wrapper over a HF `tokenizers.Tokenizer` with Felix's special-token ids as attributes."""

    def __init__(self, hf: HFTokenizer):
        self.hf = hf
        missing = [t for t in SPECIAL_TOKENS if hf.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer lacks Felix special tokens {missing}")
        self.bos_id, self.eos_id, self.pad_id = (hf.token_to_id(t) for t in (BOS, EOS, PAD))

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int:
        tid = self.hf.token_to_id(token)
        if tid is None:
            raise KeyError(f"{token!r} is not a token of this tokenizer")
        return tid

    def save(self, directory) -> Path:
        path = Path(directory) / TOKENIZER_FILE
        self.hf.save(str(path))
        return path

    @classmethod
    def load(cls, path) -> Tokenizer:
        """The tokenizer in `path` (a tokenizer.json, or a directory holding one). A missing file raises
        FileNotFoundError; a file that is not UTF-8, not a `tokenizers` JSON document, or lacks Felix's special
        tokens raises TokenizerError naming it."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer at {path}")
        text = read_text(path, TokenizerError, "tokenizer")
        try:
            hf = HFTokenizer.from_str(text)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # tokenizers raises a bare Exception on bad JSON, a pyo3 panic on worse
            raise TokenizerError(f"{path} is not a valid tokenizers JSON file: {e}") from e
        try:
            return cls(hf)
        except ValueError as e:
            raise TokenizerError(f"{path}: {e}") from e


def train_tokenizer(texts, vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train byte-level BPE on `texts` (an iterable of strings) up to `vocab_size` tokens, specials included."""
    n_base = len(SPECIAL_TOKENS) + 256
    if vocab_size < n_base + 1:
        raise ValueError(
            f"vocab_size {vocab_size} is too small: the specials and 256 byte tokens need {n_base}, "
            f"plus at least one merge"
        )
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    hf.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(hf)


def save_tokenizer_file(tokenizer: Tokenizer, path, force: bool = False) -> Path:
    """Write `tokenizer` as a tokenizers JSON file at `path`, atomically; an existing file is refused unless
    `force`."""
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; use --force to overwrite it")
    if path.parent and not path.parent.is_dir():
        raise FileNotFoundError(f"directory {path.parent} does not exist")
    return atomic_write(path, lambda tmp: tokenizer.hf.save(str(tmp)))


def json_structure_whitelist(tokenizer: Tokenizer, strings=()) -> list[int]:
    """Token ids the QUAIL hinge protects: every token containing JSON structure (``{ } [ ] " : ,``), the
    tokens of the JSON literals (``true``/``false``/``null``; has_principle=false is the refusal path) and of
    `strings` (field names, refusal phrases) — felix.core.quail.build_whitelist — minus Felix's special tokens."""
    mask = build_whitelist(tokenizer.hf, strings=strings)
    specials = {tokenizer.hf.token_to_id(t) for t in SPECIAL_TOKENS}
    return [i for i in mask.nonzero()[:, 0].tolist() if i not in specials]
