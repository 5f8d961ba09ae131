"""The user's flat settings (`EngineConfig`) resolved against the checkpoint into the config tree: the
checkpoint found or made (a folder, the hub, a GGUF file, the default and tiny models), the architecture's own
rules (through the model registry), its quantization method, and one start-up line for each setting that does
less than a user may think. It reads the model registry and the quantization layers, so it lives here, above
them, where the engine builds its tree."""
from __future__ import annotations

import logging
import os

import torch

from asyncserve.checkpoints.resolve import resolve_checkpoint
from asyncserve.config import Config, EngineConfig
from asyncserve.config.cache import CacheConfig
from asyncserve.config.device import resolve_device, resolve_dtype
from asyncserve.config.model import ModelConfig, load_model_config
from asyncserve.config.parallel import ParallelConfig
from asyncserve.config.scheduler import SchedulerConfig
from asyncserve.errors import ConfigError
from asyncserve.layers.quantization.fp8 import FP8Config
from asyncserve.models.loader import quantization_config
from asyncserve.models.registry import model_class

logger = logging.getLogger("asyncserve")


def resolve_model_path(args: EngineConfig) -> str:
    """The local checkpoint directory: downloads a hub id, converts a .gguf file once, finds or
    builds the default model (SmolLM2-135M-Instruct) and the tiny random one (`asyncserve/tiny-random`)."""
    from asyncserve.checkpoints.default_model import DEFAULT_MODEL, TINY_MODEL, default_model_path
    from asyncserve.checkpoints.scratch import remove_stale_scratch
    remove_stale_scratch()  # what a killed download or conversion left in the cache
    if args.model is None or (args.model == DEFAULT_MODEL and args.revision is None
                              and not os.path.isdir(args.model)):
        return default_model_path()  # named or not, the same model from the same places (PyPI offline)
    if args.model == TINY_MODEL and not os.path.isdir(args.model):
        from asyncserve.testing.tiny_model import default_model_path as tiny_model_path
        return tiny_model_path()
    if args.model.endswith(".gguf") and not os.path.isdir(args.model):
        from asyncserve.checkpoints.gguf_convert import gguf_checkpoint_dir
        serving = resolve_dtype(args.dtype, None, resolve_device(args.device))  # bf16 on GPU, fp32 on CPU
        return gguf_checkpoint_dir(args.model, tokenizer=args.tokenizer is None,
                                   dtype=str(serving).removeprefix("torch."))
    return resolve_checkpoint(args.model, args.revision)


