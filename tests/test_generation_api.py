"""The OpenAI-compatible API driven by the official `openai` client: a real aiohttp server on
127.0.0.1 over ReferenceBackend (a tiny Llama run in-process), then the controller's routes in
front of such a server standing in for a job's dispatcher."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.typedefs import Handler
from cluster import loopback
from test_controller import TOKEN, Api, FakeAgent, _free_port, controller, make_cfg, submit_inspected, wait_state

from infscaled.generation.errors import GenerationError
from infscaled.generation.openai_api import make_handlers
from infscaled.generation.params import SamplingParams
from infscaled.generation.reference import ReferenceBackend, model_limits
from infscaled.generation.tokenizer import load_tokenizer
from infscaled.protocol.messages import Deploy

SOURCE = "builtin:llama-tiny"
NO_EOS = {"ignore_eos": True}
TOK = load_tokenizer(SOURCE)
DIGITS = len(TOK.encode("0123456789"))  # a random model may emit eos anywhere: fixed lengths where they matter


@pytest.fixture(scope="module")
def model() -> Any:
    return ReferenceBackend.from_source(SOURCE).model


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("INFSCALED_TOKEN", raising=False)


@asynccontextmanager
async def serve(backend: Any, port: int = 0, token: str | None = None) -> AsyncIterator[str]:
    """make_handlers over `backend` on 127.0.0.1 (checking a service token if given); yields the URL."""
    context, vocab = model_limits(backend.model.config) if hasattr(backend, "model") else (256, 512)

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if token is not None and request.headers.get("Authorization") != f"Bearer {token}":
            return web.json_response({"error": "unauthorized"}, status=401)
        return await handler(request)

    app = web.Application(middlewares=[auth])
    app.add_routes(make_handlers(backend, load_tokenizer(SOURCE), "tiny", context, vocab).routes())
    async with loopback(app, port) as url:
        yield url


def client(url: str, api_key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=30)


async def collect(stream: Any) -> tuple[str, list[Any]]:
    chunks = [c async for c in stream]
    text = "".join(ch.text if hasattr(ch, "text") else (ch.delta.content or "")
                   for c in chunks for ch in c.choices)
    return text, chunks


def test_completions_stream_and_not_agree_with_the_reference(model: Any) -> None:
    async def scenario() -> None:
        backend = ReferenceBackend(model)
        async with serve(backend) as url, client(url) as api:
            done = await api.completions.create(model="tiny", prompt="Hello", max_tokens=12, temperature=0,
                                                extra_body=NO_EOS)
            assert done.object == "text_completion" and done.id.startswith("cmpl-") and done.model == "tiny"
            assert done.choices[0].finish_reason == "length"
            assert done.usage is not None and (done.usage.prompt_tokens, done.usage.completion_tokens,
                                               done.usage.total_tokens) == (len(TOK.encode("Hello")), 12,
                                                                            len(TOK.encode("Hello")) + 12)
            ids = [t async for t in backend.generate(TOK.encode("Hello"), SamplingParams(12, temperature=0.0))]
            assert done.choices[0].text == TOK.decode(ids)

            stream = await api.completions.create(model="tiny", prompt="Hello", max_tokens=12, temperature=0,
                                                  stream=True, stream_options={"include_usage": True},
                                                  extra_body=NO_EOS)
            text, chunks = await collect(stream)
            assert text == done.choices[0].text
            assert [c.choices[0].finish_reason for c in chunks[:-1]][-1] == "length"
            assert chunks[-1].choices == [] and chunks[-1].usage == done.usage
            # Token ids as the prompt; without include_usage there is no usage chunk.
            stream = await api.completions.create(model="tiny", prompt=TOK.encode("Hello"), max_tokens=12, temperature=0,
                                                  stream=True, extra_body=NO_EOS)
            assert (await collect(stream))[0] == text
            assert backend.finished == 4 and backend.cancelled == 0

    asyncio.run(scenario())


def test_continuous_usage_stats_gives_every_chunk_its_choice_usage_so_far(model: Any) -> None:
    """vLLM's stream_options.continuous_usage_stats (guidellm sends it with every streamed request):
    each chunk carries the usage of its choice so far, counting up to the choice's total; the
    final usage-only chunk still comes with include_usage, and only then."""
    async def scenario() -> None:
        async with serve(ReferenceBackend(model)) as url, client(url) as api:
            messages: Any = [{"role": "user", "content": "count with me"}]
            prompt = len(TOK.apply_chat(messages))
            kw: Any = dict(model="tiny", messages=messages, max_tokens=9, temperature=0.7, seed=11, n=2, stream=True,
                           extra_body=NO_EOS)
            _, chunks = await collect(await api.chat.completions.create(
                **kw, stream_options={"include_usage": True, "continuous_usage_stats": True}))
            *per_choice, final = chunks
            assert final.choices == [] and final.usage is not None
            assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (prompt, 18)
            for index in (0, 1):
                mine = [c for c in per_choice if c.choices[0].index == index]
                seen = [c.usage.completion_tokens for c in mine]
                assert seen[0] == 0 and mine[0].choices[0].delta.role == "assistant"
                assert seen == sorted(seen) and seen[-1] == 9, seen
                assert mine[-1].choices[0].finish_reason == "length"
                assert all(c.usage.prompt_tokens == prompt
                           and c.usage.total_tokens == prompt + c.usage.completion_tokens for c in mine)
            # Per-chunk usage alone: no usage-only chunk at the end.
            _, chunks = await collect(await api.completions.create(
                model="tiny", prompt="Hello", max_tokens=5, temperature=0, stream=True,
                stream_options={"continuous_usage_stats": True}, extra_body=NO_EOS))
            assert all(c.choices for c in chunks) and chunks[-1].usage.completion_tokens == 5
            counted = [c.usage.completion_tokens for c in chunks if c.choices[0].text]
            assert counted and counted == sorted(set(counted)) and counted[-1] <= 5, counted

    asyncio.run(scenario())


def test_chat_with_a_seed_is_reproducible_streamed_or_not(model: Any) -> None:
    async def scenario() -> None:
        async with serve(ReferenceBackend(model)) as url, client(url) as api:
            messages: Any = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
            kw: Any = dict(model="tiny", messages=messages, max_completion_tokens=20, temperature=0.8, top_p=0.95,
                           seed=7, extra_body={"top_k": 50, **NO_EOS})
            done = await api.chat.completions.create(**kw)
            choice = done.choices[0]
            assert done.object == "chat.completion" and done.id.startswith("chatcmpl-")
            assert choice.message.role == "assistant" and choice.finish_reason == "length"
            prompt = TOK.apply_chat(messages)
            assert done.usage is not None and done.usage.prompt_tokens == len(prompt)
            assert done.usage.completion_tokens == 20
            text, chunks = await collect(await api.chat.completions.create(**kw, stream=True))
            assert text == choice.message.content
            assert chunks[0].choices[0].delta.role == "assistant"
            assert chunks[-1].choices[0].finish_reason == "length"
            other = await api.chat.completions.create(**{**kw, "seed": 8})
            assert other.choices[0].message.content != choice.message.content

    asyncio.run(scenario())


def test_stop_strings_and_stop_token_ids(model: Any) -> None:
    async def scenario() -> None:
        backend = ReferenceBackend(model)
        async with serve(backend) as url, client(url) as api:
            kw: Any = dict(model="tiny", prompt="Once upon", max_tokens=40, temperature=1.0, seed=3)
            full = (await api.completions.create(**kw, extra_body=NO_EOS)).choices[0].text
            assert len(full) >= 6, full
            stop = full[len(full) // 2:len(full) // 2 + 2]
            expected = full[:full.find(stop)]
            done = await api.completions.create(**kw, stop=[stop, "never-there"], extra_body=NO_EOS)
            assert (done.choices[0].text, done.choices[0].finish_reason) == (expected, "stop")
            text, chunks = await collect(await api.completions.create(**kw, stop=stop, stream=True,
                                                                      extra_body=NO_EOS))
            assert text == expected and chunks[-1].choices[0].finish_reason == "stop"
            # More than OpenAI's 4, as lm-eval's local-completions sends (a task's `until` + eos).
            many = [f"never-{i}" for i in range(7)] + [stop]
            done = await api.completions.create(**kw, extra_body={"stop": many, **NO_EOS})
            assert (done.choices[0].text, done.choices[0].finish_reason) == (expected, "stop")

            params = SamplingParams(40, temperature=1.0, seed=3)
            ids = [t async for t in backend.generate(TOK.encode("Once upon"), params)]
            stop_id = ids[5]
            done = await api.completions.create(**kw, extra_body={"stop_token_ids": [stop_id], **NO_EOS})
            assert done.choices[0].finish_reason == "stop"
            assert done.usage is not None and done.usage.completion_tokens == ids.index(stop_id) + 1
            assert done.choices[0].text == TOK.decode(ids[:ids.index(stop_id)])

    asyncio.run(scenario())


def test_client_disconnect_mid_stream_cancels_the_sequence(model: Any) -> None:
    async def scenario() -> None:
        backend = ReferenceBackend(model)
        async with serve(backend) as url, client(url) as api:
            stream = await api.completions.create(model="tiny", prompt="Hello", max_tokens=200, stream=True,
                                                  extra_body=NO_EOS)
            got = 0
            async for _ in stream:
                got += 1
                if got == 2:
                    break
            await stream.close()
            await asyncio.wait_for(backend.cancelled_event.wait(), 10)
            assert (backend.started, backend.cancelled, backend.finished) == (1, 1, 0)
            # The backend is free again.
            done = await api.completions.create(model="tiny", prompt="Hi", max_tokens=3, extra_body=NO_EOS)
            assert done.usage is not None and done.usage.completion_tokens == 3

    asyncio.run(scenario())


BAD_COMPLETIONS: list[tuple[dict[str, Any], str]] = [
    ({"temperature": 5}, "temperature = 5: must be a number from 0 to 2"),
    ({"top_p": 0}, "top_p = 0: must be a number greater than 0 and at most 1"),
    ({"seed": "x"}, "seed = 'x': must be an integer"),
    ({"stop": ["ab"] * 65}, "'ab', 'ab']: must be a non-empty string or a list of at most 64 non-empty strings"),
    ({"max_tokens": 250}, f"prompt has {DIGITS} tokens; with max_tokens 250 it needs {DIGITS + 250} positions, "
                          "the model has 256"),
    ({"prompt": [5] * 300}, "prompt has 300 tokens, the model has 256 positions"),
    ({"prompt": [1, 600]}, "prompt = [1, 600]: must be a string, a list of strings, or a list of token ids"),
    ({"prompt": ["a", [600]]}, "prompt[1] = [600]: must be a string or a non-empty list of token ids"),
    ({"n": 0}, "n = 0: must be an integer >= 1"),
    ({"n": 200}, "1 prompts x n = 200 is 200 choices: at most 128"),
    ({"best_of": 3}, "best_of = 3: only best_of = n is supported"),
    ({"logit_bias": {"5": 101}}, "logit_bias = {'5': 101}: must be an object mapping token ids"),
    ({"suffix": "x"}, "suffix = 'x': suffix is not supported by this server"),
    ({"stream": "yes"}, "stream = 'yes': must be true or false"),
    ({"skip_special_tokens": 0}, "skip_special_tokens = 0: must be true or false"),
    ({"top_k": -2}, "top_k = -2: must be an integer >= 0"),
    ({"stop_token_ids": [999]}, "stop_token_ids = [999]: must be a list of token ids from 0 to 511"),
    # Known fields are type-checked even when not implemented, and never silently ignored.
    ({"presence_penalty": [[1]]}, "presence_penalty = [[1]]: must be a number from -2 to 2"),
    ({"response_format": {"type": "json_object"}}, "response_format = {'type': 'json_object'}: only"),
    ({"stream_options": {"include_obfuscation": True}}, "stream_options.include_obfuscation = true: stream obfusc"),
    ({"stream_options": {"continuous_usage_stats": 1}}, "stream_options.continuous_usage_stats = 1: must be true or"),
    ({"max_tokens": 2.0}, "max_tokens = 2.0: must be an integer >= 1"),
    ({"temperature": True}, "temperature = True: must be a number from 0 to 2"),
]


class PlainBackend:
    """A backend that implements no sampling feature beyond temperature / top-p / top-k / seed."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> Any:
        return self.inner.generate(prompt_ids, params)


