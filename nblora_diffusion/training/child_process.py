"""``train`` in a child process of its own, as the training GUIs of the field run theirs.

The child ("spawn": a fresh interpreter, no copy of the caller's threads or CUDA context) gives the GPU
memory back when it ends, keeps a crash out of the caller, and gets accelerate's process-wide state fresh,
so each run may choose its own --mixed_precision (accelerate fixes it once per process). The callbacks
come back through a queue and run in the caller; ``should_stop`` is relayed through an event the child's
trainer polls. The result and the child's errors come back as themselves; a child that dies without a
word (killed, a segfault) raises ``TrainingProcessError``, never a hang.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import pickle
import queue
import signal
import time
import traceback
from collections.abc import Callable
from typing import Any

from .config import TrainConfig
from .run import TrainCallbacks, TrainResult

TrainFn = Callable[..., Any]  # train(config, callbacks=..., should_stop=...) -> TrainResult


class TrainingProcessError(RuntimeError):
    """The training process failed in a way that could not come back as the child's own exception: it
    died without a result, or its exception could not be pickled (the message then names its type)."""


def train_in_child_process(
    config: TrainConfig,
    callbacks: TrainCallbacks | None = None,
    should_stop: Callable[[], bool] | None = None,
    *,
    train_fn: TrainFn | None = None,
    poll_s: float = 0.2,
) -> TrainResult:
    """``train(config, callbacks, should_stop)`` run in a spawned child process; same arguments and result.

    The callbacks are called in this process, in order, as the child reports them; ``should_stop`` is
    read every ``poll_s`` seconds. ``train_fn`` (default ``nblora_diffusion.training.train``) must be
    importable by the child: a module-level function. The child also stops (saving a checkpoint) when
    this process is gone.
    """
    callbacks = callbacks or TrainCallbacks()
    ctx = mp.get_context("spawn")
    events = ctx.Queue()
    stop = ctx.Event()
    # daemon: the child ends with this process; the trainer itself starts no multiprocessing children
    child = ctx.Process(
        target=_child_main,
        args=(train_fn, config, events, stop, logging.getLogger().getEffectiveLevel()),
        name="nblora-train",
        daemon=True,
    )
    child.start()
    try:
        while True:
            if should_stop is not None and not stop.is_set() and should_stop():
                stop.set()
            try:
                kind, payload = events.get(timeout=poll_s)
            except queue.Empty:
                if child.exitcode is None:
                    continue
                try:  # what it sent just before it exited is already in the pipe
                    kind, payload = events.get(timeout=1.0)
                except queue.Empty:
                    raise TrainingProcessError(_death(child.exitcode)) from None
            if kind == "result":
                return payload
            if kind == "error":
                raise _rebuilt(*payload)
            hook = getattr(callbacks, f"on_{kind}")
            if hook is not None:
                hook(*payload)
    finally:
        _finish(child, events, stop)


def _finish(child, events, stop, grace_s: float = 120.0) -> None:
    """Let the child end (it has, unless a callback here raised: then it stops as on Stop, saving a
    checkpoint), reading what it still sends so that it never blocks on a full pipe; killed after
    ``grace_s``."""
    stop.set()
    deadline = time.monotonic() + grace_s
    while child.is_alive() and time.monotonic() < deadline:
        try:
            while True:
                events.get_nowait()
        except queue.Empty:
            pass
        child.join(timeout=0.2)
    if child.is_alive():
        child.kill()
        child.join()
    events.close()


def _death(exitcode: int) -> str:
    if exitcode < 0:
        try:
            how = f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            how = f"was killed by signal {-exitcode}"
    else:
        how = f"exited with code {exitcode}"
    return f"the training process {how} before it reported a result"


class _ChildTraceback(Exception):
    """The child's traceback as the cause of the exception raised here (concurrent.futures does the same)."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb.rstrip()}\n"""'


def _rebuilt(exc: BaseException | None, type_name: str, message: str, is_value_error: bool, tb: str):
    """The child's exception, or a stand-in that keeps its one-line message, with the child's traceback.
    A child's SystemExit or KeyboardInterrupt ended the child, not this process: a stand-in too."""
    if not isinstance(exc, Exception):
        first = message.splitlines()[0] if message else ""
        exc = ValueError(message) if is_value_error else TrainingProcessError(f"{type_name}: {first}")
    exc.__cause__ = _ChildTraceback(tb)
    return exc


def _child_main(train_fn: TrainFn | None, config: TrainConfig, events, stop, log_level: int) -> None:
    logging.basicConfig(level=log_level)  # the trainer's log lines reach stderr as in the caller
    if train_fn is None:
        from .loop import train

        train_fn = train
    parent = mp.parent_process()

    def should_stop() -> bool:
        return stop.is_set() or (parent is not None and not parent.is_alive())

    callbacks = TrainCallbacks(
        on_step=lambda *args: events.put(("step", args)),  # step, max_steps, loss, lr, elapsed_s
        on_validation=lambda step, images: events.put(("validation", (step, list(images)))),
        on_checkpoint=lambda step, path: events.put(("checkpoint", (step, path))),
    )
    try:
        result = train_fn(config, callbacks=callbacks, should_stop=should_stop)
        pickle.dumps(result)  # here, not in the queue's feeder thread, where a failure would go unseen
        events.put(("result", result))
    except BaseException as e:
        events.put(("error", _portable(e)))
    finally:
        events.close()
        events.join_thread()  # everything is in the pipe before the process exits


def _portable(e: BaseException) -> tuple:
    """(the exception if it survives pickling else None, its type name, message, ValueError?, traceback)."""
    try:
        exc = pickle.loads(pickle.dumps(e))
    except Exception:
        exc = None
    return exc, type(e).__name__, str(e), isinstance(e, ValueError), traceback.format_exc()
