"""`infscaled serve` as a user runs it, and third-party clients against it: the README's own
examples (extracted from README.md and run as written), the official `openai` client.

One served job for the whole module (llama-generate: 2 stages x 2 replica chains): starting it
is the expensive part."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from served import Served, localise, readme_examples, serve


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    [start] = [e for e in readme_examples() if e.kind == "serve"]
    assert start.lang == "sh" and start.code.strip().startswith(".venv/bin/infscaled serve")
    with serve(start.code.strip(), tmp_path_factory.mktemp("state")) as s:
        yield s


def test_readme_examples_run_as_written(served: Served) -> None:
    examples = [e for e in readme_examples() if e.kind == "client"]
    assert {e.lang for e in examples} == {"sh", "python"}
    # One script, so the README's `export INFSCALED_TOKEN=...` reaches the later examples as it
    # would in the user's shell.
    script = ["set -euo pipefail"]
    for e in examples:
        code = localise(e.code, served.port)
        script.append(code if e.lang == "sh" else f"{sys.executable} - <<'PYTHON'\n{code}PYTHON")
    run = subprocess.run(["bash", "-c", "\n".join(script)], env=served.env, capture_output=True, text=True,
                         timeout=180)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count('"object":"text_completion"') >= 2 and "data: [DONE]" in run.stdout, run.stdout
    assert '"status":"ok"' in run.stdout.replace(" ", ""), run.stdout
    assert '"error"' not in run.stdout, run.stdout


def test_serve_prints_what_a_client_needs(served: Served) -> None:
    text = "".join(served.output)
    assert served.model == "llama-generate"
    assert f"at {served.url}" in text and "infscaled token" in text, text
    assert served.token() and served.token() != ""


def test_openai_client_against_serve(served: Served) -> None:
    api = openai.OpenAI(base_url=f"{served.url}/v1", api_key=served.token(), max_retries=0, timeout=60)
    [card] = api.models.list().data
    assert api.models.retrieve(served.model).id == card.id == api.models.retrieve(card.id).id
    with pytest.raises(openai.NotFoundError) as missing:
        api.models.retrieve("nope")
    assert missing.value.code == "model_not_found" and "nope" in missing.value.message
    messages: Any = [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}]
    reply = api.chat.completions.create(model=served.model, messages=messages, max_tokens=4, temperature=0,
                                        extra_body={"ignore_eos": True})
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 4
    assert reply.choices[0].message.refusal is None and "refusal" in reply.choices[0].message.model_fields_set
    raw = api.completions.with_raw_response.create(model=served.model, prompt="x", max_tokens=1,
                                                   extra_headers={"X-Request-Id": "mine-1"})
    assert raw.headers["x-request-id"] == "mine-1"
    with pytest.raises(openai.AuthenticationError) as denied:
        openai.OpenAI(base_url=f"{served.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert denied.value.code == "invalid_api_key" and denied.value.body["type"] == "authentication_error"
    with pytest.raises(openai.BadRequestError, match="response_format = {'type': 'json_object'}: only") as refused:
        api.chat.completions.create(model=served.model, messages=[{"role": "user", "content": "hi"}],
                                    response_format={"type": "json_object"})
    assert refused.value.param == "response_format"


def test_http_surface_errors_health_metrics_tokenizer(served: Served) -> None:
    auth = {"Authorization": f"Bearer {served.token()}"}
    with requests.Session() as http:
        assert http.get(served.url + "/health").json() == {"status": "ok"}  # no token
        done = http.post(served.url + "/v1/completions", headers=auth, timeout=60,
                         json={"model": served.model, "prompt": "x", "max_tokens": 3, "ignore_eos": True})
        assert done.json()["usage"]["completion_tokens"] == 3
        metrics = http.get(served.url + "/metrics")  # no token
        assert metrics.status_code == 200
        families = {f.name: f.samples for f in text_string_to_metric_families(metrics.text)}
        assert families["infscaled_job_state"]  # the pipeline's own series, next to vLLM's names
        served_by = {"model_name": served.model}
        ttft = [s for s in families["infscaled:time_to_first_token_seconds"]
                if s.name.endswith("_count") and s.labels == served_by]
        assert ttft and ttft[0].value >= 1

        def summed(name: str, suffix: str) -> float:
            return sum(s.value for s in families[name] if s.name.endswith(suffix) and s.labels == served_by)

        # Arrival -> admission -> first token: queue and prefill time split the time to first token.
        for part in ("infscaled:request_queue_time_seconds", "infscaled:request_prefill_time_seconds"):
            assert summed(part, "_count") == ttft[0].value
        assert abs(summed("infscaled:request_queue_time_seconds", "_sum")
                   + summed("infscaled:request_prefill_time_seconds", "_sum")
                   - summed("infscaled:time_to_first_token_seconds", "_sum")) < 1e-6
        success = {s.labels["finished_reason"]: s.value for s in families["infscaled:request_success"]}
        assert success["length"] >= 1
        assert [s.value for s in families["infscaled:generation_tokens"] if s.labels == served_by][0] >= 3
        assert 0 <= families["infscaled:kv_cache_usage_perc"][0].value <= 1
        assert {s.labels["model_name"] for s in families["infscaled:num_requests_running"]} == {served.model}
        assert http.get(served.url + "/v1/models").status_code == 401
        missing = http.get(served.url + "/v1/nothing", headers=auth)
        assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
        assert missing.headers["x-request-id"]
        wrong = http.put(served.url + "/v1/completions", headers=auth)
        assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
        assert wrong.json()["error"]["message"].endswith("(allowed: POST)")
        tokens = http.post(served.url + "/tokenize", headers=auth, json={"prompt": "Hello"}).json()
        assert tokens["count"] == len(tokens["tokens"]) > 0 and tokens["max_model_len"] == 256
        chat = http.post(served.url + "/tokenize", headers=auth, json={"messages": [{"role": "user", "content": "Hello"}]})
        assert chat.json()["count"] > tokens["count"]
        text = http.post(served.url + "/detokenize", headers=auth, json={"model": served.model, "tokens": tokens["tokens"]})
        assert text.json() == {"prompt": "Hello"}
        info = http.get(served.url + "/tokenizer_info", headers=auth, params={"model": served.model}, timeout=60).json()
        assert info["model_max_length"] == 256 and info["eos_token_id"] is not None
        bad = http.post(served.url + "/detokenize", headers=auth, json={"tokens": ["a"]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens[0]"
        nan = http.post(served.url + "/v1/completions", headers={**auth, "Content-Type": "application/json"},
                        data=b'{"model": "llama-generate", "prompt": "x", "temperature": NaN}')
        assert nan.status_code == 400 and "NaN" in nan.json()["error"]["message"]
        spec = http.get(served.url + "/openapi.json").json()
        assert spec["openapi"].startswith("3.1") and "/v1/chat/completions" in spec["paths"]


def test_schemathesis_against_served_openapi(served: Served, tmp_path: Path) -> None:
    """Schemathesis generates requests from the served /openapi.json: no 5xx, and every answer's
    status, content type and body match the document. `model` is pinned to the served job so the
    generated requests reach the pipeline instead of stopping at 404."""
    spec = requests.get(served.url + "/openapi.json", timeout=30).json()
    for name in ("CompletionRequest", "ChatCompletionRequest", "TokenizeRequest", "DetokenizeRequest"):
        spec["components"]["schemas"][name]["properties"]["model"] = {"const": served.model}
    path = tmp_path / "openapi.json"
    path.write_text(json.dumps(spec))
    checks = "not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance"
    run = subprocess.run([sys.executable, "-m", "schemathesis.cli", "run", str(path), "--url", served.url,
                          "-H", f"Authorization: Bearer {served.token()}", "-c", checks, "-n", "10", "--seed", "1",
                          "--generation-database", "none", "--request-timeout", "60"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert re.search(r"\d+ generated, \d+ passed", run.stdout), run.stdout[-3000:]


def test_lm_eval_local_completions_generate_until_and_loglikelihood(served: Served, tmp_path: Path) -> None:
    """lm-eval's `local-completions` unmodified, with its remote tokenizer (/tokenizer_info,
    /tokenize, /detokenize): a generate_until task and a multiple-choice one, which lm-eval
    scores by loglikelihood (echo + logprobs over token-id prompts, several per request). The
    generate_until task stops at 5 strings, as humaneval's does: with the eos text lm-eval sends 6."""
    from benchmarks.serve_clients import lm_eval_command, write_lm_eval_tasks

    tasks = write_lm_eval_tasks(tmp_path / "tasks")
    env = {**served.env, "OPENAI_API_KEY": served.token(), "HF_DATASETS_OFFLINE": "1"}
    run = subprocess.run(lm_eval_command(served.url, served.model, served.token(), tasks, tmp_path / "tasks",
                                         tmp_path / "out"), env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    rows = {line.split("|")[1].strip(): line for line in run.stdout.splitlines() if line.startswith("|infscaled")}
    assert set(rows) == set(tasks), run.stdout[-3000:]
    assert "acc" in rows["infscaled_mc"] and "exact_match" in rows["infscaled_gen"]


def test_pipeline_logprobs_penalties_and_choices_match_the_monolith(served: Served) -> None:
    """The served pipeline's last stage reports the monolithic model's log-probabilities (prompt
    and generated tokens) and applies logit_bias / penalties; n and a list of prompts fan out."""
    import torch

    from infscaled.generation.tokenizer import load_tokenizer
    from infscaled.models.sources import resolve
    from infscaled.models.stage import Monolith

    tok = load_tokenizer("builtin:llama-tiny")
    prompt = tok.encode("Once upon a time")
    model = Monolith(resolve("builtin:llama-tiny"), "cpu", "float32", 0).model
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=torch.tensor([prompt])).logits[0].float(), dim=-1)
    greedy = int(logp[-1].argmax())
    api = openai.OpenAI(base_url=f"{served.url}/v1", api_key=served.token(), max_retries=0, timeout=120)
    scored = api.completions.create(model=served.model, prompt=[prompt, prompt], max_tokens=1, temperature=0,
                                    echo=True, logprobs=2, extra_body={"ignore_eos": True})
    assert len(scored.choices) == 2
    for choice in scored.choices:
        lp = choice.logprobs
        expected = [logp[i, prompt[i + 1]].item() for i in range(len(prompt) - 1)] + [logp[-1, greedy].item()]
        assert lp.token_logprobs[0] is None and lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-3)
        assert len(lp.top_logprobs[-1]) == 2 and max(lp.top_logprobs[-1].values()) == pytest.approx(expected[-1],
                                                                                                     abs=1e-3)
    forced = api.completions.create(model=served.model, prompt=prompt, max_tokens=3, temperature=0,
                                    logit_bias={"65": 100}, extra_body={"ignore_eos": True})
    assert forced.choices[0].text == tok.decode([65, 65, 65])
    two = api.chat.completions.create(model=served.model, messages=[{"role": "user", "content": "hi"}], n=2,
                                      max_tokens=4, temperature=1.0, seed=3, frequency_penalty=1.0,
                                      logprobs=True, top_logprobs=1, extra_body={"ignore_eos": True})
    assert [c.index for c in two.choices] == [0, 1] and two.usage.completion_tokens == 8
    assert all(len(c.logprobs.content) == 4 for c in two.choices)


def test_serve_restarts_on_its_own_state_directory(tmp_path: Path) -> None:
    """`serve` stopped and started again on the same state directory (the default one, for a user):
    the controller's store remembers agent "local" and its credential, and the new embedded agent
    presents it (it was kept in a temporary directory and lost: every restart was refused)."""
    import asyncio

    from infscaled.client import Client
    from infscaled.controller.config import ControllerConfig
    from infscaled.runner.up import _has_agent, _wait_for, embedded_cluster

    ccfg = ControllerConfig(port=0, state_dir=str(tmp_path), model_roots=None)

    async def once() -> None:
        async with embedded_cluster("cpu:1", ccfg=ccfg) as (url, token), Client(url, token) as client:
            await _wait_for(lambda: _has_agent(client), "the local agent to register", 30)

    asyncio.run(once())
    asyncio.run(once())
