"""Felix's tokenizer: byte-level BPE (GPT-2 style byte alphabet) trained with HF `tokenizers`.

Byte-level means every string round-trips and the byte tokens are GPT-2's ``bytes_to_unicode`` symbols, which
is what a GGUF ``tokenizer.ggml.model = "gpt2"`` export needs (see docs/platform-notes.md). Special tokens come first in the
vocabulary (ids 0..): bos, eos, pad and the chat role markers of felix/data.py. Saved as ``tokenizer.json``
beside a checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from felix.data import ASSISTANT, END, SYSTEM, USER
from felix.files import atomic_write, file_sha256  # noqa: F401  (file_sha256: how a tokenizer file is identified)

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = (BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, END)
TOKENIZER_FILE = "tokenizer.json"


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
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer at {path}")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"{path} is not a valid tokenizers JSON file: {e}") from e
        return cls(hf)


def train_tokenizer(texts, vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train byte-level BPE on `texts` (an iterable of strings) up to `vocab_size` tokens, specials included."""
    n_base = len(SPECIAL_TOKENS) + 256
    if vocab_size < n_base + 1:
        raise ValueError(f"vocab_size {vocab_size} is too small: the specials and 256 byte tokens need {n_base}, "
                         f"plus at least one merge")
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(hf)


DEFAULT_MAX_CHARS = 2_000_000_000  # nanochat's tokenizer sample; see docs/data-format.md for the memory it takes
DEFAULT_DOC_CAP = 10_000


@dataclass
class TokenizerSample:
    """What a bounded tokenizer-training sample used: documents, characters (after the per-document cap), the
    files read (fully or in part), documents truncated to the cap, and whether the total cap stopped the read."""
    max_chars: int
    doc_cap: int
    documents: int = 0
    chars: int = 0
    truncated_documents: int = 0
    sources: list[str] = field(default_factory=list)
    capped: bool = False

    def describe(self) -> str:
        return (f"{self.documents:,} documents, {self.chars:,} characters from {len(self.sources)} file(s)"
                + (f" (stopped at the --max-chars cap of {self.max_chars:,})" if self.capped else " (all of them)")
                + (f"; {self.truncated_documents:,} documents cut to --doc-cap {self.doc_cap:,} characters"
                   if self.truncated_documents else ""))


def bounded_sample(sources, max_chars: int = DEFAULT_MAX_CHARS, doc_cap: int = DEFAULT_DOC_CAP,
                   text_field: str = "text", sample: TokenizerSample | None = None):
    """Documents from `sources` (felix.corpus_sources: files, folders, globs), each cut to its first `doc_cap`
    characters, until `max_chars` characters in all; reading stops there (later files are not opened). Fills
    `sample` as it goes."""
    from felix.corpus_sources import SourceReader, expand_sources

    if max_chars < 1 or doc_cap < 1:
        raise ValueError(f"max_chars and doc_cap must be >= 1, got {max_chars} and {doc_cap}")
    sample = sample if sample is not None else TokenizerSample(max_chars, doc_cap)
    for path in expand_sources(sources):
        sample.sources.append(str(path))
        for text in SourceReader(path, text_field):
            if len(text) > doc_cap:
                text = text[:doc_cap]
                sample.truncated_documents += 1
            text = text[:max_chars - sample.chars]
            sample.documents += 1
            sample.chars += len(text)
            yield text
            if sample.chars >= max_chars:
                sample.capped = True
                return


def train_tokenizer_from_sources(sources, vocab_size: int, max_chars: int = DEFAULT_MAX_CHARS,
                                 doc_cap: int = DEFAULT_DOC_CAP, text_field: str = "text",
                                 min_frequency: int = 2) -> tuple[Tokenizer, TokenizerSample]:
    """:func:`train_tokenizer` on a streamed, bounded sample of `sources` (:func:`bounded_sample`): memory is
    set by the sample's distinct words, not by the corpus size. Returns the tokenizer and the sample used."""
    sample = TokenizerSample(max_chars, doc_cap)
    tok = train_tokenizer(bounded_sample(sources, max_chars, doc_cap, text_field, sample), vocab_size,
                          min_frequency=min_frequency)
    if not sample.documents:
        raise ValueError(f"no documents to train a tokenizer on in {', '.join(map(str, sources))}")
    return tok, sample


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
    `strings` (field names, refusal phrases) — felix.quail.build_whitelist — minus Felix's special tokens."""
    from felix.quail import build_whitelist

    mask = build_whitelist(tokenizer.hf, strings=strings)
    specials = {tokenizer.hf.token_to_id(t) for t in SPECIAL_TOKENS}
    return [i for i in mask.nonzero()[:, 0].tolist() if i not in specials]
