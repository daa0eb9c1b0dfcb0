"""Concurrency derived from the machine, so a sweep never oversubscribes it.

Small models on CPU scale better across processes than across threads (each torch thread adds sync
overhead on tiny matmuls), so the default gives every job one thread and runs one job per core, up to
`MAX_JOBS`; above that, the extra cores become threads. Jobs are also capped by memory.
A data-parallel point (infra.tasks_per_node > 1) is one job of several processes: its tasks count
against the cores and the memory. Registered as OmegaConf resolvers (`${local_jobs:TASKS}`,
`${local_threads:TASKS}`, TASKS defaulting to 1) used by conf/infra/.
Environment overrides: MOE_JOBS, MOE_THREADS.
"""

from __future__ import annotations

import os

from omegaconf import OmegaConf

MAX_JOBS = 8
MEM_PER_JOB_GIB = 2.0


def available_cpus() -> int:
    """Cores this process may run on (respects taskset/cgroup affinity where the OS reports it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def available_memory_gib() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (AttributeError, ValueError, OSError):
        return None


def env_count(name: str) -> int | None:
    """A positive integer from environment variable `name` (None if unset); ValueError naming it."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} must be a positive integer") from None
    if value < 1:
        raise ValueError(f"{name}={raw!r} must be a positive integer")
    return value


def concurrent_jobs(cpus: int | None = None, memory_gib: float | None = None, tasks: int = 1) -> int:
    """How many sweep points run at once, each a job of `tasks` processes."""
    if (jobs := env_count("MOE_JOBS")) is not None:
        return jobs
    cpus = cpus if cpus is not None else available_cpus()
    jobs = min(cpus // tasks, MAX_JOBS)
    memory_gib = memory_gib if memory_gib is not None else available_memory_gib()
    if memory_gib is not None:
        jobs = min(jobs, int(memory_gib // (MEM_PER_JOB_GIB * tasks)))
    return max(1, jobs)


def threads_per_job(cpus: int | None = None, jobs: int | None = None, tasks: int = 1) -> int:
    """torch intra-op threads for each task of each concurrent job: the cores split evenly between them."""
    if (threads := env_count("MOE_THREADS")) is not None:
        return threads
    cpus = cpus if cpus is not None else available_cpus()
    jobs = jobs if jobs is not None else concurrent_jobs(cpus, tasks=tasks)
    return max(1, cpus // (jobs * tasks))


def register_resolvers() -> None:
    OmegaConf.register_new_resolver(
        "local_jobs", lambda tasks=1: concurrent_jobs(tasks=int(tasks)), replace=True
    )
    OmegaConf.register_new_resolver(
        "local_threads", lambda tasks=1: threads_per_job(tasks=int(tasks)), replace=True
    )
    # paths.root=~/x: Hydra's run and sweep folders go where the study folder goes (the home folder)
    OmegaConf.register_new_resolver("expanduser", lambda path: os.path.expanduser(str(path)), replace=True)
