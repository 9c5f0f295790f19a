import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from stages.params import ParamsError, load_params

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, edit) -> Path:
    yaml = YAML()
    data = yaml.load((ROOT / "params.yaml").read_text())
    edit(data)
    path = tmp_path / "params.yaml"
    with path.open("w") as handle:
        yaml.dump(data, handle)
    return path


def test_the_project_params_are_valid():
    params = load_params(ROOT / "params.yaml")
    assert params.grpo.group_size >= 2 and params.model.source == "scratch"


def test_the_project_params_spell_out_every_key():
    """dvc.yaml names keys one by one and `dvc exp run -S` edits them: a key left to its default is invisible to both."""
    from pydantic import BaseModel

    from stages.params import Params

    data = YAML(typ="safe").load((ROOT / "params.yaml").read_text())
    missing = []
    for name, field in Params.model_fields.items():
        section = field.annotation
        if isinstance(section, type) and issubclass(section, BaseModel):
            missing += [f"{name}.{key}" for key in section.model_fields if key not in data.get(name, {})]
        elif name not in data:
            missing.append(name)
    assert missing == []


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["grpo"].__setitem__("evn_bonus", 0.5), "grpo.evn_bonus: unknown key"),
        (lambda d: d["grpo"].__setitem__("even_bonus", "lots"), "grpo.even_bonus: Input should be a valid number"),
        (lambda d: d["grpo"].__setitem__("steps", "10"), "grpo.steps: Input should be a valid integer"),
        (lambda d: d["grpo"].__setitem__("clip_eps", 1.5), "grpo.clip_eps: Input should be less than 1"),
        (
            lambda d: d["grpo"].__setitem__("group_size", 1),
            "grpo.group_size: Input should be greater than or equal to 2",
        ),
        (lambda d: d["synth"].__setitem__("even_data_ratio", 1.0), "synth.even_data_ratio"),
        (
            lambda d: d["model"].__setitem__("heads", 5),
            "model: hidden_size (64) must be divisible by heads (5)",
        ),
        (lambda d: d.pop("sft"), "sft: required key is missing"),
        (lambda d: d.__setitem__("sfft", {}), "sfft: unknown key"),
        # numpy seeds need 0 <= seed < 2**32
        (lambda d: d.__setitem__("seed", -1), "seed: Input should be greater than or equal to 0 (got -1)"),
        (lambda d: d.__setitem__("seed", 2**70), "seed: Input should be less than 4294967296"),
        (lambda d: d.__setitem__("device", "tpu"), "device: 'tpu' is not a device: use auto, cpu, cuda, cuda:N or mps"),
        (lambda d: d.__setitem__("numerics", "fast"), "numerics: Input should be 'portable' or 'native'"),
        # the scratch model's layer count is known here: an index past it is refused before any stage runs
        (
            lambda d: d["label"].__setitem__("layers", [2, 99, -1]),
            "label.layers: layer 99 is out of range for a model with 4 layers (hidden states 0..4, or -5..-1)",
        ),
        (
            lambda d: d["inject"].__setitem__("layer", -6),
            "inject.layer: layer -6 is out of range for a model with 4 layers",
        ),
        (
            lambda d: d["surgery"].__setitem__("layers", [4]),
            "surgery.layers: layer 4 is out of range for a model with 4 layers (blocks 0..3, or -4..-1)",
        ),
        (
            lambda d: d["prompt"].__setitem__("format", "chat"),
            "prompt.format: chat needs a tokenizer with a chat template; the scratch model's character tokenizer",
        ),
        (
            lambda d: d["nla_sft"]["actor"].__setitem__("layers", [0, 4]),
            "nla_sft.actor.layers: layer 4 is out of range for a model with 4 layers (block inputs 0..3)",
        ),
    ],
)
def test_bad_params_name_the_key(tmp_path, edit, message):
    with pytest.raises(ParamsError) as error:
        load_params(_write(tmp_path, edit))
    assert message in str(error.value)


def test_a_check_across_sections_names_the_key_without_printing_every_param(tmp_path):
    """A model-level check (here policy.eval.layer against label.layers) used to print an empty key and the whole
    params dict as the value."""

    def edit(data):
        data["label"]["layers"] = [1, 2]
        data["nla_table"]["layer"] = 1

    with pytest.raises(ParamsError) as error:
        load_params(_write(tmp_path, edit))
    message = str(error.value)
    assert message == f"{tmp_path / 'params.yaml'}: policy.eval.layer (-1) must be one of label.layers [1, 2]"


def test_a_section_check_does_not_print_the_section(tmp_path):
    with pytest.raises(ParamsError) as error:
        load_params(_write(tmp_path, lambda d: d["label"].__setitem__("shard_rows", 100)))
    message = f"{tmp_path / 'params.yaml'}: label: shard_rows (100) must be a multiple of batch_size (256)"
    assert str(error.value) == message


def test_the_nla_table_reads_a_labelled_layer_and_set(tmp_path):
    with pytest.raises(ParamsError) as error:
        load_params(_write(tmp_path, lambda d: d["nla_table"].__setitem__("layer", 3)))
    assert str(error.value) == f"{tmp_path / 'params.yaml'}: nla_table.layer (3) must be one of label.layers [2, -1]"
    with pytest.raises(ParamsError, match=r"nla_table.eval_dataset \(biased\) must be one of label.datasets"):
        load_params(_write(tmp_path, lambda d: d["nla_table"].__setitem__("eval_dataset", "biased")))


