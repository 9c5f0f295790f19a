"""The schema of params.yaml: one typed section per stage plus the shared ones.

Sections reuse the library's config classes, so a bound written once in latentlab/ (say
`clip_eps < 1`) is checked here before any stage does work. Errors name the key:

    params.yaml: grpo.clip_eps: Input should be less than 1 (got 1.5)
"""

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from ruamel.yaml import YAML, YAMLError

from latentlab.common.config import Config
from latentlab.hidden.labelling import LabelConfig
from latentlab.lm.adapters import LoRAConfig
from latentlab.lm.modeling import TinyLMConfig
from latentlab.lm.prompt_format import PromptFormat
from latentlab.lm.training import LMTrainConfig
from latentlab.policies.injection import InjectorConfig
from latentlab.policies.nla_actor import NLAActorConfig
from latentlab.policies.nla_critic import NLACriticSettings
from latentlab.policies.placeholder import PlaceholderVariant
from latentlab.rl.awr import AWRConfig
from latentlab.rl.grpo import GRPOConfig, GRPOSettings
from latentlab.rl.nla import CriticUpdates, NLASFTConfig, RewardKind
from latentlab.rl.ppo import PPOConfig
from latentlab.rl.sac import SACConfig
from latentlab.rl.surgeon import SurgeonConfig
from latentlab.tasks.arithmetic import ArithmeticConfig
from latentlab.tasks.grid import BehaviourConfig, GridConfig
from latentlab.tasks.grid_online import OnlineConfig


class ParamsError(Exception):
    """params.yaml is missing, unreadable or invalid."""


class WandbParams(Config):
    mode: Literal["offline", "online", "disabled"] = "offline"
    """W&B logging: offline (local files, no login), online, or disabled."""
    project: str = "latentlab"
    """W&B project name."""


class ModelParams(TinyLMConfig):
    source: str = "scratch"
    """'scratch' builds the tiny model below; anything else is a Hugging Face id or a local directory."""
    revision: str | None = None
    """Hub revision (commit, branch or tag) to pin when `source` is a hub id."""
    adapter: Literal["none", "lora"] = "none"
    """What the stages that fine-tune the model (sft, grpo, nla_sft's and nla_rl's actor) train: none, every weight;
    lora, low-rank adapters on the frozen model (`lora` below), saved beside the merged model as <output>/adapter/."""
    lora: LoRAConfig = LoRAConfig()
    """The adapters when `adapter` is lora: rank, alpha, dropout and the layers they adapt."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """The loaded weights' dtype. bfloat16 halves the weights' and activations' memory; the optimizer then steps an
    fp32 master copy of each bf16 weight (latentlab/common/precision.py), since bf16 rounds small updates away."""


class BaseParams(LMTrainConfig):
    corpus_sequences: int = Field(gt=0)
    """Pretraining sequences in the synthetic corpus."""
    sequence_chars: int = Field(gt=0)
    """Characters per pretraining sequence."""
    grid_share: float = Field(0.0, ge=0, lt=1)
    """Share of the pretraining sequences packed from the grid world's observation texts (0: equations only)."""


class LabelParams(LabelConfig):
    datasets: list[Literal["biased", "full", "test", "grid"]] = Field(
        default_factory=lambda: ["full", "test"], min_length=1
    )
    """Sets to label, each into data/hidden/<name>.zarr and data/labels/<name>.parquet (grid: the observation texts)."""


class NLATableParams(Config):
    dataset: Literal["biased", "full", "test"] = "full"
    """The labelled set (one of label.datasets) whose vectors become the NLA table data/nla/nla.parquet."""
    layer: int = -1
    """The layer (one of label.layers, as written there) whose pooled vector is the NLA activation_vector; the
    table records it, and nla_sft's critic is the base model truncated there."""
    eval_dataset: Literal["biased", "full", "test"] | None = "test"
    """The held-out labelled set (one of label.datasets) that becomes data/nla/nla_eval.parquet (null: none)."""


class GRPOParams(GRPOSettings):
    """The GRPO section shared by every stage trained with it; each stage's learning rate is in its own section."""

    even_bonus: float = Field(0.0, ge=0)
    """Reward added for an even answer (the exploration incentive of the experiment)."""
    eval_every: int = Field(0, ge=0)
    """Greedy accuracy on a held-out batch every this many steps (0: never)."""
    eval_batch: int = Field(64, gt=0)
    """Size of that held-out batch."""


