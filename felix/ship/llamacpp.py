"""llama.cpp as the real runtime: stock llama.cpp or the Felix fork, one API.

:class:`LlamaCppModel` opens a GGUF in either runtime (``runtime="stock" | "fork"``; by default the file's own:
the fork for ``felix``-arch files and for files holding a fork-only type such as RQ4, stock otherwise) and gives
logits, greedy decoding with the KV cache, tokenization, LoRA adapters with a live scale, and -- in the fork --
live tensor reads and writes by name (the fork's ``llama_model_get/set_tensor_data[_f32]``).

Both runtimes run in a worker process, one per runtime and Python session (started on first use), which hosts the
very same :class:`_Runtime` class and is spoken to over a pipe: the fork's ``llama_cpp`` module has the same name
as stock's, so the two cannot share a process (felix.core.fork says where the fork's build lives), and llama.cpp
aborts the whole process on some malformed files (a GGML_ASSERT on forged hyperparameters), which must not take
the caller with it. A load failure comes back with the runtime's own log line (``missing tensor ...``); a crash
of a worker is reported with its stderr (LlamaCppLoadError, a ValueError, when it died opening a file), and the
next call starts a new one.

llama.cpp is fed token ids, never text, so comparisons are of the model alone; :meth:`LlamaCppModel.tokenize`
is there to compare the tokenizers themselves.
"""

from __future__ import annotations

import atexit
import ctypes
import itertools
import os
import pickle
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

from felix.core import fork
from felix.core.formats import RUNTIMES, get_format
from felix.ship.gguf_file import metadata, open_gguf


def available(runtime: str = "stock") -> tuple[bool, str]:
    """Whether `runtime` can run here, and why not."""
    if runtime == "fork":
        return fork.available()
    if runtime != "stock":
        raise ValueError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")
    try:
        import llama_cpp  # noqa: F401  (the ImportError names what is missing; optional: the serve extra)
    except ImportError as e:
        return False, f"llama-cpp-python is not installed ({e}); `bash scripts/setup.sh --test` builds it"
    return True, "llama-cpp-python (stock llama.cpp)"


def runtime_for(path) -> str:
    """The runtime a GGUF needs: "fork" for the felix arch or a fork-only tensor type, else "stock"."""
    reader = open_gguf(path)
    if metadata(reader).get("general.architecture") == fork.ARCH:
        return "fork"
    if any(t.tensor_type.name.lower() in fork.FORK_ONLY_TYPES for t in reader.tensors):
        return "fork"
    return "stock"


# ------------------------------------------------------------------------------------ one loaded model
class _Runtime:
    """A GGUF loaded in whichever llama_cpp this process imports (stock here, the fork in the worker)."""

    def __init__(
        self,
        path: str,
        n_ctx: int,
        adapter: str | None,
        adapter_scale: float,
        n_threads: int | None,
        use_mmap: bool,
        verbose: bool = False,
    ):
        from llama_cpp import Llama  # local: optional llama-cpp-python (serve extra); a worker may import the fork's

        self.llm = Llama(
            model_path=path,
            logits_all=True,
            n_ctx=max(256, n_ctx),
            verbose=verbose,
            n_threads=n_threads or os.cpu_count(),
            lora_path=adapter,
            lora_scale=adapter_scale,
            use_mmap=use_mmap,
        )
        self.path = path

    def n_vocab(self) -> int:
        return self.llm.n_vocab()

    def n_ctx(self) -> int:
        return self.llm.n_ctx()

    def tokenize(self, text: str, special: bool) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)

    def detokenize(self, ids) -> str:
        return self.llm.detokenize(list(ids), special=True).decode("utf-8", errors="replace")

    def logits(self, ids) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def greedy(self, ids, n_new: int, stops: list[int]) -> list[int]:
        """Prompt once, then one token at a time on the KV cache."""
        self.llm.reset()
        self.llm.eval(ids)
        out = []
        for _ in range(n_new):
            nxt = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            out.append(nxt)
            if nxt in stops or self.llm.n_tokens >= self.llm.n_ctx():
                break
            self.llm.eval([nxt])
        return out

    def set_adapter_scale(self, scale: float) -> None:
        import llama_cpp  # local: optional llama-cpp-python (serve extra); a worker may import the fork's

        adapter = getattr(self.llm, "_lora_adapter", None)
        if adapter is None:
            raise ValueError(f"{self.path} was loaded without an adapter")
        adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter)
        scales = (ctypes.c_float * 1)(float(scale))
        if _set_adapters(self.llm._ctx.ctx, adapters, 1, scales):
            raise RuntimeError(f"llama.cpp refused adapter scale {scale}")

    def drop_adapter(self) -> None:
        if _set_adapters(self.llm._ctx.ctx, None, 0, None):
            raise RuntimeError("llama.cpp refused to detach the adapters")

    # the fork's live tensor API (include/llama.h: "SPLICE: Get/set tensor data by name")
    def _tensor_fn(self, name: str, argtypes):
        import llama_cpp  # local: optional llama-cpp-python (serve extra); a worker may import the fork's

        lib = llama_cpp.llama_cpp._lib
        if not hasattr(lib, name):
            raise NotImplementedError(
                f"this llama.cpp has no {name} (only the Felix fork exposes live tensor reads and writes)"
            )
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = ctypes.c_int32, argtypes
        return fn

    def read_tensor(self, name: str, nbytes: int) -> bytes:
        fn = self._tensor_fn(
            "llama_model_get_tensor_data",
            [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t],
        )
        buf = ctypes.create_string_buffer(nbytes)
        _check_tensor_rc(fn(self.llm._model.model, name.encode(), buf, 0, nbytes), name)
        return buf.raw

    def write_tensor(self, name: str, data: bytes) -> None:
        fn = self._tensor_fn(
            "llama_model_set_tensor_data",
            [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t],
        )
        _check_tensor_rc(fn(self.llm._model.model, name.encode(), data, 0, len(data)), name)

    def write_tensor_f32(self, name: str, values: np.ndarray) -> None:
        fn = self._tensor_fn(
            "llama_model_set_tensor_data_f32", [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int64]
        )
        values = np.ascontiguousarray(values, dtype=np.float32)
        _check_tensor_rc(fn(self.llm._model.model, name.encode(), values.ctypes.data, values.size), name)

    def close(self) -> None:
        self.llm.close()


