"""latentlab/common/parallel.py on 2 real processes (torchrun, gloo, CPU) against one process.

Each strategy's ranks run tests/parallel_run.py once (3 AdamW steps, a full state dict and `save_pretrained`,
uneven forwards inside `gathered()`); the tests read what the run wrote. The process group times out after 60 s,
so a collective that only one rank makes fails the run instead of hanging it.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from latentlab.common.distributed import Ranks
from latentlab.common.parallel import Trainable, TrainableGroup
from tests.dag import ROOT
from tests.parallel_run import FORWARDS, LR, STEPS, Pair, batch, grad_norm, prompts, train_one_process

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "LATENTLAB_THREADS": "1"}
STRATEGIES = ["ddp", "fsdp"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """run(strategy, dtype=None, tied=True): the directory the 2-rank run of tests/parallel_run.py wrote (run once
    each)."""
    done: dict[tuple, Path] = {}

    def launch(strategy: str, dtype: str | None = None, tied: bool = True) -> Path:
        if (strategy, dtype, tied) not in done:
            out = tmp_path_factory.mktemp(f"{strategy}-{dtype}-{tied}")
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
            command += [str(ROOT / "tests" / "parallel_run.py"), strategy, str(out), dtype or "none"]
            command += [] if tied else ["untied"]
            result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=120)
            assert result.returncode == 0, result.stderr[-4000:]
            done[strategy, dtype, tied] = out
        return done[strategy, dtype, tied]

    return launch


@pytest.fixture(scope="module")
def one_process():
    """The reference run: (pair, gradient norms [STEPS]) of one process on the whole global batch."""
    return train_one_process()


def state_of(pair: Pair) -> dict[str, torch.Tensor]:
    return {f"lm.{k}": v for k, v in pair.lm.state_dict().items()} | {
        f"addon.{k}": v for k, v in pair.addon.state_dict().items()
    }


def load_lm(directory: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory).eval()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_steps_on_two_ranks_equal_one_process(run, one_process, strategy):
    """Gradients are averaged over the ranks: each rank's loss, weighted to the global mean, gives the one-process
    gradient (the norms before clipping) and the one-process weights after AdamW, the unsynced shard included.
    (Summed gradients would double the norms; AdamW itself would hardly notice.)"""
    out = run(strategy)
    pair, norms = one_process
    torch.testing.assert_close(load_file(out / "norms.safetensors")["norms"], norms, rtol=1e-5, atol=0)
    state, expected = load_file(out / "state.safetensors"), state_of(pair)
    assert state.keys() == expected.keys()
    for name, value in expected.items():  # AdamW's first steps magnify last-bit gradient differences
        torch.testing.assert_close(state[name], value, rtol=1e-5, atol=5e-6, msg=name)


def test_untied_embeddings_shard_as_units_of_their_own_and_train_as_one_process(run):
    """Llama 3's layout: the input embedding and the output layer are FSDP units of their own (the embedding called
    outside the model's forward, as a policy calls it): the same norms and weights as one process, the saved
    model the same."""
    out = run("fsdp", tied=False)
    pair, norms = train_one_process(tied=False)
    torch.testing.assert_close(load_file(out / "norms.safetensors")["norms"], norms, rtol=1e-5, atol=0)
    state, expected = load_file(out / "state.safetensors"), state_of(pair)
    assert state.keys() == expected.keys() and "lm.lm_head.weight" in state
    for name, value in expected.items():
        torch.testing.assert_close(state[name], value, rtol=1e-5, atol=5e-6, msg=name)
    assert not torch.equal(state["lm.lm_head.weight"], state["lm.model.embed_tokens.weight"])
    saved = load_lm(out / "saved")
    assert not saved.config.tie_word_embeddings
    torch.testing.assert_close(saved.lm_head.weight, expected["lm.lm_head.weight"], rtol=1e-5, atol=5e-6)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_uneven_forwards_inside_gathered_use_whole_parameters(run, strategy):
    """Rank 0 makes 3 forward calls and a 3-token generation, rank 1 7 of each: the run completed (no collective
    inside the block: the all-reduce after it still pairs up), and every output is the unsharded model's."""
    out = run(strategy)
    model = load_lm(out / "saved")
    for rank, count in enumerate(FORWARDS):
        logits = load_file(out / f"gathered{rank}.safetensors")
        with torch.no_grad():
            for i, ids in enumerate(prompts(rank)):
                torch.testing.assert_close(logits[f"forward{i}"], model(ids).logits, rtol=0, atol=1e-6)
            ids = prompts(rank)[0]
            generated = model.generate(ids, max_new_tokens=count, min_new_tokens=count, do_sample=False)
        assert torch.equal(logits["generated"], generated)  # [2, PROMPT + count]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_save_pretrained_of_full_state_dict_is_the_plain_models(run, strategy, tmp_path):
    """`save_pretrained(dir, state_dict=full_state_dict())` on the wrapped model writes the file the plain model
    holding those weights writes (keys, dtypes, values: the tied output layer saved once), and it reloads."""
    out = run(strategy)
    state = load_file(out / "state.safetensors")
    plain = Pair().lm
    plain.load_state_dict({k.removeprefix("lm."): v for k, v in state.items() if k.startswith("lm.")})
    plain.save_pretrained(tmp_path)
    saved, expected = load_file(out / "saved" / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert saved.keys() == expected.keys()
    for name, value in expected.items():
        assert saved[name].dtype == value.dtype and torch.equal(saved[name], value), name
    with torch.no_grad():
        assert torch.equal(load_lm(out / "saved")(batch()).logits, plain.eval()(batch()).logits)


def test_fsdp_mixed_precision(run, one_process):
    """param_dtype=bfloat16: a decoder block's gathered parameters in bf16, its shards and gradients float32; the
    output layer stays whole and float32 (so are the logits), and the saved state; training close to the float32
    run (not equal: bf16 block forwards)."""
    out = run("fsdp", "bfloat16")
    facts = json.loads((out / "facts0.json").read_text())
    assert facts == {
        "grad_dtype": "torch.float32",
        "param_dtype": "torch.float32",
        "gathered_param_dtype": "torch.bfloat16",
        "gathered_logits_dtype": "torch.float32",
    }
    norms = load_file(out / "norms.safetensors")["norms"]
    torch.testing.assert_close(norms, one_process[1], rtol=5e-2, atol=0)
    assert not torch.equal(norms, one_process[1])
    assert {v.dtype for v in load_file(out / "state.safetensors").values()} == {torch.float32}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_one_process_wraps_nothing(strategy):
    """world 1: the modules stay as they are and training is bitwise the plain run's."""
    pair = Pair()
    lm, addon = pair.lm, pair.addon
    one, two = Trainable(pair, "lm", Ranks(), strategy), Trainable(pair, "addon", Ranks(), strategy)
    group = TrainableGroup(one, two)
    optimizer = torch.optim.AdamW(pair.parameters(), lr=LR)
    norms = []
    for _ in range(STEPS):
        with group.gradient_pass(sync=False):
            assert pair.lm is lm and type(pair.lm) is type(Pair().lm) and pair.addon is addon
            pair.loss(batch()).backward()
        norms.append(grad_norm(pair))
        optimizer.step()
        optimizer.zero_grad()
    with group.gathered():
        assert pair.lm is lm
    plain, plain_norms = train_one_process()
    assert torch.equal(torch.stack(norms), plain_norms)
    state = one.full_state_dict()
    assert state.keys() == lm.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in plain.lm.state_dict().items())


def test_nothing_trainable_wraps_nothing():
    """A frozen module is never wrapped, whatever the world size (no process group is needed to build it)."""
    pair = Pair()
    pair.lm.requires_grad_(False)
    lm = pair.lm
    trainable = Trainable(pair, "lm", Ranks(rank=1, world=2), "fsdp")
    with trainable.gradient_pass(), trainable.gathered():
        assert pair.lm is lm and type(lm).__name__ == "LlamaForCausalLM"
    assert trainable.full_state_dict() == {}  # rank 1


def test_unknown_strategy_and_ddp_param_dtype_refused():
    pair = Pair()
    with pytest.raises(ValueError, match="unknown parallel strategy"):
        Trainable(pair, "lm", Ranks(), "zero3")
    with pytest.raises(ValueError, match="param_dtype"):
        Trainable(pair, "lm", Ranks(), "ddp", torch.bfloat16)
