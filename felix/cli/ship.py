"""`felix export`, `felix inspect`, `felix serve`: the ship stage (felix/ship) -- a checkpoint to GGUF, a GGUF's
contents, and a model on llama.cpp's OpenAI-compatible chat API."""

from __future__ import annotations

import signal
import sys

from felix.model.felix_lm import CheckpointError
from felix.ops.quant_policy import EXPORT_TYPES
from felix.ship.export import ARCHES, SPLICE_MODES, ExportError, export_gguf
from felix.ship.gguf_file import GGUFError, metadata, open_gguf, torch_shape
from felix.ship.serve import DEFAULT_HOST, DEFAULT_QUANT, Server, ServeError


def cmd_export(args) -> int:
    try:
        result = export_gguf(
            args.checkpoint,
            args.out,
            arch=args.arch,
            quant=args.quant,
            splice=args.splice,
            force=args.force,
            embedding_type=args.embedding_type,
            adapter_out=args.adapter_out,
            progress=sys.stderr.isatty(),
            spokes=args.spokes,
        )
    except (ExportError, CheckpointError, GGUFError, FileNotFoundError) as e:
        print(f"felix export: error: {e}", file=sys.stderr)
        return 2
    print(result.table())
    return 0


def cmd_inspect(args) -> int:
    try:
        reader = open_gguf(args.file)
        meta = metadata(reader, args.file)
    except GGUFError as e:
        print(f"felix inspect: error: {e}", file=sys.stderr)
        return 2
    print(
        f"{args.file}: GGUF v{int(reader.fields['GGUF.version'].parts[-1][0])}, {len(meta)} metadata keys, "
        f"{len(reader.tensors)} tensors"
    )
    for key, value in meta.items():
        if isinstance(value, list) and len(value) > args.max_items:
            value = f"[{', '.join(map(repr, value[: args.max_items]))}, ... ({len(value)} items)]"
        print(f"  {key} = {value}")
    rows = [(t.name, "x".join(map(str, torch_shape(t))), t.tensor_type.name, t.n_bytes) for t in reader.tensors]
    if rows:
        w = [max(len(str(r[i])) for r in rows) for i in range(3)]
        print(f"\n  {'tensor'.ljust(w[0])}  {'shape'.ljust(w[1])}  {'type'.ljust(w[2])}  bytes")
        for name, shape, typ, nbytes in rows:
            print(f"  {name.ljust(w[0])}  {shape.ljust(w[1])}  {typ.ljust(w[2])}  {nbytes:,}")
        total = sum(r[3] for r in rows)
        weights = sum(int(t.n_elements) for t in reader.tensors)
        print(
            f"\n  {total / 2**20:.2f} MiB of tensor data, {weights / 1e6:.2f}M weights, "
            f"{8 * total / max(1, weights):.2f} bits/weight"
        )
    return 0


def add_export_parser(sub) -> None:
    e = sub.add_parser(
        "export",
        help="export a checkpoint to GGUF (llama.cpp or the felix fork)",
        description="Export a Felix checkpoint directory (config.json, model.safetensors, "
        "tokenizer.json) to GGUF. Per-tensor types follow felix.ops.quant_policy: norms, "
        "gates, splices and small tensors F32, embeddings Q8_0 for 4-bit exports, "
        "rows that do not fit the block size fall back (reported).",
    )
    e.add_argument("checkpoint", help="checkpoint directory (e.g. runs/tiny/checkpoint)")
    e.add_argument("out", help="output .gguf path (written atomically)")
    e.add_argument("--arch", choices=ARCHES, default="llama", help="llama: stock llama.cpp; felix: the fork")
    e.add_argument("--quant", choices=EXPORT_TYPES, default="f16", help="type of the large 2-D tensors")
    e.add_argument(
        "--splice",
        choices=SPLICE_MODES,
        default="merge",
        help="merge into the weights, or a separate LoRA adapter GGUF (both runtimes apply it, with a live scale)",
    )
    e.add_argument(
        "--embedding-type",
        choices=EXPORT_TYPES,
        help="type of token_embd/output (default: Q8_0 for 4-bit and ternary exports, else --quant)",
    )
    e.add_argument("--adapter-out", help="adapter path for --splice adapter (default: OUT stem + .splice-lora.gguf)")
    e.add_argument(
        "--spokes",
        help="a spoke file (spokes.safetensors of a --train-only spokes run) to attach to "
        "the checkpoint's hub; refused when it was trained on another hub (--arch felix)",
    )
    e.add_argument("--force", action="store_true", help="overwrite existing output files")
    e.set_defaults(func=cmd_export)


