"""Hidden-state injection: identity start, frozen base, log-prob alignment, EOS masking, save/load
and a short real GRPO run whose reward improves."""

import json

import pytest
import torch

from latentlab.common.errors import InputError
from latentlab.common.execution import Loop
from latentlab.common.tracking import StepLog
from latentlab.lm.modeling import MANIFEST, save_lm
from latentlab.lm.sampling import SamplingConfig
from latentlab.policies.injection import InjectionPolicy, InjectorConfig, build_injector, save_injector
from latentlab.policies.lm_policy import LMPolicy
from latentlab.policies.loading import load_policy
from latentlab.rl.grpo import GRPOConfig, GRPOTrainer
from tests.test_grpo import mean_grpo_loss
from tests.tiny import new_tiny_lm

PROMPTS = ["3+4=", "12-5=", "40+9=", "1+1=", "48-47="]


def _policy(cfg: InjectorConfig | None = None, perturb: bool = False, l2: float = 0.0, **lm):
    """An injection policy; `perturb` gives the zero-initialised last layer random weights (v != h)."""
    model, tokenizer = new_tiny_lm(**lm)
    injector = build_injector(model, cfg or InjectorConfig())
    if perturb:
        torch.manual_seed(1)
        torch.nn.init.normal_(injector.mlp[-1].weight, std=0.3)
    return InjectionPolicy(model, tokenizer, injector, l2)


def _leading_digit(completions: list[str], targets: list) -> list[float]:
    return [float(c[:1].isdigit()) for c in completions]


