"""Serve a Felix model the way its users call it: llama.cpp's OpenAI-compatible chat API on a local port.

    felix serve CHECKPOINT_OR_GGUF [--quant q8_0] [--host 127.0.0.1] [--port 0|N] [--lora ADAPTER.gguf]

    with felix.ship.serve.Server("model.gguf") as server:          # or a checkpoint directory (exported first)
        answer = server.chat([{"role": "user", "content": "..."}], temperature=0)

The server is llama-cpp-python's (``llama_cpp.server``: ``/v1/chat/completions``, ``/v1/completions``,
``/v1/models``; the ``serve`` extra installs it), run in a child process by felix/ship/serve_child.py, which binds the
port, loads the GGUF and reports back. The GGUF's ``tokenizer.chat_template`` (written by the exporter:
felix.model.chat.CHAT_TEMPLATE) makes the chat endpoint prompt the model in Felix's own chat format, and its end-of-turn
token (END) ends the answer. A file in the fork's ``felix`` arch or holding RQ4 is served by the fork's llama_cpp
(felix.core.fork.worker_environment()), anything else by stock llama-cpp-python.

Requests: ``temperature: 0`` is greedy decoding (serve_child sets llama-cpp-python's repeat-penalty default to 1.0,
as llama-server has it). ``response_format`` ``{"type": "json_object"}`` (any JSON), ``{"type": "json_object",
"schema": {...}}`` or OpenAI's ``{"type": "json_schema", "json_schema": {"schema": {...}}}`` constrain decoding with
the GBNF grammar llama-cpp-python derives from the schema; a schema it cannot convert gets HTTP 400. A prompt that
does not fit the context gets HTTP 400 ``context_length_exceeded`` (llama-cpp-python's own check); a ``max_tokens``
beyond what the context leaves is capped to it (``finish_reason: "length"``).
LoRA adapters (``--lora``, e.g. an export's ``--splice adapter`` file) load with the model at ``--lora-scale``
(default 1); llama-cpp-python's server has no per-request adapter scale.

Failures to start (not a GGUF, a file the runtime cannot load, a port in use, a missing server package) raise
:class:`ServeError` (``felix serve`` exits 2) and leave no process behind; a server left running when Python exits
is stopped, and the child also exits when its parent dies (it watches its stdin).
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from pathlib import Path

from felix.core import fork
from felix.core.fork import arch_of
from felix.model.felix_lm import CheckpointError
from felix.ops.quant_policy import check_type
from felix.ship.export import ExportError, export_gguf
from felix.ship.gguf_file import GGUFError, metadata, open_gguf
from felix.ship.llamacpp import available, runtime_for

DEFAULT_HOST = "127.0.0.1"
DEFAULT_QUANT = "q8_0"
SERVER_PACKAGES = ("fastapi", "uvicorn", "sse_starlette", "starlette_context", "pydantic_settings")
_CHILD = Path(__file__).with_name("serve_child.py")
_LIVE: weakref.WeakSet = weakref.WeakSet()


class ServeError(ValueError):
    """The model cannot be served as asked: not a GGUF or checkpoint, a runtime that cannot load it, a busy port."""


class RequestError(RuntimeError):
    """The server answered a request with an HTTP error; `status` and the server's `message`."""

    def __init__(self, status: int, message: str, body: dict | None = None):
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message, self.body = status, message, body or {}


# ------------------------------------------------------------------------------------ what gets served
def gguf_facts(path) -> dict:
    """What serving a GGUF needs to know: its arch, context length, chat template (or None), and runtime."""
    try:
        meta = metadata(open_gguf(path))
        runtime = runtime_for(path)
    except GGUFError as e:
        raise ServeError(str(e)) from None
    arch = meta.get("general.architecture")
    if meta.get("general.type") == "adapter":
        raise ServeError(f"{path} is a LoRA adapter, not a model: serve its base model with --lora {path}")
    n_ctx = meta.get(f"{arch}.context_length")
    if not isinstance(n_ctx, int) or n_ctx < 1:
        raise ServeError(f"{path}: metadata {arch}.context_length is missing; llama.cpp cannot size its context")
    return {"arch": arch, "n_ctx": int(n_ctx), "chat_template": meta.get("tokenizer.chat_template"), "runtime": runtime}


