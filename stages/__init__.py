"""The DAG's stages: one script per `dvc.yaml` stage (`python -m stages.<name>`)."""

import latentlab  # noqa: F401  (first: it sets the OpenMP wait policy before any stage imports torch)
