"""Optimization jobs on the real path: a gateway, a trainer and, per optimized model, a
torch worker, each its own process, on the real broker and Redis. Each strategy's job is
created through `/v1/optimization/jobs` (or `llmq optimize`), ends succeeded with its
figures, and its output is then served by name by a worker started with LLMQ_MODEL set
to it; a LoRA fine-tune made through the fine-tuning API is merged and answers as the
trainer measured it; another key sees none of it; bad bodies, strategies and sources are
refused naming the parameter; a queued job is cancelled and a running one stopped."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from deploy.devstack import free_port, python_env, wait_for_port
from tests.conftest import isolated_settings
from tests.integration.helpers import WorkerProcess, api_keys, llmq
from workers.training.finsent import LABELS, generate
from workers.training.settings import TrainerSettings

FINAL = {"succeeded", "failed", "cancelled"}
PROMPT = [{"role": "user", "content": "Write about the weather in the mountains."}]
ASKED_TOKENS = 8


@dataclass
class Answer:
    status_code: int
    body: dict

    def json(self) -> dict:
        return self.body

    @property
    def text(self) -> str:
        return json.dumps(self.body)


class Http:
    """Plain HTTP calls with one key (urllib: the status and JSON body of every answer, errors too)."""

    def __init__(self, url: str, key: str) -> None:
        self.url, self.key = url, key

    def __enter__(self) -> Http:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def _call(self, method: str, path: str, body: dict | None = None) -> Answer:
        request = urllib.request.Request(self.url + path, method=method,
                                         data=json.dumps(body).encode() if body is not None else None,
                                         headers={"Authorization": f"Bearer {self.key}",
                                                  "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as resp:
                return Answer(resp.status, json.load(resp))
        except urllib.error.HTTPError as exc:
            return Answer(exc.code, json.load(exc))

    def get(self, path: str) -> Answer:
        return self._call("GET", path)

    def post(self, path: str, json: dict | None = None) -> Answer:
        return self._call("POST", path, json)


@dataclass
class Stack:
    settings: object
    url: str
    keys: dict[str, str]
    registry: Path
    log_dir: Path
    training_file: str = ""  # alice's finsent training file
    validation_file: str = ""  # alice's finsent held-out file
    heldout: list | None = None

    def http(self, who: str = "alice") -> Http:
        return Http(self.url, self.keys[who])

    def openai(self, who: str = "alice") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.keys[who], max_retries=0, timeout=120)


def _spawn(module: str, env: dict, log_path: Path) -> subprocess.Popen:
    with open(log_path, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", module], env=python_env(**env), stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _jsonl(lines: list[dict]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


@pytest.fixture(scope="module")
def stack(broker, redis_server, tiny_model_dir, tmp_path_factory) -> Iterator[Stack]:
    """Gateway and trainer processes for the module (auth on: keys alice and bob), and alice's
    finsent training and held-out files."""
    root = tmp_path_factory.mktemp("optimization")
    registry = root / "registry"
    (registry / "adapters").mkdir(parents=True)
    port = free_port()
    settings = isolated_settings(broker, redis_server, engine="torch", model=str(tiny_model_dir), auth=True,
                                 device="cpu", registry_dir=registry, files_dir=root / "files",
                                 http_host="127.0.0.1", http_port=port)
    keys = api_keys(settings, "alice", "bob")
    common = settings.model_dump(include=set(TrainerSettings.model_fields) & set(type(settings).model_fields))
    trainer_settings = TrainerSettings(**{**common, "metrics_port": 0, "training_dir": root / "training",
                                          "training_lease_seconds": 10})
    gateway = _spawn("gateway.main", settings.to_env(), root / "gateway.log")
    trainer = _spawn("workers.training.main", trainer_settings.to_env(), root / "trainer.log")
    try:
        wait_for_port(port, 60, gateway, "gateway")
        running = Stack(settings, f"http://127.0.0.1:{port}", keys, registry, root)
        train, heldout = generate(240, 30, seed=11)
        client = running.openai()
        running.training_file = client.files.create(file=("train.jsonl", io.BytesIO(_jsonl(train))),
                                                    purpose="fine-tune").id
        running.validation_file = client.files.create(file=("heldout.jsonl", io.BytesIO(_jsonl(heldout))),
                                                      purpose="fine-tune").id
        running.heldout = heldout
        yield running
    finally:
        _stop(trainer)
        _stop(gateway)


def _create(stack: Stack, body: dict, who: str = "alice") -> Answer:
    with stack.http(who) as http:
        return http.post("/v1/optimization/jobs", json=body)


def _wait(stack: Stack, job_id: str, until=FINAL, timeout: float = 240, check=None) -> dict:
    deadline = time.monotonic() + timeout
    with stack.http() as http:
        while True:
            resp = http.get(f"/v1/optimization/jobs/{job_id}")
            assert resp.status_code == 200, resp.text
            job = resp.json()
            if job["status"] in until and (check is None or check(job)):
                return job
            if time.monotonic() > deadline:
                trainer_log = (stack.log_dir / "trainer.log").read_text(errors="replace")[-3000:]
                raise AssertionError(f"job still {job['status']} after {timeout} s: {job}\n{trainer_log}")
            time.sleep(0.5)


def _events_once_published(stack: Stack, job_id: str) -> list[str]:
    """The job's event messages, once the trainer wrote the one it writes just after ending the job."""
    deadline = time.monotonic() + 10
    with stack.http() as http:
        while True:
            events = [e["message"] for e in http.get(f"/v1/optimization/jobs/{job_id}/events?limit=100").json()["data"]]
            if any(m.startswith("New optimized model created") for m in events) or time.monotonic() > deadline:
                return events
            time.sleep(0.2)