def test_the_critic_layer_is_no_setting(tmp_path):
    """nla_sft.critic.layer could only ever equal the NLA table's layer: it is gone from params (the table says)."""
    with pytest.raises(ParamsError, match="nla_sft.critic.layer"):
        load_params(_write(tmp_path, lambda d: d["nla_sft"]["critic"].__setitem__("layer", 2)))


def test_params_that_are_not_utf8_name_the_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_bytes(b"# \xe9 (Latin-1)\n" + (ROOT / "params.yaml").read_bytes())
    with pytest.raises(ParamsError) as error:
        load_params(path)
    assert str(error.value) == f"{path} is not UTF-8 text (byte 0xe9 at offset 2): save it as UTF-8"


def test_invalid_yaml_is_one_line_with_its_position(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("seed: 0\ngrpo: [1\n")
    with pytest.raises(ParamsError) as error:
        load_params(path)
    assert "\n" not in str(error.value) and str(error.value).startswith(f"{path} is not valid YAML: line 3, column 1")


def test_a_hub_model_is_not_checked_against_the_scratch_layer_count(tmp_path):
    def edit(data):
        data["model"]["source"] = "some/hub-model"
        data["label"]["layers"] = [2, 30, -1]

    assert load_params(_write(tmp_path, edit)).label.layers == [2, 30, -1]


def test_params_read_floats_as_dvc_does(tmp_path):
    """YAML 1.2: `1e-3` is a float (PyYAML would read a string)."""
    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text().replace("lr: 1.0e-3", "lr: 1e-3"))
    assert load_params(path).sft.lr == 1e-3


def _stage(tmp_path: Path, name: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", f"stages.{name}"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )


def test_a_stage_with_bad_params_exits_before_work_naming_the_key(tmp_path):
    _write(tmp_path, lambda d: d["synth"].__setitem__("n_test", -4))
    result = _stage(tmp_path, "synth")
    assert result.returncode == 2
    assert "params.yaml: synth.n_test: Input should be greater than or equal to 2" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing written


def test_a_missing_input_names_the_file(tmp_path):
    shutil.copy(ROOT / "params.yaml", tmp_path)
    result = _stage(tmp_path, "sft")
    assert result.returncode == 1
    assert "error: models/base does not exist: run the stage that writes it" in result.stderr


def test_a_malformed_input_names_the_file(tmp_path):
    _write(tmp_path, lambda d: d["wandb"].__setitem__("mode", "disabled"))
    (tmp_path / "data" / "synth").mkdir(parents=True)
    (tmp_path / "data" / "synth" / "full.parquet").write_text("not parquet")
    result = _stage(tmp_path, "base")
    assert result.returncode == 1
    assert "data/synth/full.parquet is not a readable Parquet file" in result.stderr
    assert not (tmp_path / "models").exists()


def test_grpo_config_is_validated_when_a_stage_adds_its_learning_rate():
    """with_lr builds the full GRPOConfig through validation (no unchecked copy): a bad lr is refused."""
    from pydantic import ValidationError

    params = load_params(ROOT / "params.yaml")
    assert params.grpo.with_lr(params.grpo_full.lr).lr == params.grpo_full.lr
    with pytest.raises(ValidationError, match="lr"):
        params.grpo.with_lr(-1.0)


@pytest.mark.parametrize(
    "missing, message",
    [
        ("model.safetensors", "no model.safetensors or model.safetensors.index.json (the weights)"),
        ("tokenizer.json", "no tokenizer.json or tokenizer_config.json (the tokenizer)"),
        ("latentlab.json", "no latentlab.json (the provenance manifest every stage writes)"),
    ],
)
def test_a_damaged_model_directory_stops_the_stage_in_one_line(tmp_path, tiny_lm, missing, message):
    from latentlab.lm.modeling import save_lm

    _write(tmp_path, lambda d: d["wandb"].__setitem__("mode", "disabled"))
    save_lm(*tiny_lm, tmp_path / "models" / "base", source="scratch")
    if missing == "tokenizer.json":  # the tokenizer's other files would not make it loadable either
        for file in (tmp_path / "models" / "base").glob("tokenizer*"):
            file.unlink()
    else:
        (tmp_path / "models" / "base" / missing).unlink()
    result = _stage(tmp_path, "sft")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: models/base is not a complete saved model: {message}")
    assert not (tmp_path / "models" / "sft").exists()


@pytest.mark.parametrize(("module", "expected"), [("stages.grpo", 7), ("stages.inject", 3), ("stages.sft", 3)])
def test_a_stage_runs_under_its_own_seed_when_stage_seeds_sets_it(tmp_path, monkeypatch, module, expected):
    """`stage` hands main the params of Params.for_stage: grpo gets stage_seeds.grpo, the others (inject's seed is
    null here, sft has none) the top-level seed; so setup and every draw of the stage follow its own seed."""
    from stages.common import stage

    def edit(data):
        data["seed"], data["stage_seeds"]["grpo"] = 3, 7

    _write(tmp_path, edit)
    monkeypatch.chdir(tmp_path)  # no dvc.yaml here: no outputs to check
    seen = []

    def main(params):
        seen.append((params.seed, params.stage_seeds.grpo))

    main.__module__ = module
    stage(main)()
    assert seen == [(expected, 7)]


def test_a_stage_seed_is_checked_and_named(tmp_path):
    with pytest.raises(ParamsError, match=r"stage_seeds\.grpo: Input should be greater than or equal to 0"):
        load_params(_write(tmp_path, lambda d: d["stage_seeds"].__setitem__("grpo", -1)))
    with pytest.raises(ParamsError, match=r"stage_seeds\.sft: unknown key"):
        load_params(_write(tmp_path, lambda d: d["stage_seeds"].__setitem__("sft", 1)))
