"""Loading any saved policy: a Hugging Face model directory, or an add-on (injector) on its frozen base."""

from pathlib import Path

import torch

from latentlab.common.inputs import require_model_dir
from latentlab.lm.modeling import load_lm, verify_manifest
from latentlab.lm.prompt_format import RAW, PromptFormat
from latentlab.policies import injection
from latentlab.policies.lm_policy import LMPolicy


def load_policy(
    directory: str | Path, device: torch.device | str = "cpu", verify: bool = True, prompt_format: PromptFormat = RAW
) -> LMPolicy:
    """The policy a saved directory holds: a Hugging Face model, or an injector on its frozen base; either is
    first checked against the content hash its manifest records (`verify_manifest`; the base by `load_lm`)."""
    directory = Path(directory)
    if (directory / injection.CONFIG).exists():
        verify_manifest(directory, verify)
        return injection.load_injection_policy(directory, device)
    return LMPolicy(*load_lm(require_model_dir(directory), device, verify=verify), prompt_format)