class Served:
    """A torch worker process started on one model (LLMQ_MODEL), until the block ends."""

    def __init__(self, stack: Stack, model: str) -> None:
        self.stack, self.model = stack, model

    def __enter__(self) -> WorkerProcess:
        settings = self.stack.settings.model_copy(update={"model": self.model})
        self.worker = WorkerProcess(settings, self.stack.log_dir / f"worker-{self.model.replace(':', '_')}.log")
        deadline = time.monotonic() + 180
        while "partitions_assigned" not in self.worker.log():  # loaded its model and joined the group
            assert self.worker.proc.poll() is None, self.worker.log()
            assert time.monotonic() < deadline, f"the worker did not start on {self.model}:\n{self.worker.log()}"
            time.sleep(0.5)
        return self.worker

    def __exit__(self, *exc) -> None:
        self.worker.signal(15)
        try:
            self.worker.proc.wait(60)
        finally:
            self.worker.close()


def _chat(stack: Stack, model: str, messages=PROMPT, who: str = "alice", max_tokens: int = ASKED_TOKENS):
    with stack.openai(who) as client:
        return client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)


def _check_private(stack: Stack, job: dict) -> None:
    """Another key sees neither the job nor its model; the fine-tuning list doesn't show it."""
    with stack.http("bob") as bob, stack.http("alice") as alice:
        assert bob.get(f"/v1/optimization/jobs/{job['id']}").status_code == 404
        assert bob.post(f"/v1/optimization/jobs/{job['id']}/cancel").status_code == 404
        assert bob.get(f"/v1/optimization/jobs/{job['id']}/events").status_code == 404
        assert job["id"] not in [j["id"] for j in bob.get("/v1/optimization/jobs").json()["data"]]
        assert job["optimized_model"] not in [m["id"] for m in bob.get("/v1/models").json()["data"]]
        assert job["optimized_model"] in [m["id"] for m in alice.get("/v1/models").json()["data"]]
        assert job["id"] in [j["id"] for j in alice.get("/v1/optimization/jobs?limit=100").json()["data"]]
        assert job["id"] not in [j["id"] for j in alice.get("/v1/fine_tuning/jobs?limit=100").json()["data"]]
        assert alice.get(f"/v1/fine_tuning/jobs/{job['id']}").status_code == 404


# ---- each strategy: a job, its figures, served by name ------------------------------------

STRATEGIES = [
    pytest.param({"type": "precision", "dtype": "bfloat16"}, False, id="precision-bf16"),
    pytest.param({"type": "int8_dynamic"}, False, id="int8_dynamic"),
    pytest.param({"type": "weight_only", "bits": 8}, False, id="weight_only-int8"),
    pytest.param({"type": "qat", "bits": 8, "training": {"n_epochs": 1, "batch_size": 8}}, True, id="qat"),
    pytest.param({"type": "prune_l1", "sparsity": 0.5, "recovery": {"n_epochs": 1, "batch_size": 8}}, True,
                 id="prune_l1-recovery"),
    pytest.param({"type": "prune_structured", "mlp_kept": 0.5, "layers_kept": 0.75}, False, id="prune_structured"),
]


