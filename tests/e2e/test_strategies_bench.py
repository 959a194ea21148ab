"""`python -m bench.strategies --short` as a user runs it: from an empty directory it
fine-tunes the tiny model, makes every optimization strategy's variant, measures each
in its own process and writes the table, the JSON and the chart. Only the report's
completeness is checked here (every row, every column, a PNG): its figures are the
benchmark's, never a test's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from bench.strategies import COLUMNS, variants

REPO = Path(__file__).parents[2]


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


@pytest.mark.timeout(900)  # two fine-tunes, QAT and three recoveries, and a process per variant
def test_short_run_reports_every_variant_in_a_table_json_and_png(tmp_path):
    md, out_json, png = tmp_path / "out" / "strategies.md", tmp_path / "out" / "strategies.json", tmp_path / "s.png"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMQ_")} | {"PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "bench.strategies", "--short", "--md", str(md), "--json",
                          str(out_json), "--png", str(png)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=880)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    expected = [v.label for v in variants(1)]
    table = [line for line in md.read_text().splitlines() if line.startswith("|")]
    assert _cells(table[0]) == COLUMNS
    rows = [_cells(line) for line in table[2:]]
    assert [row[0] for row in rows] == expected
    assert all(len(row) == len(COLUMNS) for row in rows), rows
    # Each row measured, or saying why not (CPU has no fp16 kernels): none broke.
    assert not [row for row in rows if "failed" in row[-1] or "skipped" in row[-1]], rows
    assert next(row for row in rows if row[0] == "fp16")[-1].startswith("not available here")
    assert md.read_text() in run.stdout  # the same table printed

    report = json.loads(out_json.read_text())
    assert [row["variant"] for row in report["rows"]] == expected

    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        image.verify()
