"""`--config FILE`: command-line flags kept in a YAML file, as vLLM's `--config`, the command line winning.

Each key is a flag's name without its dashes (`max-model-len` or `max_model_len`; `model` too); a switch
takes true or false, a flag of several values a list, a JSON flag (`--speculative-config`) a mapping. The
file's flags are parsed by the same parser as the command line's and become its defaults, so a file's value
is checked as the flag's would be and any flag on the command line replaces it.
Standard library and PyYAML only: the CLI reads this before anything heavy is imported.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import json
from collections.abc import Iterator

from asyncserve.errors import ConfigFileError

FLAG = "--config"
_NOT_KEYS = frozenset({"--config", "--help", "--version"})  # keys that would not set a flag


def split_config_flag(argv: list[str]) -> tuple[str | None, list[str]]:
    """(the --config path or None, argv without it); both `--config FILE` and `--config=FILE`."""
    paths, rest = [], []
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg == "--":  # what follows is positional
            rest += argv[index:]
            break
        if arg == FLAG:
            if index + 1 == len(argv):
                raise ConfigFileError("--config needs a YAML file: --config serve.yaml")
            paths.append(argv[index + 1])
            index += 2
            continue
        if arg.startswith(FLAG + "="):
            paths.append(arg[len(FLAG) + 1:])
        else:
            rest.append(arg)
        index += 1
    if len(paths) > 1:
        raise ConfigFileError(f"--config is given {len(paths)} times ({', '.join(paths)}); give one file.")
    return (paths[0] if paths else None), rest


def read_flags_file(path: str) -> dict:
    """The file's mapping of flag names to values; an empty file sets nothing."""
    import yaml  # PyYAML: read only when a file is given

    try:
        with open(path, encoding="utf-8") as file:
            data = yaml.safe_load(file)
    except FileNotFoundError:
        raise ConfigFileError(f"--config {path}: no such file.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigFileError(f"--config {path} cannot be read: {exc}.") from None
    except yaml.YAMLError as exc:
        raise ConfigFileError(f"--config {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigFileError(f"--config {path} must hold a mapping of flag names to values (e.g. "
                              f"'max-model-len: 4096'), not a {type(data).__name__}.")
    return data


def flags_from_mapping(parser: argparse.ArgumentParser, data: dict, path: str) -> list[str]:
    """The command-line words the file's keys stand for, in the file's order."""
    options = parser._option_string_actions  # argparse has no public way to ask
    words: list[str] = []
    for key, value in data.items():
        option = "--" + str(key).replace("_", "-")
        if not isinstance(key, str) or option in _NOT_KEYS or option not in options:
            raise ConfigFileError(_unknown_key(key, path, options))
        words += _words(option, options[option], value, options, path)
    return words


def _words(option: str, action: argparse.Action, value, options: dict, path: str) -> list[str]:
    if value is None:  # `key:` with nothing after it leaves the flag as it is
        return []
    if action.nargs == 0:  # a switch
        if not isinstance(value, bool):
            raise ConfigFileError(f"--config {path}: '{option[2:]}' is a switch: write true or false, not "
                                  f"{value!r}.")
        if value:
            return [option]
        negative = "--no-" + option[2:]
        return [negative] if negative in options else []  # store_true's false is its default
    if action.nargs in ("+", "*") or isinstance(action.nargs, int) and action.nargs > 1:
        items = value if isinstance(value, list) else [value]
        return [option, *map(_text, items)] if items else []
    return [option, _text(value)]


def _text(value) -> str:
    """A YAML value as the command line writes it: lists and mappings as JSON (vLLM's JSON flags)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def _unknown_key(key, path: str, options: dict) -> str:
    names = sorted({option[2:] for option in options if option.startswith("--")} - {n[2:] for n in _NOT_KEYS})
    close = difflib.get_close_matches(str(key).replace("_", "-"), names, n=1)
    hint = (f" Did you mean '{close[0]}'?" if close
            else " Keys are flag names without dashes, as `asyncserve --help` lists them.")
    return f"--config {path}: '{key}' is not a flag.{hint}"


@contextlib.contextmanager
def errors_name_the_file(parser: argparse.ArgumentParser, path: str) -> Iterator[None]:
    """While the file's flags are parsed, argparse's complaints (a bad value) say they came from the file."""
    def error(message: str):
        raise ConfigFileError(f"--config {path}: {message}")

    parser.error = error
    try:
        yield
    finally:
        del parser.error  # the class's own again


def apply_flags_file(parser: argparse.ArgumentParser, path: str) -> argparse.Namespace:
    """Parses the file's flags and makes them the parser's defaults; returns what the file set."""
    words = flags_from_mapping(parser, read_flags_file(path), path)
    with errors_name_the_file(parser, path):
        from_file = parser.parse_args(words)
    parser.set_defaults(**vars(from_file))
    return from_file
