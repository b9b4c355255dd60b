"""Sample transforms in worker processes, arrays both ways through shared memory.

``ProcessTransformRunner`` is the ``data.transform_pool = "process"`` runner of
dataflow.pipeline.transform: for pure-Python transforms, which hold the GIL and so do not scale
over the loader's decode threads.

Algorithm
    ``workers`` persistent processes, started at construction from a forkserver (a clean
    interpreter: the loader's process runs threads, and a fork could inherit a lock one of
    them held). Each imports the transform — ``"module:function"`` through
    ``load_callable``, or the callable as pickled here (a function by reference) — and
    owns two shared-memory segments of ``shm_bytes`` (created and unlinked by this
    process): one in, one out.
    A caller (one of the loader's decode threads) takes an idle worker from a queue, writes
    its chunk's arrays and tensors (and bytes of 4 KiB or more) into the worker's input
    segment at 64-byte aligned offsets, and sends over a pipe only small metadata: per
    value its dtype, shape and offset, smaller values inline
    (dataflow.pipeline.shared_values). The worker builds views on
    the segment, runs ``transform(sample, sample_rng(*seed))`` per sample, checks the output
    (``check_output``), and writes the outputs' arrays into its output segment, again
    sending metadata; the caller copies the arrays out (the segments are then free for the
    next chunk) and puts the worker back in the queue. A chunk whose inputs do not fit the
    segment is sent in parts; outputs that do not fit come back in parts, each acknowledged
    once copied. Only a sample whose own arrays exceed ``shm_bytes`` has them pickled through
    the pipe: counted in ``pickled_samples``, with one warning naming the knob.

What comes back
    The same values as ``ThreadTransformRunner`` gives: numpy arrays of the same dtype,
    shape and bytes, always C-contiguous, writeable copies (a transform that returns a
    strided view or its input gets a compact copy); torch tensors as CPU
    tensors of the same dtype, shape and bytes, contiguous, detached from autograd (they
    travel as raw bytes, so bfloat16 and other dtypes numpy lacks come back too); numbers,
    str, bytes, None and nested lists, tuples and dicts as pickle copies of themselves. A
    failure is a ``TransformFailure`` with the worker's traceback; a wrong output type raises
    ``TransformOutputError`` in the caller, as in the thread runner. The worker sees its
    inputs as C-contiguous views of the segment, writeable where the caller's were.

Failure and cleanup
    A caller waits on the worker's pipe and its process sentinel together, so a worker that
    dies (killed, a segfault in an extension) raises ``TransformWorkerError`` naming the
    transform, the pid and the exit code instead of hanging; the worker is replaced by a
    fresh one for later chunks. Workers ignore SIGINT (the loader's process decides), and
    die with the process that started them, kill -9 included (dataflow.processes
    ``die_with_parent``); their segments are then unlinked by multiprocessing's resource
    tracker, which outlives them. ``close()`` stops the workers and unlinks every segment.

Measured cost (2 shared cores, chunks of 16, a transform returning its input's image):
the calling process spends ~29 µs of CPU per 32×32×3 sample and ~140 µs per 224×224×3
one (most of it copying the 150 KB output into fresh memory), against ~14 µs in the thread
runner (the sample's generator, which here runs in the worker). A pool of 2 starts in
~0.1 s once the forkserver runs; the forkserver's own start imports numpy, torch and
dataflow (7.8 s at a load average of 10). In a Loader with a pure-Python transform, the
pool costs 0.1–0.3 ms of CPU per sample more than the thread runner, all processes
together (tools/bench_transform.py: 1.71 against 1.44 ms on 32×32 digits with a 1.2 ms
transform, 2.94 against 2.82 ms on 224 photo crops with a 2.2 ms one; webdataset +
DataLoader doing the same work: 2.03 and 4.46 ms). The segments are sparse: /dev/shm
holds only the pages written, at most 2 × shm_bytes per worker.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import queue
import secrets
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from multiprocessing.shared_memory import SharedMemory
from typing import Any, Final

from dataflow.pipeline.shared_values import (
    ALIGNMENT,
    Packer,
    pack_samples,
    segment_buffer,
    unpack,
)
from dataflow.pipeline.transform import (
    SampleSeed,
    SampleTransform,
    TransformFailure,
    TransformOutputError,
    callable_name,
    check_output,
    load_callable,
    sample_rng,
)
from dataflow.processes import die_with_parent

log = logging.getLogger(__name__)

SETTING: Final = "data.sample_transform"
SHM_PREFIX: Final = "shardflow-transform-"
"""Segment names start with this (``/dev/shm/shardflow-transform-<pid>-…`` on Linux)."""


class TransformWorkerError(RuntimeError):
    """A transform worker process died or could not load the transform."""


# ---------------------------------------------------------------------------------------------
# The worker process


def _load(transform: str | bytes) -> SampleTransform:
    if isinstance(transform, str):
        return load_callable(transform, setting=SETTING)
    loaded: SampleTransform = pickle.loads(transform)
    return loaded


def _worker_main(
    transform_reference: str | bytes,
    name: str,
    input_name: str,
    output_name: str,
    connection: multiprocessing.connection.Connection,
    main_pid: int,
    nice: int = 0,
) -> None:
    die_with_parent(main_pid)
    if nice > os.getpriority(os.PRIO_PROCESS, 0):  # loader work yields to the training loop
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group
    try:
        transform = _load(transform_reference)
        segments = SharedMemory(input_name), SharedMemory(output_name)
    except Exception as error:  # reported to the caller, who raises it
        connection.send(("failed", f"{type(error).__name__}: {error}"))
        return
    connection.send(("ready", os.getpid()))
    input_buffer, packer = segment_buffer(segments[0]), Packer(segments[1])
    while True:
        try:
            message = connection.recv()
        except EOFError:  # the caller is gone
            break
        if message is None:
            break
        packed_samples, seeds = message
        try:
            outputs = [
                _transform_one(transform, name, unpack(packed, input_buffer, copy=False), seed)
                for packed, seed in zip(packed_samples, seeds, strict=True)
            ]
        except TransformOutputError as error:
            connection.send(("wrong", str(error)))
            continue
        _send_outputs(connection, packer, outputs, name)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    # Skip interpreter teardown: a transform may still hold a view on a segment, whose
    # close() would then raise at exit; the caller unlinks the segments.
    os._exit(0)


def _transform_one(
    transform: SampleTransform, name: str, sample: dict[str, Any], seed: SampleSeed
) -> dict[str, Any] | TransformFailure:
    try:
        output = transform(sample, sample_rng(*seed))
    except Exception as error:  # the user's code: any exception is this sample's
        return TransformFailure.from_exception(name, error)
    return check_output(output, name)


def _send_outputs(
    connection: multiprocessing.connection.Connection,
    packer: Packer,
    outputs: list[Any],
    name: str,
) -> None:
    start = 0
    while start < len(outputs):
        packed, count, pickled = pack_samples(packer, outputs, start)
        start += count
        last = start == len(outputs)
        try:
            connection.send(("done" if last else "part", packed, pickled))
        except (pickle.PicklingError, TypeError, AttributeError) as error:
            connection.send(
                (
                    "wrong",
                    f"sample_transform {name} returned a value that cannot be sent "
                    f"back from its worker process ({error}); return numpy arrays, "
                    "tensors, numbers, str, bytes, lists or dicts",
                )
            )
            return
        if not last and connection.recv() != "next":
            return


# ---------------------------------------------------------------------------------------------
# The runner


class _Worker:
    """One worker process and its two segments."""

    def __init__(
        self,
        context: multiprocessing.context.ForkServerContext,
        reference: str | bytes,
        name: str,
        shm_bytes: int,
        number: int,
        nice: int = 0,
    ) -> None:
        self.ready = False
        """True once the worker said it loaded the transform."""
        self._released = False
        self._release_lock = threading.Lock()
        tag = f"{SHM_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{number}"
        self.input = SharedMemory(f"{tag}-in", create=True, size=shm_bytes)
        try:
            self.output = SharedMemory(f"{tag}-out", create=True, size=shm_bytes)
        except BaseException:
            self.input.unlink()
            raise
        self.connection, child = context.Pipe()
        self.process = context.Process(
            target=_worker_main,
            args=(reference, name, self.input.name, self.output.name, child, os.getpid(), nice),
            name=f"shardflow-transform-{number}",
            daemon=True,
        )
        try:
            self.process.start()
        except BaseException:
            self.release()
            raise
        finally:
            child.close()  # only the worker holds its end now: its death reads as EOF here

    def stop(self) -> None:
        """Kill the process and unlink the segments, for ``close()`` while another thread
        uses this worker: that thread's wait ends on the sentinel, and it releases the
        pipe and the mappings it may still be using."""
        if self.process.pid is not None:
            self.process.kill()
        self._unlink()

    def release(self) -> None:
        """Stop the process (politely, then not), close the pipe, unlink and unmap both
        segments; once, whoever calls it first."""
        with self._release_lock:
            if self._released:
                return
            self._released = True
        with contextlib.suppress(OSError, ValueError):
            self.connection.send(None)
        if self.process.pid is not None:
            self.process.join(timeout=2.0)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(timeout=5.0)
        self.connection.close()
        self._unlink()
        for segment in (self.input, self.output):
            with contextlib.suppress(BufferError):  # a view outlived its call (a bug): GC
                segment.close()

    def _unlink(self) -> None:
        for segment in (self.input, self.output):
            with contextlib.suppress(FileNotFoundError):
                segment.unlink()


def _exit_description(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"exit code {code} ({signal.Signals(-code).name})"
    return f"exit code {code}"


class ProcessTransformRunner:
    """Runs a sample transform in ``workers`` processes (see the module docstring).

    ``transform``: a module-level callable or a ``"package.module:function"`` string;
    ``shm_bytes``: the size of each worker's input and of its output segment."""

    def __init__(
        self,
        transform: SampleTransform | str,
        *,
        workers: int,
        shm_bytes: int = 64 << 20,
        nice: int = 0,
    ) -> None:
        """``nice``: the workers' niceness (the loader passes its threads', data.thread_nice
        above its own, so that transforms, like decode, yield to the training loop)."""
        if workers < 1:
            raise ValueError(f"transform workers = {workers}: need at least 1")
        if shm_bytes < ALIGNMENT:
            raise ValueError(f"shm_bytes = {shm_bytes}: need at least {ALIGNMENT}")
        reference: str | bytes
        if isinstance(transform, str):
            self.name = callable_name(load_callable(transform, setting=SETTING))
            reference = transform
        else:
            self.name = callable_name(transform)
            reference = _reference(transform, self.name)
        self.shm_bytes = shm_bytes
        self.pickled_samples = 0
        """Samples whose arrays exceeded shm_bytes and were pickled through the pipe."""
        self._lock = threading.Lock()
        self._closed = False
        self._warned = False
        # Set before the forkserver first starts (later calls do not change a running one):
        # its preload makes each worker start without importing numpy and torch again.
        multiprocessing.set_forkserver_preload([__name__])
        self._context = multiprocessing.get_context("forkserver")
        self._make_worker: Callable[[int], _Worker] = lambda number: _Worker(
            self._context, reference, self.name, shm_bytes, number, nice
        )
        self._workers: list[_Worker] = []
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        try:
            for number in range(workers):
                worker = self._make_worker(number)
                self._workers.append(worker)
                self._idle.put(worker)
        except BaseException:
            self.close()
            raise

    @property
    def pids(self) -> list[int]:
        """The worker processes' ids (for diagnostics and tests)."""
        with self._lock:
            return [w.process.pid for w in self._workers if w.process.pid is not None]

    def run(
        self, samples: list[dict[str, Any]], seeds: Sequence[SampleSeed]
    ) -> list[dict[str, Any] | TransformFailure]:
        if len(samples) != len(seeds):
            raise ValueError(f"{len(samples)} samples but {len(seeds)} seeds")
        if self._closed:
            raise RuntimeError(f"sample_transform {self.name}: the process pool is closed")
        worker = self._take_idle()
        broken = False
        try:
            return self._run_on(worker, samples, seeds)
        except TransformWorkerError:
            broken = True
            raise
        finally:
            self._give_back(worker, broken)

    def close(self) -> None:
        with self._lock:  # after this, _give_back releases what it is given
            self._closed = True
            workers, self._workers = self._workers, []
            idle = set()
            with contextlib.suppress(queue.Empty):
                while True:
                    idle.add(self._idle.get_nowait())
        for worker in workers:
            if worker in idle:
                worker.release()
            else:  # another thread is writing to its pipe or reading its segments
                worker.stop()

    def __enter__(self) -> ProcessTransformRunner:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -----------------------------------------------------------------------------------------

    def _take_idle(self) -> _Worker:
        while True:
            try:  # blocks with the GIL released; wakes up now and then to notice close()
                worker = self._idle.get(timeout=0.5)
            except queue.Empty:
                worker = None
            if self._closed:
                raise RuntimeError(f"sample_transform {self.name}: the process pool is closed")
            if worker is not None:
                return worker

    def _give_back(self, worker: _Worker, broken: bool) -> None:
        if broken:
            worker.release()
        with self._lock:
            if self._closed:
                worker.release()
                return
            if not broken:
                self._idle.put(worker)
                return
            number = self._workers.index(worker)
        replacement = self._make_worker(number)  # outside the lock: it takes a while
        with self._lock:
            if not self._closed:
                self._workers[number] = replacement
                self._idle.put(replacement)
                return
        replacement.release()

    def _run_on(
        self, worker: _Worker, samples: list[dict[str, Any]], seeds: Sequence[SampleSeed]
    ) -> list[dict[str, Any] | TransformFailure]:
        if not worker.ready:
            reply = self._receive(worker, len(samples))
            if reply[0] == "failed":
                raise TransformWorkerError(
                    f"sample_transform {self.name}: the worker process could not load it "
                    f"({reply[1]}); is its module importable there (installed, or on "
                    'PYTHONPATH)? Or set data.transform_pool = "thread"'
                )
            worker.ready = True
        packer = Packer(worker.input)
        results: list[dict[str, Any] | TransformFailure] = []
        start = 0
        while start < len(samples):
            packed, count, pickled = pack_samples(packer, samples, start)
            if pickled:
                self._count_pickled()
            self._send(worker, (packed, list(seeds[start : start + count])), count)
            start += count
            while True:
                kind, *payload = self._receive(worker, count)
                if kind == "wrong":
                    raise TransformOutputError(payload[0])
                packed_outputs, outputs_pickled = payload
                if outputs_pickled:
                    self._count_pickled()
                output = segment_buffer(worker.output)
                results.extend(unpack(o, output, copy=True) for o in packed_outputs)
                if kind == "done":
                    break
                self._send(worker, "next", count)
        return results

    def _send(self, worker: _Worker, message: object, count: int) -> None:
        try:
            worker.connection.send(message)
        except (BrokenPipeError, ConnectionResetError, OSError):
            raise self._died(worker, count) from None

    def _receive(self, worker: _Worker, count: int) -> tuple[Any, ...]:
        # Waiting on the sentinel too: a dead worker ends the wait instead of hanging it.
        ready = multiprocessing.connection.wait([worker.connection, worker.process.sentinel])
        if worker.connection in ready:
            try:
                reply: tuple[Any, ...] = worker.connection.recv()
                return reply
            except (EOFError, OSError):
                pass
        raise self._died(worker, count)

    def _died(self, worker: _Worker, count: int) -> TransformWorkerError:
        worker.process.join(timeout=5.0)
        if self._closed:
            return TransformWorkerError(
                f"sample_transform {self.name}: the process pool was closed while a chunk "
                f"of {count} samples was in a worker"
            )
        code = worker.process.exitcode
        if not worker.ready:
            why = "before it had loaded the transform; its error is on stderr above"
        elif code is not None and code < 0:
            why = "a crash in native code, or the kernel's OOM killer (dmesg tells)"
        else:
            why = "the transform or its libraries ended the process (sys.exit, os._exit?)"
        return TransformWorkerError(
            f"sample_transform {self.name}: worker process {worker.process.pid} died "
            f"({_exit_description(code)}) while transforming a chunk of {count} samples: "
            f"{why}. A fresh worker replaces it"
        )

    def _count_pickled(self) -> None:
        with self._lock:
            self.pickled_samples += 1
            if self._warned:
                return
            self._warned = True
        log.warning(
            "sample_transform %s: a sample's arrays exceed the %d bytes of a worker's "
            "shared-memory segment and are pickled through a pipe instead (slower; counted "
            "in pickled_samples); raise data.transform_shm_bytes (shm_bytes) above the "
            "largest sample's arrays",
            self.name,
            self.shm_bytes,
        )


def _reference(transform: SampleTransform, name: str) -> bytes:
    """``transform`` pickled by reference, or the one error saying how to make it so."""
    qualified = getattr(transform, "__qualname__", "")
    problem = ""
    if "<lambda>" in qualified:
        problem = "a lambda"
    elif "<locals>" in qualified:
        problem = "a function defined inside another function"
    else:
        try:
            return pickle.dumps(transform)
        except Exception as error:  # pickle raises several types for the same problem
            problem = f"not importable by name ({type(error).__name__}: {error})"
    raise TypeError(
        f"sample_transform {name} is {problem}, which worker processes cannot import; define "
        "it at the top level of a module and name it ('package.module:function'), or set "
        'data.transform_pool = "thread"'
    )