def export_for_serving(checkpoint, directory, quant: str = DEFAULT_QUANT) -> Path:
    """Export a checkpoint directory to `directory`/model-<quant>.gguf in the arch its format runs in (the fork's
    felix arch for RQ4, stock llama otherwise; splices merged)."""
    try:
        quant = check_type(quant)
        out = Path(directory) / f"model-{quant}.gguf"
        export_gguf(checkpoint, out, arch=arch_of(quant), quant=quant)
    except (ExportError, CheckpointError, FileNotFoundError, ValueError) as e:
        raise ServeError(f"cannot export {checkpoint} for serving: {e}") from None
    return out


def server_environment(runtime: str) -> dict[str, str]:
    """The child's environment: the fork's llama_cpp for the fork runtime, this Python's for stock; checked to
    hold the server's packages."""
    ok, why = available(runtime)
    if not ok:
        raise ServeError(f"cannot serve: {why}")
    if runtime == "fork":
        env = fork.worker_environment()
    else:
        env = dict(os.environ)
    missing = [m for m in SERVER_PACKAGES if importlib.util.find_spec(m) is None]
    if missing:
        raise ServeError(
            f"llama-cpp-python's server needs {', '.join(missing)}: pip install "
            "'llama-cpp-python[server]' (Felix's `serve` extra)"
        )
    env["PYTHONUNBUFFERED"] = "1"
    return env


