"""llama.cpp as the real runtime, through llama-cpp-python: logits, tokenization, greedy decoding, LoRA hot-swap.

The comparisons that prove an export right (logits vs PyTorch, tokenizer agreement, adapter = merge) and the
runtime path of the fidelity harness all run here. llama.cpp is fed token ids, never text, so the comparison
is of the model alone; :meth:`LlamaCppModel.tokenize` is there to compare the tokenizers themselves.
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np


def available() -> tuple[bool, str]:
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        return False, f"llama-cpp-python is not installed ({e}); `bash scripts/setup.sh --test` builds it"
    return True, ""


class LlamaCppModel:
    """One GGUF loaded in llama.cpp (CPU), optionally with a LoRA adapter whose scale can change at run time."""

    def __init__(self, path, n_ctx: int = 512, adapter=None, adapter_scale: float = 1.0, n_threads: int | None = None):
        ok, why = available()
        if not ok:
            raise ImportError(why)
        from llama_cpp import Llama

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no GGUF at {path}")
        self.path = path
        self.llm = Llama(model_path=str(path), logits_all=True, n_ctx=max(256, n_ctx), verbose=False,
                         n_threads=n_threads or os.cpu_count(), lora_path=str(adapter) if adapter else None,
                         lora_scale=adapter_scale)
        self._adapter_scale = adapter_scale if adapter else None

    @property
    def n_vocab(self) -> int:
        return self.llm.n_vocab()

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        """llama.cpp's tokenization of `text` (no BOS added; `special`: parse special-token strings)."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)

    def detokenize(self, ids) -> str:
        return self.llm.detokenize(list(ids), special=True).decode("utf-8", errors="replace")

    def logits(self, ids) -> np.ndarray:
        """Logits [len(ids), n_vocab] (float32) for a fresh sequence of token ids."""
        ids = [int(i) for i in ids]
        if not ids:
            raise ValueError("logits of an empty token sequence")
        if len(ids) > self.llm.n_ctx():
            raise ValueError(f"{len(ids)} tokens exceed the context of {self.llm.n_ctx()}")
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def greedy(self, ids, n_new: int, stop: int | None = None) -> list[int]:
        """`n_new` greedily decoded tokens after the prompt `ids` (stopping early at token `stop`)."""
        self.llm.reset()
        self.llm.eval([int(i) for i in ids])
        out = []
        for _ in range(n_new):
            nxt = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            out.append(nxt)
            if nxt == stop or self.llm.n_tokens >= self.llm.n_ctx():
                break
            self.llm.eval([nxt])
        return out

    def set_adapter_scale(self, scale: float) -> None:
        """Re-scale the loaded LoRA adapter at run time (0 = off), without reloading anything (hot swap)."""
        import llama_cpp

        adapter = getattr(self.llm, "_lora_adapter", None)
        if adapter is None:
            raise ValueError(f"{self.path} was loaded without an adapter")
        adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter)
        scales = (ctypes.c_float * 1)(float(scale))
        if llama_cpp.llama_set_adapters_lora(self.llm._ctx.ctx, adapters, 1, scales):
            raise RuntimeError(f"llama.cpp refused adapter scale {scale}")
        self._adapter_scale = float(scale)

    def drop_adapter(self) -> None:
        """Detach every adapter from the context (the base model alone)."""
        import llama_cpp

        if llama_cpp.llama_set_adapters_lora(self.llm._ctx.ctx, None, 0, None):
            raise RuntimeError("llama.cpp refused to detach the adapters")
        self._adapter_scale = None

    def close(self) -> None:
        self.llm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
