"""The errors of splice edits: every refusal is an EditError (a ValueError), with the reason in its class."""

from __future__ import annotations


class EditError(ValueError):
    """An edit cannot be made as asked."""


class UntokenisableError(EditError):
    """A prompt or target the tokenizer / model cannot represent."""


class ConflictError(EditError):
    """An edit that contradicts an applied edit, another request of its batch, or the preserved-knowledge set."""


class RankBudgetError(EditError):
    """The edits need more rank than the splice surface has left."""
