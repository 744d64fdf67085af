"""`infscaled serve` as a user runs it, and third-party clients against it: the README's own
examples (extracted from README.md and run as written), the official `openai` client.

One served job for the whole module (llama-generate: 2 stages x 2 replica chains): starting it
is the expensive part."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import openai
import pytest
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
    assert '"error"' not in run.stdout, run.stdout


def test_serve_prints_what_a_client_needs(served: Served) -> None:
    text = "".join(served.output)
    assert served.model == "llama-generate"
    assert f"at {served.url}" in text and "infscaled token" in text, text
    assert served.token() and served.token() != ""


def test_openai_client_against_serve(served: Served) -> None:
    api = openai.OpenAI(base_url=f"{served.url}/v1", api_key=served.token(), max_retries=0, timeout=60)
    assert len(api.models.list().data) == 1
    reply = api.chat.completions.create(model=served.model, messages=[{"role": "user", "content": "hi"}],
                                        max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 4
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{served.url}/v1", api_key="wrong", max_retries=0).models.list()
