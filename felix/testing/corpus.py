"""A synthetic "ordinary text" corpus for tests and benchmarks, with no download.

Documents are 1-8 paragraphs drawn from felix.data.corpus.builtin_prose() (pydoc help topics, stdlib docstrings and
source that ship with Python), shuffled and recombined with a seeded generator, so a corpus of any size has the
statistics of English technical prose with a little code, and the same seed and size give the same bytes."""

from __future__ import annotations

import json
import random
from pathlib import Path

from felix.data.corpus import builtin_prose
from felix.core.files import atomic_write


def prose_paragraphs() -> list[str]:
    """The non-empty paragraphs of the built-in prose, in a fixed order."""
    return [p.strip() for chunk in builtin_prose() for p in chunk.split("\n\n") if p.strip()]


def text_documents(seed: int = 0, min_paragraphs: int = 1, max_paragraphs: int = 8):
    """An endless, deterministic stream of documents (strings) recombined from the built-in prose."""
    rng = random.Random(seed)
    paragraphs = prose_paragraphs()
    while True:
        yield "\n\n".join(rng.choice(paragraphs) for _ in range(rng.randint(min_paragraphs, max_paragraphs)))


def write_text_corpus(path, target_bytes: int, seed: int = 0) -> dict:
    """Write a JSONL corpus of ``{"text": ...}`` lines to `path` (atomically), stopping at the first line that
    reaches `target_bytes`. Returns {"path", "bytes", "documents", "chars"}."""
    if target_bytes < 1:
        raise ValueError(f"target_bytes must be >= 1, got {target_bytes}")
    stats = {"path": str(path), "bytes": 0, "documents": 0, "chars": 0}

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
            for doc in text_documents(seed):
                line = json.dumps({"text": doc}, ensure_ascii=False) + "\n"
                fh.write(line)
                stats["bytes"] += len(line.encode("utf-8"))
                stats["documents"] += 1
                stats["chars"] += len(doc)
                if stats["bytes"] >= target_bytes:
                    break

    atomic_write(path, write)
    return stats