def test_bad_requests_are_400s_with_our_messages(model: Any) -> None:
    async def scenario() -> None:
        backend = ReferenceBackend(model)
        async with serve(backend) as url, aiohttp.ClientSession() as http, client(url) as api:
            for extra, message in BAD_COMPLETIONS:
                body = {"prompt": "0123456789", **extra}
                with pytest.raises(openai.BadRequestError) as err:
                    await api.completions.create(model="tiny", prompt=body.pop("prompt"), extra_body=body)
                assert err.value.status_code == 400
                assert message in err.value.message, (extra, err.value.message)
                assert isinstance(err.value.body, dict) and err.value.body["type"] == "invalid_request_error"
                param = next(iter(extra))
                if param == "stream_options":
                    param = f"stream_options.{next(iter(extra['stream_options']))}"
                assert err.value.param == param
            # A backend without the sampling features (no `features`): each is a 400 naming its field.
            async with serve(PlainBackend(backend)) as plain_url, client(plain_url) as plain:
                for extra in ({"presence_penalty": 0.5}, {"repetition_penalty": 1.2}, {"logit_bias": {"5": 10}},
                              {"min_p": 0.1}, {"min_tokens": 2}, {"logprobs": 0}, {"prompt_logprobs": 1}):
                    with pytest.raises(openai.BadRequestError) as err:
                        await plain.completions.create(model="tiny", prompt="0123", extra_body=extra)
                    field = next(iter(extra))
                    assert f"{field} is not supported by this job's engine yet" in err.value.message
                    assert err.value.param == field
            for messages, message in [
                ([{"role": "tool", "content": "x"}], "messages[0].role = 'tool': must be one of system, developer, user"),
                ([{"role": "user", "content": 3}], "messages[0].content = 3: must be a string"),
                ([], "messages = []: must be a non-empty list"),
            ]:
                with pytest.raises(openai.BadRequestError, match=r".*") as err:
                    await api.chat.completions.create(model="tiny", messages=messages)
                assert message in err.value.message
            hi: Any = [{"role": "user", "content": "hi"}]
            tool: Any = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
            for extra, message in [({"tools": [tool]}, "tools = [{'type': 'function', 'function': {'name': 'f', "),
                                   ({"tool_choice": "auto"}, "tool_choice = 'auto': tools are not supported"),
                                   ({"parallel_tool_calls": "no"}, "parallel_tool_calls = 'no': must be true or")]:
                with pytest.raises(openai.BadRequestError) as err:
                    await api.chat.completions.create(model="tiny", messages=hi, extra_body=extra)
                assert message in err.value.message and err.value.param == next(iter(extra)), err.value.message
            async with http.post(f"{url}/v1/completions", data=b"{not json") as resp:
                assert resp.status == 400
                assert (await resp.json())["error"]["message"].startswith("the request body is not valid JSON")
            assert backend.started == 0
            # The neutral values agent frameworks send with every request are no-ops.
            done = await api.chat.completions.create(model="tiny", messages=hi, max_tokens=2, tools=[],
                                                     tool_choice="none", parallel_tool_calls=False)
            assert done.choices[0].finish_reason in ("length", "stop")

    asyncio.run(scenario())


