"""One training at a time, run in a worker thread, its callbacks turned into a stream of events.

By default the run calls ``nblora_diffusion.training.train`` (the code behind train_dreambooth.py) in a
child process of its own (``training.train_in_child_process``), as the training GUIs of the field do: the
GPU memory is freed after each run, a crash stays out of the app, and each run may choose its own
precision. A ``train_fn`` given to the slot runs in the worker thread itself (the tests' fakes). Stop sets
the flag that the trainer polls through ``should_stop``, so it saves a checkpoint and the adapter, then
returns.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TrainFn = Callable[..., Any]  # train(config, callbacks=..., should_stop=...) -> TrainResult


@dataclass
class TrainEvent:
    """One thing that happened in a run: a step, validation images, a checkpoint, the end, or an error."""

    kind: str  # "step" | "validation" | "checkpoint" | "done" | "error"
    step: int = 0
    max_steps: int = 0
    loss: float | None = None
    lr: float | None = None
    elapsed_s: float = 0.0
    images: list = field(default_factory=list)
    path: str | None = None
    result: Any = None
    error: str | None = None

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the average pace so far (None before the first step)."""
        if self.kind != "step" or self.step <= 0 or self.max_steps <= 0:
            return None
        return self.elapsed_s / self.step * max(self.max_steps - self.step, 0)


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def describe_step(event: TrainEvent) -> str:
    """'step 3/10 · loss 0.1234 · lr 1e-04 · 0:12 left' for a step event."""
    parts = [f"step {event.step}/{event.max_steps}"]
    if event.loss is not None:
        parts.append(f"loss {event.loss:.4f}")
    if event.lr is not None:
        parts.append(f"lr {event.lr:.2g}")
    parts.append(f"{format_duration(event.eta_s)} left")
    return " · ".join(parts)


def _default_train() -> TrainFn:
    from ..training import train_in_child_process

    return train_in_child_process


def failure_message(e: Exception) -> str:
    """The page's one line for a run that raised ``e``: a ValueError's own first line (bad settings, a
    TrainingError), else "training failed: Type: first line"."""
    first = str(e).splitlines()[0] if str(e) else ""
    if isinstance(e, ValueError):
        return first or "invalid training settings"
    from ..training import TrainingProcessError

    if isinstance(e, TrainingProcessError):  # already "Type: ..." of the child's error, or how it died
        return f"training failed: {first}"
    return f"training failed: {type(e).__name__}: {first}"