def add_inspect_parser(sub) -> None:
    i = sub.add_parser("inspect", help="metadata and tensor table of any GGUF file")
    i.add_argument("file")
    i.add_argument("--max-items", type=int, default=8, help="array values longer than this are shortened")
    i.set_defaults(func=cmd_inspect)


def _stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (a service manager, `kill`) stops the server as Ctrl-C does, cleaning up


def cmd_serve(args) -> int:
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        return _serve_until_stopped(args)
    finally:
        signal.signal(signal.SIGTERM, previous)  # called in-process (tests, scripts): leave no handler behind


def _serve_until_stopped(args) -> int:
    try:
        server = Server(
            args.model,
            quant=args.quant,
            host=args.host,
            port=args.port,
            lora=args.lora,
            lora_scale=args.lora_scale,
            n_ctx=args.n_ctx,
            n_threads=args.threads,
            log_path=args.log,
        )
    except ServeError as e:
        print(f"felix serve: error: {e}", file=sys.stderr)
        return 2
    with server:
        print(
            f"felix serve: {server.gguf} ({server.arch} arch, {server.runtime} llama.cpp, context {server.n_ctx}"
            + (f", LoRA {server.lora} at scale {server.lora_scale}" if server.lora else "")
            + ")"
        )
        print(
            f"felix serve: OpenAI-compatible API at {server.base_url} (POST /chat/completions); log "
            f"{server.log_path}; Ctrl-C stops",
            flush=True,
        )
        try:
            code = server.wait()
        except KeyboardInterrupt:
            return 0
    print(f"felix serve: the server exited with code {code}{server.log_tail()}", file=sys.stderr)
    return 1


def add_serve_parser(sub) -> None:
    s = sub.add_parser(
        "serve",
        help="serve a checkpoint or GGUF on llama.cpp's OpenAI-compatible chat API",
        description="Serve a model through llama-cpp-python's OpenAI-compatible server "
        "(/v1/chat/completions, /v1/completions), bound to 127.0.0.1 by default. A "
        "checkpoint directory is exported first (--quant). The GGUF's chat template "
        "puts requests in Felix's chat format; temperature 0 is greedy; "
        "response_format json_object / json_schema constrains decoding to the schema.",
    )
    s.add_argument("model", help="a GGUF file, or a checkpoint directory (exported to --quant first)")
    s.add_argument(
        "--quant",
        choices=EXPORT_TYPES,
        default=DEFAULT_QUANT,
        help=f"export type for a checkpoint (default {DEFAULT_QUANT}; rq4 serves through the fork)",
    )
    s.add_argument("--host", default=DEFAULT_HOST, help=f"listen address (default {DEFAULT_HOST}: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = a free one, printed)")
    s.add_argument("--lora", help="a LoRA adapter GGUF to load with the model (e.g. felix export --splice adapter)")
    s.add_argument("--lora-scale", type=float, default=1.0, help="the adapter's scale (default 1)")
    s.add_argument("--n-ctx", type=int, help="context length (default: the model's)")
    s.add_argument("--threads", type=int, help="CPU threads (default: llama-cpp-python's)")
    s.add_argument("--log", help="append the server's log here (default: a temporary file)")
    s.set_defaults(func=cmd_serve)
