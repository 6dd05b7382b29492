"""Multi-host start-up: join the multi-process JAX job the environment describes.

Every process of a multi-host job (TPU pod slice, several GPU hosts, the local
CPU test launcher) runs the same `maxprune` command; `initialize()` must run in
each of them before any other JAX call. It reads the environment:

- ``MAXPRUNE_COORDINATOR=host:port`` with ``MAXPRUNE_NUM_PROCESSES`` and
  ``MAXPRUNE_PROCESS_ID``: an explicit job (the local launcher, hand-made clusters).
- ``MAXPRUNE_DISTRIBUTED=1``, or a multi-host TPU environment
  (``TPU_WORKER_HOSTNAMES`` naming more than one host, ``MEGASCALE_COORDINATOR_ADDRESS``):
  JAX detects the cluster itself (GCE TPU metadata, SLURM, Open MPI, Kubernetes).
- ``MAXPRUNE_DISTRIBUTED=0`` turns all of this off; nothing set means one process.
- ``MAXPRUNE_INIT_TIMEOUT`` (seconds, default 300) bounds the wait for the coordinator.

Why the coordinator is probed first: when JAX's client cannot reach the
coordinator it aborts the whole process from C++ (a check failure, no Python
exception). A plain TCP probe before that turns an unreachable coordinator into
a one-line `MaxpruneError` naming the address. (Process 0 *is* the coordinator;
if the other processes never arrive, JAX's own abort after the timeout is all
there is.)
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from collections.abc import Mapping

from maxprune.errors import MaxpruneError

DEFAULT_TIMEOUT_S = 300


@dataclasses.dataclass(frozen=True)
class Plan:
    """How this process joins: explicit coordinator/count/id, or None for JAX to detect."""

    coordinator: str | None
    num_processes: int | None
    process_id: int | None
    timeout_s: int

    @property
    def auto(self) -> bool:
        return self.coordinator is None


def plan(environ: Mapping[str, str] | None = None) -> Plan | None:
    """The join `environ` asks for (default: `os.environ`), or None for a single process."""
    env = os.environ if environ is None else environ
    flag = env.get("MAXPRUNE_DISTRIBUTED", "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return None
    if flag not in ("", "1", "true", "yes", "on", "auto"):
        raise MaxpruneError(f"MAXPRUNE_DISTRIBUTED={env['MAXPRUNE_DISTRIBUTED']!r} must be 1 (join the "
                            f"job JAX detects) or 0 (single process)")
    timeout = _int_env(env, "MAXPRUNE_INIT_TIMEOUT", DEFAULT_TIMEOUT_S, minimum=1)
    coordinator = env.get("MAXPRUNE_COORDINATOR", "").strip()
    if coordinator:
        _split_address(coordinator)
        num = _int_env(env, "MAXPRUNE_NUM_PROCESSES", None, minimum=1)
        pid = _int_env(env, "MAXPRUNE_PROCESS_ID", None, minimum=0)
        if num is None or pid is None:
            raise MaxpruneError(f"MAXPRUNE_COORDINATOR={coordinator} needs MAXPRUNE_NUM_PROCESSES and "
                                f"MAXPRUNE_PROCESS_ID too")
        if pid >= num:
            raise MaxpruneError(f"MAXPRUNE_PROCESS_ID={pid} must be < MAXPRUNE_NUM_PROCESSES={num}")
        return Plan(coordinator, num, pid, timeout)
    if flag or _multihost_tpu(env):
        return Plan(None, None, None, timeout)
    return None


def _multihost_tpu(env: Mapping[str, str]) -> bool:
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    return len(hosts) > 1 or bool(env.get("MEGASCALE_COORDINATOR_ADDRESS"))


def initialize(environ: Mapping[str, str] | None = None) -> bool:
    """Join the multi-process job `environ` describes; True if joined, False if single-process.

    Call before any other JAX call. Idempotent: a second call in a joined process is a no-op.
    """
    p = plan(environ)
    if p is None:
        return False
    import jax

    if jax.distributed.is_initialized():
        return True
    coordinator, num, pid = p.coordinator, p.num_processes, p.process_id
    local_ids = None
    if p.auto:
        coordinator, num, pid, local_ids = _detect(p.timeout_s)
    if coordinator and pid:  # process 0 starts the coordinator; the others must reach it
        wait_for_coordinator(coordinator, p.timeout_s)
    try:
        jax.distributed.initialize(coordinator, num, pid, local_device_ids=local_ids,
                                   initialization_timeout=p.timeout_s)
    except (RuntimeError, ValueError) as e:  # e.g. called after JAX started, or no cluster detected
        raise MaxpruneError(f"cannot join the multi-process job (coordinator {coordinator or 'auto'}): "
                            f"{' '.join(str(e).split())}") from e
    return True


def _detect(timeout_s: int):
    """(coordinator, num_processes, process_id, local_device_ids) as JAX's cluster detection finds them.

    Uses JAX's own detector (private API) so the coordinator can be probed first;
    if that API moves, JAX detects inside `jax.distributed.initialize` instead.
    """
    try:
        from jax._src import clusters
        detect = clusters.ClusterEnv.auto_detect_unset_distributed_params
    except (ImportError, AttributeError):
        return None, None, None, None
    try:
        found = detect(None, None, None, None, None, timeout_s)
    except Exception as e:  # noqa: BLE001 -- any detector failure means "no usable cluster here"
        raise MaxpruneError(_NO_CLUSTER.format(why=_one_line(e))) from e
    if found[0] is None:
        raise MaxpruneError(_NO_CLUSTER.format(why="no TPU pod, SLURM, Open MPI or Kubernetes job found"))
    return found


_NO_CLUSTER = ("a multi-process job was asked for (MAXPRUNE_DISTRIBUTED or a TPU pod environment) but JAX "
               "detected no cluster ({why}); set MAXPRUNE_COORDINATOR, MAXPRUNE_NUM_PROCESSES and "
               "MAXPRUNE_PROCESS_ID, or MAXPRUNE_DISTRIBUTED=0")


def wait_for_coordinator(address: str, timeout_s: float, interval_s: float = 0.25) -> None:
    """Return once `address` (host:port) accepts a TCP connection; MaxpruneError after `timeout_s`."""
    host, port = _split_address(address)
    deadline = time.monotonic() + timeout_s
    last = "no attempt"
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(1.0, timeout_s))):
                return
        except OSError as e:
            last = e.strerror or type(e).__name__
        if time.monotonic() >= deadline:
            raise MaxpruneError(f"the JAX coordinator at {address} did not answer within {timeout_s:g} s "
                                f"({last}); start process 0 first, check the address and firewall, "
                                f"or raise MAXPRUNE_INIT_TIMEOUT")
        time.sleep(interval_s)


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")  # [::1]:1234
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise MaxpruneError(f"coordinator address {address!r} must be host:port, e.g. 10.0.0.2:8476")
    return host, int(port)


def _int_env(env: Mapping[str, str], name: str, default: int | None, minimum: int) -> int | None:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise MaxpruneError(f"{name}={raw!r} must be an integer >= {minimum}")
    return value


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"
