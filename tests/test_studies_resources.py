"""Machine-derived concurrency: never more busy threads than cores."""

from __future__ import annotations

import pytest

from studies.launch.resources import concurrent_jobs, threads_per_job


@pytest.mark.parametrize(
    ("cpus", "memory_gib", "jobs", "threads"),
    [
        (1, 16.0, 1, 1),
        (2, 24.0, 2, 1),
        (4, 16.0, 4, 1),
        (16, 128.0, 8, 2),
        (64, 512.0, 8, 8),
        (16, 5.0, 2, 8),
    ],
)
def test_jobs_times_threads_never_exceeds_the_cores(cpus, memory_gib, jobs, threads, monkeypatch):
    monkeypatch.delenv("MOE_JOBS", raising=False)
    monkeypatch.delenv("MOE_THREADS", raising=False)
    got_jobs = concurrent_jobs(cpus, memory_gib)
    got_threads = threads_per_job(cpus, got_jobs)
    assert (got_jobs, got_threads) == (jobs, threads)
    assert got_jobs * got_threads <= cpus


@pytest.mark.parametrize(
    ("cpus", "tasks", "jobs", "threads"), [(2, 2, 1, 1), (16, 2, 8, 1), (16, 4, 4, 1), (3, 4, 1, 1)]
)
def test_a_data_parallel_point_counts_its_tasks_against_the_cores(cpus, tasks, jobs, threads, monkeypatch):
    monkeypatch.delenv("MOE_JOBS", raising=False)
    monkeypatch.delenv("MOE_THREADS", raising=False)
    got_jobs = concurrent_jobs(cpus, 512.0, tasks=tasks)
    assert (got_jobs, threads_per_job(cpus, got_jobs, tasks=tasks)) == (jobs, threads)


def test_local_infra_with_two_tasks_runs_half_the_jobs(monkeypatch, compose):
    monkeypatch.delenv("MOE_JOBS", raising=False)
    monkeypatch.delenv("MOE_THREADS", raising=False)
    one, two = compose(hydra=True), compose(["infra.tasks_per_node=2"], hydra=True)
    assert two.hydra.launcher.tasks_per_node == 2 and two.infra.threads == two.hydra.launcher.cpus_per_task
    assert two.hydra.sweeper.max_batch_size == max(1, one.hydra.sweeper.max_batch_size // 2)


def test_environment_overrides_the_derived_values(monkeypatch):
    monkeypatch.setenv("MOE_JOBS", "3")
    monkeypatch.setenv("MOE_THREADS", "5")
    assert concurrent_jobs(2, 24.0) == 3
    assert threads_per_job(2, 3) == 5


def test_local_infra_resolves_batch_size_and_threads_from_the_machine(monkeypatch, compose):
    monkeypatch.setenv("MOE_JOBS", "2")
    monkeypatch.setenv("MOE_THREADS", "1")
    cfg = compose(hydra=True)
    assert cfg.hydra.sweeper.max_batch_size == 2
    assert cfg.hydra.launcher.cpus_per_task == 1
    assert cfg.infra.threads == 1
    assert cfg.hydra.launcher._target_.endswith("submitit_launcher.LocalLauncher")
