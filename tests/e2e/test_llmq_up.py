"""`llmq up` (what `make up` runs) as a user runs it: from an empty directory
it starts the broker, Redis, the gateway and the scaler, which starts a worker
(min 1) on the tiny model it builds, on the torch engine and, where vLLM is
installed (`make test-vllm`), on vLLM; it serves a request over HTTP, and
Ctrl-C stops all of it, workers included."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from deploy.devstack import free_port

REPO = Path(__file__).parents[2]


def _http(method: str, url: str, body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as resp:
        return resp.status, json.load(resp)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.mark.parametrize("engine", ["torch"] + (["vllm"] if importlib.util.find_spec("vllm") else []))
def test_llmq_up_serves_a_request_and_stops_cleanly_on_ctrl_c(tmp_path, engine):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMQ_")}
    env.update(LLMQ_HTTP_PORT=str(port), PYTHONPATH=str(REPO), LLMQ_LOG_LEVEL="warning", LLMQ_ENGINE=engine)
    proc = subprocess.Popen([sys.executable, "-m", "deploy.cli", "up"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 240
        while not any("Ctrl-C stops everything" in line for line in lines):
            assert proc.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "".join(lines)
            time.sleep(0.2)
        banner = "".join(lines)
        broker_port = int(re.search(r"broker\s+127\.0\.0\.1:(\d+)", banner).group(1))
        redis_port = int(re.search(r"redis\s+redis://127\.0\.0\.1:(\d+)", banner).group(1))
        assert f"http://127.0.0.1:{port}" in banner and "curl" in banner

        base = f"http://127.0.0.1:{port}"
        status, accepted = _http("POST", f"{base}/v1/requests",
                                 {"input": {"prompt": "Hello"}, "params": {"max_tokens": 8, "temperature": 0}})
        assert status == 202
        status, view = _http("GET", f"{base}{accepted['status_url']}?wait=60")
        assert view["status"] == "succeeded", view
        assert view["usage"]["completion_tokens"] >= 1

        # The same text the model's own generate() gives, from the checkpoint `llmq up` built.
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model_dir = tmp_path / ".llmq" / "models" / "tiny-llama"
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        inputs = tokenizer("Hello", return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        assert view["output"]["text"] == tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

        # The worker that served it was started by the scaler (min 1 by default), which records it.
        assert "scaler    local, 1 to 4 workers" in banner
        state = json.loads((tmp_path / ".llmq" / "scaler" / "local-workers.llmq-workers.json").read_text())
        worker_pids = state["pids"]
        assert len(worker_pids) == 1 and _is_worker(worker_pids[0])
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        try:
            code = proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    assert code == 0, "".join(lines)
    for stopped in (port, broker_port, redis_port):
        assert not _listening(stopped), f"something still listens on port {stopped} after llmq up stopped"
    # Ctrl-C leaves no worker process behind (they run in sessions of their own, stopped by the scaler).
    assert not any(_is_worker(pid) for pid in worker_pids)
    # The dev broker's log is plain text, as the README shows it: no terminal colour codes.
    assert "\x1b[" not in (tmp_path / ".llmq" / "logs" / "broker.log").read_text(errors="replace")


def _is_worker(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return b"workers.main" in cmdline and state not in ("Z", "X")
