"""Which decoder layers attend within a sliding window, read from either transformers 5's
`layer_types` or the per-family fields of 4.x configs as they appear on the Hub."""
from __future__ import annotations


def layer_sliding_window(hf_config, layer_index: int, pattern: int | None = None) -> int | None:
    """The window (in tokens, the query's own included) of layer `layer_index`, or None for full
    attention. `pattern` P is a family's 4.x rule "every P-th layer is global" (Gemma 2: 2,
    Gemma 3: 6); without one, a Qwen2-style `max_window_layers` or else every layer (Mistral)."""
    window = getattr(hf_config, "sliding_window", None)
    if not window or not getattr(hf_config, "use_sliding_window", True):
        return None
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types:
        sliding = layer_types[layer_index] == "sliding_attention"
    elif pattern:
        sliding = (layer_index + 1) % pattern != 0
    elif getattr(hf_config, "max_window_layers", None) is not None:
        sliding = layer_index >= hf_config.max_window_layers
    else:
        sliding = True
    return int(window) if sliding else None
