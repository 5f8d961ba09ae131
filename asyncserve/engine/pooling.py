"""The engine's side of embedding models: pooling requests are added, checked, and finished as soon as
their prompt has run (their KV blocks go back to the pool at once; nothing is generated)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from asyncserve.engine.sequence import FinishReason, Request, Sequence
from asyncserve.errors import InvalidParameterError, PromptTooLongError
from asyncserve.outputs import EmbeddingOutput, EmbeddingRequestOutput
from asyncserve.pooling_params import PoolingParams
from asyncserve.runner.step import StepOutput

if TYPE_CHECKING:
    from asyncserve.engine.llm_engine import LLMEngine


def check_pooling_request(engine: "LLMEngine", params) -> None:
    """Pooling parameters go to an embedding model, sampling parameters to a generative one."""
    model_config = engine.model_config
    if isinstance(params, PoolingParams) and not model_config.is_pooling:
        raise InvalidParameterError(
            "This model runs as a generative model: it does not support embeddings. Start it with "
            "runner='pooling' (--runner pooling, or the older --task embed) to embed.", "model")
    if not isinstance(params, PoolingParams) and model_config.is_pooling:
        raise InvalidParameterError(
            "This model runs as an embedding model (runner='pooling'): it does not generate. Use "
            "LLM.embed() / /v1/embeddings, or start it with --runner generate.", "model")


def validate_pooling_prompt(engine: "LLMEngine", token_ids: list[int], params: PoolingParams) -> None:
    model_config = engine.model_config
    check_pooling_request(engine, params)
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


def check_dimensions(model_config, dimensions: int | None) -> None:
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


def add_pooling_request(engine: "LLMEngine", request_id: str, prompt, params: PoolingParams) -> Request:
    check_pooling_request(engine, params)  # before tokenizing: the wrong kind of request fails first
    params = params.clone()
    text, token_ids = engine.tokenize_prompt(prompt)
    truncated = params.truncate_prompt(token_ids, engine.model_config.max_model_len)
    if len(truncated) < len(token_ids):
        text, token_ids = None, truncated
    validate_pooling_prompt(engine, token_ids, params)
    request = Request(request_id, text, token_ids, params)
    seq = Sequence(next(engine._seq_ids), request, list(token_ids), 0)
    request.seqs.append(seq)
    engine.requests[request_id] = request
    engine.scheduler.add(seq)
    engine.stats["prompt_tokens"] += len(token_ids)
    return request


def embedding_output(request: Request) -> EmbeddingRequestOutput:
    outputs = EmbeddingOutput(request.embedding) if request.embedding is not None else None
    return EmbeddingRequestOutput(request.request_id, outputs, request.prompt_token_ids, True, request.prompt)


def process_pooled(engine: "LLMEngine", scheduled: list[tuple[Sequence, int]],
                   output: StepOutput) -> list[EmbeddingRequestOutput]:
    """Applies a pooling step: a sequence whose prompt ended takes its embedding and finishes, which frees
    its blocks; returns the finished requests' outputs."""
    kv_manager, scheduler = engine.kv_manager, engine.scheduler
    outputs = []
    for (seq, _), result in zip(scheduled, output.results):
        if result.embedding is not None:
            seq.num_in_flight -= 1
        if seq.is_finished:  # aborted while the step ran
            continue
        kv_manager.cache_computed_blocks(seq)
        if result.embedding is None:
            continue
        request = seq.request
        request.embedding = result.embedding
        seq.finish_reason = FinishReason.STOP
        scheduler.finish(seq)
        del engine.requests[request.request_id]
        engine._to_release.append(request)
        outputs.append(embedding_output(request))
    return outputs
