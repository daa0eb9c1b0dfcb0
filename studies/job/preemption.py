"""A job's stop signals, noted by a handler and acted on at the next step boundary (no Hydra here).

Two signals stop a point cleanly: submitit's checkpoint signal (USR2 by default, sent by SLURM
`signal_delay_s` before the time limit, or by `scancel --signal=USR2`) and SIGTERM (what SLURM sends on
preemption with PreemptMode=REQUEUE, `scontrol requeue` and `scancel`, KillWait seconds before SIGKILL;
and what the sweep process forwards to its local jobs when it is itself terminated). Either way training
writes a checkpoint at the end of the current step and the point is recorded PREEMPTED. Afterwards
`hand_over` lets submitit requeue the job for its own signal; after SIGTERM the job just ends (SLURM
requeues a preempted job itself; a cancelled one stays cancelled and resumes when the sweep is re-run).
"""

from __future__ import annotations

import signal
import threading
from typing import Any


class Preemption:
    """The stop signal of this process: `install` it, poll `requested`, then `hand_over`."""

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        """The signal that asked for the stop."""
        self._submitit_signum: int | None = None
        self._submitit_handler: Any = None

    def install(self) -> None:
        """Take over SIGTERM and, in a submitit job, submitit's checkpoint signal. Main thread only."""
        if threading.current_thread() is not threading.main_thread():
            return
        import submitit  # lazy: the module itself stays importable without it

        usr = submitit.JobEnvironment._usr_sig()
        handler = signal.getsignal(usr)
        if callable(handler) and handler != self._note:  # submitit's handler: keep it for hand_over
            self._submitit_signum, self._submitit_handler = usr, handler
            signal.signal(usr, self._note)
        if signal.getsignal(signal.SIGTERM) != self._note:
            signal.signal(signal.SIGTERM, self._note)

    def _note(self, signum: int, frame: Any) -> None:
        self.requested = True
        self.signum = signum
        print(f"{signal.Signals(signum).name} received: checkpointing at the end of this step", flush=True)

    def stop_requested(self) -> bool:
        return self.requested

    @property
    def requeues_itself(self) -> bool:
        """Whether submitit should requeue the job (its own signal) rather than the job just ending."""
        return self.requested and self.signum is not None and self.signum == self._submitit_signum

    def hand_over(self) -> None:
        """Let submitit checkpoint (its resubmission) and requeue; does not return (it exits the job)."""
        signal.signal(self._submitit_signum, self._submitit_handler)
        self._submitit_handler(self._submitit_signum, None)


preemption = Preemption()
"""The process's one instance: the launcher installs it, studies.job.execute polls it."""


def install() -> None:
    """`preemption.install()` through a module function: the entry point's task function is pickled by
    value into submitit jobs, and a module object it referenced would arrive as a copy."""
    preemption.install()
