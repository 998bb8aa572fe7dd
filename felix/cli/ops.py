"""`felix quantize`, `felix backends`, `felix aot-report`, `felix selftest`: the ops stage (felix/ops) on this machine."""

from __future__ import annotations

import importlib
import sys
import time

import torch
from tqdm import tqdm

from felix import __version__
from felix.core.formats import FORMATS, LARGEST_BLOCK, get_format
from felix.ops import aot, selftest
from felix.ops.codecs import dequantize, quantize
from felix.ops.dispatch import backends, runnable_backends
from felix.ship import llamacpp


def builtin_weights(rows: int, cols: int, seed: int) -> torch.Tensor:
    """A weight-like matrix that needs no download: Student-t (heavy tails, like trained LLM weights)
    with per-row scales and a few planted outlier columns."""
    g = torch.Generator().manual_seed(seed)
    t = torch.distributions.StudentT(torch.tensor(5.0))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        x = t.sample((rows, cols))
    x *= 0.02 * torch.exp(0.3 * torch.randn(rows, 1, generator=g))
    outliers = torch.randint(0, cols, (max(1, cols // 512),), generator=g)
    x[:, outliers] *= 8.0
    return x.float()


def _timed(fn, repeats: int):
    fn()  # warm-up (Triton JIT, caches)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        if isinstance(out, torch.Tensor) and out.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return out, best


def quantize_args_problem(args) -> str | None:
    """What is wrong with `felix quantize`'s arguments beyond what argparse checks (None: nothing)."""
    if args.cols % LARGEST_BLOCK:
        return f"--cols {args.cols} must be a multiple of {LARGEST_BLOCK} (the largest block)"
    return None


def cmd_quantize(args) -> int:
    device = torch.device(args.device)
    x = builtin_weights(args.rows, args.cols, args.seed).to(device)
    backend_names = args.backend or runnable_backends("quantize", device)
    formats = args.format or list(FORMATS)
    print(
        f"felix {__version__}: built-in weight matrix {args.rows}x{args.cols} (Student-t, outlier "
        f"columns, seed {args.seed}) on {device}; backends: {', '.join(backend_names)}"
    )
    rows = []
    jobs = [(fmt, b) for fmt in formats for b in backend_names]
    reference_bytes = {}
    for fmt, backend in tqdm(jobs, desc="quantizing", unit="case", disable=not sys.stderr.isatty()):
        f = get_format(fmt)
        blocks, tq = _timed(lambda: quantize(x, fmt, backend=backend), args.repeats)
        y, td = _timed(lambda: dequantize(blocks, fmt, x.shape, backend=backend), args.repeats)
        err = (x - y).abs()
        snr = 10 * torch.log10(x.pow(2).sum() / (x - y).pow(2).sum().clamp_min(1e-30))
        same = reference_bytes.setdefault(fmt, blocks.cpu())
        nbytes = x.numel() * 4 + blocks.numel()
        rows.append(
            (
                fmt,
                backend,
                f.bits_per_weight,
                float(err.max()),
                float(err.mean()),
                float(err.sum() / x.abs().sum()),
                float(snr),
                nbytes / tq / 1e9,
                nbytes / td / 1e9,
                "yes" if torch.equal(same, blocks.cpu()) else "NO",
            )
        )
    head = (
        f"{'format':8} {'backend':9} {'bits/w':>6} {'max|err|':>9} {'mean|err|':>9} {'rel err':>8} "
        f"{'SNR dB':>7} {'quant GB/s':>10} {'deq GB/s':>9} {'same bytes':>10}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r[0]:8} {r[1]:9} {r[2]:6.3f} {r[3]:9.5f} {r[4]:9.6f} {r[5]:8.4f} {r[6]:7.2f} {r[7]:10.2f} "
            f"{r[8]:9.2f} {r[9]:>10}"
        )
    print("'same bytes' compares each backend with the first one listed: every backend writes ggml's exact bytes.")
    return 0 if all(r[9] == "yes" for r in rows) else 1


def cmd_backends(args) -> int:
    print("op backends:")
    for name, s in backends().items():
        print(f"  {name:10} {'yes' if s.available else 'no ':3}  {s.reason}")
    print("GGUF runtimes (felix.ship.llamacpp):")
    for name in llamacpp.RUNTIMES:
        ok, why = llamacpp.available(name)
        print(f"  {name:10} {'yes' if ok else 'no ':3}  {why}")
    return 0


def cmd_aot_report(args) -> int:
    reports = []
    for module in args.modules or aot.kernel_modules():
        mod = importlib.import_module(f"felix.ops.kernels.{module}")  # a Triton kernel module, chosen at run time
        for target in args.target or list(aot.ARCH_KEYS):
            for spec in mod.aot_specs(aot.ARCH_KEYS[target]):
                reports.append(aot.resource_report(spec, target))
    print(aot.format_reports(reports))
    spilled = [r for r in reports if r.spill_bytes]
    for r in spilled:
        print(f"SPILLS: {r.kernel} on {r.target}: {r.spill_bytes} bytes", file=sys.stderr)
    return 1 if spilled else 0


def cmd_selftest(args) -> int:
    device = torch.device(args.device)
    print(
        f"felix {__version__} selftest on {device} "
        f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), torch {torch.__version__}"
    )
    for name, s in backends().items():
        print(f"  backend {name:9} {'yes' if s.available else 'no ':3} {s.reason}")
    rows = selftest.run(device, args.op, args.seed)
    print(selftest.format_table(rows))
    failed = [r for r in rows if not r.passed]
    print(f"{len(rows) - len(failed)}/{len(rows)} checks passed" + (f"; {len(failed)} FAILED" if failed else ""))
    return 1 if failed or not rows else 0


def add_quantize_parser(sub) -> None:
    q = sub.add_parser("quantize", help="codec demo on a built-in weight matrix: error and speed per format")
    q.add_argument("--format", action="append", choices=list(FORMATS), help="format to run (repeatable; default: all)")
    q.add_argument(
        "--backend",
        action="append",
        choices=["reference", "triton", "cpu"],
        help="backend to run (repeatable; default: every available one)",
    )
    q.add_argument("--rows", type=int, default=1024)
    q.add_argument(
        "--cols",
        type=int,
        default=4096,
        help=f"a multiple of {LARGEST_BLOCK} (the largest block) so every format applies",
    )
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--repeats", type=int, default=3, help="timed repeats (best is reported)")
    q.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    q.set_defaults(func=cmd_quantize, args_problem=quantize_args_problem)


def add_backends_parser(sub) -> None:
    b = sub.add_parser("backends", help="which backends run on this machine")
    b.set_defaults(func=cmd_backends)


def add_aot_report_parser(sub) -> None:
    a = sub.add_parser("aot-report", help="compile Triton kernels for real targets and report resources")
    a.add_argument("--target", action="append", choices=list(aot.ARCH_KEYS), help="default: both")
    a.add_argument("--modules", nargs="+", help="kernel modules under felix.ops.kernels (default: all of them)")
    a.set_defaults(func=cmd_aot_report)


def add_selftest_parser(sub) -> None:
    t = sub.add_parser("selftest", help="every op vs its torch reference on this machine; exit 1 on failure")
    t.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    t.add_argument("--op", action="append", choices=list(selftest.CHECKS), help="default: all")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=cmd_selftest)
