"""The on-disk record of a study, the contract between studies/ (which writes it) and analysis/ (which
reads it): run folders, the sweep record and the code snapshot record (docs/outputs.md).
Stdlib only (with filelock), so a study can be read without torch, Hydra or MLflow."""
