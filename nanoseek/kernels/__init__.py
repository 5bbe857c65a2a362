"""Speed devices, each a drop-in for a reference module of nanoseek.model and tested against it,
applied from outside by the trainer and the engine (`speedup`), the way parallel/ applies FSDP.
NANOSEEK_KERNELS=0 turns them off."""
from nanoseek.kernels.chunked_head import known_logprob_gradient
from nanoseek.kernels.decode_weights import transposed_weights
from nanoseek.kernels.speedup import enabled, speedup

__all__ = ["speedup", "enabled", "transposed_weights", "known_logprob_gradient"]
