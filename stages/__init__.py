"""The DAG's stages: one script per `dvc.yaml` stage (`python -m stages.<name>`).

Importing this package comes before any stage imports torch, so it is where the process's CPU kernels are
pinned: params.yaml's `numerics` (portable by default; latentlab/common/numerics.py). The value is read raw
here and checked with every other key by the params schema when the stage starts.
"""

import latentlab  # noqa: F401  (first: it sets the OpenMP wait policy and portable kernels before torch loads)
from latentlab.common.numerics import MODES, pin


def _numerics(path: str = "params.yaml") -> str:
    from ruamel.yaml import YAML

    try:
        with open(path, encoding="utf-8") as file:
            value = (YAML(typ="safe").load(file) or {}).get("numerics", "portable")
    except Exception:  # missing or unreadable: the schema names the problem when the stage loads its params
        return "portable"
    return value if value in MODES else "portable"


pin(_numerics())