@pytest.mark.timeout(600)
@pytest.mark.parametrize(("strategy", "trains"), STRATEGIES)
def test_a_strategy_job_succeeds_with_figures_and_is_served_by_name(stack, strategy, trains):
    body = {"model": "tiny-llama", "strategy": strategy, "validation_file": stack.validation_file, "seed": 3,
            "metadata": {"case": strategy["type"]}}
    if trains:
        body["training_file"] = stack.training_file
    resp = _create(stack, body)
    assert resp.status_code == 200, resp.text
    created = resp.json()
    assert created["object"] == "optimization.job" and created["id"].startswith("optjob-")
    assert created["status"] in ("queued", "running") and created["strategy"]["type"] == strategy["type"]
    assert created["optimized_model"] is None and created["metadata"] == {"case": strategy["type"]}

    job = _wait(stack, created["id"])
    assert job["status"] == "succeeded", job
    name = job["optimized_model"]
    assert name.startswith("tiny-llama:opt-") and name.endswith(created["id"][-8:])
    assert job["figures"]["size_bytes"] > 0 and job["error"] is None
    assert set(job["eval"]) == {"before", "after"} and job["eval"]["after"]["n_eval"] == len(stack.heldout)
    meta = json.loads((stack.registry / "models" / name.rpartition(":")[2] / "llmq-model.json").read_text())
    assert meta["method"] == "optimization" and meta["source_model"] == "tiny-llama"
    assert meta["strategy"]["type"] == strategy["type"] and meta["eval"] == job["eval"]
    if strategy["type"] == "prune_structured":  # the matrices really shrank
        assert job["figures"]["parameters_after"] < job["figures"]["parameters_before"]
        assert job["figures"]["shape_after"]["intermediate_size"] == job["figures"]["shape_before"][
            "intermediate_size"] // 2
    assert f"New optimized model created: {name}" in _events_once_published(stack, job["id"])
    _check_private(stack, job)

    with Served(stack, name):
        if trains:  # it learned the task on the way: it answers a held-out headline with a label
            assert job["eval"]["after"]["eval_loss"] < job["eval"]["before"]["eval_loss"], job["eval"]
            answers = [_chat(stack, name, line["messages"][:-1]) for line in stack.heldout[:10]]
            texts = [a.choices[0].message.content for a in answers]
            assert all(a.model == name for a in answers) and sum(t in LABELS for t in texts) >= 5, texts
        else:  # random weights, changed: text of the asked length
            answer = _chat(stack, name)
            assert answer.model == name and answer.usage.completion_tokens == ASKED_TOKENS, answer
            assert answer.choices[0].message.content.strip()
        with pytest.raises(openai.NotFoundError):
            _chat(stack, name, who="bob")


# ---- a LoRA fine-tune, merged -----------------------------------------------------------


@pytest.fixture(scope="module")
def lora_model(stack) -> str:
    """A LoRA fine-tune of alice's, made through the fine-tuning API on the finsent task (short)."""
    with stack.openai() as client:
        job = client.fine_tuning.jobs.create(
            model="tiny-llama", training_file=stack.training_file, validation_file=stack.validation_file,
            suffix="finsent", seed=7, method={"type": "lora", "lora": {"hyperparameters": {"n_epochs": 3,
                                                                                           "batch_size": 8}}})
        deadline = time.monotonic() + 300
        while job.status not in FINAL:
            assert time.monotonic() < deadline, job
            time.sleep(0.5)
            job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded", job
    return job.fine_tuned_model


@pytest.mark.timeout(600)
def test_a_lora_fine_tune_is_merged_and_answers_as_measured(stack, lora_model):
    # Bob can't name alice's fine-tune as a source; a merge needs a LoRA source.
    refused = _create(stack, {"model": lora_model, "strategy": {"type": "merge_lora"}}, who="bob")
    assert refused.status_code == 404 or refused.json()["error"]["param"] == "model", refused.text
    base = _create(stack, {"model": "tiny-llama", "strategy": {"type": "merge_lora"}})
    assert base.status_code == 400 and base.json()["error"]["param"] == "model", base.text

    resp = _create(stack, {"model": lora_model, "strategy": {"type": "merge_lora"},
                           "validation_file": stack.validation_file})
    assert resp.status_code == 200, resp.text
    job = _wait(stack, resp.json()["id"])
    assert job["status"] == "succeeded", job
    name = job["optimized_model"]
    assert name.startswith(f"{lora_model}:opt-merged-")
    assert job["figures"]["adapter_parameters_merged"] > 0
    after = job["eval"]["after"]
    # Merging changes no answer: the merged model scores what the adapter did (both measured here).
    assert abs(after["eval_loss"] - job["eval"]["before"]["eval_loss"]) < 1e-3, job["eval"]
    _check_private(stack, job)

    with Served(stack, name):
        answers = [_chat(stack, name, line["messages"][:-1]) for line in stack.heldout]
    texts = [a.choices[0].message.content for a in answers]
    assert all(a.model == name for a in answers)
    right = sum(text == line["messages"][-1]["content"] for text, line in zip(texts, stack.heldout))
    # The served model answers the held-out set as the trainer measured it (same tokens, greedy).
    assert abs(right / len(stack.heldout) - after["accuracy"]) <= 2 / len(stack.heldout), (right, after)
    assert sum(text in LABELS for text in texts) >= len(texts) // 2, texts  # the task's labels, learned


