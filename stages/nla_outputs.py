"""What nla_sft and nla_rl write: the NLA pair, the actor as plain weights (a LoRA adapter beside them)."""

from pathlib import Path

from latentlab.lm.modeling import read_manifest
from latentlab.policies.nla_actor import NLAActor, save_actor
from latentlab.policies.nla_critic import NLACritic, save_critic
from stages.execution import plain_weights
from stages.params import Params


def save_nla_pair(params: Params, actor: NLAActor, critic: NLACritic, out: Path, base: Path, **provenance) -> None:
    """The NLA actor (plain weights; a LoRA adapter beside them) and critic into `out`/actor and `out`/critic, as
    nla_sft and nla_rl save them, `base`'s content hash as their parent. Rank 0, inside the learners' `whole()`."""
    provenance["parent"] = read_manifest(base).get("content_sha256")
    actor.model, _ = plain_weights(params, actor.model, out / "actor", base)
    save_actor(actor, out / "actor", **provenance)
    save_critic(critic, out / "critic", **provenance)
