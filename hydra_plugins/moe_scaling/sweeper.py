"""Hydra's basic sweeper, launching every cooldown branch after the other points of the sweep
(studies.sweep.ordered_jobs, docs/branches.md): with batches run one after another (infra=local) or one
point at a time (infra=basic), each parent then trains before its branches wait for its checkpoints.
conf/config.yaml selects it; Hydra instantiates sweepers only from the hydra_plugins namespace."""

from __future__ import annotations

from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper


class ParentsFirstSweeper(BasicSweeper):
    def split_arguments(self, overrides: list[Any], max_batch_size: int | None) -> list[list[list[str]]]:  # type: ignore[override]
        """The basic sweeper's batches, of the jobs in launch order (called on the instance by sweep())."""
        from studies.sweep import ordered_jobs  # here: Hydra imports this module on every start

        flat = [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]
        jobs = [list(job) for job, _ in ordered_jobs(self.config, flat, self.hydra_context.config_loader)]
        return list(BasicSweeper.split_overrides_to_chunks(jobs, max_batch_size))
