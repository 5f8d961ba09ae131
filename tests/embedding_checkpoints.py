"""Tiny embedding checkpoints in the layouts users serve, built from the tiny random qwen3 checkpoint:
- sentence-transformers' classic layout, as Qwen3-Embedding ships it: config.json still says
  Qwen3ForCausalLM, modules.json lists Transformer, Pooling (1_Pooling/config.json with
  `pooling_mode_<mode>: true`) and, when normalized, Normalize (2_Normalize);
- the decoder body alone (architectures ["Qwen3Model"], tensors without the "model." prefix, no LM
  head), as transformers' AutoModel saves it.
"""
from __future__ import annotations

import json
import os
import shutil

import torch

_ST_MODES = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens", "lasttoken")


def _write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def sentence_transformers_checkpoint(source: str, target: str, mode: str = "lasttoken", normalize: bool = True,
                                     extra_modules: list[dict] = (), **config_updates) -> str:
    """A copy of `source` with sentence-transformers' classic module files (pooling `mode`)."""
    shutil.copytree(source, target)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
        os.makedirs(os.path.join(target, "2_Normalize"), exist_ok=True)
    modules.extend(extra_modules)
    _write_json(os.path.join(target, "modules.json"), modules)
    with open(os.path.join(source, "config.json")) as f:
        config = json.load(f)
    _write_json(os.path.join(target, "1_Pooling", "config.json"),
                {"word_embedding_dimension": config["hidden_size"], "include_prompt": True,
                 **{f"pooling_mode_{m}": m == mode for m in _ST_MODES}})
    _write_json(os.path.join(target, "sentence_bert_config.json"), {"max_seq_length": 512, "do_lower_case": False})
    if config_updates:
        _write_json(os.path.join(target, "config.json"), {**config, **config_updates})
    return target


def decoder_body_checkpoint(source: str, target: str) -> str:
    """`source` saved through transformers' AutoModel: the decoder body alone (Qwen3Model)."""
    from transformers import AutoModel, AutoTokenizer
    AutoModel.from_pretrained(source, dtype=torch.float32).save_pretrained(target)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    return target


def hf_hidden_states(path: str, token_ids: list[int]) -> torch.Tensor:
    """[T, E] final hidden states (after the final norm) of transformers' AutoModel, one sequence alone."""
    from transformers import AutoModel
    model = _auto_models.get(path)
    if model is None:
        model = _auto_models[path] = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([token_ids])).last_hidden_state[0]


_auto_models: dict = {}


def reference_embedding(path: str, token_ids: list[int], pooling_type: str, normalize: bool) -> torch.Tensor:
    """transformers + manual pooling: the reference for pooling types without a sentence-transformers file."""
    hidden = hf_hidden_states(path, token_ids)
    vector = {"LAST": hidden[-1], "CLS": hidden[0], "MEAN": hidden.mean(dim=0)}[pooling_type]
    return torch.nn.functional.normalize(vector, dim=-1) if normalize else vector