class TrainingRun:
    """A training started by ``TrainingSlot.start``; read its events, stop it, or wait for it."""

    def __init__(
        self, config: Any, owner: str | None, train_fn: TrainFn, on_exit: Callable[[], None]
    ) -> None:
        self.config = config
        self.owner = owner
        self.output_dir = Path(config.output_dir)
        self._train_fn = train_fn
        self._on_exit = on_exit
        self._events: queue.Queue[TrainEvent] = queue.Queue()
        self._stop = threading.Event()
        self._done = threading.Event()
        self.result: Any = None
        self.error: str | None = None
        self.last_step: TrainEvent | None = None
        self.last_checkpoint: str | None = None
        self._thread = threading.Thread(target=self._run, name="nblora-train", daemon=True)

    # -- worker thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        from ..training import TrainCallbacks

        t0 = time.monotonic()

        def on_step(step, max_steps, loss, lr, elapsed_s):
            event = TrainEvent("step", int(step), int(max_steps), _float(loss), _float(lr), float(elapsed_s))
            self.last_step = event
            self._events.put(event)

        def on_validation(step, images):
            self._events.put(
                TrainEvent("validation", int(step), images=list(images), elapsed_s=time.monotonic() - t0)
            )

        def on_checkpoint(step, path):
            self.last_checkpoint = str(path)
            self._events.put(
                TrainEvent("checkpoint", int(step), path=str(path), elapsed_s=time.monotonic() - t0)
            )

        callbacks = TrainCallbacks(on_step=on_step, on_validation=on_validation, on_checkpoint=on_checkpoint)
        try:  # train() itself leaves torch's process-wide TF32 flag as it was (training.setup.tf32_matmuls)
            self.result = self._train_fn(self.config, callbacks=callbacks, should_stop=self._stop.is_set)
            ckpt = getattr(self.result, "last_checkpoint", None) or getattr(self.result, "checkpoint", None)
            if ckpt:
                self.last_checkpoint = str(ckpt)
            final = _int(getattr(self.result, "final_step", None) or getattr(self.result, "step", None))
            self._events.put(TrainEvent("done", final, result=self.result, elapsed_s=time.monotonic() - t0))
        except Exception as e:  # the trainer's own failures (OOM, I/O): one line for the page, full log here
            if not isinstance(e, ValueError):
                log.exception("training failed")
            self.error = failure_message(e)
            self._events.put(TrainEvent("error", error=self.error))
        finally:
            try:
                self._on_exit()  # the slot is free once the run counts as done
            finally:
                self._done.set()

    # -- caller side --------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return not self._done.is_set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def stop(self) -> None:
        """Ask the trainer to stop at the next step; it saves a checkpoint and the adapter first."""
        self._stop.set()

    def events(self, poll_s: float = 0.25) -> Iterator[TrainEvent | None]:
        """Events in order until "done" or "error"; None every ``poll_s`` without news (a heartbeat)."""
        while True:
            try:
                event = self._events.get(timeout=poll_s)
            except queue.Empty:
                if self._done.is_set() and self._events.empty():
                    return
                yield None
                continue
            yield event
            if event.kind in ("done", "error"):
                return

    def wait(self, timeout: float | None = None) -> Any:
        """Block until the run ends; returns the TrainResult or raises ValueError with the run's error."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"training still running after {timeout} s")
        if self.error:
            raise ValueError(self.error)
        return self.result


def _float(x: Any) -> float | None:
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _int(x: Any) -> int:
    try:
        return int(x)
    except (TypeError, ValueError):
        return 0


class SlotBusy(ValueError):
    """Another training holds the slot (or waits before this one)."""


@dataclass(eq=False)
class Ticket:
    """A place in the training queue."""

    owner: str | None
    cancelled: bool = False


class TrainingSlot:
    """Admits one training at a time (across every user of an app), first come first served.

    ``train_fn(config, callbacks=..., should_stop=...)`` runs each training; by default
    ``train_in_child_process``, each training in a process of its own.
    """

    def __init__(self, train_fn: TrainFn | None = None) -> None:
        self._train_fn = train_fn
        self._cond = threading.Condition()
        self._queue: list[Ticket] = []
        self._running: TrainingRun | None = None

    @property
    def current(self) -> TrainingRun | None:
        """The running training, or None."""
        return self._running

    def enqueue(self, owner: str | None = None) -> Ticket:
        with self._cond:
            ticket = Ticket(owner)
            self._queue.append(ticket)
            return ticket

    def ahead_of(self, ticket: Ticket) -> int:
        """How many trainings run or wait before ``ticket`` (0: it starts next)."""
        with self._cond:
            waiting = self._queue.index(ticket) if ticket in self._queue else 0
            return waiting + (self._running is not None)

    def leave(self, ticket: Ticket) -> None:
        """Take ``ticket`` out of the queue (no-op once its training started)."""
        with self._cond:
            if ticket in self._queue:
                self._queue.remove(ticket)
                self._cond.notify_all()

    def _release(self) -> None:
        with self._cond:
            self._running = None
            self._cond.notify_all()

    def start(self, config: Any, owner: str | None = None, wait_s: float = 0.0, ticket: Ticket | None = None):
        """Start training ``config`` in a worker thread once the slot is free and ``ticket`` is first.

        Waits up to ``wait_s`` seconds, then raises SlotBusy (the ticket keeps its place; without a
        ticket a temporary one is used and dropped).
        """
        own = ticket is None
        ticket = ticket or self.enqueue(owner)
        deadline = time.monotonic() + wait_s
        with self._cond:
            try:
                while True:
                    if ticket.cancelled or ticket not in self._queue:
                        raise ValueError("this training was cancelled before it started")
                    if self._running is None and self._queue[0] is ticket:
                        break
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise SlotBusy("another training is running; wait for it to finish")
                    self._cond.wait(left)
                run = TrainingRun(
                    config, ticket.owner, self._train_fn or _default_train(), on_exit=self._release
                )
                self._queue.remove(ticket)
                self._running = run
            except BaseException:
                if own and ticket in self._queue:
                    self._queue.remove(ticket)
                    self._cond.notify_all()
                raise
        try:
            run._thread.start()
        except BaseException:
            self._release()
            raise
        return run

    def stop(self, owner: str | None = None) -> str | None:
        """Stop ``owner``'s training (any, when owner is None): "stopping" a running one, "cancelled" for
        one still waiting, None when there is none."""
        with self._cond:
            run = self._running
            if run is not None and (owner is None or run.owner == owner):
                run.stop()
                return "stopping"
            mine = [t for t in self._queue if owner is None or t.owner == owner]
            for t in mine:
                t.cancelled = True
                self._queue.remove(t)
            if mine:
                self._cond.notify_all()
                return "cancelled"
        return None
