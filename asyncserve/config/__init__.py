"""Configuration: what a user sets (`EngineConfig`, flat, vLLM's names) apart from the tree it resolves to
(`Config`: model, cache, scheduler, parallel, quantization), one file per part."""
from asyncserve.config.engine_args import EngineConfig
from asyncserve.config.tree import Config

__all__ = ["Config", "EngineConfig"]
