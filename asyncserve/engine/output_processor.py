"""Applies a step's sampled tokens to sequences: text, logprobs, stop conditions, forks, outputs."""
from __future__ import annotations

import logging
import time

from asyncserve.engine.detokenizer import NullDetokenizer, IncrementalDetokenizer, find_stop_string
from asyncserve.engine.sequence import FinishReason, Request, Sequence
from asyncserve.outputs import CompletionOutput, Logprob, RequestOutput

logger = logging.getLogger("asyncserve")


class OutputProcessor:
    def __init__(self, tokenizer, max_model_len: int):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self._pieces: dict[bool, dict[int, str]] = {True: {}, False: {}}  # by skip_special_tokens

    def make_detokenizer(self, request: Request) -> IncrementalDetokenizer:
        params = request.params
        if self.tokenizer is None:
            return NullDetokenizer()
        return IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, params.skip_special_tokens,
                                      params.spaces_between_special_tokens,
                                      self._pieces[bool(params.skip_special_tokens)])

    def _decoded(self, token_id: int) -> str | None:
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else None

    def position_logprobs(self, chosen_id: int, entry) -> dict[int, Logprob]:
        logprob, rank, top = entry
        position = {chosen_id: Logprob(logprob, rank, self._decoded(chosen_id))}
        for top_rank, (token_id, value) in enumerate(top, start=1):
            if token_id not in position:
                position[token_id] = Logprob(value, top_rank, self._decoded(token_id))
        return position

    def append_token(self, seq: Sequence, token_id: int, logprob_entry=None) -> bool:
        """Adds one sampled token; returns True when it finished the sequence."""
        decode = self.append_ids(seq, token_id, logprob_entry)
        return self.check_stop(seq, token_id, seq.detokenizer.step_pushed() if decode else "")

    def append_ids(self, seq: Sequence, token_id: int, logprob_entry=None) -> bool:
        """The first half of `append_token`: adds the token and its logprobs, and (unless it is the stop token
        whose text is left out) to the detokenizer; True when its text is to be decoded. A step does this
        for all its sequences, decodes them together (detokenizer.decode_step), then calls `check_stop`."""
        params = seq.params
        seq.token_ids.append(token_id)
        if logprob_entry is not None:
            seq.cumulative_logprob += logprob_entry[0]
            if seq.logprobs is not None:
                seq.logprobs.append(self.position_logprobs(token_id, logprob_entry))
        # As vLLM: the EOS or stop token that ends the output is not part of its text (which shows with
        # skip_special_tokens=False), unless include_stop_str_in_output asks for it.
        if not params.include_stop_str_in_output and seq.num_output_tokens >= params.min_tokens and (
                token_id in params.extra_eos_token_ids or token_id in params.token_constraints.stop_token_ids):
            return False
        seq.detokenizer.push(token_id)
        return True

    def check_stop(self, seq: Sequence, token_id: int, delta: str) -> bool:
        """The second half of `append_token`, once the token's text `delta` is known: True when the token
        finished the sequence (stop token, stop string, length)."""
        params = seq.params
        num_output = seq.num_output_tokens
        if num_output >= params.min_tokens:
            if token_id in params.extra_eos_token_ids:
                return self._finish(seq, FinishReason.STOP, None)
            if token_id in params.token_constraints.stop_token_ids:  # a set, built once per request
                return self._finish(seq, FinishReason.STOP, token_id)
            found = find_stop_string(seq.detokenizer.output_text, len(delta), params.stop,
                                     params.include_stop_str_in_output)
            if found is not None:
                stop, end = found
                seq.detokenizer.truncate(end)
                seq.finish_reason, seq.stop_reason = FinishReason.STOP, stop
                return True
        if params.max_tokens is not None and num_output >= params.max_tokens:
            return self._finish(seq, FinishReason.LENGTH, None)
        if seq.num_tokens >= self.max_model_len:
            return self._finish(seq, FinishReason.LENGTH, None)
        return False

    def advance_grammar(self, seq: Sequence, token_id: int) -> bool:
        """Moves a constrained sequence's matcher past its new token; True when that ends the output: the
        grammar accepted a stop token at one of its ends (EOS under ignore_eos), or (never, unless a mask
        was bypassed) rejected the token."""
        matcher = seq.matcher
        if not matcher.accept_token(token_id):
            logger.warning("grammar rejected token %d of sequence %d: its output ends here", token_id, seq.seq_id)
            return self._finish(seq, FinishReason.STOP, None)
        if matcher.is_terminated():
            return self._finish(seq, FinishReason.STOP, None)
        return False

    @staticmethod
    def _finish(seq: Sequence, reason: str, stop_reason) -> bool:
        seq.detokenizer.flush()
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        return True

    def add_prompt_logprobs(self, request: Request, entries) -> None:
        if request.prompt_logprobs is None:
            request.prompt_logprobs = [None]  # the first prompt token has no context
        start = len(request.prompt_logprobs)
        for offset, entry in enumerate(entries):
            target = request.prompt_token_ids[start + offset]
            request.prompt_logprobs.append(self.position_logprobs(target, entry))

    def request_output(self, request: Request) -> RequestOutput:
        finished = request.is_finished
        params = request.params
        seqs = request.seqs
        if finished and len(seqs) > params.n:  # best_of: keep the n most likely continuations
            seqs = sorted(seqs, key=lambda s: s.cumulative_logprob, reverse=True)[:params.n]
        hold_back = params.max_stop_str_len - 1 if params.stop else 0
        outputs = []
        for index, seq in enumerate(seqs[:params.n]):
            text = seq.output_text
            if hold_back and seq.finish_reason is None:
                text = text[:max(0, len(text) - hold_back)]  # may still become a stop string
            outputs.append(CompletionOutput(
                index=index, text=text, token_ids=seq.output_token_ids,
                cumulative_logprob=seq.cumulative_logprob if params.logprobs is not None else None,
                logprobs=seq.logprobs, finish_reason=seq.finish_reason, stop_reason=seq.stop_reason))
        if finished and request.finished_time is None:
            request.finished_time = time.monotonic()
        return RequestOutput(
            request_id=request.request_id, prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids, outputs=outputs, finished=finished,
            prompt_logprobs=request.prompt_logprobs, num_cached_tokens=request.num_cached_tokens,
            metrics=request.metrics() if finished else {})

    def delta_output(self, request: Request) -> RequestOutput:
        """A streaming request's output of this step (vLLM's RequestOutputKind.DELTA): each choice's new text,
        new token ids and their logprobs only, since the last delta. A choice with nothing new is left out,
        except from the request's last output, which lists every choice with its finish reason (a choice
        that finished earlier with nothing new). `cumulative_logprob` is the total so far. Never best_of > n
        (the best choices are only known at the end: not streamed)."""
        params = request.params
        finished = request.is_finished
        hold_back = params.max_stop_str_len - 1 if params.stop else 0
        want_logprobs = params.logprobs is not None
        outputs = []
        for index, seq in enumerate(request.seqs[:params.n]):
            reason = seq.finish_reason
            start = seq.num_sent_tokens
            token_ids = seq.token_ids[start:] if len(seq.token_ids) > start else []
            detokenizer = seq.detokenizer
            text_len = len(detokenizer.output_text) if detokenizer is not None else 0
            if reason is None and hold_back:
                text_len -= hold_back  # may still become a stop string
            sent_chars = seq.num_sent_chars
            text = detokenizer.output_text[sent_chars:text_len] if text_len > sent_chars else ""
            report_finish = reason is not None and not seq.finish_sent
            if not (token_ids or text or report_finish or finished):
                continue
            logprobs = None
            if seq.logprobs is not None:
                logprobs = seq.logprobs[start - seq.num_prompt_tokens:] if token_ids else []
            seq.num_sent_tokens += len(token_ids)
            seq.num_sent_chars += len(text)
            seq.finish_sent = reason is not None
            outputs.append(CompletionOutput(
                index=index, text=text, token_ids=token_ids,
                cumulative_logprob=seq.cumulative_logprob if want_logprobs else None,
                logprobs=logprobs, finish_reason=reason, stop_reason=seq.stop_reason))
        if finished and request.finished_time is None:
            request.finished_time = time.monotonic()
        return RequestOutput(
            request_id=request.request_id, prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids, outputs=outputs, finished=finished,
            prompt_logprobs=request.prompt_logprobs, num_cached_tokens=request.num_cached_tokens,
            metrics=request.metrics() if finished else {})
