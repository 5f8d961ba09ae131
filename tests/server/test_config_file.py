"""`--config FILE` (vLLM's): a YAML file's keys are the CLI's flags, the command line wins over them, and a key
that is no flag, a missing file or bad YAML each fail in one line naming the file (exit 2)."""
from __future__ import annotations

import pytest

from asyncserve.cli import build_parser, engine_config, parse_args

SERVE_YAML = """\
model: some/model
max_model_len: 4096          # underscores, as vLLM allows
max-num-seqs: 7              # dashes
dtype: float32
enforce-eager: true          # a store_true switch
enable-prefix-caching: false # a --flag/--no-flag switch
disable-log-stats: false     # a store_true switch left off
served-model-name: [first, second]
speculative-config: {method: ngram, num_speculative_tokens: 3}
allowed-origins: ["http://localhost:3000"]
"""


@pytest.fixture
def serve_yaml(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text(SERVE_YAML)
    return str(path)


def _parse(argv: list[str], parser=None):
    return parse_args(parser or build_parser(), argv)


def test_the_files_keys_become_the_flags_they_name(serve_yaml):
    args = _parse(["--config", serve_yaml])
    assert (args.model, args.max_model_len, args.max_num_seqs, args.dtype) == ("some/model", 4096, 7, "float32")
    assert (args.enforce_eager, args.enable_prefix_caching, args.disable_log_stats) == (True, False, False)
    assert args.served_model_name == ["first", "second"]
    assert args.allowed_origins == ["http://localhost:3000"]
    config = engine_config(args)
    assert config.speculative_config.num_speculative_tokens == 3
    assert config.served_model_name == ["first", "second"]


def test_flags_on_the_command_line_win_over_the_file_wherever_they_stand(serve_yaml):
    args = _parse(["serve", "other/model", "--dtype", "bfloat16", f"--config={serve_yaml}", "--max-num-seqs", "9",
                   "--enable-prefix-caching", "--served-model-name", "only"])
    assert (args.model, args.dtype, args.max_num_seqs) == ("other/model", "bfloat16", 9)
    assert args.enable_prefix_caching is True
    assert args.served_model_name == ["only"]
    assert args.max_model_len == 4096  # what the command line leaves alone comes from the file


def test_without_a_file_the_defaults_stand():
    args = _parse(["some/model"])
    assert (args.max_model_len, args.enforce_eager, args.enable_prefix_caching) == (None, False, True)


def test_run_batch_reads_the_file_too(serve_yaml, tmp_path):
    from asyncserve.cli import build_batch_parser
    args = _parse(["-i", "in.jsonl", "-o", "-", "--config", serve_yaml], build_batch_parser())
    assert (args.model, args.max_model_len, args.input_file, args.output_file) == ("some/model", 4096,
                                                                                    "in.jsonl", "-")


def _exit_line(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as caught:
        _parse(argv)
    assert caught.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) >= 1 and lines[0].startswith("asyncserve: error: ")
    return "\n".join(lines)


def test_an_unknown_key_is_named_with_the_closest_flag(tmp_path, capsys):
    path = tmp_path / "typo.yaml"
    path.write_text("max-model-lenght: 4096\n")
    assert _exit_line(["--config", str(path)], capsys) == (
        f"asyncserve: error: --config {path}: 'max-model-lenght' is not a flag. Did you mean 'max-model-len'?")


def test_a_key_like_nothing_says_where_the_keys_come_from(tmp_path, capsys):
    path = tmp_path / "odd.yaml"
    path.write_text("zzzz: 1\n")
    assert "'zzzz' is not a flag. Keys are flag names without dashes" in _exit_line(["--config", str(path)], capsys)


def test_a_missing_file_is_named(tmp_path, capsys):
    missing = tmp_path / "nowhere.yaml"
    assert _exit_line(["--config", str(missing)], capsys) == f"asyncserve: error: --config {missing}: no such file."


def test_bad_yaml_is_named_with_its_line(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("dtype: float32\nserved-model-name: [a, b\n")
    message = _exit_line(["--config", str(path)], capsys)
    assert message.startswith(f"asyncserve: error: --config {path} is not valid YAML:")
    assert "line 3" in message


def test_a_file_that_is_not_a_mapping_is_refused(tmp_path, capsys):
    path = tmp_path / "list.yaml"
    path.write_text("- --dtype\n- float32\n")
    assert "must hold a mapping of flag names to values" in _exit_line(["--config", str(path)], capsys)


@pytest.mark.parametrize("text,message", [
    ("enforce-eager: 1\n", "'enforce-eager' is a switch: write true or false, not 1."),
    ("dtype: float99\n", "argument --dtype: invalid choice: 'float99'"),
    ("config: other.yaml\n", "'config' is not a flag."),
])
def test_a_bad_value_is_refused_naming_the_file(tmp_path, capsys, text, message):
    path = tmp_path / "values.yaml"
    path.write_text(text)
    line = _exit_line(["--config", str(path)], capsys)
    assert line.startswith(f"asyncserve: error: --config {path}: ") and message in line


def test_an_unbuilt_vllm_flag_in_the_file_is_refused_as_on_the_command_line(tmp_path, capsys):
    path = tmp_path / "vllm.yaml"
    path.write_text("pipeline-parallel-size: 2\n")
    assert _exit_line(["some/model", "--config", str(path)], capsys) == (
        "asyncserve: error: --pipeline-parallel-size (vLLM: pipeline parallelism) is not built in asyncserve yet: "
        "use --tensor-parallel-size.")


def test_config_given_twice_or_without_a_file_is_refused(serve_yaml, capsys):
    assert "--config is given 2 times" in _exit_line(["--config", serve_yaml, "--config", serve_yaml], capsys)
    assert "--config needs a YAML file" in _exit_line(["some/model", "--config"], capsys)


def test_help_describes_the_file():
    assert "--config FILE" in build_parser().format_help()