class Refusing:
    """A backend whose pipeline is down: it refuses every sequence."""

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[int]:
        raise GenerationError(503, "the pipeline of job x has failed: worker 1.0 exited")
        yield 0  # pragma: no cover - makes this an async generator


def test_a_refusing_backend_gives_its_status_streamed_or_not() -> None:
    async def scenario() -> None:
        async with serve(Refusing()) as url, client(url) as api:
            for stream in (False, True):
                with pytest.raises(openai.InternalServerError, match="worker 1.0 exited") as err:
                    await api.completions.create(model="tiny", prompt="hi", stream=stream)
                assert err.value.status_code == 503

    asyncio.run(scenario())


# -- through the controller ---------------------------------------------------------------------


JOB = """
name = "chat"

[model]
source = "builtin:gpt2-tiny"

[pipeline]
stages = 2

[generation]
"""


def test_controller_routes_model_to_the_job_and_streams_through(model: Any, tmp_path: Any) -> None:
    async def scenario() -> None:
        backend = ReferenceBackend(model)
        async with (controller(make_cfg(tmp_path)) as ctl, aiohttp.ClientSession() as http,
                    client(ctl.url, api_key=TOKEN) as api):
            rest = Api(http, ctl.url)
            port = _free_port()
            agent = FakeAgent(http, ctl.url, devices=3, port_range=(port, port + 20))
            await agent.connect()
            agent.start_beating()  # the scenario below can keep the socket quiet past the 5 s timeout
            _, job = await submit_inspected(rest, agent, JOB)
            deploy = await agent.expect(Deploy)

            with pytest.raises(openai.APIStatusError, match=f"job {job['id']} is deploying") as conflict:
                await api.completions.create(model="chat", prompt="hi")
            assert conflict.value.status_code == 409
            await agent.report(job["id"], deploy.nodes, "ready")
            await wait_state(ctl, job["id"], "running")
            assert [m.id for m in (await api.models.list()).data] == [job["id"]]

            with pytest.raises(openai.NotFoundError) as err:
                await api.completions.create(model="nope", prompt="hi")
            assert err.value.message.endswith(f"- The model 'nope' does not exist; running jobs: chat ({job['id']})")
            assert isinstance(err.value.body, dict) and err.value.body["code"] == "model_not_found"
            with pytest.raises(openai.InternalServerError, match="unreachable") as down:
                await api.completions.create(model="chat", prompt="hi")
            assert down.value.status_code == 502

            async with serve(backend, port=deploy.dispatcher_port, token=deploy.service_token):
                kw: Any = dict(prompt="Hello", max_tokens=10, temperature=0, extra_body=NO_EOS)
                done = await api.completions.create(model="chat", **kw)
                assert done.choices[0].finish_reason == "length" and done.model == "chat"
                text, chunks = await collect(await api.completions.create(model=job["id"], stream=True, **kw))
                assert text == done.choices[0].text and chunks[-1].choices[0].finish_reason == "length"
                chat = await api.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}],
                                                         max_tokens=4, extra_body=NO_EOS)
                assert chat.usage is not None and chat.usage.completion_tokens == 4
                with pytest.raises(openai.BadRequestError, match="temperature = 9: must be a number from 0 to 2"):
                    await api.completions.create(model="chat", prompt="hi", temperature=9)

                stream = await api.completions.create(model="chat", prompt="Hello", max_tokens=200, stream=True,
                                                      extra_body=NO_EOS)
                async for _ in stream:
                    break
                await stream.close()
                await asyncio.wait_for(backend.cancelled_event.wait(), 10)
                assert backend.cancelled == 1

    asyncio.run(scenario())


