"""--speculative-config: vLLM's spellings parse to one SpeculativeConfig; wrong values say what to change."""
from __future__ import annotations

import pytest

from asyncserve.cli import build_parser, engine_config, parse_args
from asyncserve.config import EngineConfig
from asyncserve.config.speculative import DEFAULT_DISABLE_BY_BATCH_SIZE, SpeculativeConfig, parse_speculative_config
from asyncserve.errors import ConfigError


def test_current_spelling(monkeypatch):
    monkeypatch.undo()  # the shipped defaults, not this folder's (conftest.py)
    config = parse_speculative_config({"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
                                       "prompt_lookup_min": 2})
    assert config == SpeculativeConfig(num_speculative_tokens=4, prompt_lookup_max=4, prompt_lookup_min=2,
                                       disable_by_batch_size=DEFAULT_DISABLE_BY_BATCH_SIZE, method="ngram",
                                       disable_when_slower=True)


def test_older_model_spelling_and_key_names():
    config = parse_speculative_config('{"model": "[ngram]", "num_speculative_tokens": 3, '
                                      '"ngram_prompt_lookup_max": 3, "ngram_prompt_lookup_min": 1}')
    assert (config.method, config.num_speculative_tokens, config.prompt_lookup_max,
            config.prompt_lookup_min) == ("ngram", 3, 3, 1)


def test_lookup_defaults_as_vllm():
    assert parse_speculative_config({"method": "ngram", "num_speculative_tokens": 2}).prompt_lookup_min == 5
    only_max = parse_speculative_config({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3})
    assert (only_max.prompt_lookup_max, only_max.prompt_lookup_min) == (3, 3)


def test_no_config_is_no_speculation():
    assert parse_speculative_config(None) is None
    assert EngineConfig().speculative_config is None


@pytest.mark.parametrize("value,needle", [
    ({"method": "ngram"}, "needs num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens must be a positive integer, got 0"),
    ({"method": "ngram", "num_speculative_tokens": "4"}, "num_speculative_tokens must be a positive integer"),
    ({"method": "ngram", "num_speculative_tokens": True}, "num_speculative_tokens must be a positive integer"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2},
     "prompt_lookup_min (4) is larger than prompt_lookup_max (2)"),
    ({"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": -1},
     "disable_by_batch_size must be a positive integer"),
    ({"method": "ngram", "num_speculative_tokens": 2, "disable_when_slower": "yes"},
     "disable_when_slower must be true or false"),
    ({"method": "ngram", "num_speculative_tokens": 2, "lookahead": 3}, "unknown key 'lookahead'"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3, "ngram_prompt_lookup_max": 3},
     "'prompt_lookup_max' is given twice"),
    ({"method": "eagle", "model": "m", "num_speculative_tokens": 2},
     "method 'eagle' is not built in asyncserve yet; supported: 'ngram', 'draft_model', 'eagle3'"),
    ({"method": "eagle3", "num_speculative_tokens": 2}, "method 'eagle3' needs the draft model's"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "method 'draft_model' needs the draft model's"),
    ({"method": "draft_model", "model": "m", "num_speculative_tokens": 2, "prompt_lookup_max": 3},
     "prompt_lookup_max applies to method 'ngram' only"),
    ({"method": "draft_model", "model": "m", "num_speculative_tokens": 2, "draft_tensor_parallel_size": 2},
     "draft_tensor_parallel_size=2 is not built in asyncserve"),
    ({"method": "ngram", "num_speculative_tokens": 2, "draft_tensor_parallel_size": 1},
     "method 'ngram' has no draft model"),
    ({"method": "lookahead", "num_speculative_tokens": 2},
     "unknown method 'lookahead'; supported: 'ngram', 'draft_model', 'eagle3'"),
    ({"method": "ngram", "model": "some/draft", "num_speculative_tokens": 2}, "takes no model"),
    ({"num_speculative_tokens": 2}, "needs a method"),
    ("{method: ngram}", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
])
def test_bad_values_name_what_to_change(value, needle):
    with pytest.raises(ConfigError) as caught:
        EngineConfig(speculative_config=value)
    assert needle in str(caught.value)


def test_tensor_parallel_is_refused_for_now():
    with pytest.raises(ConfigError, match="tensor_parallel_size > 1 is not built"):
        EngineConfig(speculative_config={"method": "ngram", "num_speculative_tokens": 2}, tensor_parallel_size=2)


def test_cli_flag_reaches_the_engine_config():
    args = parse_args(build_parser(), ["--speculative-config",
                                       '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2}'])
    config = engine_config(args).speculative_config
    assert (config.method, config.num_speculative_tokens, config.prompt_lookup_max,
            config.prompt_lookup_min) == ("ngram", 3, 2, 2)
    assert engine_config(parse_args(build_parser(), [])).speculative_config is None


def test_hybrid_models_decode_without_speculation_and_say_why(make_llm, caplog):
    """A linear-attention state cannot step back over rejected drafts: speculation is off, with a line."""
    with caplog.at_level("INFO", logger="asyncserve"):
        llm = make_llm("qwen3_next", speculative_config={"method": "ngram", "num_speculative_tokens": 2})
    assert llm.llm_engine.speculator is None and llm.llm_engine.config.speculative is None
    assert any("speculative decoding is off: this hybrid model's linear-attention state cannot be rolled back"
               in record.getMessage() for record in caplog.records)


def test_offline_llm_takes_the_config(make_llm):
    llm = make_llm("qwen3", speculative_config='{"model": "[ngram]", "num_speculative_tokens": 3}')
    speculator = llm.llm_engine.speculator
    assert speculator is not None and speculator.config.num_speculative_tokens == 3
