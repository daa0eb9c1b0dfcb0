"""`python -m studies.run [-m] axis=value,...`: the thin Hydra shell around `studies.point.run_point`."""

from __future__ import annotations

import dataclasses
import os
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from studies.callbacks import PARENT_ENV, write_job_record
from studies.config import register_configs
from studies.point import run_point

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> dict:
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    job_dir = Path(hc.runtime.output_dir)
    try:
        result = run_point(cfg, parent_run_id=os.environ.get(PARENT_ENV), cwd=Path(hc.runtime.cwd))
    except Exception as exc:
        record = {"status": "FAILED", "error": f"{type(exc).__name__}: {exc}", "job": job_dir.name}
        write_job_record(job_dir, record)
        if not multirun:
            raise
        # In a sweep, keep going: the end-of-sweep callback reports the failure and exits non-zero.
        traceback.print_exc()
        return record
    record = dataclasses.asdict(result)
    write_job_record(job_dir, record)
    return record


if __name__ == "__main__":
    main()
