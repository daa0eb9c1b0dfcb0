"""Hydra entry points and orchestration for MoE scaling studies (`python -m studies.run`).

Importing the package registers the OmegaConf resolvers the configs use, so a submitit job that
unpickles any part of it can resolve `${local_jobs:}` and `${local_threads:}`.
"""

from studies.launch.resources import register_resolvers

register_resolvers()
