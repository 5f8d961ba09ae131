"""The rules of embedding models' requests, and their output. The engine finishes a pooling request as
soon as its prompt has run (its KV blocks go back to the pool at once; nothing is generated)."""
from __future__ import annotations

from asyncserve.config.model import ModelConfig
from asyncserve.engine.sequence import Request
from asyncserve.errors import InvalidParameterError, PromptTooLongError
from asyncserve.outputs import EmbeddingOutput, EmbeddingRequestOutput
from asyncserve.pooling_params import PoolingParams


def check_pooling_request(model_config: ModelConfig, params) -> None:
    """Pooling parameters go to an embedding model, sampling parameters to a generative one."""
    if isinstance(params, PoolingParams) and not model_config.is_pooling:
        raise InvalidParameterError(
            "This model runs as a generative model: it does not support embeddings. Start it with "
            "runner='pooling' (--runner pooling, or the older --task embed) to embed.", "model")
    if not isinstance(params, PoolingParams) and model_config.is_pooling:
        raise InvalidParameterError(
            "This model runs as an embedding model (runner='pooling'): it does not generate. Use "
            "LLM.embed() / /v1/embeddings, or start it with --runner generate.", "model")


def validate_pooling_prompt(model_config: ModelConfig, token_ids: list[int], params: PoolingParams) -> None:
    check_pooling_request(model_config, params)
    max_len, vocab_size = model_config.max_model_len, model_config.vocab_size
    if not token_ids:
        raise InvalidParameterError("The input is empty: give at least one token.", "input")
    if any(not 0 <= t < vocab_size for t in token_ids):
        raise InvalidParameterError(f"Input token ids must be in [0, {vocab_size}).", "input")
    if len(token_ids) > max_len:
        raise PromptTooLongError(
            f"This model's maximum context length is {max_len} tokens (max_model_len), and the input has "
            f"{len(token_ids)}. Shorten the input, or pass truncate_prompt_tokens.", "input")
    check_dimensions(model_config, params.dimensions)


def check_dimensions(model_config: ModelConfig, dimensions: int | None) -> None:
    """`dimensions` only for Matryoshka models (config.json's is_matryoshka / matryoshka_dimensions)."""
    if dimensions is None:
        return
    if not model_config.is_matryoshka:
        raise InvalidParameterError(
            f"This model does not support 'dimensions': it is not a Matryoshka model (no is_matryoshka or "
            f"matryoshka_dimensions in its config.json); its embeddings have {model_config.hidden_size}.",
            "dimensions")
    allowed = model_config.matryoshka_dimensions
    if allowed is not None and dimensions not in allowed:
        raise InvalidParameterError(f"dimensions={dimensions} is not one this model was trained for: "
                                    f"{sorted(allowed)}.", "dimensions")
    if not 1 <= dimensions <= model_config.hidden_size:
        raise InvalidParameterError(f"dimensions must be in [1, {model_config.hidden_size}], got "
                                    f"{dimensions}.", "dimensions")


def embedding_output(request: Request) -> EmbeddingRequestOutput:
    outputs = EmbeddingOutput(request.embedding) if request.embedding is not None else None
    return EmbeddingRequestOutput(request.request_id, outputs, request.prompt_token_ids, True, request.prompt)
