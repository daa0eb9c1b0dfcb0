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
   point again, and studies.job.point resumes it from runs/<key>/checkpoints.
3. Terminating the sweep process ends its jobs cleanly. The sweep process waits in `launch`; SIGTERM
   there (a `kill`, a closed session, a SLURM step ending) is forwarded to the local jobs, which
   checkpoint at their next step and record PREEMPTED (resumable, studies.job.preemption); the sweep waits
   for them, so no process is left behind, and exits non-zero. SLURM jobs are left to SLURM.

Every launch records its jobs (id, log, run folder, steps) in the sweep folder's sweep.json, for
`python -m studies.status` and studies.launch.finish. Detached (launch.detach, docs/slurm.md) it returns once
they are submitted: on SLURM with the end-of-sweep job queued behind the array (afterany); locally with
the jobs ignoring SIGHUP and writing nothing to this terminal, so they outlive this process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher
from omegaconf import OmegaConf

from studies.job.preemption import preemption

log = logging.getLogger(__name__)
JOB_STOP_WAIT_S = 120.0  # how long a terminated sweep waits for its local jobs to checkpoint and end
FINISH_TIMEOUT_MIN = 60  # the end-of-sweep SLURM job: table, MLflow parent run, report


def failure_record(error: str, job: str) -> dict[str, Any]:
    return {"status": "FAILED", "error": error, "job": job}


def _detached_return(overrides: list[str], job: Any) -> JobReturn:
    """What Hydra's sweeper gets for a job left running: a completed return (it would stop otherwise)."""
    ret = JobReturn(overrides=overrides, status=JobStatus.COMPLETED)
    ret.return_value = {"status": "DETACHED", "job_id": str(job.job_id)}
    return ret


