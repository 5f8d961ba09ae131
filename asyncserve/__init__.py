"""asyncserve: fast LLM serving from one Python process."""
from asyncserve.config import EngineConfig
from asyncserve.errors import (AsyncServeError, ConfigError, InvalidParameterError, PromptTooLongError,
                               SamplingParamsError, UnsupportedModelError)
from asyncserve.outputs import (CompletionOutput, EmbeddingOutput, EmbeddingRequestOutput, Logprob,
                                RequestOutput)
from asyncserve.lora_request import LoRARequest
from asyncserve.pooling_params import PoolingParams
from asyncserve.sampling_params import BeamSearchParams, SamplingParams, StructuredOutputsParams

__version__ = "0.1.0"


def __getattr__(name):
    # The engine pulls in torch and transformers: load it when first used, not on `import asyncserve`.
    if name == "LLM":
        from asyncserve.llm import LLM
        return LLM
    if name == "AsyncEngine":
        from asyncserve.engine.async_engine import AsyncEngine
        return AsyncEngine
    raise AttributeError(f"module 'asyncserve' has no attribute {name!r}")


__all__ = ["LLM", "AsyncEngine", "EngineConfig", "SamplingParams", "StructuredOutputsParams",
           "BeamSearchParams", "PoolingParams", "LoRARequest",
           "RequestOutput", "CompletionOutput", "EmbeddingRequestOutput", "EmbeddingOutput", "Logprob", "AsyncServeError", "ConfigError", "InvalidParameterError",
           "PromptTooLongError", "SamplingParamsError", "UnsupportedModelError"]