class StageLR(Config):
    lr: float = Field(gt=0)
    """AdamW learning rate of what this stage trains."""


class InjectParams(InjectorConfig):
    l2: float = Field(0.0, ge=0)
    """Weight of the pull toward identity: l2 * ||v - h||^2, mean over prompts."""
    lr: float = Field(gt=0)
    """AdamW learning rate of the injector (GRPO's other settings: the `grpo` section)."""
    align_steps: int = Field(0, ge=0)
    """Steps of the alignment phase before GRPO: the injector learns KL(model without v || with v) on gold answers
    (xRAG's self-distillation; latentlab/policies/alignment.py). 0: none."""
    align_lr: float = Field(1e-3, gt=0)
    """AdamW learning rate of the alignment phase."""
    align_batch: int = Field(64, gt=0)
    """Training problems per alignment step."""
    scale_sweep: int = Field(6, ge=0)
    """Norms in the step-0 sweep of the norm variant -> plots/inject_scales.csv (0: the file holds a header only)."""

    @property
    def injector(self) -> InjectorConfig:
        return InjectorConfig.model_validate(self.model_dump(include=set(InjectorConfig.model_fields)))


class SFTParams(LMTrainConfig):
    placeholder_share: float = Field(0.0, ge=0, le=1)
    """Share of SFT examples with an <INJECT> position after the prompt holding the `placeholder` variant's step-0
    vector (latentlab/policies/placeholder.py), so the model has seen a virtual token. 0: plain SFT."""
    placeholder: PlaceholderVariant = "residual"
    """Which inject variant's step-0 vector fills it: residual (h), norm (h at the embedding rows' mean norm), token
    (the mean embedding row); inject's defaults for scale and init_token."""
    placeholder_layer: int = -1
    """The hidden state h of that vector (as inject.layer: output_hidden_states numbering)."""


class SurgeryParams(SurgeonConfig):
    phases: list[int] = Field(min_length=3, max_length=3)
    """Steps of phase 1 (GRPO only), 2 (surgery only, edits discarded) and 3 (GRPO + surgery, commits)."""
    lr: float = Field(gt=0)
    """AdamW learning rate of GRPO on the whole model (GRPO's other settings: the `grpo` section)."""
    sac: SACConfig
    """The surgeon's SAC."""

    @model_validator(mode="after")
    def _phases_counted(self):
        if min(self.phases) < 0 or self.phases[0] + self.phases[2] == 0:
            raise ValueError(f"phases {self.phases}: counts must be >= 0 with some GRPO steps (phase 1 or 3)")
        return self

    @property
    def surgeon(self) -> SurgeonConfig:
        return SurgeonConfig.model_validate(self.model_dump(include=set(SurgeonConfig.model_fields)))


class NLASFTParams(NLASFTConfig):
    actor: NLAActorConfig
    """The actor: prompt template, injection mode, layers and scale."""
    critic: NLACriticSettings
    """The critic: pooling, loss, centring, text length (its layer is the NLA table's)."""

    @model_validator(mode="after")
    def _same_space(self):
        if self.actor.center != self.critic.center:
            raise ValueError("actor.center and critic.center must agree: both read the same vector space")
        return self


class NLARLParams(Config):
    algo: Literal["grpo", "ppo"] = "grpo"
    """The RL algorithm that trains the actor (each reads its own subsection below)."""
    reward: RewardKind = "neg_mse"
    """f(MSE) of the critic's reconstruction: neg_mse -MSE | exp exp(-MSE) | inverse 1/(1+MSE) | neg_log -log MSE."""
    critic: CriticUpdates
    """The critic's own learning during RL (on the actor's explanations)."""
    grpo: GRPOConfig
    """GRPO of the actor (the shared core; prompts are activation vectors)."""
    ppo: PPOConfig
    """PPO of the actor with a value head on its model."""
    eval_every: int = Field(0, ge=0)
    """Held-out FVE of greedy explanations every this many steps (0: never)."""
    eval_batch: int = Field(64, gt=0)
    """Held-out vectors in that check."""


