"""EAGLE-3 heads for the tests, in the public checkpoint layout (asyncserve/testing/eagle3_head.py), and the
speculative config that names one."""
from __future__ import annotations

import torch

from asyncserve.testing.eagle3_head import build_eagle3_head

DRAFT_VOCAB = 100
# The tiny targets have 2 layers: the hidden states entering layers 0 and 1 and leaving layer 1.
AUX_LAYERS = [0, 1, 2]


def eagle3_config(path: str, num_tokens: int = 3, **extra) -> dict:
    """vLLM's spelling, the head at `path`."""
    return {"method": "eagle3", "model": path, "num_speculative_tokens": num_tokens, **extra}


def random_head(path, target: str, seed: int = 0, **kwargs) -> str:
    """Random weights, a draft vocabulary of DRAFT_VOCAB of the target's tokens: mostly wrong proposals."""
    kwargs.setdefault("aux_layer_ids", AUX_LAYERS)
    return build_eagle3_head(path, target, draft_vocab_size=DRAFT_VOCAB, seed=seed, **kwargs)


def constant_head(path, target: str, token_id: int, hidden_size: int = 64) -> str:
    """A head that always proposes `token_id`: its final norm is zero, so every draft logit is 0 and the
    argmax is draft id 0, which `d2t` maps to `token_id` (the other ids map elsewhere)."""
    d2t = torch.arange(1, DRAFT_VOCAB + 1, dtype=torch.int64)  # draft id i -> target id 2 i + 1
    d2t[0] = token_id
    return build_eagle3_head(path, target, draft_vocab_size=DRAFT_VOCAB, aux_layer_ids=AUX_LAYERS,
                             overrides={"norm.weight": torch.zeros(hidden_size), "d2t": d2t})
