"""Portable numerics: the same seed gives the same bytes on any x86-64 CPU with AVX2.

torch, MKL, oneDNN, NumPy and OpenBLAS each choose their vectorised kernels by the CPU's instruction set, and
kernels of different widths sum floating-point numbers in different orders: a 10-step training of a 4-layer
Llama gave other weight bytes with ATen's AVX-512 kernels than with its AVX2 ones (same seed, one thread), and
NumPy's AVX-512 exp/tanh other bytes than its AVX2 ones. Portable mode caps every library at AVX2, which every
x86-64 CPU of the last decade has; native mode leaves each library its own choice (faster where AVX-512 pays,
bytes that differ between CPUs).

What is pinned, and when each library reads it (a setting read after that moment does nothing):
    ATEN_CPU_CAPABILITY=avx2         torch's own kernels (DispatchStub), read at the first kernel torch runs
    MKL_CBWR=AVX2, MKL_DYNAMIC=FALSE  MKL's conditional numerical reproducibility (matmul, BLAS): AVX2 code
                                     paths and a fixed thread count, read at MKL's first call
    ONEDNN_MAX_CPU_ISA=AVX2          oneDNN (mkldnn: convolutions, bf16 matmul), read at its first primitive
    NPY_DISABLE_CPU_FEATURES         NumPy's SIMD dispatch above AVX2 (X86_V4, AVX512_*), read when NumPy loads
    OPENBLAS_CORETYPE=Haswell        NumPy's OpenBLAS kernels (AVX2) and their cache blocking
    OPENBLAS_L2_SIZE=512             (OpenBLAS otherwise sizes blocks by the detected L2), read when NumPy loads

NumPy loads with torch, so `pin` must run before `import torch`: `latentlab/__init__.py` calls it, so importing
latentlab (or anything under it) first is enough; stages import it before anything else (stages/__init__.py,
with params.yaml's `numerics`). The thread count is pinned separately (`threads`): CPU reductions split across
threads sum in another order too.

On CUDA, portable mode also asks for what can be made deterministic on one GPU model: cuBLAS's fixed workspace
(CUBLAS_WORKSPACE_CONFIG), deterministic algorithms where torch has them, cuDNN without autotuning. Bytes still
differ between GPU models and driver versions; nothing can pin those.
"""

import os
import platform
import sys
import warnings

MODES = ("portable", "native")
ENV_MODE = "LATENTLAB_NUMERICS"  # portable (default) | native
_PINNED = "LATENTLAB_NUMERICS_PINNED"  # the variables `pin` set itself: native mode removes exactly these

PORTABLE_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "AVX2",
    "MKL_DYNAMIC": "FALSE",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    # NumPy 2.x names of the dispatch targets above AVX2 (a name this machine lacks is ignored by NumPy)
    "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR",
    "OPENBLAS_CORETYPE": "Haswell",
    "OPENBLAS_L2_SIZE": "512",  # its GEMM blocking otherwise follows the detected cache size
}
CUDA_ENV = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}  # read when cuBLAS starts: deterministic matmul reductions


def mode_from_env() -> str:
    mode = os.environ.get(ENV_MODE, "portable")
    if mode not in MODES:
        raise ValueError(f"{ENV_MODE}={mode!r}: expected one of {MODES}")
    return mode


def pin(mode: str | None = None) -> None:
    """Set (portable) or clear (native) the kernel pins in this process's environment, which its children
    inherit. Portable overrides whatever the parent environment set; native removes only the pins an earlier
    `pin` set (a parent latentlab process), never a variable the user set. Call before torch and NumPy load."""
    mode = mode or mode_from_env()
    if mode not in MODES:
        raise ValueError(f"numerics must be one of {MODES}, got {mode!r}")
    os.environ[ENV_MODE] = mode
    ours = {name for name in os.environ.get(_PINNED, "").split(",") if name}
    if mode == "native":
        for name in ours:
            os.environ.pop(name, None)
        os.environ.pop(_PINNED, None)
        return
    pins = dict(PORTABLE_ENV) if platform.machine() in ("x86_64", "AMD64") else {}
    pins.update(CUDA_ENV)
    for name, value in pins.items():
        if os.environ.get(name) != value:
            ours.add(name)
        os.environ[name] = value
    os.environ[_PINNED] = ",".join(sorted(ours))
    if "torch" in sys.modules:  # too late for NumPy; ATen's choice holds if no kernel ran yet
        _warn_if_unpinned()


def _warn_if_unpinned() -> None:
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "DEFAULT"):
        warnings.warn(
            f"torch ran kernels before latentlab pinned them ({capability}): this process's numerics are native. "
            "Import latentlab before torch (or set ATEN_CPU_CAPABILITY=avx2 in the environment) for portable bytes.",
            stacklevel=3,
        )


def configure_torch(device) -> None:
    """Portable mode on a CUDA device: deterministic algorithms where torch has them (warn where it has none),
    no cuDNN autotuning. Nothing on the CPU: the environment pins already hold there."""
    import torch

    if mode_from_env() != "portable" or torch.device(device).type != "cuda":
        return
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def describe() -> dict:
    """What this process runs with (for manifests and benchmark JSON): mode, ATen capability, the pins."""
    import torch

    return {
        "numerics": mode_from_env(),
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "pins": {name: os.environ[name] for name in PORTABLE_ENV if name in os.environ},
    }