class GridParams(GridConfig, BehaviourConfig):
    """The grid world and the behaviour data collected in it (data/grid/)."""

    @property
    def env(self) -> GridConfig:
        return GridConfig.model_validate(self.model_dump(include=set(GridConfig.model_fields)))

    @property
    def behaviour(self) -> BehaviourConfig:
        return BehaviourConfig.model_validate(self.model_dump(include=set(BehaviourConfig.model_fields)))


class PolicyParams(Config):
    channels: int = Field(16, gt=0)
    """Channels of the actor-critic's first conv layer."""
    features: int = Field(128, gt=0)
    """Width of the CNN features and of the heads."""
    awr: AWRConfig = AWRConfig()
    """Offline training of both policies (with and without the hidden state)."""
    eval: OnlineConfig = OnlineConfig()
    """Online evaluation; `eval.layer` is also the layer the hidden policy is trained on."""


class LauncherParams(Config):
    """How training stages run: one process, or torchrun with DistributedDataParallel (docs: how-to/distributed.md)."""

    nproc: int = Field(1, ge=1)
    """Processes per node (one GPU each on CUDA; gloo on the CPU). >1: the stage re-executes itself under torchrun."""
    nnodes: int = Field(1, ge=1)
    """Nodes; >1 needs `rdzv_endpoint`, and the same command started on every node."""
    rdzv_endpoint: str = ""
    """host:port of the c10d rendezvous when nnodes > 1 (e.g. node0:29400)."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """How the trainable modules spread over the processes: ddp replicates them (DistributedDataParallel); fsdp
    shards each decoder block's weights, gradients and optimizer state over them (torch's FSDP2 `fully_shard`), for
    a model whose training state does not fit one device. Saved outputs are the same whole model either way."""
    shards: int = Field(0, ge=0)
    """Shards of each global batch in sampling stages (grpo, inject, surgery, nla_rl): shard k samples from its
    own stream seeded seed + 1 + 1000003 k. 0: one per process. A single process with `shards: N` reproduces
    a run on N processes (it accumulates the N shards' gradients)."""

    @model_validator(mode="after")
    def _endpoint_for_nodes(self):
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError("launcher.rdzv_endpoint (host:port) is needed when launcher.nnodes > 1")
        return self


class GPUParams(Config):
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Training forward passes and sampling: 'auto' is bf16 autocast on a CUDA device that supports it and fp32
    otherwise (the CPU always runs fp32); 'bf16' asks for it (an error where unsupported); 'fp32' never autocasts."""
    gradient_checkpointing: bool = False
    """HF activation checkpointing on the decoder blocks: each keeps only its input for the backward, which
    recomputes the rest (far less activation memory for about one extra forward per step)."""


class EvaluateParams(Config):
    batch_size: int = Field(256, gt=0)
    """Problems per generation batch."""
    max_new_tokens: int = Field(6, gt=0)
    """Longest answer read from each model."""


class StageSeeds(Config):
    """Seeds of single stages, for variation downstream of fixed upstream models (null: the top-level `seed`).

    A stage's seed here replaces `seed` for that stage alone: every random choice it makes (setup's streams, its own
    draws) follows it, while the stages upstream keep the top-level seed, their params unchanged, so DVC reuses their
    outputs: `stage_seeds.grpo: 3` reruns grpo (and what reads its model) on the same base and SFT models. Each key
    is tracked by its own stage only (dvc.yaml). `python -m flows.sweep --stage-seeds grpo,inject=5` sweeps them."""

    grpo: int | None = Field(None, ge=0, lt=2**32)
    """The grpo stage's seed (prompts, sampling, held-out monitor) on the fixed SFT model."""
    inject: int | None = Field(None, ge=0, lt=2**32)
    """The inject stage's; set it equal to `grpo`'s to keep the two paired (they draw the same prompts and samples)."""
    surgery: int | None = Field(None, ge=0, lt=2**32)
    """The surgery stage's (its GRPO streams, the surgeon and its controls) on the fixed SFT model."""
    nla_rl: int | None = Field(None, ge=0, lt=2**32)
    """The nla_rl stage's, on the fixed NLA SFT actor and critic."""
    policy: int | None = Field(None, ge=0, lt=2**32)
    """The policy stage's (initial networks, data order) on the fixed base model's hidden states."""