def resolve_config(args: EngineConfig) -> Config:
    """Reads the checkpoint's config and resolves everything that depends on it."""
    model = load_model_config(args, resolve_model_path(args))
    quantization = quantization_config(model.hf_config, args.quantization, model.path)
    _note_what_does_little(args, model, quantization)
    # A rule of the model's own (Phi-3's LongRoPE) that the scheduler applies.
    recompute_kv_at = model_class(model.hf_config).kv_recompute_length(model.hf_config, model.max_model_len)
    prefix_caching = args.enable_prefix_caching
    hybrid = model_class(model.hf_config).has_recurrent_state(model.hf_config)
    if hybrid and model.device.type == "cuda":
        from asyncserve.kernels.gated_delta_rule import fla_ops
        if fla_ops() is None:
            logger.warning("fla-core is not installed: this hybrid model's Gated DeltaNet layers run their "
                           "pure-torch reference on the GPU (correct, much slower); pip install "
                           "'asyncserve[hybrid]' for flash-linear-attention's kernels")
    if hybrid and prefix_caching:
        # A cached prefix's KV is reusable, but the recurrent state after it is not kept: a hit could not
        # resume the linear-attention layers.
        logger.info("prefix caching is off: this hybrid model's linear-attention layers keep one recurrent "
                    "state per sequence, not one per KV block, so a cached prefix could not be resumed")
        prefix_caching = False
    if model.pooler is not None and model.pooler.pooling_type != "LAST" and prefix_caching:
        # A cached prefix's hidden states are never computed: mean and CLS pooling need them all.
        logger.info("prefix caching is off: %s pooling reads every prompt token's hidden state",
                    model.pooler.pooling_type)
        prefix_caching = False
    budget = _token_budget(args, model.max_model_len, model.device)
    whole_image = model_class(model.hf_config).whole_image_tokens(model.hf_config)
    if whole_image is not None and budget < whole_image:
        # An image's tokens attend to each other both ways, so one prefill chunk computes all of them.
        raise ConfigError(f"max_num_batched_tokens={budget} is smaller than the {whole_image} tokens of one "
                          "image of this model, which one step must compute together: raise it to at least "
                          f"{whole_image}.")
    speculative = args.speculative_config
    if speculative is not None and (hybrid or model.pooler is not None):
        # A recurrent state cannot step back over rejected drafts; an embedding model never decodes.
        logger.info("speculative decoding is off: %s", "this hybrid model's linear-attention state cannot be "
                    "rolled back past rejected drafts" if hybrid else "an embedding model does not decode")
        speculative = None
    draft_model = draft_quantization = None
    if speculative is not None and speculative.method == "draft_model":
        from asyncserve.engine.resolve_draft import resolve_draft_model
        draft_model, draft_quantization = resolve_draft_model(speculative.model, model)
        draft_config = draft_model.hf_config
        architecture = (getattr(draft_config, "architectures", None) or ["?"])[0]
        logger.info("speculative decoding: the draft model %s (%s, %s layers) proposes up to %d tokens per "
                    "sequence and step", speculative.model, architecture,
                    getattr(draft_config, "num_hidden_layers", "?"), speculative.num_speculative_tokens)
    if speculative is not None and speculative.method == "eagle3":
        from asyncserve.engine.resolve_draft import resolve_eagle3_head
        from asyncserve.models.eagle3 import aux_layer_ids
        if args.tensor_parallel_size != 1:
            raise ConfigError("speculative_config: method 'eagle3' runs with tensor_parallel_size 1 only in "
                              f"asyncserve (got {args.tensor_parallel_size}).")
        draft_model = resolve_eagle3_head(speculative.model, model)
        head_config = draft_model.hf_config
        logger.info("speculative decoding: the EAGLE-3 head %s (draft vocabulary %s, the target's layers %s) "
                    "proposes up to %d tokens per sequence and step", speculative.model,
                    getattr(head_config, "draft_vocab_size", None) or head_config.vocab_size,
                    list(aux_layer_ids(head_config, model.hf_config.num_hidden_layers)),
                    speculative.num_speculative_tokens)
    return Config(
        model=model,
        cache=CacheConfig(
            block_size=args.block_size, gpu_memory_utilization=args.gpu_memory_utilization,
            cpu_kv_cache_space=args.cpu_kv_cache_space,
            num_gpu_blocks_override=args.num_gpu_blocks_override,
            enable_prefix_caching=prefix_caching, swap_space=args.swap_space,
            kv_cache_dtype=args.kv_cache_dtype, num_state_slots=args.max_num_seqs if hybrid else 0,
            mamba_ssm_cache_dtype=args.mamba_ssm_cache_dtype),
        scheduler=SchedulerConfig(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=budget,
            enable_chunked_prefill=args.enable_chunked_prefill, preemption_mode=args.preemption_mode,
            scheduling_policy=args.scheduling_policy,
            max_num_waiting=args.max_num_waiting, recompute_kv_at=recompute_kv_at),
        parallel=ParallelConfig(tensor_parallel_size=args.tensor_parallel_size),
        quantization=quantization,
        disable_log_stats=args.disable_log_stats, structured_outputs_backend=args.structured_outputs_backend,
        structured_outputs_cache_mb=args.structured_outputs_cache_mb,
        structured_outputs_max_bytes=args.structured_outputs_max_bytes,
        structured_outputs_compile_timeout=args.structured_outputs_compile_timeout, speculative=speculative,
        lora=_lora_config(args), draft_model=draft_model, draft_quantization=draft_quantization)

def _note_what_does_little(args: EngineConfig, model: ModelConfig, quantization) -> None:
    """One start-up line for each setting that does less, or other, than a user may think."""
    if isinstance(quantization, FP8Config) and not quantization.serialized:
        logger.info("quantizing the weights to FP8 at load (--quantization fp8 on an unquantized "
                    "checkpoint): e4m3 with one scale per output row; outputs differ slightly from the "
                    "checkpoint's own")
    if args.load_format == "dummy":
        logger.info("the weights are random (--load-format dummy): outputs mean nothing; for benchmarks")
    if model.device.type == "cpu" and args.gpu_memory_utilization != EngineConfig.gpu_memory_utilization:
        logger.info("--gpu-memory-utilization %g has no effect on the CPU: the KV cache takes "
                    "--cpu-kv-cache-space (%g GiB)", args.gpu_memory_utilization, args.cpu_kv_cache_space)
    if args.revision is not None and args.model is not None and os.path.exists(os.path.expanduser(args.model)):
        logger.info("--revision %s is ignored: %s is a local %s, used as it is", args.revision, args.model,
                    "folder" if os.path.isdir(os.path.expanduser(args.model)) else "file")

def _token_budget(args: EngineConfig, max_len: int, device: torch.device) -> int:
    if args.max_num_batched_tokens is not None:
        budget = args.max_num_batched_tokens
        if not args.enable_chunked_prefill and budget < max_len:
            raise ConfigError(f"max_num_batched_tokens={budget} is smaller than max_model_len={max_len} "
                              "with chunked prefill off: long prompts could never run. Raise it, or "
                              "enable chunked prefill.")
        return budget
    default = 8192 if device.type == "cuda" else 2048
    return default if args.enable_chunked_prefill else max(default, max_len)


def _lora_config(args: EngineConfig):
    if not args.enable_lora:
        return None
    from asyncserve.config.lora import check_lora_config
    return check_lora_config(args.max_loras, args.max_lora_rank, args.max_cpu_loras)
