"""The benchmark harness every Felix kernel reuses (driven by pytest-benchmark from bench/).

A *case* (say "quantize q8_0 1024x4096 cpu") is timed for several *implementations* in the same
run: Felix's own (the candidate) and its peers (ggml's C code, gguf-py, torch, ...). The recorder
turns pytest-benchmark's timings into what matters: GB/s or TFLOP/s, the ratio to each peer, and
the share of the device's roofline (its measured copy bandwidth for memory-bound kernels, its
peak FLOP/s for compute-bound ones). Results go to `bench/results/<device>.json`, a Markdown
summary and a PNG plot. Nothing here asserts on time: benchmarks report, tests assert.
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
from dataclasses import asdict, dataclass, field

import torch

from felix.testing.rss import peak_rss_bytes, peak_rss_growth_bytes, reset_peak_rss, rss_bytes  # noqa: F401


# ------------------------------------------------------------------------------------ device
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as fh:
            m = re.search(r"model name\s*:\s*(.+)", fh.read())
            model = m.group(1).strip() if m else model
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_copy_bandwidth(device: torch.device, nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + bytes written), best of `repeats`."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best / 1e9


# ----------------------------------------------------------------------------------- records
@dataclass
class Measurement:
    case: str  # what is computed, identical for every implementation compared
    impl: str  # who computes it
    candidate: bool  # Felix's own implementation (ratios are candidate vs each peer)
    seconds: float  # median wall time of one call
    bytes_moved: float  # bytes read + written by one call (0 if not meaningful)
    flops: float = 0.0  # floating-point operations of one call (0 if not meaningful)
    extra: dict = field(default_factory=dict)
    copy_gbps: float | None = None  # the copy bandwidth measured in the session that timed this (its % roofline)

    @property
    def gbps(self) -> float:
        return self.bytes_moved / self.seconds / 1e9 if self.bytes_moved else 0.0

    @property
    def tflops(self) -> float:
        return self.flops / self.seconds / 1e12 if self.flops else 0.0


class BenchRecorder:
    """Collects measurements of one benchmark session and writes the report."""

    def __init__(self, device: torch.device, copy_gbps: float | None = None, peak_tflops: float | None = None):
        self.device = device
        self.name = device_name(device)
        self.copy_gbps = copy_gbps
        self.peak_tflops = peak_tflops
        self.measurements: list[Measurement] = []

    def add(self, m: Measurement) -> None:
        if m.copy_gbps is None:
            m.copy_gbps = self.copy_gbps
        self.measurements.append(m)

    def rows(self) -> list[dict]:
        """One row per measurement, with ratios to every other implementation of the same case."""
        by_case: dict[str, list[Measurement]] = {}
        for m in self.measurements:
            by_case.setdefault(m.case, []).append(m)
        rows = []
        for case, ms in by_case.items():
            for m in ms:
                row = asdict(m) | {"gbps": m.gbps, "tflops": m.tflops}
                copy_gbps = m.copy_gbps or self.copy_gbps
                if copy_gbps and m.bytes_moved:
                    row["pct_copy_bandwidth"] = 100 * m.gbps / copy_gbps
                if self.peak_tflops and m.flops:
                    row["pct_peak_flops"] = 100 * m.tflops / self.peak_tflops
                # speedup of this implementation over each other one: >1 means this one is faster
                row["speedup_vs"] = {o.impl: o.seconds / m.seconds for o in ms if o is not m}
                rows.append(row)
        return rows

    def markdown(self) -> str:
        lines = [f"# Benchmarks on {self.name}", ""]
        if self.copy_gbps:
            lines.append(
                f"Measured copy bandwidth: {self.copy_gbps:.1f} GB/s (read + write) in the latest session; "
                f"each row's % is against the bandwidth measured in the session that timed it."
            )
        if self.peak_tflops:
            lines.append(f"Peak used for %-of-roofline: {self.peak_tflops:.1f} TFLOP/s.")
        lines += [
            "",
            "| case | impl | median ms | GB/s | % copy BW | speedup of candidate vs this peer | other |",
            "|---|---|---|---|---|---|---|",
        ]
        rows = self.rows()
        for r in rows:
            cand = [c for c in rows if c["case"] == r["case"] and c["candidate"]]
            vs = (
                f"{cand[0]['speedup_vs'][r['impl']]:.2f}x"
                if cand and not r["candidate"] and r["impl"] in cand[0]["speedup_vs"]
                else ("(candidate)" if r["candidate"] else "-")
            )
            pct = f"{r['pct_copy_bandwidth']:.1f}" if "pct_copy_bandwidth" in r else "-"
            other = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r["extra"].items())
            lines.append(
                f"| {r['case']} | {r['impl']} | {1e3 * r['seconds']:.3f} | {r['gbps']:.2f} | {pct} | {vs} | "
                f"{other or '-'} |"
            )
        return "\n".join(lines) + "\n"

    def plot(self, path: str) -> None:
        """Horizontal bars of GB/s per case and implementation (candidate highlighted)."""
        import matplotlib  # local: heavy (half a second), loaded only when a plot is drawn; Agg before pyplot

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [r for r in self.rows() if r["gbps"]]
        if not rows:
            return
        labels = [f"{r['case']} | {r['impl']}" for r in rows]
        fig, ax = plt.subplots(figsize=(10, 0.28 * len(rows) + 1.5))
        colors = ["tab:orange" if r["candidate"] else "tab:blue" for r in rows]
        ax.barh(range(len(rows)), [r["gbps"] for r in rows], color=colors)
        ax.set_yticks(range(len(rows)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("GB/s (bytes in + bytes out); orange = Felix")
        if self.copy_gbps:
            ax.axvline(self.copy_gbps, color="gray", linestyle="--", linewidth=1)
            ax.text(self.copy_gbps, -0.8, " copy BW", color="gray", fontsize=7)
        ax.set_title(f"Felix benchmarks on {self.name}", fontsize=9)
        fig.tight_layout()
        tmp = path + ".tmp.png"
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        os.replace(tmp, path)

    def write(self, directory: str) -> str:
        """Write <slug>.json, <slug>.md and <slug>.png atomically (merging with earlier cases of the
        same device, so separate runs of bench files accumulate). Returns the JSON path."""
        os.makedirs(directory, exist_ok=True)
        base = os.path.join(directory, device_slug(self.device))
        old, old_copy_gbps = [], None
        if os.path.exists(base + ".json"):
            with open(base + ".json") as fh:
                payload = json.load(fh)
            old, old_copy_gbps = payload.get("measurements", []), payload.get("copy_gbps")
        keep = {(m.case, m.impl) for m in self.measurements}
        merged = [
            Measurement(
                **(
                    {"copy_gbps": old_copy_gbps}
                    | {k: v for k, v in m.items() if k in Measurement.__dataclass_fields__ and v is not None}
                )
            )
            for m in old
            if (m["case"], m["impl"]) not in keep
        ]
        self.measurements = merged + self.measurements
        payload = {
            "device": self.name,
            "copy_gbps": self.copy_gbps,
            "peak_tflops": self.peak_tflops,
            "torch": torch.__version__,
            "written": time.strftime("%Y-%m-%d %H:%M:%S"),
            "measurements": [asdict(m) for m in self.measurements],
            "rows": self.rows(),
        }
        for suffix, text in ((".json", json.dumps(payload, indent=1)), (".md", self.markdown())):
            with open(base + suffix + ".tmp", "w") as fh:
                fh.write(text)
            os.replace(base + suffix + ".tmp", base + suffix)
        self.plot(base + ".png")
        return base + ".json"
