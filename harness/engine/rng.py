"""Every random draw of a sampling run, made with the run's generator on the generator's own device.

PyTorch draws with a `torch.Generator` only into tensors of the generator's device: a CUDA generator cannot
fill a CPU scalar (`torch.rand(())` without `device=`), and a CPU generator cannot sample from CUDA
probabilities. The bench makes one generator per question on the target's device (so a GPU run draws on the
GPU, with no host round trip for the probabilities); the proposers and acceptance rules never call
`torch.rand` / `torch.multinomial` themselves but go through here, where the device always matches:

- `uniform(generator)`: a U[0, 1) scalar drawn on the generator's device;
- `categorical(probs, generator)`: one index from a probability vector. Same device: `torch.multinomial`.
  Probabilities on another device than the generator (a draft model kept on the CPU beside a GPU target):
  inverse-CDF sampling with a uniform from the generator, so no tensor crosses devices for the draw;
- `seed_from(generator)`: an int seed for libraries that take the global RNG (transformers' `generate`).

`generator=None` draws from PyTorch's global RNG (unseeded use, tests)."""
from __future__ import annotations

import torch


def generator_device(generator: torch.Generator | None) -> torch.device:
    return torch.device("cpu") if generator is None else torch.device(generator.device)


def uniform(generator: torch.Generator | None) -> float:
    return float(torch.rand((), generator=generator, device=generator_device(generator)))


def categorical(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One index drawn from `probs` (a 1-D, non-negative vector; it need not sum to exactly 1)."""
    if generator is None or generator_device(generator) == probs.device:
        return int(torch.multinomial(probs, 1, generator=generator))
    cumulative = probs.float().cumsum(dim=-1)
    point = uniform(generator) * float(cumulative[-1])
    index = int(torch.searchsorted(cumulative, torch.tensor([point], device=probs.device), right=True))
    return min(index, probs.shape[-1] - 1)


def seed_from(generator: torch.Generator | None) -> int:
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator_device(generator)))
