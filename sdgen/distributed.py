"""Running a txt2img plan on a Ray cluster (``sdgen txt2img --ray ADDRESS``): the same jobs, names, seeds, batches
and PNG files as a local run; only where the UNet batches are computed changes. Imported only with ``--ray``
(Ray is the optional extra ``sdgen[ray]``).

    driver (the sdgen command)                                 Ray workers (actors, one model each)
      plan_run ─ execute ─ RayRunner.run_jobs                     Worker.ready: load the model once
                            plan_batches ─ queue ──── batch ─────> Worker.compute: batch.compute_batch
                            write_batch (save_png) <─ pixels ─────┘   (pixels, PNG parameters, timings)

Who writes: the driver. Workers return each batch's pixels and PNG ``parameters`` text (``batch.BatchOutput``) and
the driver writes the files with the code a local run uses (atomic ``save_png``, Ctrl-C held during a write,
``--skip-existing``/``--overwrite`` checked before the run). So the output folder need not be shared with the
workers, only one process ever writes an image (each batch is written once, the first time its result arrives),
and the PNG encoding (zlib) is the driver's, as in a local run. Workers only need the model at the same path
(or, for a registry model, in their own Hugging Face cache) and sdgen installed. The pixels cost little to move
(768 KB for a 512x512 image, against seconds of compute).

Faults: a worker (actor) that dies (its process killed, its node lost, out of memory) fails its batch with a
``RayActorError``; the batch goes back to the front of the queue and the next free worker takes it, while Ray
restarts the dead actor (``max_restarts``), which reloads the model and then takes batches again. A batch that
kills ``max_attempts`` workers in a row stops the run; so does losing every worker. Errors raised by sdgen itself
on a worker (a model file missing there, NaN weights) are not retried: they stop the run with their own message
and exit code. Nothing half-written is ever left: files appear whole (``save_png``) or not at all, and a rerun
with ``--skip-existing`` makes only the missing images.

Identical files: a batch computed on a worker gives the pixels the same batch gives locally when the thread count
is the same (``--threads``, per worker here): the kernels are deterministic for a given thread count, but BLAS
and a few kernels split sums differently with a different count, which can move a rare pixel by one grey level.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import signal
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from . import batch as batch_mod
from .errors import ModelNotFoundError, SdgenError, UsageError

try:
    import ray
    import ray.exceptions as ray_errors
except ImportError:  # the optional extra is not installed: the CLI reports it (ray_available)
    ray = None
    ray_errors = None

DEFAULT_MAX_RESTARTS = 3     # restarts of each worker actor
DEFAULT_MAX_ATTEMPTS = 3     # workers a single batch may see die before the run gives up


class RayNotInstalledError(SdgenError):
    """``--ray`` without Ray installed."""

    exit_code = 2


def require_ray() -> None:
    """A one-line error (exit code 2) when Ray is not installed."""
    if ray is None:
        raise RayNotInstalledError("--ray needs Ray: pip install 'sdgen[ray]' (on the driver and every Ray node)")


# ------------------------------------------------------------------------------------------------ the worker
@dataclass
class ModelInfo:
    """What the driver needs of the model without loading it (``batch.execute`` reads these off ``pipe``):
    reported by the first worker that loaded it."""

    name: str
    path: str
    size: int
    scheduler_config: dict

    def default_size(self) -> int:
        """The model's native image side, as ``Pipeline.default_size``."""
        return self.size