def _set_adapters(ctx, adapters, n, scales) -> int:
    """llama_set_adapters_lora (llama.cpp >= 0.3.17's plural form), else the older set/clear pair."""
    import llama_cpp  # local: optional llama-cpp-python (serve extra); a worker may import the fork's

    if hasattr(llama_cpp, "llama_set_adapters_lora"):
        return llama_cpp.llama_set_adapters_lora(ctx, adapters, n, scales)
    llama_cpp.llama_clear_adapter_lora(ctx)
    return llama_cpp.llama_set_adapter_lora(ctx, adapters[0], scales[0]) if n else 0


def _check_tensor_rc(rc: int, name: str) -> None:
    if rc == -1:
        raise KeyError(f"the model has no tensor {name!r}")
    if rc == -2:
        raise ValueError(f"size mismatch writing or reading tensor {name!r}")
    if rc:
        raise RuntimeError(f"the fork could not convert data for tensor {name!r} (code {rc})")


# ------------------------------------------------------------------------------------ the runtimes' worker processes
_ERRORS = {e.__name__: e for e in (ValueError, KeyError, FileNotFoundError, NotImplementedError, RuntimeError)}


def _fork_quantize_rq4(x: np.ndarray) -> bytes:
    """The fork's own quantize_row_rq4_ref (libggml-base) on float32 rows: the RQ4 byte reference."""
    lib = _fork_ggml()
    x = np.ascontiguousarray(x, dtype=np.float32)
    f = get_format("rq4")
    out = np.empty(x.size // f.block_size * f.bytes_per_block, dtype=np.uint8)
    lib.quantize_row_rq4_ref(x.ctypes.data, out.ctypes.data, x.size)
    return out.tobytes()


def _fork_dequantize_rq4(blocks: bytes, n_values: int) -> np.ndarray:
    lib = _fork_ggml()
    buf = np.frombuffer(blocks, dtype=np.uint8).copy()
    out = np.empty(n_values, dtype=np.float32)
    lib.dequantize_row_rq4(buf.ctypes.data, out.ctypes.data, n_values)
    return out


_GGML = None


def _fork_ggml() -> ctypes.CDLL:
    global _GGML
    if _GGML is None:
        lib = ctypes.CDLL(os.path.join(os.environ["LLAMA_CPP_LIB_PATH"], "libggml-base.so"))
        for fn in (lib.quantize_row_rq4_ref, lib.dequantize_row_rq4):
            fn.restype, fn.argtypes = None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        _GGML = lib
    return _GGML


def serve() -> None:
    """The worker's loop: pickled (op, args) requests on stdin, pickled ("ok", value) / ("err", type, message)
    replies on the original stdout. C code's own prints are sent to stderr so they cannot corrupt the pipe."""
    proto_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    proto_in = os.fdopen(os.dup(0), "rb")
    models: dict[int, _Runtime] = {}
    ids = itertools.count(1)
    while True:
        try:
            op, args = pickle.load(proto_in)
        except EOFError:
            return
        try:
            if op == "open":
                handle = next(ids)
                models[handle] = _Runtime(*args, verbose=True)  # verbose: the loader's errors reach our stderr
                value = handle
            elif op == "call":
                handle, method, margs = args
                value = getattr(models[handle], method)(*margs)
                if method == "close":
                    del models[handle]
            elif op == "quantize_rq4":
                value = _fork_quantize_rq4(*args)
            elif op == "dequantize_rq4":
                value = _fork_dequantize_rq4(*args)
            else:
                raise ValueError(f"unknown worker op {op!r}")
            reply = ("ok", value)
        except Exception as e:  # every failure goes back to the caller, typed
            reply = ("err", type(e).__name__, str(e))
        pickle.dump(reply, proto_out)
        proto_out.flush()


class LlamaCppLoadError(ValueError):
    """A GGUF that llama.cpp could not load: it aborted the worker that opened it (the caller lives on)."""


class RuntimeWorker:
    """One worker process hosting a runtime's llama_cpp (stock, or the fork); requests are serialized by a lock."""

    def __init__(self, runtime: str = "fork"):
        if runtime == "fork":
            env = fork.worker_environment()
        else:
            env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("GGML_NO_BACKTRACE", "1")  # an abort reports at once (ggml would first run gdb for a minute)
        self.runtime = runtime
        self.log = tempfile.NamedTemporaryFile(prefix=f"felix-{runtime}-worker-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from felix.ship.llamacpp import serve; serve()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            env=env,
        )
        self.lock = threading.Lock()

    def _log_tail(self, since: int = 0, lines: int = 12) -> str:
        try:
            text = Path(self.log.name).read_bytes()[since:].decode("utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def request(self, op: str, *args):
        with self.lock:
            start = os.path.getsize(self.log.name)
            try:
                pickle.dump((op, args), self.proc.stdin)
                self.proc.stdin.flush()
                reply = pickle.load(self.proc.stdout)
            except (EOFError, BrokenPipeError, pickle.UnpicklingError) as e:
                self.proc.wait(timeout=30)
                name = "the llama.cpp fork's worker" if self.runtime == "fork" else "the stock llama.cpp worker"
                what = f"opening {args[0]}" if op == "open" else op
                message = (
                    f"{name} died (exit {self.proc.returncode}) {what}: {type(e).__name__}\n{self._log_tail(start)}"
                )
                if op == "open":
                    raise LlamaCppLoadError(f"{args[0]} aborted llama.cpp, which refused it: {message}") from None
                raise RuntimeError(message) from None
        if reply[0] == "ok":
            return reply[1]
        _, kind, message = reply
        if op == "open":
            errors = [
                ln for ln in self._log_tail(start, 200).splitlines() if "error" in ln.lower() or "failed" in ln.lower()
            ]
            message = "\n".join([message, *errors[-4:]])
        raise _ERRORS.get(kind, RuntimeError)(message)

    def close(self) -> None:
        """End the worker (closing its stdin ends serve()), then release the pipes and the log file."""
        if self.alive():
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe and not pipe.closed:
                pipe.close()
        self.log.close()
        if os.path.exists(self.log.name):
            os.unlink(self.log.name)


ForkWorker = RuntimeWorker  # the fork's worker (the first runtime that had one)
_WORKERS: dict[str, RuntimeWorker] = {}


def runtime_worker(runtime: str) -> RuntimeWorker:
    """The session's worker for `runtime`, started on first use and again after a crash; ended at interpreter exit."""
    worker = _WORKERS.get(runtime)
    if worker is None or not worker.alive():
        if worker is not None:
            worker.close()  # a crashed worker: release its pipes and log
        worker = _WORKERS[runtime] = RuntimeWorker(runtime)
    return worker


def fork_worker() -> RuntimeWorker:
    """The session's fork worker (runtime_worker("fork"))."""
    return runtime_worker("fork")


@atexit.register
def _close_workers() -> None:
    while _WORKERS:
        _WORKERS.popitem()[1].close()


def fork_quantize_rq4(x: np.ndarray) -> np.ndarray:
    """RQ4 bytes of float32 rows `x` [rows, n] (n a multiple of 32) from the fork's own quantize_row_rq4_ref."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    data = fork_worker().request("quantize_rq4", x)
    return np.frombuffer(data, dtype=np.uint8).reshape(x.shape[0], -1).copy()


def fork_dequantize_rq4(blocks: np.ndarray, n_values: int) -> np.ndarray:
    """The fork's dequantize_row_rq4 over a whole buffer of RQ4 blocks."""
    return fork_worker().request("dequantize_rq4", np.ascontiguousarray(blocks, np.uint8).tobytes(), n_values)


class _WorkerModel:
    """A model held by a runtime's worker; any method call is forwarded to its _Runtime there."""

    def __init__(self, args, runtime: str = "fork"):
        self.worker = runtime_worker(runtime)
        self.handle = self.worker.request("open", *args)

    def __getattr__(self, method):
        return lambda *a: self.worker.request("call", self.handle, method, a)


# ------------------------------------------------------------------------------------ the API
class LlamaCppModel:
    """One GGUF loaded in llama.cpp (CPU), stock or the fork, optionally with a LoRA adapter whose scale can change
    at run time."""

    def __init__(
        self,
        path,
        n_ctx: int = 512,
        adapter=None,
        adapter_scale: float = 1.0,
        n_threads: int | None = None,
        runtime: str | None = None,
        use_mmap: bool | None = None,
    ):
        """`use_mmap` (default: stock yes, fork no): a memory-mapped model's tensors live in the read-only mapping
        of the file, where a live tensor write would crash the process, so the fork loads into memory."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no GGUF at {path}")
        self.runtime = runtime or runtime_for(path)
        if self.runtime not in RUNTIMES:
            raise ValueError(f"unknown runtime {self.runtime!r}; choose from {', '.join(RUNTIMES)}")
        ok, why = available(self.runtime)
        if not ok:
            raise ImportError(why)
        if self.runtime == "stock" and runtime_for(path) == "fork":
            raise ValueError(
                f"{path} needs the llama.cpp fork (felix arch or an RQ4 tensor); stock llama.cpp "
                "cannot load it: use runtime='fork'"
            )
        self.path = path
        if use_mmap is None:
            use_mmap = self.runtime == "stock"
        self._writable = not use_mmap
        args = (str(path), n_ctx, str(adapter) if adapter else None, adapter_scale, n_threads, bool(use_mmap))
        self._impl = _WorkerModel(args, self.runtime)  # a worker process: no file can abort the caller
        self._has_adapter = adapter is not None
        self._n_ctx = self._impl.n_ctx()

    @property
    def n_vocab(self) -> int:
        return self._impl.n_vocab()

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        """llama.cpp's tokenization of `text` (no BOS added; `special`: parse special-token strings)."""
        return self._impl.tokenize(text, special)

    def detokenize(self, ids) -> str:
        return self._impl.detokenize([int(i) for i in ids])

    def logits(self, ids) -> np.ndarray:
        """Logits [len(ids), n_vocab] (float32) for a fresh sequence of token ids."""
        ids = [int(i) for i in ids]
        if not ids:
            raise ValueError("logits of an empty token sequence")
        if len(ids) > self._n_ctx:
            raise ValueError(f"{len(ids)} tokens exceed the context of {self._n_ctx}")
        return self._impl.logits(ids)

    def greedy(self, ids, n_new: int, stop: int | list[int] | None = None) -> list[int]:
        """`n_new` greedily decoded tokens after the prompt `ids` (stopping early at token `stop`, or at any of
        several; the stop token is included), the prompt evaluated once and each new token on the KV cache."""
        ids = [int(i) for i in ids]
        if not ids or len(ids) >= self._n_ctx:
            raise ValueError(f"a prompt of {len(ids)} tokens does not fit a context of {self._n_ctx}")
        stops = [] if stop is None else [int(stop)] if isinstance(stop, (int, np.integer)) else [int(t) for t in stop]
        return self._impl.greedy(ids, int(n_new), stops)

    def set_adapter_scale(self, scale: float) -> None:
        """Re-scale the loaded LoRA adapter at run time (0 = off), without reloading anything (hot swap)."""
        if not self._has_adapter:
            raise ValueError(f"{self.path} was loaded without an adapter")
        self._impl.set_adapter_scale(float(scale))

    def drop_adapter(self) -> None:
        """Detach every adapter from the context (the base model alone)."""
        self._impl.drop_adapter()
        self._has_adapter = False

    def read_tensor(self, name: str, nbytes: int) -> bytes:
        """The first `nbytes` stored bytes of tensor `name` (fork only)."""
        return self._impl.read_tensor(name, int(nbytes))

    def _check_writable(self) -> None:
        if not self._writable:
            raise ValueError(f"{self.path} is memory-mapped read-only; open it with use_mmap=False to write tensors")

    def write_tensor(self, name: str, data: bytes) -> None:
        """Overwrite tensor `name` with raw bytes of its stored type, at run time (fork only)."""
        self._check_writable()
        self._impl.write_tensor(name, bytes(data))

    def write_tensor_f32(self, name: str, values) -> None:
        """Overwrite tensor `name` with float32 values; the fork re-quantizes them to the tensor's stored type with
        that type's reference quantizer (an RQ4 tensor goes through RQ4 rounding). Fork only."""
        self._check_writable()
        values = np.ascontiguousarray(values, dtype=np.float32)
        if not np.isfinite(values).all():
            raise ValueError(f"non-finite values written to tensor {name!r}")
        self._impl.write_tensor_f32(name, values)

    def close(self) -> None:
        self._impl.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
