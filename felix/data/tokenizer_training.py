"""Training Felix's tokenizer on a pretraining corpus: a bounded, streamed sample of the sources (files, folders,
globs; felix/data/sources.py), so memory is set by the sample's distinct words and not by the corpus size
(`felix tokenizer train`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from felix.data.sources import SourceReader, expand_sources
from felix.model.tokenizer import Tokenizer, train_tokenizer


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
        return (
            f"{self.documents:,} documents, {self.chars:,} characters from {len(self.sources)} file(s)"
            + (f" (stopped at the --max-chars cap of {self.max_chars:,})" if self.capped else " (all of them)")
            + (
                f"; {self.truncated_documents:,} documents cut to --doc-cap {self.doc_cap:,} characters"
                if self.truncated_documents
                else ""
            )
        )


def bounded_sample(
    sources,
    max_chars: int = DEFAULT_MAX_CHARS,
    doc_cap: int = DEFAULT_DOC_CAP,
    text_field: str = "text",
    sample: TokenizerSample | None = None,
):
    """Documents from `sources` (felix.data.sources: files, folders, globs), each cut to its first `doc_cap`
    characters, until `max_chars` characters in all; reading stops there (later files are not opened). Fills
    `sample` as it goes."""
    if max_chars < 1 or doc_cap < 1:
        raise ValueError(f"max_chars and doc_cap must be >= 1, got {max_chars} and {doc_cap}")
    sample = sample if sample is not None else TokenizerSample(max_chars, doc_cap)
    for path in expand_sources(sources):
        sample.sources.append(str(path))
        for text in SourceReader(path, text_field):
            if len(text) > doc_cap:
                text = text[:doc_cap]
                sample.truncated_documents += 1
            text = text[: max_chars - sample.chars]
            sample.documents += 1
            sample.chars += len(text)
            yield text
            if sample.chars >= max_chars:
                sample.capped = True
                return


def train_tokenizer_from_sources(
    sources,
    vocab_size: int,
    max_chars: int = DEFAULT_MAX_CHARS,
    doc_cap: int = DEFAULT_DOC_CAP,
    text_field: str = "text",
    min_frequency: int = 2,
) -> tuple[Tokenizer, TokenizerSample]:
    """:func:`train_tokenizer` on a streamed, bounded sample of `sources` (:func:`bounded_sample`): memory is
    set by the sample's distinct words, not by the corpus size. Returns the tokenizer and the sample used."""
    sample = TokenizerSample(max_chars, doc_cap)
    tok = train_tokenizer(
        bounded_sample(sources, max_chars, doc_cap, text_field, sample), vocab_size, min_frequency=min_frequency
    )
    if not sample.documents:
        raise ValueError(f"no documents to train a tokenizer on in {', '.join(map(str, sources))}")
    return tok, sample
