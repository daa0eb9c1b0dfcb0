"""hydra-submitit-launcher with durable jobs: failures that fail, preemption that resumes.

conf/infra/local.yaml and slurm.yaml set `hydra.launcher._target_` to the subclasses declared in
hydra_plugins/moe_scaling/submitit_launcher.py (Hydra only instantiates launchers from the hydra_plugins
namespace); the behaviour lives here. Three changes to the plugin's
launchers (docs/lifecycle.md):

1. A failed point fails its job. The plugin's job returns Hydra's JobReturn even when the task raised, so
   submitit and SLURM record success. Here the job re-raises: submitit's result is an error, the process
   exits non-zero, sacct says FAILED. On the submitting side Hydra's BasicSweeper aborts the whole sweep
   at the first JobReturn that is not COMPLETED, so `launch` hands it a COMPLETED return whose value is
   the failure record; the other points go on and the end-of-sweep callback reports the failure from the
   job's point.json (and exits non-zero).
2. Preemption resumes. submitit calls `checkpoint()` from its signal handler, wherever the main thread
   is, and exits right after; the plugin's `checkpoint()` resubmits the task, which starts from the top.
   Here the job replaces submitit's handler by one that only notes the signal; training polls the note
   after each step, writes a checkpoint at that step boundary and stops, and only then is submitit's own
   handler called: it pickles `checkpoint()`'s resubmission and requeues. The requeued task runs the
   point again, and studies.point resumes it from runs/<key>/checkpoints.
3. Before each batch is submitted, a table says per point whether it will start, resume (from which
   step), be skipped (DONE) or refused (FAILED without --retry-failed).
"""

from __future__ import annotations

import logging
import re
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


class Preemption:
    """The job's preemption signal, noted by a handler and acted on at the next step boundary."""

    def __init__(self) -> None:
        self.requested = False
        self._signum: int | None = None
        self._submitit_handler: Any = None

    def install(self) -> None:
        """In a submitit job (main thread): take over submitit's checkpoint signal (USR2 by default)."""
        import submitit

        signum = submitit.JobEnvironment._usr_sig()
        handler = signal.getsignal(signum)
        if not callable(handler) or handler == self._note:
            return  # not a submitit job, or installed already
        self._signum, self._submitit_handler = signum, handler
        signal.signal(signum, self._note)

    def _note(self, signum: int, frame: Any) -> None:
        self.requested = True
        print(f"{signal.Signals(signum).name} received: checkpointing at the end of this step", flush=True)

    def hand_over(self) -> None:
        """Let submitit checkpoint (our resubmission) and requeue; does not return (it exits the job)."""
        signal.signal(self._signum, self._submitit_handler)
        self._submitit_handler(self._signum, None)


preemption = Preemption()


def failure_record(error: str, job: str) -> dict[str, Any]:
    return {"status": "FAILED", "error": error, "job": job}


class DurableSubmititLauncher(BaseSubmititLauncher):
    """The plugin's launcher with points 1-3 above; subclasses set _EXECUTOR (local, slurm)."""

    def __call__(self, *args: Any, **kwargs: Any) -> JobReturn:
        """Runs in the job: the plugin's task runner, with a failure raised and preemption deferred."""
        from moe.train import TrainingInterrupted  # here: Hydra imports this module on every start

        preemption.install()
        ret = super().__call__(*args, **kwargs)
        if ret.status == JobStatus.FAILED:
            exc = ret._return_value
            if isinstance(exc, TrainingInterrupted) and preemption.requested:
                preemption.hand_over()
            raise exc
        return ret

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit

        assert self.config is not None and self.hydra_context is not None
        print(self._lifecycle_table(job_overrides, initial_job_idx), flush=True)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            sweep_dir.chmod(int(str(self.config.hydra.sweep.mode), 8))
        params = dict(self.params)
        executor = submitit.AutoExecutor(
            cluster=self._EXECUTOR, folder=params.pop("submitit_folder"),
            **{f"{self._EXECUTOR}_max_num_timeout": params.pop(k) for k in ["max_num_timeout"] if k in params},
        )  # fmt: skip
        shared = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(
            **{k if k in shared else f"{self._EXECUTOR}_{k}": v for k, v in params.items()}
        )
        nums = list(range(initial_job_idx, initial_job_idx + len(job_overrides)))
        for num, overrides in zip(nums, job_overrides, strict=True):
            log.info(f"\t#{num} : {' '.join(filter_overrides(overrides))}")
        state = Singleton.get_state()
        jobs = executor.map_array(
            self, [list(o) for o in job_overrides], ["hydra.sweep.dir"] * len(nums), nums,
            [f"job_id_for_{n}" for n in nums], [state] * len(nums),
        )  # fmt: skip
        return [self._collect(job, list(o), n) for job, o, n in zip(jobs, job_overrides, nums, strict=True)]

    def _collect(self, job: Any, overrides: list[str], num: int) -> JobReturn:
        """The job's JobReturn; a failed job becomes a COMPLETED return holding its failure record."""
        try:
            return job.results()[0]
        except Exception as exc:  # noqa: BLE001 - submitit's FailedJobError / UncompletedJobError
            # submitit's message wraps the job's traceback; its last "SomeError: ..." line says what failed
            errors = [
                ln for ln in str(exc).splitlines() if re.match(r"^[A-Za-z_][\w.]*(Error|Exception)\b", ln)
            ]
            error = errors[-1] if errors else f"{type(exc).__name__}: {str(exc).strip()[:300]}"
            print(f"job #{num} ({job.job_id}) failed: {error}", file=sys.stderr, flush=True)
            ret = JobReturn(overrides=overrides, status=JobStatus.COMPLETED)
            ret.return_value = failure_record(error, str(num))
            return ret

    def _lifecycle_table(self, job_overrides: Sequence[Sequence[str]], first: int) -> str:
        given = set(self.config.hydra.overrides.task)  # shown: only what a sweep varies
        rows = []
        for num, overrides in enumerate(job_overrides, start=first):
            label = [o for o in filter_overrides(overrides) if o not in given]
            try:
                cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            except Exception as exc:  # noqa: BLE001 - planning is informative; the job reports errors
                rows.append((f"#{num}", " ".join(label) or "-", "?", "?", f"unknown ({exc})"))
                continue
            rows.append((f"#{num}", *lifecycle_row(cfg, label)))
        return format_lifecycle(rows)


def lifecycle_row(cfg: DictConfig, overrides: Sequence[str]) -> tuple[str, str, str, str]:
    """(overrides, variant, run key, what running it does) for one composed job config."""
    from studies.config import load_run_config
    from studies.point import lifecycle, planned_point, retry_failed_from_env

    label = " ".join(overrides) or "-"
    try:
        point = planned_point(load_run_config(cfg))
        return label, point.variant, point.run_key, lifecycle(point.run_dir, retry_failed_from_env()).detail
    except Exception as exc:  # noqa: BLE001 - shown in the table; validation names the key
        return label, "?", "?", f"unknown ({type(exc).__name__}: {exc})"


def format_lifecycle(rows: Sequence[Sequence[str]]) -> str:
    header = ("job", "overrides", "variant", "run key", "action")[-len(rows[0]) :] if rows else ()
    table = [header, *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table]
    return "Sweep points:\n" + "\n".join(lines)
