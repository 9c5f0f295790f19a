"""A throwaway copy of the project as its own git + DVC repo, with tiny params, for end-to-end tests."""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parents[1]

# Small enough that the whole DAG runs in about a minute on 2 cores; every stage still does real work.
TINY = {
    "wandb": {"mode": "disabled"},
    "model": {"hidden_size": 32, "layers": 2, "heads": 4, "intermediate_size": 64, "max_positions": 48},
    "synth": {"operand_max": 19, "n_test": 40},
    "base": {"corpus_sequences": 300, "sequence_chars": 48, "steps": 40, "batch_size": 16, "warmup_steps": 5},
    "label": {"layers": [1, -1], "tokens": 4, "batch_size": 32, "shard_rows": 64},
    "nla_table": {"layer": 1},
    "sft": {"steps": 20, "batch_size": 16, "warmup_steps": 2},
    "grpo": {"steps": 4, "prompts_per_step": 4, "group_size": 4, "eval_every": 2, "eval_batch": 8, "warmup_steps": 1},
    "surgery": {"phases": [2, 3, 3], "probe_size": 8, "sac": {"learning_starts": 2, "batch_size": 4}},
    "nla_sft": {
        "steps": 6,
        "batch_size": 16,
        "warmup_steps": 1,
        "log_every": 2,
        "actor": {
            "template": "<INJECT>\n",
            "mode": "replace",
            "layers": [0, 1],
            "injection_scale": None,
            "center": True,
        },
    },
    "nla_rl": {
        "eval_every": 2,
        "eval_batch": 8,
        "grpo": {
            "steps": 2,
            "prompts_per_step": 4,
            "group_size": 4,
            "max_new_tokens": 8,
            "warmup_steps": 1,
            "lr": 1.0e-4,
        },
        "ppo": {
            "steps": 2,
            "rollouts_per_step": 8,
            "max_new_tokens": 8,
            "warmup_steps": 1,
            "lr": 1.0e-4,
            "epochs": 1,
            "minibatches": 2,
        },
    },
    "grid": {"transitions": 256, "envs": 4, "text_chars": 40},  # 40 chars + label.tokens 4 fit max_positions 48
    "policy": {  # nested sections are replaced whole; the keys left out take the library's defaults
        "channels": 4,
        "features": 16,
        "awr": {"iterations": 2, "steps_per_iteration": 5, "batch_size": 32},
        "eval": {"envs": 4, "episodes": 8},
    },
    "evaluate": {"batch_size": 64},
}


@dataclass
class Project:
    root: Path
    env: dict[str, str]

    def run(self, *command: str, check: bool = True, timeout: int = 900, cwd: Path | None = None):
        result = subprocess.run(
            list(command), cwd=cwd or self.root, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and result.returncode:
            raise AssertionError(
                f"{' '.join(command)} exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            )
        return result

    def status(self, *options: str, cwd: Path | None = None) -> dict:
        """`dvc status --json`, less the `source` stage's standing "always changed" (stages/source.py: it looks at
        model.source again on every repro) when that is all it says."""
        status = json.loads(self.run("dvc", "status", "--json", *options, cwd=cwd).stdout)
        if status.get("source") == ["always changed"]:
            del status["source"]
        return status

    def restore(self) -> None:
        """Back to the last commit: params, dvc.lock (also if DVC auto-staged it) and the outputs they pin."""
        self.run("git", "reset", "-q", "--hard", "HEAD")
        self.run("git", "clean", "-q", "-d", "--force")  # stray untracked files; ignored outputs stay
        self.run("dvc", "checkout", "--force")

    def set_params(self, overrides: dict) -> None:
        yaml = YAML()
        path = self.root / "params.yaml"
        data = yaml.load(path.read_text())
        for section, values in overrides.items():
            if isinstance(values, dict):
                data[section].update(values)
            else:  # a top-level value: seed, threads, numerics
                data[section] = values
        with path.open("w") as handle:
            yaml.dump(data, handle)


def environment(home: Path) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "PYTHONPATH": "",
        "WANDB_MODE": "disabled",
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "test",
        "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "test",
        "GIT_COMMITTER_EMAIL": "test@example.com",
    }


def make_project(directory: Path, home: Path) -> Project:
    """Copy the project's files (tracked and new, not ignored) into a fresh repo with TINY params."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in listed:
        source = ROOT / name
        if source.is_file() and not name.startswith(("tests/", "benchmarks/")):
            (directory / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, directory / name)
    project = Project(directory, environment(home))
    project.set_params(TINY)
    (directory / "dvc.lock").unlink(missing_ok=True)  # the committed lock belongs to the default params
    project.run("git", "init", "-q", "-b", "main")
    project.run("git", "add", "-A")
    project.run("git", "commit", "-qm", "tiny project")
    return project


def stages_in_order(dvc_yaml: Path = ROOT / "dvc.yaml", skip=("source",)) -> list[str]:
    """dvc.yaml's stages, each after every stage whose outputs it reads (dvc.yaml's own order breaks ties), less
    `skip` (source: the throwaway projects build models/base themselves)."""
    stages = YAML(typ="safe").load(dvc_yaml.read_text())["stages"]

    def paths(spec, *keys):
        return [next(iter(e)) if isinstance(e, dict) else e for key in keys for e in spec.get(key) or []]

    writes = {name: paths(spec, "outs", "metrics", "plots") for name, spec in stages.items()}
    needs = {
        name: {
            other
            for dep in paths(spec, "deps")
            for other, outs in writes.items()
            if other != name and any(dep == out or dep.startswith(out + "/") for out in outs)
        }
        for name, spec in stages.items()
    }
    order: list[str] = []
    while len(order) < len(stages):
        order.append(next(n for n in stages if n not in order and needs[n] <= set(order)))
    return [name for name in order if name not in skip]