class Worker:
    """A Ray actor's state: the model, loaded once (on the first call, and again after a restart), and the
    batches it computes. Plain Python; ``RayRunner`` turns it into an actor with ``ray.remote``."""

    def __init__(self, model_path: str, spec=None, check_weights: bool = False, threads: int = 1,
                 load_options: dict | None = None):
        self.model_path = model_path
        self.spec = spec
        self.check = check_weights
        self.threads = threads
        self.load_options = load_options or {}
        self.pipe = None
        self.weights_checked = False

    def _load(self):
        if self.pipe is None:
            from .memory import fresh_memory_settings
            from .threads import set_threads

            fresh_memory_settings()  # a worker process is sdgen's own, as the sdgen command's (see memory.py)
            set_threads(self.threads)
            path = Path(self.model_path)
            if not path.exists() and self.spec is not None:  # a registry model: this node's own copy
                from .registry import locate
                path = locate(self.spec)[0] or path
            if not path.exists():
                raise ModelNotFoundError(f"{self.model_path}: not on Ray node {socket.gethostname()} (every node "
                                         "needs the model at the same path, or a registry model in its cache)")
            self.pipe = batch_mod.load_model(path, self.spec, self.check, **self.load_options)
        return self.pipe

    def ready(self) -> dict:
        """Load the model (if not yet); who this worker is and what the model is."""
        pipe = self._load()
        return {"pid": os.getpid(), "host": socket.gethostname(), "name": pipe.name, "path": str(pipe.path),
                "size": pipe.default_size(), "scheduler_config": dict(pipe.scheduler_config)}

    def compute(self, jobs: list[dict], model_name: str) -> batch_mod.BatchOutput:
        """One UNet batch of resolved jobs (``Job.to_dict`` form) -> its pixels and PNG parameters."""
        pipe = self._load()
        output = batch_mod.compute_batch(pipe, [batch_mod.Job.from_dict(j) for j in jobs], model_name,
                                         weights_checked=self.weights_checked)
        self.weights_checked = self.weights_checked or not output.finite.all()
        return output


# ------------------------------------------------------------------------------------------------ the driver
@dataclass
class WorkerHandle:
    """The driver's view of one worker actor."""

    index: int
    actor: object
    state: str = "starting"     # starting (loading the model) | idle | busy | gone
    pid: int | None = None
    host: str | None = None
    probe_failures: int = 0


@dataclass
class RunStats:
    """What happened on the cluster: batches computed, worker deaths seen, batches sent again."""

    batches: int = 0
    worker_failures: int = 0
    retried_batches: int = 0
    workers_lost: int = 0
    failures: list = field(default_factory=list)   # one line per worker failure


def _worker_failures() -> tuple:
    """Ray errors that mean "the worker (or its node) went away", not "the code raised"."""
    return (ray_errors.RayActorError, ray_errors.WorkerCrashedError, ray_errors.NodeDiedError,
            ray_errors.OutOfMemoryError, ray_errors.ObjectLostError)