DEVICES = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _out_of_range(key: str, indices, blocks: int, numbering: str, low: int, high: int) -> str | None:
    """`key: layer i is out of range for a model with N layers (...)` for the first index outside low..high."""
    for index in indices:
        if not low <= index <= high:
            negatives = f", or {low}..-1" if low < 0 else ""
            return (
                f"{key}: layer {index} is out of range for a model with {blocks} layers "
                f"({numbering} {max(low, 0)}..{high}{negatives})"
            )
    return None


class Params(Config):
    seed: int = Field(0, ge=0, lt=2**32)
    """Seed for every random choice of every stage (0 <= seed < 2**32, as numpy's seeding needs), but those
    `stage_seeds` gives a seed of their own."""
    stage_seeds: StageSeeds = StageSeeds()
    """Per-stage seeds replacing `seed` for one stage (null: `seed`): variation of a stage on fixed upstream models."""
    device: str = "auto"
    """'auto' (GPU when present), 'cpu', 'cuda', 'cuda:1', ..., 'mps'; checked against the machine when a stage
    starts."""
    threads: int = Field(1, ge=0)
    """torch's CPU threads in each stage process (0: every core torch sees). A CPU kernel's floating-point result
    depends on its thread count, so this is a param: dvc.lock records it, and a lock holds on any machine. One
    thread is the fastest here for every stage but base's large matmuls (docs: concepts/numerics.md), and lets two stages run
    side by side on two cores (`python -m flows.pipeline --jobs 2`)."""
    numerics: Literal["portable", "native"] = "portable"
    """CPU kernels: portable pins torch's vectorised kernels, MKL and oneDNN to the AVX2 instruction set so the same
    seed gives the same bytes on any x86-64 machine with AVX2; native lets each library pick the machine's best
    (faster, bytes differ between CPUs). See latentlab/common/numerics.py."""
    wandb: WandbParams = WandbParams()
    model: ModelParams = ModelParams()
    prompt: PromptFormat = PromptFormat()
    """How every stage that prompts the model encodes a problem's text (label, sft, grpo, inject, surgery,
    evaluate): raw, or the tokenizer's chat template with an optional system prompt."""
    synth: ArithmeticConfig
    base: BaseParams
    label: LabelParams = LabelParams()
    sft: SFTParams
    grpo: GRPOParams
    grpo_full: StageLR
    inject: InjectParams
    surgery: SurgeryParams
    nla_table: NLATableParams = NLATableParams()
    nla_sft: NLASFTParams
    nla_rl: NLARLParams
    grid: GridParams = GridParams()
    policy: PolicyParams = PolicyParams()
    launcher: LauncherParams = LauncherParams()
    gpu: GPUParams = GPUParams()
    evaluate: EvaluateParams = EvaluateParams()

    def for_stage(self, name: str) -> "Params":
        """These params as stage `name` runs under them: `seed` is the stage's own (`stage_seeds.<name>`) when set."""
        own = getattr(self.stage_seeds, name, None)
        return self if own is None else self.model_copy(update={"seed": own})

    @field_validator("device")
    @classmethod
    def _a_device_torch_knows(cls, device: str) -> str:
        if not DEVICES.fullmatch(device):
            raise ValueError(f"{device!r} is not a device: use auto, cpu, cuda, cuda:N or mps")
        return device

    # Checks across sections have no location of their own: each message starts with the key it is about.

    @model_validator(mode="after")
    def _layers_fit_the_scratch_model(self):
        """With `model.source: scratch` the layer count is a param: every layer index is checked against it here
        (a hub model's count is known once it is loaded: `layer_problem` with its count, in the stage)."""
        if self.model.source == "scratch" and (problem := self.layer_problem(self.model.layers)):
            raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _chat_needs_a_template(self):
        if self.model.source == "scratch" and self.prompt.format == "chat":
            raise ValueError(
                "prompt.format: chat needs a tokenizer with a chat template; the scratch model's character tokenizer "
                "has none (use raw, or a model.source whose tokenizer holds a template)"
            )
        return self

    @model_validator(mode="after")
    def _nla_table_reads_labelled_sets(self):
        label, table = self.label, self.nla_table
        for key, name in (("dataset", table.dataset), ("eval_dataset", table.eval_dataset)):
            if name is not None and name not in label.datasets:
                raise ValueError(f"nla_table.{key} ({name}) must be one of label.datasets {label.datasets}")
        if table.layer not in label.layers:
            raise ValueError(f"nla_table.layer ({table.layer}) must be one of label.layers {label.layers}")
        return self

    @model_validator(mode="after")
    def _policy_layer_is_labelled(self):
        if self.policy.eval.layer not in self.label.layers:
            raise ValueError(
                f"policy.eval.layer ({self.policy.eval.layer}) must be one of label.layers {self.label.layers}"
            )
        return self

    def layer_problem(self, blocks: int, keys: tuple[str, ...] | None = None) -> str | None:
        """The first layer index of these params (of `keys` only, when given) that a model of `blocks` decoder
        blocks lacks, as a message that names the key; None when all fit. Numberings: hidden states as output_hidden_states (0..L, -1 the final
        norm), blocks (0..L-1, negatives from the end), block inputs (0 the embeddings, l the input of block l)."""
        hidden = ("hidden states", -blocks - 1, blocks)
        block = ("blocks", -blocks, blocks - 1)
        block_input = ("block inputs", 0, blocks - 1)
        checks = [
            ("label.layers", self.label.layers, hidden),
            ("inject.layer", [self.inject.layer], hidden),
            ("sft.placeholder_layer", [self.sft.placeholder_layer], hidden),
            ("surgery.layers", self.surgery.layers or [], block),
            ("nla_sft.actor.layers", self.nla_sft.actor.layers, block_input),
        ]
        if self.inject.variant == "gated":
            checks.append(("inject.gate_layer", [self.inject.gate_layer], block_input))
        for key, indices, (numbering, low, high) in checks:
            if keys is not None and key not in keys:
                continue
            if problem := _out_of_range(key, indices, blocks, numbering, low, high):
                return problem
        return None


