"""`openai_gptoss` (vLLM's name): GPT-OSS's harmony channels apart. The `analysis` channel is reasoning;
`final` and commentary preambles are the answer's content; a message to `functions.NAME` (a tool call)
stays in the content, framed as harmony frames it, for the `openai` tool-call parser to read."""
from __future__ import annotations

from asyncserve.parsers.harmony import (
    CALL,
    CHANNEL,
    MESSAGE,
    START,
    Body,
    Closed,
    HarmonyReader,
    Opened,
)
from asyncserve.parsers.reasoning.think import ReasoningParser, register


@register("openai_gptoss")
class GptOssReasoningParser(ReasoningParser):
    keeps_special_tokens = True  # the channels are special tokens: the text must keep them

    def __init__(self, chat_template_kwargs: dict | None = None):
        super().__init__(chat_template_kwargs)
        self._reader = HarmonyReader()
        self._kind = "content"  # of the open message: reasoning, content or call
        self._reasoned = False

    def feed(self, text: str) -> tuple[str, str]:
        return self._split(self._reader.feed(text))

    def finish(self) -> tuple[str, str]:
        return self._split(self._reader.finish())

    def _split(self, events: list) -> tuple[str, str]:
        reasoning, content = [], []
        for event in events:
            if isinstance(event, Opened):
                header = event.header
                if header.function is not None:
                    self._kind = "call"
                    content.append(f"{START}assistant to={header.recipient}{CHANNEL}commentary{MESSAGE}")
                elif header.channel == "analysis":
                    self._kind = "reasoning"
                    if self._reasoned:  # messages of reasoning one per line, as vLLM joins them
                        reasoning.append("\n")
                else:
                    self._kind = "content"
            elif isinstance(event, Body):
                if self._kind == "reasoning":
                    reasoning.append(event.text)
                    self._reasoned = True
                else:
                    content.append(event.text)
            elif isinstance(event, Closed):
                if self._kind == "call" and event.marker == CALL:
                    content.append(CALL)
                self._kind = "content"
        return "".join(reasoning), "".join(content)