# ---- refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "tiny-llama", "strategy": {"type": "int8_dynamic"}, "bits": 8}, "bits"),
    ({"model": "tiny-llama", "strategy": {"type": "int3"}}, "strategy"),
    ({"model": "tiny-llama", "strategy": {"type": "prune_l1", "sparsity": 2}}, "strategy.sparsity"),
    ({"model": "tiny-llama", "strategy": {"type": "qat"}}, "training_file"),
    ({"model": "other-model", "strategy": {"type": "int8_dynamic"}}, "model"),
    ({"model": "tiny-llama:ft-nope-0a1b2c3d", "strategy": {"type": "int8_dynamic"}}, "model"),
    ({"model": "tiny-llama", "strategy": {"type": "prune_l1", "recovery": {}}, "training_file": "file-nope"},
     "training_file"),
])
def test_a_bad_body_strategy_or_source_is_refused_naming_the_parameter(stack, body, param):
    resp = _create(stack, body)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param, resp.text
    # Another key's file is no file at all.
    bob = _create(stack, {"model": "tiny-llama", "strategy": {"type": "qat"}, "training_file": stack.training_file},
                  who="bob")
    assert bob.status_code == 400 and bob.json()["error"]["param"] == "training_file", bob.text


# ---- cancel ----------------------------------------------------------------------------------


@pytest.mark.timeout(600)
def test_a_queued_job_is_cancelled_at_once_and_a_running_one_stops(stack):
    long = {"model": "tiny-llama", "training_file": stack.training_file, "seed": 1,
            "strategy": {"type": "prune_l1", "recovery": {"n_epochs": 20, "batch_size": 2}}}
    running = _create(stack, long).json()
    _wait(stack, running["id"], until={"running"}, timeout=120,
          check=lambda j: (j.get("progress") or {}).get("step", 0) >= 2)
    queued = _create(stack, {"model": "tiny-llama", "strategy": {"type": "int8_dynamic"}}).json()
    assert queued["status"] == "queued"
    with stack.http() as http:
        cancelled = http.post(f"/v1/optimization/jobs/{queued['id']}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled", cancelled.text
        asked = http.post(f"/v1/optimization/jobs/{running['id']}/cancel")
        assert asked.status_code == 200 and asked.json()["status"] in ("running", "cancelled"), asked.text
    stopped = _wait(stack, running["id"], timeout=120)
    assert stopped["status"] == "cancelled" and stopped["optimized_model"] is None, stopped
    assert stopped["progress"]["step"] < stopped["progress"]["total_steps"]
    # The queued one never ran: still cancelled once the trainer read its message.
    time.sleep(2)
    assert _wait(stack, queued["id"])["status"] == "cancelled"
    with stack.http() as http:
        again = http.post(f"/v1/optimization/jobs/{queued['id']}/cancel")
        assert again.status_code == 200 and again.json()["status"] == "cancelled"


# ---- llmq optimize -------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_llmq_optimize_creates_a_job_follows_it_and_reads_it(stack):
    env = {"LLMQ_URL": stack.url, "LLMQ_API_KEY": stack.keys["alice"]}
    # The real command, as helpers.llmq runs it, with time for the job to run.
    made = subprocess.run([sys.executable, "-m", "deploy.cli", "optimize", "tiny-llama", "--strategy", "precision",
                           "--set", "dtype=bfloat16", "--suffix", "half", "--wait"],
                          env=python_env(**{**stack.settings.to_env(), **env}), capture_output=True, text=True,
                          timeout=240)
    assert made.returncode == 0, made.stderr
    job = json.loads(made.stdout)
    assert job["status"] == "succeeded" and job["optimized_model"].startswith("tiny-llama:opt-half-")
    assert f"LLMQ_MODEL='{job['optimized_model']}'" in made.stderr

    got = llmq(stack.settings, "optimize", "--get", job["id"], **env)
    assert got.returncode == 0 and json.loads(got.stdout)["figures"] == job["figures"], got.stderr
    listed = llmq(stack.settings, "optimize", "--list", **env)
    assert listed.returncode == 0 and any(line.startswith(f"{job['id']}\tsucceeded") for line in
                                          listed.stdout.splitlines()), listed.stdout
    # One line per error, and a non-zero exit.
    for args, code, words in ((["tiny-llama", "--strategy", "prune_l1", "--set", "sparsity"], 2, "KEY=VALUE"),
                              (["tiny-llama", "--strategy", "precision"], 1, "strategy.dtype"),
                              (["--get", job["id"]], 1, "404")):
        who = {**env, "LLMQ_API_KEY": stack.keys["bob"]} if args[0] == "--get" else env
        failed = llmq(stack.settings, "optimize", *args, **who)
        assert failed.returncode == code and len(failed.stderr.strip().splitlines()) == 1, failed.stderr
        assert words in failed.stderr, failed.stderr
