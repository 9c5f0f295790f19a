"""Shared by the label, npz and serve tests: scratch copies of the DAG's inputs in which
`python -m stages.label` runs for real (as a subprocess, as DVC runs it)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from ruamel.yaml import YAML

from latentlab.lm.modeling import save_lm
from latentlab.tasks.arithmetic import ArithmeticConfig, make_splits

REPO = Path(__file__).resolve().parents[1]
# one thread everywhere: a single process and each torchrun worker then run the same kernels
ENV = {**os.environ, "PYTHONPATH": str(REPO)}  # LATENTLAB_THREADS as this process has it (conftest): same arithmetic
SMALL_SYNTH = ArithmeticConfig(operand_max=19, n_test=40)  # 760 training problems, 40 held out


def save_model(lm, directory: Path) -> Path:
    """conftest's `tiny_lm` (H=32, 2 blocks, 64 positions) as a model directory, as `base` writes one."""
    save_lm(*lm, directory, source="scratch", arch="llama")
    return directory


def scratch_repo(root: Path, model: Path, label: dict, nla_table: dict | None = None) -> Path:
    """A directory laid out like the DAG after `synth` and `base`, with params.yaml's label section set (and
    nla_table's: by default its layer is label's first)."""
    shutil.copytree(model, root / "models" / "base")
    (root / "data" / "synth").mkdir(parents=True)
    for name, table in make_splits(SMALL_SYNTH, 0).items():
        table.write_parquet(root / "data" / "synth" / f"{name}.parquet")
    yaml = YAML()
    params = yaml.load((REPO / "params.yaml").read_text())
    params["label"].update(label)
    params["nla_table"].update(nla_table or {"layer": params["label"]["layers"][0]})
    if params["nla_table"]["dataset"] not in params["label"]["datasets"]:  # a repo that labels one set
        params["nla_table"] |= {"dataset": params["label"]["datasets"][0], "eval_dataset": None}
    with open(root / "params.yaml", "w") as file:
        yaml.dump(params, file)
    return root


def start_stage(repo: Path, nproc: int = 1) -> subprocess.Popen:
    command = [sys.executable, "-m", "stages.label"]
    if nproc > 1:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "stages.label",
        ]
    return subprocess.Popen(command, cwd=repo, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run_stage(repo: Path, nproc: int = 1) -> str:
    process = start_stage(repo, nproc)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]
    return output


def tree_bytes(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` by relative path: two stores are identical when these are equal."""
    return {str(f.relative_to(directory)): f.read_bytes() for f in sorted(directory.rglob("*")) if f.is_file()}
