"""Hydra finds launchers only under the `hydra_plugins` namespace: the project's durable submitit launchers
(studies.launch.launcher, docs/lifecycle.md) are declared here; conf/infra/local.yaml and slurm.yaml select them."""

from studies.launch.launcher import DurableSubmititLauncher


class LocalLauncher(DurableSubmititLauncher):
    _EXECUTOR = "local"


class SlurmLauncher(DurableSubmititLauncher):
    _EXECUTOR = "slurm"
