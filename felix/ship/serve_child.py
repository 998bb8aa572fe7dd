"""The process behind `felix serve` (felix.ship.serve starts it): llama-cpp-python's OpenAI-compatible server
(``llama_cpp.server``) on one GGUF, with Felix's settings.

Standalone on purpose: it imports no felix module, so it starts in about a second, and the ``llama_cpp`` it serves
with is whichever its environment gives it (stock, or the fork's through felix.core.fork.worker_environment()).

What it adds to ``python -m llama_cpp.server`` (each measured in tests/ship/test_serve_llamacpp.py):

* the socket is bound before the model loads, so a port in use fails at once with a clear message; the port
  actually bound (``--port 0``: a free one) is written to ``--status-file`` as JSON, and so is a failure;
* temperature 0 means greedy decoding, as in llama.cpp's own llama-server: llama-cpp-python's server defaults a
  request's ``repeat_penalty`` to 1.1, which changes even a temperature-0 answer (JSON repeats its quotes and
  colons), so requests default to 1.0 here (a request may still send its own);
* ``response_format``: OpenAI's ``{"type": "json_schema", "json_schema": {"schema": ...}}`` is passed on as the
  ``{"type": "json_object", "schema": ...}`` llama-cpp-python 0.3.x understands (it rejects the former with 422),
  and a schema that cannot become a GBNF grammar is answered with HTTP 400 and the converter's reason, where
  llama-cpp-python would silently fall back to "any JSON";
* ``--lora-scale``: llama-cpp-python's server loads ``lora_path`` at scale 1 only;
* the server ends when its parent does (its stdin, a pipe from the parent, closes).
"""

import os
import sys

# Run as a script, this file's folder (felix/) would come first on sys.path and shadow top-level modules.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import threading  # noqa: E402

CHAT_PATH = "/v1/chat/completions"


def write_status(path: str, status: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(status, f)
    os.replace(tmp, path)


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT only, never a live listener
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def normalize_request(obj: dict) -> str | None:
    """Rewrite a chat request in place for llama-cpp-python; return an error message for a 400 instead."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf  # local: optional, the serve extra

    rf = obj.get("response_format")
    if not isinstance(rf, dict):
        return None
    if rf.get("type") == "json_schema":
        spec = rf.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            return "response_format of type json_schema needs json_schema.schema, a JSON Schema object"
        rf = obj["response_format"] = {"type": "json_object", "schema": schema}
    if rf.get("type") == "json_object" and "schema" in rf:
        try:
            json_schema_to_gbnf(json.dumps(rf["schema"]))
        except Exception as e:  # the converter raises whatever it meets (ValueError, KeyError, TypeError, ...)
            return f"response_format schema cannot become a grammar: {type(e).__name__}: {e}"
    return None


class FelixRequests:
    """ASGI middleware: chat requests through normalize_request (400 on a schema that cannot become a grammar)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != CHAT_PATH:
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        try:
            obj = json.loads(body)
        except ValueError:
            obj = None  # the server's own validation answers it
        if isinstance(obj, dict):
            error = normalize_request(obj)
            if error is not None:
                payload = json.dumps(
                    {
                        "error": {
                            "message": error,
                            "type": "invalid_request_error",
                            "param": "response_format",
                            "code": None,
                        }
                    }
                ).encode()
                await send(
                    {
                        "type": "http.response.start",
                        "status": 400,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": payload})
                return
            body = json.dumps(obj).encode()
        delivered = False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await self.app({**scope, "headers": headers}, replay, send)


def greedy_defaults() -> None:
    """repeat_penalty 1.0 by default (llama-server's default), before the app's routes are built from the types."""
    import llama_cpp.server.types as types  # local: optional, the serve extra

    for cls in (types.CreateChatCompletionRequest, types.CreateCompletionRequest):
        cls.model_fields["repeat_penalty"].default = 1.0
        cls.model_rebuild(force=True)


def scaled_lora(scale: float) -> None:
    """The server builds its model with llama_cpp.Llama(...) and no lora_scale: give it one."""
    import llama_cpp  # local: optional, the serve extra

    base = llama_cpp.Llama

    class ScaledLlama(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, lora_scale=scale, **kwargs)

    llama_cpp.Llama = ScaledLlama


def exit_with_parent() -> None:
    """The parent holds our stdin open; EOF means it is gone: shut down as on Ctrl-C."""

    def watch():
        try:
            while sys.stdin.buffer.read(1):
                pass
        except (OSError, ValueError):
            pass
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True).start()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the GGUF to serve")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0: a free port")
    p.add_argument("--n-ctx", type=int, required=True)
    p.add_argument("--n-threads", type=int)
    p.add_argument("--lora", help="a LoRA adapter GGUF")
    p.add_argument("--lora-scale", type=float, default=1.0)
    p.add_argument("--status-file", required=True)
    p.add_argument("--watch-stdin", action="store_true", help="exit when stdin closes (the parent is gone)")
    args = p.parse_args(argv)
    try:
        sock = bind(args.host, args.port)
    except OSError as e:
        write_status(
            args.status_file, {"error": f"cannot listen on {args.host}:{args.port}: {e.strerror or e}", "stage": "bind"}
        )
        return 3
    if args.watch_stdin:
        exit_with_parent()
    try:
        import uvicorn  # local: optional, the serve extra (missing: reported in the status file)

        greedy_defaults()
        if args.lora and args.lora_scale != 1.0:
            scaled_lora(args.lora_scale)
        from llama_cpp.server.app import create_app  # optional (serve extra); after greedy_defaults changed the types
        from llama_cpp.server.settings import ModelSettings, ServerSettings  # local: optional, the serve extra

        model = ModelSettings(
            model=args.model,
            n_ctx=args.n_ctx,
            lora_path=args.lora,
            verbose=True,
            **({"n_threads": args.n_threads, "n_threads_batch": args.n_threads} if args.n_threads else {}),
        )
        app = create_app(
            server_settings=ServerSettings(host=args.host, port=sock.getsockname()[1]), model_settings=[model]
        )
    except Exception as e:
        write_status(args.status_file, {"error": f"{type(e).__name__}: {e}", "stage": "load"})
        return 2
    write_status(args.status_file, {"port": sock.getsockname()[1], "pid": os.getpid()})
    config = uvicorn.Config(FelixRequests(app), log_level="warning", timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
