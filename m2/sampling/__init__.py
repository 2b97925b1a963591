"""In-framework sampling: batched prefill + jitted decode over the KV cache, and
exact speculative decoding."""

from m2.sampling.sampler import (FINISH_LENGTH, FINISH_STOP, Sampler, SamplerOutput,
                                 SamplerState, SamplingParams)
from m2.sampling.speculative import Drafter, ModelDrafter, SpeculativeSampler
from m2.sampling.eagle import EagleDrafter, EagleHead

__all__ = ["Drafter", "EagleDrafter", "EagleHead", "FINISH_LENGTH", "FINISH_STOP", "ModelDrafter",
           "Sampler", "SamplerOutput", "SamplerState", "SamplingParams", "SpeculativeSampler"]
