"""Hydra's basic sweeper, launching every cooldown branch after the other points of the sweep
(studies.launch.sweep.ordered_jobs, docs/branches.md): with batches run one after another (infra=local) or one
point at a time (infra=basic), each parent then trains before its branches wait for its checkpoints.
Held-out points (study.holdout, docs/scaling_law.md) come last, in batches of their own: before the first
of them starts, the study writes their forecast (studies.launch.holdout.forecast_before); without one, the sweep
ends there and says why. conf/config.yaml selects it; Hydra instantiates sweepers only from the
hydra_plugins namespace."""

from __future__ import annotations

from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper


class ParentsFirstSweeper(BasicSweeper):
    _jobs: list[Any] = []
    _held: set[tuple[str, ...]] = set()
    _forecast: str | None = None  # "written" once checked; else why the held-out points cannot start

    def split_arguments(self, overrides: list[Any], max_batch_size: int | None) -> list[list[list[str]]]:  # type: ignore[override]
        """The basic sweeper's batches, of the jobs in launch order (called on the instance by sweep())."""
        from studies.launch.holdout import is_held_out
        from studies.launch.sweep import ordered_jobs  # here: Hydra imports this module on every start

        flat = [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]
        self._jobs = ordered_jobs(self.config, flat, self.hydra_context.config_loader)
        self._held = {tuple(job) for job, cfg in self._jobs if is_held_out(cfg)}
        groups = (
            [list(j) for j, _ in self._jobs if tuple(j) not in self._held],
            [list(j) for j, _ in self._jobs if tuple(j) in self._held],
        )
        return [b for g in groups if g for b in BasicSweeper.split_overrides_to_chunks(g, max_batch_size)]

    def is_done(self) -> bool:
        if super().is_done():
            return True
        if self._forecast is None and any(tuple(j) in self._held for j in self.overrides[self.batch_index]):
            import os

            from studies.launch.callbacks import PARENT_ENV, study_dir, tracking_uri
            from studies.launch.holdout import forecast_before

            why = forecast_before(
                self.config,
                self._jobs,
                study_dir(self.config),
                tracking_uri(self.config),
                os.environ.get(PARENT_ENV),
            )
            self._forecast = "written" if why is None else why
            if (
                why is not None
            ):  # the sweep ends here; its end (studies.launch.callbacks) exits non-zero with this
                from pathlib import Path

                from records.sweep_record import update_sweep_record

                update_sweep_record(Path(self.config.hydra.sweep.dir), held_out_not_started=why)
        return self._forecast not in (None, "written")
