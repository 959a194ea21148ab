"""A fine-tuning file's content, checked line by line as the trainer will read it
(shared.training.parse_example), before a job is queued: a file a trainer would
refuse fails its job at once, naming the line, instead of after a wait in the queue.
Reads a line at a time, so memory stays bounded whatever the file's size."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shared.training import ExampleError, parse_example

# A longer line is refused without being held whole (no chat example is anywhere near it).
MAX_LINE_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class ContentError:
    """Why a file can't be trained on, as a job's `error` says it."""

    code: str  # invalid_training_file | invalid_validation_file
    message: str
    param: str  # training_file | validation_file

    def as_error(self) -> dict:
        return {"code": self.code, "message": self.message, "param": self.param}


def check_file(path: Path, file_id: str, param: str) -> tuple[int, ContentError | None]:
    """(examples in the file, the first problem or None). Blocking: run it in a thread."""
    def problem(message: str) -> tuple[int, ContentError]:
        return examples, ContentError(f"invalid_{param}", f"{param} {file_id}: {message}", param)

    examples = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), start=1):
            if len(raw) > MAX_LINE_BYTES:
                return problem(f"line {number} is over {MAX_LINE_BYTES} bytes")
            if not raw.strip():
                continue
            try:
                parse_example(raw)
            except ExampleError as exc:
                return problem(f"line {number}: {exc}")
            except RecursionError:  # nested past the JSON parser's depth
                return problem(f"line {number}: not JSON: nested too deeply")
            examples += 1
    if examples == 0:
        return problem("the file has no examples")
    return examples, None
