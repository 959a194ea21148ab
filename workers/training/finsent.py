"""The shipped fine-tuning task: financial-news sentiment. Generates, from a fixed
seed, headlines labelled positive / negative / neutral (the answer is the label
word) as OpenAI chat-format JSONL, a training file and a held-out file whose
sentences never occur in the training file; labels are balanced in both.

    python -m workers.training.finsent OUT_DIR [--train N] [--heldout N] [--seed S]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SYSTEM = "Classify the sentiment of the financial news as positive, negative or neutral."
LABELS = ("positive", "negative", "neutral")

COMPANIES = [
    "Acme Corp", "Globex", "Initech", "Umbrella Holdings", "Stark Industries", "Wayne Enterprises",
    "Hooli", "Vandelay Imports", "Soylent Foods", "Cyberdyne Systems", "Tyrell Corp", "Wonka Industries",
    "Massive Dynamic", "Oscorp", "Nakatomi Trading", "Pied Piper", "Aperture Labs", "Gringotts Bank",
    "Monarch Mining", "Blue Sun Energy", "Sirius Cybernetics", "Dunder Mifflin", "Prestige Worldwide",
    "Duff Brewing", "Krusty Foods", "Zorg Industries", "Weyland Logistics", "Rekall Travel",
]
METRICS = [
    "quarterly profit", "annual revenue", "net income", "operating margin", "second-quarter sales",
    "full-year earnings", "order backlog", "free cash flow", "dividend", "market share",
    "subscriber base", "export volume", "same-store sales", "gross margin",
]
# Each label's phrasings: (verb phrase, whether it takes a percentage).
PHRASES = {
    "positive": [("rose {n}%", True), ("jumped {n}%", True), ("climbed {n}%", True), ("grew {n}%", True),
                 ("beat analyst expectations", False), ("hit a record high", False), ("surged {n}%", True),
                 ("improved sharply", False)],
    "negative": [("fell {n}%", True), ("dropped {n}%", True), ("slumped {n}%", True), ("declined {n}%", True),
                 ("missed analyst forecasts", False), ("hit a five-year low", False), ("plunged {n}%", True),
                 ("weakened sharply", False)],
    "neutral": [("was unchanged", False), ("held steady", False), ("was flat", False),
                ("came in line with forecasts", False), ("stayed at last year's level", False),
                ("was broadly stable", False), ("matched the prior quarter", False),
                ("was in line with guidance", False)],
}
TAILS = [
    "", " this quarter", " in the latest period", " year on year", ", the company said on Tuesday",
    ", according to its filing", " as the market watched", ", executives told investors",
    " in its home region", ", the chief executive said",
]


def headline(rng: random.Random, label: str) -> str:
    phrase, _ = rng.choice(PHRASES[label])
    text = phrase.format(n=rng.randint(2, 45))
    return f"{rng.choice(COMPANIES)}'s {rng.choice(METRICS)} {text}{rng.choice(TAILS)}."


def example(sentence: str, label: str) -> dict:
    return {"messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": sentence},
                         {"role": "assistant", "content": label}]}


def generate(n_train: int, n_heldout: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, held-out) examples: balanced labels, no sentence in both (or twice)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    sets: list[list[dict]] = []
    for size in (n_train, n_heldout):
        examples = []
        while len(examples) < size:
            label = LABELS[len(examples) % len(LABELS)]
            sentence = headline(rng, label)
            if sentence not in seen:
                seen.add(sentence)
                examples.append(example(sentence, label))
        rng.shuffle(examples)
        sets.append(examples)
    return sets[0], sets[1]


def write_jsonl(path: Path, examples: list[dict]) -> None:
    path.write_text("".join(json.dumps(e) + "\n" for e in examples))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workers.training.finsent", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--train", type=int, default=900, help="training examples (default 900)")
    parser.add_argument("--heldout", type=int, default=90, help="held-out examples (default 90)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    train, heldout = generate(args.train, args.heldout, args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out_dir / "train.jsonl", train)
    write_jsonl(args.out_dir / "heldout.jsonl", heldout)
    print(f"{args.out_dir}: train.jsonl ({len(train)}), heldout.jsonl ({len(heldout)})")


if __name__ == "__main__":
    main()