def test_choices_prompts_echo_logprobs_and_logit_processors(model: Any) -> None:
    """n, a list of prompts, echo, logprobs / top_logprobs / prompt_logprobs, logit_bias,
    penalties and min_tokens through the official client, checked against the model itself."""
    import torch

    prompt = TOK.encode("Once upon")
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt])).logits[0].float()  # [T, V]
    logp = torch.log_softmax(logits, dim=-1)
    greedy = int(logits[-1].argmax())

    async def scenario() -> None:
        backend = ReferenceBackend(model)
        async with serve(backend) as url, client(url) as api:
            # Two prompts x n = 2, seeded: indices prompt-major, seeded choices differ and repeat.
            kw: Any = dict(model="tiny", prompt=["Once upon", prompt], max_tokens=4, n=2, temperature=1.0, seed=5,
                           extra_body=NO_EOS)
            done = await api.completions.create(**kw)
            texts = [c.text for c in sorted(done.choices, key=lambda c: c.index)]
            assert [c.index for c in done.choices] == [0, 1, 2, 3] and texts[0] != texts[1]
            assert texts[:2] == texts[2:]  # the same prompt as text and as ids
            assert done.usage.prompt_tokens == 2 * len(prompt) and done.usage.completion_tokens == 16
            assert [c.text for c in (await api.completions.create(**kw)).choices] == texts
            streamed: dict[int, str] = {}
            async for chunk in await api.completions.create(**kw, stream=True):
                for c in chunk.choices:
                    streamed[c.index] = streamed.get(c.index, "") + c.text
            assert [streamed[i] for i in range(4)] == texts

            # lm-eval's loglikelihood request: echo + logprobs, the prompt's tokens scored.
            scored = await api.completions.create(model="tiny", prompt=prompt, max_tokens=1, temperature=0, echo=True,
                                                  logprobs=1, extra_body=NO_EOS)
            lp = scored.choices[0].logprobs
            assert scored.choices[0].text == TOK.decode(prompt) + TOK.decode([greedy])
            assert lp.token_logprobs[0] is None and len(lp.tokens) == len(prompt) + 1
            expected = [logp[i, prompt[i + 1]].item() for i in range(len(prompt) - 1)]
            assert lp.token_logprobs[1:-1] == pytest.approx(expected, abs=1e-4)
            assert lp.token_logprobs[-1] == pytest.approx(logp[-1, greedy].item(), abs=1e-4)
            assert max(lp.top_logprobs[-1].values()) == pytest.approx(lp.token_logprobs[-1], abs=1e-4)
            assert lp.text_offset[1] == len(lp.tokens[0])
            vllm = await api.completions.create(model="tiny", prompt=prompt, max_tokens=1,
                                                extra_body={"prompt_logprobs": 0, **NO_EOS})
            extra = vllm.choices[0].model_extra or {}
            assert extra["prompt_logprobs"][0] is None
            assert extra["prompt_logprobs"][1][str(prompt[1])]["logprob"] == pytest.approx(expected[0], abs=1e-4)

            # Chat: logprobs = true with top_logprobs; role developer; refusal null.
            chat = await api.chat.completions.create(model="tiny", messages=[{"role": "developer", "content": "hi"}],
                                                     max_tokens=3, temperature=0, logprobs=True, top_logprobs=2,
                                                     extra_body=NO_EOS)
            content = chat.choices[0].logprobs.content
            assert len(content) == 3 and all(len(t.top_logprobs) == 2 for t in content)
            assert content[0].top_logprobs[0].logprob == pytest.approx(content[0].logprob, abs=1e-4)
            assert "".join(t.token for t in content) == chat.choices[0].message.content

            # logit_bias +100 picks the token; a repetition penalty changes greedy output; min_tokens holds eos back.
            forced = await api.completions.create(model="tiny", prompt=prompt, max_tokens=3, temperature=0,
                                                  logit_bias={"65": 100}, extra_body=NO_EOS)
            assert forced.choices[0].text == TOK.decode([65, 65, 65])
            # A special token the model generates: its log-probability entry names it; the text
            # leaves it out unless skip_special_tokens is false (vLLM's default and field).
            eos: Any = dict(model="tiny", prompt=prompt, max_tokens=2, temperature=0, logprobs=0, logit_bias={"0": 100})
            for skip, text in ((None, ""), (False, "<|endoftext|>" * 2)):
                body = {**NO_EOS} if skip is None else {**NO_EOS, "skip_special_tokens": skip}
                special = (await api.completions.create(**eos, extra_body=body)).choices[0]
                assert special.text == text and special.logprobs.tokens == ["<|endoftext|>"] * 2
            plain = (await api.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0,
                                                  extra_body=NO_EOS)).choices[0].text
            penalised = await api.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0,
                                                     frequency_penalty=2.0, extra_body={"repetition_penalty": 5.0,
                                                                                        **NO_EOS})
            assert penalised.choices[0].text != plain
            eos_now = await api.completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=0,
                                                   logit_bias={str(TOK.eos_token_id): 100},
                                                   extra_body={"min_tokens": 3})
            assert eos_now.usage.completion_tokens == 4 and eos_now.choices[0].finish_reason == "stop"

    asyncio.run(scenario())