# ------------------------------------------------------------------------------------ the server
class Server:
    """One model served on host:port by llama-cpp-python's OpenAI-compatible server in a child process.

    `model`: a GGUF file, or a checkpoint directory (exported to `quant` in a temporary directory first). `port` 0
    picks a free port (``server.port`` says which). `lora`/`lora_scale`: a LoRA adapter GGUF loaded with the model.
    `n_ctx`: the context (default: the file's context_length). Starts on construction and waits until the chat
    API answers; on any failure raises ServeError with the reason and the end of the server's log, and nothing is
    left running. Use it as a context manager, or call :meth:`close`."""

    def __init__(
        self,
        model,
        *,
        quant: str = DEFAULT_QUANT,
        host: str = DEFAULT_HOST,
        port: int = 0,
        lora=None,
        lora_scale: float = 1.0,
        n_ctx: int | None = None,
        n_threads: int | None = None,
        startup_timeout: float = 120.0,
        log_path=None,
    ):
        self.proc: subprocess.Popen | None = None
        self._workdir = Path(tempfile.mkdtemp(prefix="felix-serve-"))
        self._own_log = log_path is None
        self.log_path = Path(log_path) if log_path else self._workdir / "server.log"
        try:
            self._start(Path(model), quant, host, port, lora, lora_scale, n_ctx, n_threads, startup_timeout)
        except BaseException:
            self.close()
            raise
        _LIVE.add(self)

    def _start(self, model: Path, quant, host, port, lora, lora_scale, n_ctx, n_threads, timeout) -> None:
        if not model.exists():
            raise ServeError(f"{model}: no such file or checkpoint directory")
        if model.is_dir():
            self.gguf = export_for_serving(model, self._workdir, quant)
        else:
            self.gguf = model
        facts = gguf_facts(self.gguf)
        self.runtime, self.arch, self.chat_template = facts["runtime"], facts["arch"], facts["chat_template"]
        if self.chat_template is None:
            print(
                f"felix serve: warning: {self.gguf} has no tokenizer.chat_template, so /v1/chat/completions "
                "will prompt it in llama-cpp-python's fallback (llama-2) format; re-export it with this Felix",
                file=sys.stderr,
            )
        if lora is not None:
            lora = Path(lora)
            try:
                lmeta = metadata(open_gguf(lora))
            except GGUFError as e:
                raise ServeError(f"--lora: {e}") from None
            if lmeta.get("general.type") != "adapter":
                raise ServeError(
                    f"--lora {lora} is not a LoRA adapter GGUF (general.type is "
                    f"{lmeta.get('general.type')!r}, not 'adapter')"
                )
        self.n_ctx = int(n_ctx or facts["n_ctx"])
        self.host, self.lora, self.lora_scale = host, lora, lora_scale
        env = server_environment(self.runtime)
        status_file = self._workdir / "status.json"
        cmd = [
            sys.executable,
            str(_CHILD),
            "--model",
            str(self.gguf),
            "--host",
            host,
            "--port",
            str(int(port)),
            "--n-ctx",
            str(self.n_ctx),
            "--status-file",
            str(status_file),
            "--watch-stdin",
        ]
        if n_threads:
            cmd += ["--n-threads", str(int(n_threads))]
        if lora is not None:
            cmd += ["--lora", str(lora), "--lora-scale", repr(float(lora_scale))]
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        self.port = None
        while True:
            status = _read_status(status_file)
            if status and "error" in status:
                raise ServeError(f"cannot serve {self.gguf}: {status['error']}" + self.log_tail())
            if status and self.port is None:
                self.port = int(status["port"])
            if self.port is not None and self._ready():
                return
            if self.proc.poll() is not None:
                raise ServeError(
                    f"the server for {self.gguf} exited with code {self.proc.returncode} while "
                    f"starting{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise ServeError(f"the server for {self.gguf} did not answer within {timeout:.0f} s" + self.log_tail())
            time.sleep(0.05)

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_bytes().decode("utf-8", errors="replace")
        except OSError:
            return ""
        keep = [ln for ln in text.strip().splitlines() if ln.strip()][-lines:]
        return ("\n--- server log (" + str(self.log_path) + ") ---\n" + "\n".join(keep)) if keep else ""

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/v1/models", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    @property
    def url(self) -> str:
        """http://host:port (the OpenAI base URL is ``url + "/v1"``)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # ---------------------------------------------------------------- requests (plain HTTP, no client library)
    def request(self, path: str, body: dict | None = None, timeout: float = 300.0) -> dict:
        """POST `body` (GET without one) to `path`; the JSON answer, or RequestError with the server's message."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                payload = json.loads(raw)
            except ValueError:
                payload = {"error": {"message": raw.decode("utf-8", errors="replace")}}
            err = payload.get("error") if isinstance(payload.get("error"), dict) else {}
            message = err.get("message") or json.dumps(payload.get("detail", payload))
            raise RequestError(e.code, message, payload) from None

    def chat(self, messages: list[dict], **params) -> dict:
        """One /v1/chat/completions request (OpenAI fields in `params`: temperature, max_tokens, response_format...)."""
        return self.request("/v1/chat/completions", {"messages": messages, **params})

    def chat_text(self, messages: list[dict], **params) -> str:
        """The assistant's answer text of :meth:`chat`."""
        return self.chat(messages, **params)["choices"][0]["message"]["content"]

    # ---------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 10 s) and remove its temporary files."""
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if proc.stdin:
                proc.stdin.close()
        log = getattr(self, "_log", None)
        if log is not None and not log.closed:
            log.close()
        if self._workdir.exists():
            shutil.rmtree(self._workdir, ignore_errors=True)
        _LIVE.discard(self)

    def wait(self) -> int:
        """Block until the server exits on its own; its exit code."""
        return self.proc.wait() if self.proc is not None else 0

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if getattr(self, "proc", None) is not None:
            self.close()


def _read_status(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@atexit.register
def _stop_all() -> None:
    for server in list(_LIVE):
        server.close()
