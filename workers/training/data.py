"""A job's training and validation files, read and tokenized for training: each line
becomes the prompt's token ids (rendered exactly as the serving engines render a
request) followed by the completion's and EOS, with the loss on the completion only."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.training import Example, ExampleError, parse_example
from workers.engines.common import prompt_ids

IGNORE = -100  # the label torch's cross-entropy (and transformers) skips: prompt tokens


class TrainingFileError(ValueError):
    """A file a job can't train on; `code` is the job's error code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    completion: str  # the answer's text, for exact-match accuracy
    prompt_len: int

    def features(self) -> dict[str, list[int]]:
        return {"input_ids": self.input_ids, "labels": self.labels}


def read_examples(files_dir: Path, file_id: str, code: str) -> list[tuple[int, Example]]:
    """(line number, example) of every non-blank line of a stored file."""
    path = Path(files_dir) / f"{file_id}.jsonl"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TrainingFileError(code, f"file {file_id} not found") from None
    except UnicodeDecodeError as exc:
        raise TrainingFileError(code, f"file {file_id} is not UTF-8 text: {exc.reason}") from None
    examples = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            examples.append((number, parse_example(line)))
        except ExampleError as exc:
            raise TrainingFileError(code, f"file {file_id}, line {number}: {exc}") from None
    if not examples:
        raise TrainingFileError(code, f"file {file_id} has no examples")
    return examples


def tokenize(tokenizer: Any, example: Example) -> Tokenized:
    prompt = prompt_ids(tokenizer, example.prompt, example.messages)
    answer = list(tokenizer.encode(example.completion, add_special_tokens=False)) + [tokenizer.eos_token_id]
    return Tokenized(input_ids=prompt + answer, labels=[IGNORE] * len(prompt) + answer,
                     completion=example.completion, prompt_len=len(prompt))


def load_file(files_dir: Path, file_id: str, tokenizer: Any, max_tokens: int, code: str) -> list[Tokenized]:
    """A file's examples, tokenized. A line longer than max_tokens fails the file, naming it:
    truncating would train on a cut-off answer (or none), silently."""
    tokenized = []
    for number, example in read_examples(files_dir, file_id, code):
        item = tokenize(tokenizer, example)
        if len(item.input_ids) > max_tokens:
            raise TrainingFileError(code, f"file {file_id}, line {number}: {len(item.input_ids)} tokens, "
                                          f"more than the {max_tokens} a training example may have")
        tokenized.append(item)
    return tokenized


def split_heldout(items: list[Tokenized], fraction: float, seed: int) -> tuple[list[Tokenized], list[Tokenized]]:
    """(train, held-out): a share of the lines, chosen by the seed, held out for evaluation."""
    if len(items) < 2:
        raise TrainingFileError("invalid_training_file",
                                "a training file needs at least 2 examples when no validation file is given "
                                "(some are held out for evaluation)")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_heldout = min(len(items) - 1, max(1, round(len(items) * fraction)))
    held = set(order[:n_heldout])
    return ([x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held])

