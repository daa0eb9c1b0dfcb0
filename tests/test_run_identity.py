"""What a point is: the run key hashes what it computes and nothing else, each value has one key, and
studies/ stays readable (no import cycles, modules of one sitting)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from studies.job.config import load_run_config
from studies.job.point import INFRA_KEYS, build_point, run_key_of

REPO = Path(__file__).resolve().parents[1]


def point_of(compose, overrides):
    return build_point(load_run_config(compose(overrides)))


@pytest.mark.parametrize(
    "override",
    [
        "data.cache_dir=/elsewhere",
        "data.workers=4",
        "train.device=cpu",
        "train.compile=true",
        "train.log_every=1",
        "train.progress_every=1",
        "train.checkpoint_every=7",
        "train.keep_last=5",
        "paths.root=/other/root",
        "tracking.uri=sqlite:////tmp/other.db",
        "infra.threads=3",
        "infra.peer_timeout_s=5",
        "launch.retry_failed=true",
    ],
)
def test_an_infrastructure_key_does_not_change_the_run_key(override, compose):
    assert point_of(compose, [override]).run_key == point_of(compose, []).run_key


def _other(value):
    """A different value of the same kind (the hash only; validity does not matter here)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value * 2 + 1
    if isinstance(value, str):
        return value + "_other"
    if value is None:
        return 3
    raise TypeError(value)


def _fields(obj, prefix=""):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _fields(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value


def test_every_key_that_changes_the_computation_changes_the_run_key(compose):
    point = point_of(compose, ["granularity=2"])
    key = run_key_of(point.model, point.run, point.train)
    checked = 0
    for section in ("model", "data", "optim", "train"):
        source = {
            "model": point.model,
            "data": point.run.data,
            "optim": point.run.optim,
            "train": point.train,
        }
        for name, value in _fields(source[section]):
            if name in INFRA_KEYS.get(section, ()):
                continue
            changed = object.__new__(type(source[section]))
            changed.__dict__.update(source[section].__dict__)
            parts = name.split(".")
            if len(parts) == 2:  # model.moe.<field>
                inner = object.__new__(type(getattr(changed, parts[0])))
                inner.__dict__.update(getattr(changed, parts[0]).__dict__)
                inner.__dict__[parts[1]] = _other(value)
                changed.__dict__[parts[0]] = inner
            else:
                changed.__dict__[name] = _other(value)
            model, run, train = point.model, point.run, point.train
            if section == "model":
                model = changed
            elif section == "train":
                train = changed
            else:
                run = object.__new__(type(run))
                run.__dict__.update(point.run.__dict__)
                run.__dict__[section] = changed
            assert run_key_of(model, run, train) != key, f"{section}.{name} does not change the run key"
            checked += 1
    assert checked > 60, checked


def test_infrastructure_keys_name_real_fields(compose):
    point = point_of(compose, [])
    for section, keys in INFRA_KEYS.items():
        names = {f.name for f in dataclasses.fields(getattr(point.run, section))}
        assert set(keys) <= names, set(keys) - names