def _describe(error: dict) -> str:
    """`key: message (got value)`. A value error is one of our checks: its message names the values it is about,
    so the value is not repeated (for a check of a whole section, or of the file, it would be all of it)."""
    key = ".".join(str(part) for part in error["loc"])
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    elif error["type"] == "missing":
        message = "required key is missing"
    elif error["type"] == "value_error":  # our own checks: the message names the keys and values
        message = str(error["ctx"]["error"]) if "error" in error.get("ctx", {}) else message
    shown = "" if error["type"] in ("missing", "extra_forbidden", "value_error") else f" (got {error['input']!r})"
    return f"{key}: {message}{shown}" if key else f"{message}{shown}"


def _yaml_problem(error: YAMLError) -> str:
    """A YAML error on one line, with its position."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None)
    if mark is None or problem is None:
        return " ".join(str(error).split())
    context = getattr(error, "context", None)
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" + (f" ({context})" if context else "")


def load_params(path: str | Path = "params.yaml") -> Params:
    """Parse and validate the whole file; raise ParamsError listing every bad key."""
    path = Path(path)
    try:
        raw = YAML(typ="safe").load(path.read_bytes().decode("utf-8"))  # YAML 1.2, as DVC reads it: 1e-3 is a float
    except FileNotFoundError:
        raise ParamsError(f"{path} does not exist") from None
    except UnicodeDecodeError as error:
        raise ParamsError(
            f"{path} is not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset {error.start}): "
            "save it as UTF-8"
        ) from None
    except OSError as error:
        raise ParamsError(f"{path} cannot be read: {error.strerror}") from None
    except YAMLError as error:
        raise ParamsError(f"{path} is not valid YAML: {_yaml_problem(error)}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path} must be a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        lines = "\n".join(f"{path}: {_describe(e)}" for e in error.errors())
        raise ParamsError(lines) from None


if __name__ == "__main__":  # python -m stages.params --check FILE: the flows check param overrides without torch
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m stages.params", description="check a params file")
    parser.add_argument("--check", metavar="FILE", default="params.yaml", help="the file to check (params.yaml)")
    try:
        load_params(parser.parse_args().check)
    except ParamsError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