@contextlib.contextmanager
def _detached_local(sweep_dir: Path) -> Iterator[None]:
    """Local jobs started in the block outlive this process: they ignore SIGHUP (a closed terminal), as
    under nohup (an ignored signal stays ignored across exec), and their controllers write to a file, not
    to this process's stdout and stderr, which a caller may be reading to the end."""
    log_path = sweep_dir / ".submitit" / "controllers.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    target = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(target, 1)
        os.dup2(target, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in zip((1, 2), saved, strict=True):
            os.dup2(copy, fd)
            os.close(copy)
        os.close(target)
        signal.signal(signal.SIGHUP, previous)


class DurableSubmititLauncher(BaseSubmititLauncher):
    """The plugin's launcher with points 1-3 above; subclasses set _EXECUTOR (local, slurm)."""

    def __call__(self, *args: Any, **kwargs: Any) -> JobReturn:
        """Runs in the job: the plugin's task runner, with a failure raised and preemption deferred."""
        from moe.train.outcome import TrainingInterrupted  # here: Hydra imports this module on every start

        preemption.install()
        ret = super().__call__(*args, **kwargs)
        if ret.status == JobStatus.FAILED:
            exc = ret._return_value
            if isinstance(exc, TrainingInterrupted) and preemption.requeues_itself:
                preemption.hand_over()
            if isinstance(exc, TrainingInterrupted) and preemption.requested:
                # SIGTERM: the point is PREEMPTED with its checkpoint. End like a terminated process, with
                # no result file: SLURM requeues a preempted job itself, and submitit would otherwise hand
                # the sweep this attempt's error while the requeued attempt runs.
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(128 + signal.SIGTERM)
            raise exc
        return ret

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit

        assert self.config is not None and self.hydra_context is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            sweep_dir.chmod(int(str(self.config.hydra.sweep.mode), 8))
        params = dict(self.params)
        executor = submitit.AutoExecutor(
            cluster=self._EXECUTOR,
            folder=params.pop("submitit_folder"),
            **{
                f"{self._EXECUTOR}_max_num_timeout": params.pop(k) for k in ["max_num_timeout"] if k in params
            },
        )
        shared = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(
            **{k if k in shared else f"{self._EXECUTOR}_{k}": v for k, v in params.items()}
        )
        nums = list(range(initial_job_idx, initial_job_idx + len(job_overrides)))
        for num, overrides in zip(nums, job_overrides, strict=True):
            log.info(f"\t#{num} : {' '.join(filter_overrides(overrides))}")
        state = Singleton.get_state()
        detach = bool(self.config.launch.detach)
        quiet = (
            _detached_local(sweep_dir) if detach and self._EXECUTOR == "local" else contextlib.nullcontext()
        )
        # The jobs and their controllers ignore SIGINT (inherited across exec): Ctrl-C reaches the whole
        # terminal group, and this process alone must handle it (_stop_jobs_on_signal), in one line.
        no_sigint = self._EXECUTOR == "local" and not detach
        previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN) if no_sigint else None
        try:
            with quiet:
                jobs = executor.map_array(
                    self,
                    [list(o) for o in job_overrides],
                    ["hydra.sweep.dir"] * len(nums),
                    nums,
                    [f"job_id_for_{n}" for n in nums],
                    [state] * len(nums),
                )
        finally:
            if no_sigint:
                signal.signal(signal.SIGINT, previous_int)
        for job, num in zip(jobs, nums, strict=True):
            print(f"job #{num}: {job.job_id}, log {job.paths.stdout}", flush=True)
        tracked, batch_tokens = self._tracked(jobs, job_overrides)
        self._record_jobs(sweep_dir, jobs, nums, tracked, batch_tokens)
        if detach:
            if self._EXECUTOR == "slurm":
                self._submit_finish(sweep_dir, jobs)
            return [_detached_return(list(o), job) for job, o in zip(jobs, job_overrides, strict=True)]
        with self._stop_jobs_on_signal(jobs):
            self._show_progress(jobs, tracked, batch_tokens)
            return [
                self._collect(job, list(o), n) for job, o, n in zip(jobs, job_overrides, nums, strict=True)
            ]

    def _tracked(
        self, jobs: list[Any], job_overrides: Sequence[Sequence[str]]
    ) -> tuple[list[Any], list[int]]:
        """Each job as the progress view and studies.status know it, and its point's batch tokens."""
        from studies.job.config import load_run_config
        from studies.job.point import build_point
        from studies.launch.progress import Tracked
        from studies.launch.sweep import varying

        given = set(self.config.hydra.overrides.task)
        labels = varying([[o for o in filter_overrides(job) if o not in given] for job in job_overrides])
        tracked, batch_tokens = [], []
        for job, overrides, label in zip(jobs, job_overrides, labels, strict=True):
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            point = build_point(load_run_config(cfg))
            tracked.append(
                Tracked(
                    label,
                    point.variant,
                    point.run_dir,
                    point.plan.steps,
                    str(job.job_id),
                    Path(job.paths.stdout),
                )
            )
            batch_tokens.append(point.plan.batch_tokens)
        return tracked, batch_tokens

    def _record_jobs(
        self, sweep_dir: Path, jobs: list[Any], nums: list[int], tracked: list[Any], batch_tokens: list[int]
    ) -> None:
        from records.sweep_record import update_sweep_record

        host = socket.gethostname()
        records = [
            {
                "num": num,
                "job_id": t.job_id,
                "log": str(t.log),
                "label": t.label,
                "variant": t.variant,
                "run_dir": str(Path(t.run_dir).resolve()),
                "steps": t.steps,
                "batch_tokens": b,
                "host": host,
                "pid": getattr(getattr(job, "_process", None), "pid", None),
            }
            for job, num, t, b in zip(jobs, nums, tracked, batch_tokens, strict=True)
        ]
        update_sweep_record(sweep_dir, executor=self._EXECUTOR, add_jobs=records)

    def _submit_finish(self, sweep_dir: Path, jobs: list[Any]) -> None:
        """The end-of-sweep work as a SLURM job that starts once every job of the array has ended."""
        import submitit

        from records.sweep_record import update_sweep_record
        from studies.launch.finish import finish_job

        array_id = str(jobs[0].job_id).split("_")[0]
        dependency = f"afterany:{array_id}"
        params = dict(self.params)
        executor = submitit.AutoExecutor(cluster="slurm", folder=str(sweep_dir / ".submitit" / "%j"))
        cluster_keys = {
            f"slurm_{k}": params[k] for k in ("partition", "account", "qos", "setup") if params.get(k)
        }
        executor.update_parameters(
            name=f"{params.get('name', 'sweep')}-finish",
            timeout_min=FINISH_TIMEOUT_MIN,
            cpus_per_task=1,
            mem_gb=params.get("mem_gb") or 4,
            nodes=1,
            tasks_per_node=1,
            **cluster_keys,
            slurm_additional_parameters={**params.get("additional_parameters", {}), "dependency": dependency},
        )
        job = executor.submit(finish_job, str(sweep_dir.resolve()))
        print(f"end of sweep: SLURM job {job.job_id} ({dependency}), log {job.paths.stdout}", flush=True)
        update_sweep_record(
            sweep_dir,
            finish_job={"job_id": str(job.job_id), "dependency": dependency, "log": str(job.paths.stdout)},
        )

    def _show_progress(self, jobs: list[Any], tracked: list[Any], batch_tokens: list[int]) -> None:
        """Live progress from the run folders until every job of the batch has ended (studies.launch.progress)."""
        from studies.launch.progress import ProgressView, watch

        launch = self.config.launch
        if launch.progress == "off":
            return
        view = ProgressView(tracked, batch_tokens, launch.progress, every_s=launch.progress_every_s)
        watch(view, lambda: [str(job.state) for job in jobs], lambda: all(job.done() for job in jobs))

    @contextlib.contextmanager
    def _stop_jobs_on_signal(self, jobs: list[Any]) -> Iterator[None]:
        """While waiting for local jobs: SIGTERM or Ctrl-C (SIGINT) stops them the way a preemption does
        (each checkpoints and records PREEMPTED; the same command resumes them), ends the sweep's MLflow
        parent run KILLED, then this process, with one line and no traceback."""
        if self._EXECUTOR != "local":
            yield
            return

        def stop(signum: int, frame: Any) -> None:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean stop short
            name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
            print(
                f"{name}: stopping the sweep's jobs (each checkpoints and records PREEMPTED); "
                "re-run the same command to resume them",
                file=sys.stderr,
                flush=True,
            )
            processes = [p for p in (getattr(job, "_process", None) for job in jobs) if p is not None]
            for process in processes:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + JOB_STOP_WAIT_S
            for process in processes:
                try:
                    process.wait(timeout=max(0.1, deadline - time.monotonic()))
                except Exception:  # noqa: BLE001 - a job that ignores the grace is killed
                    process.kill()
            from studies.launch.callbacks import end_open_parent_killed  # the sweep process has it loaded

            end_open_parent_killed()
            raise SystemExit(128 + signum)  # as if the default handler had run

        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

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
