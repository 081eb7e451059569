#!/usr/bin/env python3
"""Start one Dask worker process per GPU, each pinned to its GPU, and supervise them.

Docker Compose cannot give each replica of a service its own GPU: every replica that reserves
``count: 1`` gets device 0. The GPU worker container therefore reserves the GPUs itself and this
launcher starts ``--workers`` copies of a command, worker ``i`` seeing only GPU
``gpus[i % len(gpus)]`` through ``CUDA_VISIBLE_DEVICES``.

Usage::

    hrdv2-gpu-workers [--gpus all|0,1,...] [--workers N] [--http-port 8790] -- COMMAND...

In COMMAND, ``{i}`` (worker index), ``{gpu}`` (its GPU), ``{host}`` (host name), ``{port}``
(``--http-port`` + i) and ``{memory_fraction}`` (1/N, for ``dask worker --memory-limit``) are
replaced for each worker. SIGTERM and SIGINT are passed on to the workers. When one worker exits,
the others are stopped and the launcher exits with that worker's status, so the container's
restart policy restarts the whole set.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

log = logging.getLogger("hrdv2-gpu-workers")


def count_gpus() -> int:
    """Number of CUDA devices torch sees, asked in a child process (the launcher never uses CUDA).

    Returns
    -------
    int
        0 when torch is missing or no GPU is visible.
    """
    code = "import torch; print(torch.cuda.device_count())"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    try:
        return int(res.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        log.warning("could not count GPUs: %s", res.stderr.strip()[-500:])
        return 0


def parse_gpus(
    spec: str, *, environ: dict[str, str] | None = None, count: Callable[[], int] = count_gpus
) -> list[str]:
    """The GPU ids to spread the workers over.

    Parameters
    ----------
    spec : str
        ``"all"`` or comma-separated ids (``"0,2"``) as the container numbers its GPUs
        (``CUDA_DEVICE_ORDER=PCI_BUS_ID``, the order of ``nvidia-smi``).
    environ : dict of str, optional
        Environment to read ``CUDA_VISIBLE_DEVICES`` from (default: ``os.environ``). With
        ``"all"``, a non-empty ``CUDA_VISIBLE_DEVICES`` gives the ids.
    count : callable, optional
        Returns the number of visible GPUs (``"all"`` without ``CUDA_VISIBLE_DEVICES``).

    Returns
    -------
    list of str
        GPU ids, in order, without duplicates.

    Examples
    --------
    >>> parse_gpus("0, 2")
    ['0', '2']
    >>> parse_gpus("all", environ={}, count=lambda: 3)
    ['0', '1', '2']
    >>> parse_gpus("all", environ={"CUDA_VISIBLE_DEVICES": "1,3"})
    ['1', '3']
    """
    environ = os.environ if environ is None else environ
    if spec.strip() == "all":
        visible = environ.get("CUDA_VISIBLE_DEVICES", "").strip()
        if visible:
            return parse_gpus(visible)
        return [str(i) for i in range(count())]
    ids = [part.strip() for part in spec.split(",") if part.strip()]
    if not ids or len(set(ids)) != len(ids):
        raise ValueError(
            f"--gpus must be 'all' or distinct comma-separated GPU ids such as '0,1', got {spec!r}."
        )
    return ids


def assign_gpus(gpus: Sequence[str], workers: int = 0) -> list[str]:
    """GPU of each worker: ``workers`` of them (0: one per GPU), round-robin over ``gpus``.

    Examples
    --------
    >>> assign_gpus(["0", "1"])
    ['0', '1']
    >>> assign_gpus(["0", "1"], 3)
    ['0', '1', '0']
    """
    if not gpus:
        raise ValueError(
            "No GPU is visible in this container. Check that the NVIDIA container toolkit is "
            "installed and the service reserves GPUs (deploy.resources.reservations.devices), "
            "or run the CPU workers instead (docker compose --profile cpu ...)."
        )
    if workers < 0:
        raise ValueError(f"--workers must be >= 0 (0: one per GPU), got {workers!r}.")
    n = workers or len(gpus)
    return [gpus[i % len(gpus)] for i in range(n)]


def worker_command(
    template: Sequence[str], *, index: int, gpu: str, n_workers: int, http_port: int, host: str
) -> list[str]:
    """``template`` with the placeholders of worker ``index`` filled in.

    Examples
    --------
    >>> worker_command(["w", "--name", "gpu-{host}-{i}", ":{port}", "{memory_fraction}"],
    ...                index=1, gpu="1", n_workers=4, http_port=8790, host="node7")
    ['w', '--name', 'gpu-node7-1', ':8791', '0.25']
    """
    values = {
        "{i}": str(index),
        "{gpu}": gpu,
        "{host}": host,
        "{port}": str(http_port + index),
        "{memory_fraction}": f"{1 / n_workers:.4g}",
    }
    out = []
    for arg in template:
        for key, value in values.items():
            arg = arg.replace(key, value)
        out.append(arg)
    return out


def _stop(procs: Sequence[subprocess.Popen], grace_s: float) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            log.warning("worker pid %d did not stop in %.0f s; killing it", p.pid, grace_s)
            p.kill()
            p.wait()


def supervise(commands: Sequence[tuple[list[str], str]], *, grace_s: float = 20.0) -> int:
    """Run each ``(command, gpu)`` with ``CUDA_VISIBLE_DEVICES=gpu`` until one exits or a signal.

    Returns
    -------
    int
        0 after SIGTERM/SIGINT, else the exit status of the first worker that ended (a signal
        number ``s`` as ``128 + s``).
    """
    procs: list[subprocess.Popen] = []
    stopping = False

    def forward(signum, _frame) -> None:
        nonlocal stopping
        stopping = True
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for cmd, gpu in commands:
            if stopping:
                break
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu}
            procs.append(subprocess.Popen(cmd, env=env))
            log.info("worker pid %d on GPU %s: %s", procs[-1].pid, gpu, " ".join(cmd))
        while True:
            ended = [p for p in procs if p.poll() is not None]
            if ended or stopping:
                break
            time.sleep(0.2)
        if stopping:
            log.info("stopping %d worker(s)", len(procs))
        else:
            log.warning("worker pid %d exited with %s", ended[0].pid, ended[0].returncode)
        _stop(procs, grace_s)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if stopping:
        return 0
    rc = ended[0].returncode
    return 128 - rc if rc < 0 else rc


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(prog="hrdv2-gpu-workers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", default="all", help="'all' or GPU ids such as 0,1")
    parser.add_argument("--workers", type=int, default=0, help="worker processes (0: one per GPU)")
    parser.add_argument("--http-port", type=int, default=8790, help="{port} of worker 0")
    parser.add_argument("--grace", type=float, default=20.0, help="seconds to wait on stop")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND with placeholders")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the worker command after '--'")
    try:
        gpus = assign_gpus(parse_gpus(args.gpus), args.workers)
    except ValueError as err:
        log.error("%s", err)
        return 2
    host = socket.gethostname()
    commands = [
        (
            worker_command(
                command,
                index=i,
                gpu=gpu,
                n_workers=len(gpus),
                http_port=args.http_port,
                host=host,
            ),
            gpu,
        )
        for i, gpu in enumerate(gpus)
    ]
    return supervise(commands, grace_s=args.grace)


if __name__ == "__main__":
    sys.exit(main())