class RayRunner:
    """Runs the UNet batches of a plan on Ray worker actors; ``run_jobs`` has ``batch.run_jobs``'s signature and
    results, so ``batch.execute(..., run=runner.run_jobs)`` does the rest as for a local run.

    address: ``local`` (start a private Ray on this machine), ``auto`` (the cluster this machine joined with
    ``ray start``, or ``$RAY_ADDRESS``), ``HOST:PORT`` (a cluster's GCS) or ``ray://HOST:10001`` (Ray Client). When
    Ray is already initialised in this process (a test, a notebook) that connection is used and left open.
    threads: per worker (the CPUs each actor reserves); None: the smallest node's CPU count (one worker per node).
    workers: None: as many as the cluster has room for, at most one per batch.
    load_options: what ``batch.load_model`` takes besides the model (``vae``), as the local run passes them; paths
    (``os.PathLike`` values) are made absolute, for workers whose working folder differs.
    on_dispatch(worker, jobs): called when a batch is sent (monitoring, tests).
    """

    def __init__(self, address: str, model_path: str | os.PathLike, spec=None, check_weights: bool = False,
                 threads: int | None = None, workers: int | None = None, load_options: dict | None = None,
                 max_restarts: int = DEFAULT_MAX_RESTARTS, max_attempts: int = DEFAULT_MAX_ATTEMPTS,
                 init_options: dict | None = None, on_dispatch: Callable | None = None):
        require_ray()
        if threads is not None and threads < 1:
            raise UsageError(f"--threads must be at least 1 (got {threads})")
        if workers is not None and workers < 1:
            raise UsageError(f"--ray-workers must be at least 1 (got {workers})")
        self.address = address
        self.model_path = str(Path(model_path).resolve())
        self.spec = spec
        self.load_options = {k: str(Path(v).resolve()) if isinstance(v, os.PathLike) else v
                             for k, v in (load_options or {}).items()}
        self.check_weights = check_weights
        self.threads = threads
        self.workers_asked = workers
        self.max_restarts = max_restarts
        self.max_attempts = max_attempts
        self.init_options = init_options or {}
        self.on_dispatch = on_dispatch
        self.workers: list[WorkerHandle] = []
        self.info: ModelInfo | None = None
        self.stats = RunStats()
        self._pending: dict = {}          # ObjectRef -> (worker, batch id or None for a readiness probe)
        self._connected_here = False

    # -- cluster ------------------------------------------------------------------------------------------------
    def connect(self) -> None:
        """Join the Ray cluster (or start a local one) unless this process is already connected."""
        if ray.is_initialized():
            return
        options = {"logging_level": logging.WARNING}
        if self.address == "local":
            options.update(include_dashboard=False)
        options.update(self.init_options)
        # ray.init installs its own SIGTERM handler; keep the one sdgen's CLI relies on (SIGTERM acts as Ctrl-C)
        previous = signal.getsignal(signal.SIGTERM)
        try:
            ray.init(address=self.address, **options)
        except ConnectionError as e:
            raise UsageError(f"--ray {self.address}: cannot connect to a Ray cluster ({_first_line(e)}); start "
                             "one with `ray start --head`, or use --ray local") from None
        finally:
            if threading.current_thread() is threading.main_thread() and previous is not None:
                signal.signal(signal.SIGTERM, previous)
        self._connected_here = True

    def _sizes(self, batches: int) -> tuple[int, int]:
        """(threads per worker, workers) from what was asked and the cluster's nodes."""
        cpus = [int(n.get("Resources", {}).get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
        cpus = [c for c in cpus if c > 0]
        if not cpus:
            raise UsageError(f"--ray {self.address}: the Ray cluster has no node with CPUs")
        threads = self.threads or min(cpus)
        room = sum(c // threads for c in cpus)
        if room == 0:
            raise UsageError(f"--threads {threads}: no Ray node has that many CPUs (largest: {max(cpus)})")
        workers = self.workers_asked or room
        return threads, max(1, min(workers, batches))

    def start(self, batches: int, progress=None) -> ModelInfo:
        """Connect, start the workers (at most ``batches``), and wait until one has loaded the model."""
        progress = progress or batch_mod._NoProgress()
        progress.status(f"connecting to Ray ({self.address})")
        self.connect()
        threads, count = self._sizes(batches)
        self.threads = threads
        remote = ray.remote(Worker).options(num_cpus=threads, max_restarts=self.max_restarts, max_task_retries=0)
        for i in range(count):
            actor = remote.remote(self.model_path, self.spec, self.check_weights, threads, self.load_options)
            handle = WorkerHandle(i, actor)
            self.workers.append(handle)
            self._probe(handle)
        progress.status(f"starting {count} Ray worker{'s' if count > 1 else ''} ({threads} thread"
                        f"{'s' if threads > 1 else ''} each), loading the model")
        while self.info is None:
            if not self._pending:
                raise SdgenError("no Ray worker could start: " + "; ".join(self.stats.failures[-3:]))
            self._next()
        return self.info

    def _probe(self, worker: WorkerHandle) -> None:
        """Ask a (new or restarted) worker to load the model; it takes batches once that answers."""
        worker.state = "starting"
        self._pending[worker.actor.ready.remote()] = (worker, None)

    def _next(self):
        """Wait for one call to finish and update the workers; returns ``(batch id, BatchOutput)`` for a computed
        batch, ``(batch id, None)`` for a batch whose worker died (to send again), None otherwise."""
        ready, _ = ray.wait(list(self._pending), num_returns=1)
        ref = ready[0]
        worker, batch_id = self._pending.pop(ref)
        try:
            value = ray.get(ref)
        except ray_errors.RayTaskError as e:  # sdgen raised on the worker: not a fault to retry
            cause = getattr(e, "cause", None)
            if isinstance(cause, SdgenError):
                raise cause from None
            raise RuntimeError(f"on Ray worker {worker.host or worker.index}: {_first_line(cause or e)}") from None
        except getattr(ray_errors, "ActorUnschedulableError", ()) as e:  # (not in older Ray)
            worker.state = "gone"
            self.stats.workers_lost += 1
            self.stats.failures.append(f"worker {worker.index} cannot be placed: {_first_line(e)}")
            return (batch_id, None) if batch_id is not None else None
        except _worker_failures() as e:
            self.stats.worker_failures += 1
            self.stats.failures.append(f"worker {worker.index} ({worker.host or '?'} pid {worker.pid or '?'}) "
                                       f"failed: {type(e).__name__}")
            if batch_id is None:
                worker.probe_failures += 1
            if worker.probe_failures > self.max_restarts + 1:
                worker.state = "gone"
                self.stats.workers_lost += 1
            else:
                self._probe(worker)  # answers once Ray has restarted it (and it has reloaded the model)
            return (batch_id, None) if batch_id is not None else None
        if batch_id is None:
            worker.state, worker.pid, worker.host, worker.probe_failures = "idle", value["pid"], value["host"], 0
            if self.info is None:
                self.info = ModelInfo(value["name"], value["path"], value["size"], value["scheduler_config"])
            return None
        worker.state = "idle"
        return batch_id, value

    # -- running ------------------------------------------------------------------------------------------------
    def run_jobs(self, pipe, jobs: list, batch_size: int = 1, model_name: str | None = None,
                 overwrite: bool = False, progress=None) -> Iterator[batch_mod.Result]:
        """``batch.run_jobs`` on the cluster: the same UNet batches (``plan_batches``), computed by the workers,
        each written by this process once, in the order they finish."""
        progress = progress or batch_mod._NoProgress()
        model_name = model_name or (pipe.name if pipe is not None else self.info.name)
        batches = batch_mod.plan_batches(jobs, batch_size)
        queue = collections.deque(range(len(batches)))
        deaths = [0] * len(batches)
        done: set[int] = set()
        while len(done) < len(batches):
            for worker in self.workers:
                if worker.state == "idle" and queue:
                    batch_id = queue.popleft()
                    worker.state = "busy"
                    ref = worker.actor.compute.remote([j.to_dict() for j in batches[batch_id]], model_name)
                    self._pending[ref] = (worker, batch_id)
                    if self.on_dispatch is not None:
                        self.on_dispatch(worker, batches[batch_id])
            if not self._pending:
                raise SdgenError(f"every Ray worker is gone; {len(batches) - len(done)} batch(es) not made "
                                 f"(last failures: {'; '.join(self.stats.failures[-3:])}); run the same command "
                                 "with --skip-existing to make the rest")
            event = self._next()
            if event is None:
                continue
            batch_id, output = event
            if output is None:
                deaths[batch_id] += 1
                if deaths[batch_id] >= self.max_attempts:
                    raise SdgenError(f"a batch (image {batches[batch_id][0].index}) saw {deaths[batch_id]} Ray "
                                     f"workers die (out of memory?): {'; '.join(self.stats.failures[-3:])}")
                self.stats.retried_batches += 1
                queue.appendleft(batch_id)   # first in line for the next free worker
                continue
            if batch_id in done:              # cannot happen (one call per batch at a time); never write twice
                continue
            done.add(batch_id)
            self.stats.batches += 1
            progress.status("saving")
            yield from batch_mod.write_batch(output, overwrite)
        if self.stats.worker_failures and hasattr(progress, "message"):
            progress.message(f"sdgen: Ray: {self.stats.worker_failures} worker failure"
                             f"{'s' if self.stats.worker_failures > 1 else ''}; {self.stats.retried_batches} "
                             f"batch{'es' if self.stats.retried_batches != 1 else ''} computed again elsewhere")

    def close(self) -> None:
        """Stop the workers; leave the cluster if this runner joined it."""
        for worker in self.workers:
            with contextlib.suppress(Exception):
                ray.kill(worker.actor, no_restart=True)
            worker.state = "gone"
        self._pending.clear()
        if self._connected_here:
            with contextlib.suppress(Exception):
                ray.shutdown()
            self._connected_here = False

    def __enter__(self) -> "RayRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _first_line(error: object) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
