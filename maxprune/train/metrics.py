"""Training metrics: MFU against a device-peak table, metrics.jsonl and TensorBoard.

Peaks are dense bf16 FLOP/s per chip from the vendors' data sheets. On CPU
there is no data sheet worth trusting, so the peak is measured once per
process with a large fp32 matmul (what XLA's CPU kernels reach on this host).
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from maxprune.fs import atomic

# device_kind substring (lower case) -> peak dense bf16 FLOP/s per device
DEVICE_PEAKS: dict[str, float] = {
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,  # v5e
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,
    "tpu v6 lite": 918e12,  # v6e (Trillium)
    "tpu v6e": 918e12,
    "a100": 312e12,
    "h100": 989e12,
    "h200": 989e12,
}


@functools.lru_cache(maxsize=1)
def measured_cpu_peak(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` fp32 n×n×n matmuls on this host."""
    a = jnp.ones((n, n), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n ** 3 / best


def device_peak(device: jax.Device | None = None) -> tuple[float, str]:
    """(peak FLOP/s per device, where the number comes from)."""
    device = device or jax.devices()[0]
    kind = device.device_kind.lower()
    for key, peak in DEVICE_PEAKS.items():
        if key in kind:
            return peak, f"data sheet ({device.device_kind}, bf16 dense)"
    if device.platform == "cpu":
        return measured_cpu_peak(), "measured fp32 2048^3 matmul on this CPU"
    return float("nan"), f"unknown device {device.device_kind!r}"


def mfu(tokens_per_s: float, flops_per_token: float, num_devices: int, peak_per_device: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the devices' peak."""
    return tokens_per_s * flops_per_token / (num_devices * peak_per_device)


class MetricsWriter:
    """Appends one JSON line per record to metrics.jsonl (and TensorBoard); process 0 only."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        if self.enabled and tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def write(self, step: int, values: dict[str, Any], kind: str = "train") -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, **{k: _plain(v) for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tb.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def drop_after(run_dir: str | Path, step: int) -> None:
    """Drop rows logged after `step` (a resumed run logs them again), atomically."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    keep = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError):  # a line cut short by a kill
            continue
    if len(keep) != len(lines):
        atomic.write_text(path, "".join(line + "\n" for line in keep))


def read_metrics(run_dir: str | Path, kind: str | None = None) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if kind is None or r["kind"] == kind]


def _plain(value):
    try:
        return float(value) if not isinstance(value, (int, str, bool, type(None))) else value
    except TypeError:
        return str(value)


class CompileClock:
    """Seconds JAX spends tracing, lowering and compiling (XLA) while active, and how many programs.

    Reads JAX's own compile events (`jax.monitoring`), so it counts every jit in
    the process: the train step, evaluation, pruning passes, checkpoint I/O.
    """

    EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
              "/jax/core/compile/backend_compile_duration")

    def __init__(self):
        self.seconds, self.programs = 0.0, 0

    def _listen(self, event: str, duration: float, **kwargs) -> None:
        if event in self.EVENTS:
            self.seconds += duration
            self.programs += event == self.EVENTS[-1]

    def __enter__(self) -> CompileClock:
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listen)