@pytest.mark.parametrize("layer", [0, 1, -1])
@torch.no_grad()
def test_virtual_token_is_exactly_the_chosen_layers_last_prompt_state_at_init(layer):
    policy = _policy(InjectorConfig(layer=layer))
    rollout = policy.rollout(PROMPTS, SamplingConfig(max_new_tokens=2), torch.Generator().manual_seed(0))
    embeds, mask = policy.prefix(rollout)
    for row, prompt in enumerate(PROMPTS):
        # independent path: the unpadded prompt alone, every hidden state materialised
        ids = torch.tensor([policy.tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        h = policy.model(input_ids=ids, output_hidden_states=True).hidden_states[layer][0, -1]
        torch.testing.assert_close(rollout.extras["hidden"][row], h, atol=1e-5, rtol=1e-5)
    # identity at init: the appended position is h itself, bit for bit, and costs no regularisation
    assert torch.equal(embeds[:, -1], rollout.extras["hidden"])
    assert torch.equal(embeds[:, :-1], policy.model.get_input_embeddings()(rollout.prompt_ids))
    assert mask[:, -1].all() and mask.shape[1] == rollout.prompt_mask.shape[1] + 1
    assert policy.regularizers(rollout)["l2_reg"].item() == 0.0


@torch.no_grad()
def test_output_norm_keeps_the_direction_and_takes_the_embedding_scale():
    policy = _policy(InjectorConfig(output_norm=True))
    h = torch.randn(4, 32) * 7
    v = policy.injector(h)
    embedding_rms = policy.model.get_input_embeddings().weight.pow(2).mean().sqrt()
    torch.testing.assert_close(v.pow(2).mean(-1).sqrt(), embedding_rms.expand(4), rtol=1e-4, atol=0)
    torch.testing.assert_close(torch.cosine_similarity(v, h, dim=-1), torch.ones(4))


def test_training_moves_only_the_injector_and_no_gradient_reaches_the_base():
    policy = _policy(l2=0.1)
    before = {name: p.clone() for name, p in policy.model.state_dict().items()}
    injector_before = [p.clone() for p in policy.trainable_parameters()]
    cfg = GRPOConfig(steps=3, prompts_per_step=4, group_size=4, max_new_tokens=3, lr=1e-2)
    trainer = GRPOTrainer(policy, _leading_digit, cfg, torch.Generator().manual_seed(0))
    trainer.train(lambda: (PROMPTS[:4], [0] * 4), Loop(log=StepLog(), desc="test"))

    assert all(p.grad is None and not p.requires_grad for p in policy.model.parameters())
    assert all(torch.equal(p, before[name]) for name, p in policy.model.state_dict().items())
    assert all(p.grad is not None for p in policy.trainable_parameters())
    assert not torch.equal(policy.injector.mlp[-1].weight, injector_before[-2])  # the zero layer has moved
    assert len(policy.trainable_parameters()) == 6  # three Linear layers: weights and biases, nothing else


@torch.no_grad()
def test_logprobs_score_exactly_the_sampled_tokens_against_a_slow_reference():
    policy = _policy(perturb=True)
    temperature = 0.7
    rollout = policy.rollout(
        PROMPTS, SamplingConfig(max_new_tokens=6, temperature=temperature), torch.Generator().manual_seed(0)
    )
    teacher_forced = policy.logprobs(rollout, temperature)  # one pass over [prompt, v, completion]
    embed = policy.model.get_input_embeddings()
    for row, prompt in enumerate(PROMPTS):
        ids = torch.tensor([policy.tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        h = policy.model(input_ids=ids, output_hidden_states=True).hidden_states[-1][:, -1]
        virtual = policy.injector(h)[:, None]
        assert not torch.allclose(virtual[0, 0], h[0])  # the injector really changes the token
        for t in range(int(rollout.completions.mask[row].sum())):
            # no padding, no cache: [prompt, v, completion[:t]] from scratch, the last logits score token t
            sequence = torch.cat([embed(ids), virtual, embed(rollout.completions.ids[row : row + 1, :t])], dim=1)
            logits = policy.model(inputs_embeds=sequence).logits[0, -1]
            expected = torch.log_softmax(logits / temperature, -1)[rollout.completions.ids[row, t]]
            # the sampler (prompt cache + v as the one new position) and the loss's pass agree with it
            assert rollout.completions.logprobs[row, t].item() == pytest.approx(expected.item(), abs=1e-4)
            assert teacher_forced[row, t].item() == pytest.approx(expected.item(), abs=1e-4)


def test_tokens_after_eos_change_neither_the_loss_nor_its_gradient():
    policy = _policy(perturb=True, l2=0.1)
    rollout = policy.rollout(
        PROMPTS, SamplingConfig(max_new_tokens=6, temperature=1.5), torch.Generator().manual_seed(0)
    )
    completions, eos = rollout.completions, policy.tokenizer.eos_token_id
    assert completions.ids.shape[1] == 6
    # end row r at position r % 3 (EOS included in the mask), padding after it
    for row in range(len(PROMPTS)):
        end = row % 3
        completions.ids[row, end] = eos
        completions.ids[row, end + 1 :] = policy.tokenizer.pad_token_id
        completions.mask[row] = torch.arange(6) <= end
    advantages = torch.tensor([1.0, -0.5, 2.0, -1.5, 0.3])

    def loss_and_grad():
        logprobs = policy.logprobs(rollout, 1.0)
        # old log-probs fixed at 0, so the ratio (hence the loss) depends on the scored tokens
        loss, _ = mean_grpo_loss(logprobs, torch.zeros_like(logprobs), advantages, completions.mask, clip_eps=0.2)
        loss = loss + sum(policy.regularizers(rollout).values())
        policy.injector.zero_grad()
        loss.backward()
        return loss.item(), [p.grad.clone() for p in policy.trainable_parameters()]

    reference_loss, reference_grads = loss_and_grad()
    after_eos = ~completions.mask
    completions.ids[after_eos] = torch.randint(
        10, 40, (int(after_eos.sum()),), generator=torch.Generator().manual_seed(2)
    )
    loss, grads = loss_and_grad()
    assert loss == pytest.approx(reference_loss, abs=1e-6)
    for grad, reference in zip(grads, reference_grads):
        torch.testing.assert_close(grad, reference, atol=1e-6, rtol=1e-5)

    completions.ids[4, 0] = (completions.ids[4, 0] + 1) % 40  # a token before EOS does count
    assert loss_and_grad()[0] != pytest.approx(reference_loss, abs=1e-6)


def test_short_grpo_run_of_the_injector_raises_the_reward():
    # reward: the completion starts with a digit (about 1 in 5 at the start); the frozen model can
    # only be steered through the virtual token, so a rise is the injector's doing
    policy = _policy(embedding_scale=10.0)
    cfg = GRPOConfig(steps=30, prompts_per_step=4, group_size=8, max_new_tokens=2, lr=3e-2)
    log = StepLog()
    GRPOTrainer(policy, _leading_digit, cfg, torch.Generator().manual_seed(0)).train(
        lambda: (PROMPTS[:4], [0] * 4), Loop(log=log, desc="test")
    )
    rewards = [row["reward_mean"] for row in log.rows]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-10:]) / 10
    assert last > first + 0.4, f"reward went from {first:.3f} to {last:.3f}"
    for key in ("policy_loss", "l2_reg", "advantage_mean", "advantage_std", "reward_mean", "seconds_per_step"):
        assert key in log.rows[-1]


def test_saved_injector_loads_onto_its_base_and_refuses_a_changed_base(tmp_path):
    policy = _policy(perturb=True)
    save_lm(policy.model, policy.tokenizer, tmp_path / "sft")
    save_injector(policy.injector, tmp_path / "inject", base=tmp_path / "sft", trained_parameters=1234)
    config = json.loads((tmp_path / "inject" / "injector.json").read_text())
    assert config["base_model"] == str(tmp_path / "sft") and len(config["base_sha256"]) == 64

    loaded = load_policy(tmp_path / "inject")
    assert isinstance(loaded, InjectionPolicy)
    for name, value in policy.injector.state_dict().items():
        assert torch.equal(loaded.injector.state_dict()[name], value), name
    assert loaded.generate(PROMPTS, 4) == policy.generate(PROMPTS, 4)
    assert type(load_policy(tmp_path / "sft")) is LMPolicy

    manifest = tmp_path / "sft" / MANIFEST
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "content_sha256": "0" * 64}))
    with pytest.raises(InputError, match="retrain the injector"):
        load_policy(tmp_path / "inject")
