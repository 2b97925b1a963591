"""In-framework sampling: batched prefill + jitted decode over the KV cache, and
exact speculative decoding."""

from m2.sampling.sampler import (FINISH_LENGTH, FINISH_STOP, Sampler, SamplerOutput,
                                 SamplerState, SamplingParams)
from m2.sampling.speculative import Drafter, ModelDrafter, SpeculativeSampler

__all__ = ["Drafter", "FINISH_LENGTH", "FINISH_STOP", "ModelDrafter", "Sampler", "SamplerOutput",
           "SamplerState", "SamplingParams", "SpeculativeSampler"]
