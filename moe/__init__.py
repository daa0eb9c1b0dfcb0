"""A small library for fine-grained Mixture-of-Experts language models.

It imports no orchestration (Hydra, MLflow, submitit): plain typed dataclasses in, modules out.
"""
