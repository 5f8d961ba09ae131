"""Left truncation of a prompt (vLLM's truncate_prompt_tokens), shared by sampling and pooling parameters."""
from __future__ import annotations


def truncate_left(token_ids: list[int], keep: int | None, max_model_len: int, error: type) -> list[int]:
    """The prompt's last `keep` tokens (vLLM's truncate_prompt_tokens: left truncation; -1 keeps
    max_model_len); `error` is raised, naming the field, when `keep` exceeds max_model_len."""
    if keep is None:
        return token_ids
    if keep == -1:
        keep = max_model_len
    if keep > max_model_len:
        raise error(f"truncate_prompt_tokens={keep} is larger than max_model_len={max_model_len}; ask for a "
                    "smaller truncation.", "truncate_prompt_tokens")
    return token_ids[-keep:] if len(token_ids) > keep else token_ids
