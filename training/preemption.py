"""Stopping a run on a signal without losing it.

SLURM, Kubernetes and the clouds' spot services send SIGTERM, then wait a grace period before SIGKILL. Within
`StopSignals`, SIGTERM, SIGINT (Ctrl-C) and SIGUSR1 are only recorded: the trainer finishes the current step, saves a
checkpoint at it, logs how to resume and raises `TrainingStopped`, whose exit status is `PREEMPTED_EXIT_CODE`.
"""

import logging
import os
import shlex
import signal
import sys
import threading

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# EX_TEMPFAIL of sysexits.h ("temporary failure, retry"): the run saved a checkpoint and resumes with the same command.
# It differs from 143 and 130 (128 + SIGTERM, SIGINT), the status of a process killed before it could save.
PREEMPTED_EXIT_CODE = 75
LAUNCHERS = ("hfgen", "accelerate", "torchrun")  # console scripts a command line is shown by name


class TrainingStopped(SystemExit):
    """Training stopped on a signal after saving `checkpoint`; as an uncaught exit, status PREEMPTED_EXIT_CODE."""

    def __init__(self, checkpoint: str, signal_name: str):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.checkpoint, self.signal_name = checkpoint, signal_name


class StopSignals:
    """Within `with`, SIGTERM, SIGINT and SIGUSR1 are recorded in `received` (the first one) instead of
    stopping the process: the training loop looks at it after each step.

    A repeated signal is only logged, so it never interrupts a save. A process forked meanwhile (a DataLoader worker,
    which gets Ctrl-C's SIGINT too) inherits the handler and ignores the signals: the training process stops. Outside
    the main thread, where Python cannot handle signals, nothing is installed and the signals act as usual.
    """

    def __init__(self, log: bool = True):
        self.received: signal.Signals | None = None
        self.then = "the run stops after this step, with a checkpoint"  # what the trainer does next; logged
        self.log = log
        self.pid = os.getpid()
        self._previous = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for number in STOP_SIGNALS:
                self._previous[number] = signal.signal(number, self._record)
        return self

    def __exit__(self, exc_type, *exc_info) -> None:
        stopped = exc_type is not None and issubclass(exc_type, TrainingStopped)
        for number, previous in self._previous.items():
            previous = signal.SIG_DFL if previous is None else previous
            # A process on its way out with status 75 keeps recording SIGTERM and SIGUSR1: their default action would
            # make a late second signal (a launcher forwarding it, a scheduler repeating it) a kill with status 143.
            if not (stopped and previous == signal.SIG_DFL):
                signal.signal(number, previous)
        self._previous = {}

    def _record(self, number, frame) -> None:
        if os.getpid() != self.pid:
            return
        name = signal.Signals(number).name
        if self.received is not None:
            if self.log:
                logger.warning("%s received again, already stopping: %s", name, self.then)
            return
        self.received = signal.Signals(number)
        if self.log:
            logger.warning("%s received: %s (SIGKILL would stop at once, losing the steps since the last checkpoint)",
                           name, self.then)


class IgnoreStopSignals:
    """A DataLoader `worker_init_fn` (wrapping `then`, the loader's own) under which workers ignore the stop signals:
    a SIGTERM to the whole process group (`scancel`) would otherwise kill them (torch's worker handler), and the
    training process could not fetch the batch it needs before it stops."""

    def __init__(self, then=None):
        self.then = then

    def __call__(self, worker_id: int) -> None:
        for number in STOP_SIGNALS:
            signal.signal(number, signal.SIG_IGN)
        if self.then is not None:
            self.then(worker_id)


def signal_to_a_process(numbers: list[int]) -> str | None:
    """Names the first stop signal of `numbers` (one per process, 0 where none came), e.g. "SIGTERM to process 1"."""
    for process, number in enumerate(numbers):
        if number:
            return f"{signal.Signals(number).name} to process {process}"
    return None


def resume_command(output_dir: str, family: str) -> str:
    """The command that resumes this run: the one that started it, with `--resume_from_checkpoint latest` (and
    without `--overwrite_output_dir`). Under `accelerate launch` or torchrun it is the launcher's command line, read
    from /proc; called from Python (no command line naming `output_dir`), a template."""
    launched = "TORCHELASTIC_RUN_ID" in os.environ
    argv = parent_command_line() if launched else list(sys.orig_argv)
    if not argv or not any(output_dir in arg for arg in argv):
        launcher = f"accelerate launch ... -m hfgen.training.train_{family}" if launched else f"hfgen train {family}"
        return f"{launcher} --output_dir {shlex.quote(output_dir)} <the same flags> --resume_from_checkpoint latest"
    if len(argv) > 1 and os.path.basename(argv[1]) in LAUNCHERS:  # `python /usr/bin/hfgen ...` -> `hfgen ...`
        argv = [os.path.basename(argv[1]), *argv[2:]]
    kept, skip = [], False
    for arg in argv:
        if skip or arg == "--overwrite_output_dir" or arg.startswith("--resume_from_checkpoint="):
            skip = False
            continue
        if arg == "--resume_from_checkpoint":
            skip = True  # and its value
            continue
        kept.append(arg)
    return shlex.join([*kept, "--resume_from_checkpoint", "latest"])


def parent_command_line() -> list[str] | None:
    """The command line of this process's parent (the launcher of a torchrun worker), where /proc has it."""
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as file:
            return [arg.decode(errors="replace") for arg in file.read().split(b"\0") if arg]
    except OSError:
        return None
