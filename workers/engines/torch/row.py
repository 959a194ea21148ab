"""One request inside the torch engine: the asyncio queue its outputs go to, and
its state in the scheduler thread, where each new token becomes text and,
when it is ready to show, an output (a delta, or the last one with the result)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from workers.engines.base import GenerationOutput, GenerationRequest, GenerationResult


class Stream:
    """The asyncio side of one request: outputs arrive here from the scheduler thread."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[GenerationOutput] = asyncio.Queue()


Output = tuple[Stream, GenerationOutput]  # an output and the stream it goes to


@dataclass
class Row:
    """One request's state in the scheduler."""

    request: GenerationRequest
    stream: Stream
    prompt_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # decoded so far (cut at a stop string when one ends the request)
    emitted: int = 0  # characters of `text` already sent as deltas
    prefix_offset: int = 0  # incremental detokenization (as in TGI / vLLM)
    read_offset: int = 0
    finish_reason: str | None = None
    error: str | None = None
    first_token_at: float | None = None
    finished_at: float | None = None

    @property
    def budget(self) -> int:
        """Tokens this row may hold in the KV cache at most."""
        return len(self.prompt_ids) + self.request.params.max_tokens

    def add_token(self, token: int, decode: Callable[[list[int]], str], eos_ids: set[int],
                  now: float) -> Output | None:
        """Take the row's next token; the output it makes, if any."""
        self.first_token_at = self.first_token_at or now
        self.tokens.append(token)  # EOS too: it was generated, and counts (as in vLLM)
        self._detokenize(decode)
        params = self.request.params
        if params.stop and self._cut_at_stop():
            return self.finish("stop")
        if token in eos_ids or len(self.tokens) >= params.max_tokens:
            # The last token may end in half a character: the text says so (U+FFFD),
            # as decoding all the tokens at once would.
            self._detokenize(decode, final=True)
            return self.finish("stop" if token in eos_ids else "length")
        # Hold back what could be the start of a stop string, so a
        # stream never shows text the final result cuts off.
        holdback = max((len(s) for s in params.stop), default=1) - 1
        visible = len(self.text) - holdback
        if visible <= self.emitted:
            return None
        delta, self.emitted = self.text[self.emitted:visible], visible
        return self.stream, GenerationOutput(self.request.request_id, delta, len(self.tokens))

    def finish(self, reason: str) -> Output:
        """End the row; its last output, which carries the result."""
        self.finish_reason = reason
        self.finished_at = time.time()
        request_id = self.request.request_id
        if reason == "error":
            result = GenerationResult(request_id, finish_reason="error", prompt_tokens=len(self.prompt_ids),
                                      error=self.error)
        else:
            result = GenerationResult(request_id, self.text, reason, len(self.prompt_ids), len(self.tokens),
                                      first_token_at=self.first_token_at, finished_at=self.finished_at)
        delta = self.text[self.emitted:] if reason != "error" else ""
        return self.stream, GenerationOutput(request_id, delta, len(self.tokens), result)

    def _detokenize(self, decode: Callable[[list[int]], str], final: bool = False) -> None:
        """Append the newest token's text, decoding only a short window (O(1) per step).

        Byte-level tokenizers split a character across tokens; decoding from
        `prefix_offset` and holding text back while it ends in U+FFFD gives
        the same text as decoding everything at once (TGI's decode_token).
        """
        before = decode(self.tokens[self.prefix_offset:self.read_offset])
        after = decode(self.tokens[self.prefix_offset:])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.text += after[len(before):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)

    def _cut_at_stop(self) -> bool:
        """Whether a stop string has appeared; cuts the text before it if so."""
        stops = self.request.params.stop
        # Earlier steps found none, so a new one ends in the text's tail.
        start = max(0, self.emitted - max(len(s) for s in stops))
        cuts = [i for i in (self.text.find(s, start) for s in stops) if i >= 0]
        if not cuts:
            return False
        self.text = self.text[:min(cuts)]
        return True
