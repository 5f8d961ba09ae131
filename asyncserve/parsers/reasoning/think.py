"""`<think> ... </think>` reasoning, whole or as it streams, by vLLM's `--reasoning-parser` names.

`deepseek_r1`: the chat template may open the think block in the prompt, so the output starts inside it:
everything before `</think>` is reasoning (a leading `<think>` is dropped), all of it if `</think>` never
comes. `qwen3`: reasoning only when the output opens with `<think>`; with `enable_thinking: false` in
`chat_template_kwargs` the template closes the block in the prompt and nothing is reasoning.
A tag split across deltas is held back until it is whole, so every cut of a text gives the same split.
"""
from __future__ import annotations

from asyncserve.utils.named_registry import NamedRegistry
from asyncserve.utils.text import held_prefix

START, END = "<think>", "</think>"
_REGISTRY = NamedRegistry("reasoning parser")
register = _REGISTRY.register
reasoning_parser_names = _REGISTRY.names
get_reasoning_parser = _REGISTRY.get


class ReasoningParser:
    """Text in, (reasoning delta, content delta) out; `finish()` flushes what was held back."""

    name = ""
    # Whether the format's markers are special tokens, which a detokenizer skipping them would drop.
    keeps_special_tokens = False

    def __init__(self, chat_template_kwargs: dict | None = None):
        self._buffer = ""
        self._mode = "start"  # start -> reasoning -> content

    def feed(self, text: str) -> tuple[str, str]:
        self._buffer += text
        return self._advance(final=False)

    def finish(self) -> tuple[str, str]:
        return self._advance(final=True)

    def extract(self, text: str) -> tuple[str | None, str | None]:
        """(reasoning, content) of a whole output; None where there is none."""
        reasoning, content = self.feed(text)
        more_reasoning, more_content = self.finish()
        return (reasoning + more_reasoning) or None, (content + more_content) or None

    def _advance(self, final: bool) -> tuple[str, str]:
        reasoning = content = ""
        if self._mode == "start":
            buffer = self._buffer
            if buffer.startswith(START):
                self._buffer, self._mode = buffer[len(START):], "reasoning"
            elif START.startswith(buffer) and not final:
                return "", ""  # may still become "<think>"
            else:
                self._mode = "reasoning" if self._reasoning_without_tag() else "content"
        if self._mode == "reasoning":
            buffer = self._buffer
            at = buffer.find(END)
            if at >= 0:
                reasoning, self._buffer, self._mode = buffer[:at], buffer[at + len(END):], "content"
            else:
                keep = 0 if final else held_prefix(buffer, END)
                reasoning, self._buffer = buffer[:len(buffer) - keep], buffer[len(buffer) - keep:]
        if self._mode == "content":
            content, self._buffer = self._buffer, ""
        return reasoning, content

    def _reasoning_without_tag(self) -> bool:
        raise NotImplementedError


@register("deepseek_r1")
class DeepSeekR1ReasoningParser(ReasoningParser):

    def _reasoning_without_tag(self) -> bool:
        return True


@register("qwen3")
class Qwen3ReasoningParser(ReasoningParser):

    def __init__(self, chat_template_kwargs: dict | None = None):
        super().__init__(chat_template_kwargs)
        if (chat_template_kwargs or {}).get("enable_thinking") is False:
            self._mode = "content"

    def _reasoning_without_tag(self) -> bool:
        return False
