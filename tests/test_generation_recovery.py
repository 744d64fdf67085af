"""Generation survives a dead replica chain (issue 12): its sequences continue on a surviving
chain with no gap and no repeated token, greedy ones equal to HF generate, seeded sampled ones
(penalties and min_tokens included) equal to the single-process reference, i.e. to a run without
the fault; with no chain left they wait, and time out with a reason that says what they waited for.

Real worker processes over gloo, LocalJob's own recovery ([recovery]: the lost chain is
replaced by a new one); the fault is a SIGKILL of a stage-1 worker mid-stream.
"""

from __future__ import annotations

import asyncio
import os
import signal
from dataclasses import replace
from typing import Any

import pytest
import torch
from cluster import fork_server
from test_generation_pipeline import Collected, wait_for

from infscaled.config import parse_job
from infscaled.controller.job import JobState
from infscaled.generation.gpu_sampling import sample_async
from infscaled.generation.params import Sampled, SamplingParams
from infscaled.generation.reference import ReferenceBackend
from infscaled.generation.sampling import make_generator, resume_sampling, sample_step, skip_draws
from infscaled.models.sources import resolve
from infscaled.models.stage import Monolith
from infscaled.protocol.generation import SequenceSpec, decode_specs, encode_specs
from infscaled.protocol.plan import Node
from infscaled.runner.launcher import LocalJob, prepare


def hf_greedy_batch(mono: Monolith, prompts: list[list[int]], new: int) -> list[list[int]]:
    """HF generate (greedy) of prompts of one length, in one batch."""
    ids = torch.tensor(prompts)
    with torch.inference_mode():
        out = mono.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                                  pad_token_id=0, eos_token_id=None)
    return out[:, ids.shape[1]:].tolist()


def sampled(seed: int, new: int, **extra: Any) -> SamplingParams:
    return SamplingParams(max_new_tokens=new, temperature=0.9, top_k=40, top_p=0.95, seed=seed, **extra)


def recovering_job(chains: int, **generation: Any) -> Any:
    return parse_job({"name": "genft", "model": {"source": "builtin:gpt2-tiny"},
                      "pipeline": {"stages": 2, "replicas": [chains, chains], "graph": "parallel"},
                      "generation": {"max_batch_sequences": 4, "kv_budget_tokens": 2048, **generation},
                      "recovery": {"enabled": True}})


def expected_tokens(mono: Monolith, prompts: list[list[int]], params: list[SamplingParams], greedy: int
                    ) -> list[list[int]]:
    """The first `greedy` sequences (prompts of one length) by HF generate, the others (seeded
    sampling) by the single-process reference, which is what the pipeline gives without a fault
    (test_generation_pipeline checks that)."""
    reference = ReferenceBackend(mono.model)

    async def one(p: list[int], sp: SamplingParams) -> list[int]:
        return [t.token if isinstance(t, Sampled) else t async for t in reference.generate(p, sp)]

    head = hf_greedy_batch(mono, prompts[:greedy], params[0].max_new_tokens) if greedy else []
    return head + [asyncio.run(one(p, sp)) for p, sp in zip(prompts[greedy:], params[greedy:], strict=True)]


def tokens_of(c: Collected) -> list[int]:
    return [t.token if isinstance(t, Sampled) else t for t in c.tokens]


def test_sequences_of_a_killed_chain_continue_on_the_other_exactly() -> None:
    new = 64
    cfg = recovering_job(2)
    gen = torch.Generator().manual_seed(11)
    # Greedy prompts of one length: HF generate does them in one batch, with no padding.
    prompts = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (6, 6, 6, 6, 6, 9, 3, 12, 7, 4)]
    params = ([SamplingParams(max_new_tokens=new, temperature=0.0)] * 5
              + [sampled(1, new), sampled(2, new), sampled(3, new, logprobs=2),
                 sampled(4, new, frequency_penalty=0.6, presence_penalty=0.4, repetition_penalty=1.3),
                 sampled(5, new, min_tokens=new - 5, stop_token_ids=(7, 9))])
    want = expected_tokens(Monolith(resolve(cfg.model.source), "cpu", "float32", 0), prompts, params, 5)
    with LocalJob(prepare(cfg)) as job:
        seqs = job.generator
        got = [Collected() for _ in prompts]
        for p, sp, c in zip(prompts, params, got, strict=True):
            seqs.submit(p, sp, c)
        wait_for(lambda: all(len(c.tokens) >= 3 for c in got), "every stream's first tokens")
        victim = job.group.handles[Node(1, 1)].process.pid
        assert victim is not None
        os.kill(victim, signal.SIGSTOP)  # chain 1 freezes mid-stream, then dies
        cut = [len(c.tokens) for c in got]
        os.kill(victim, signal.SIGKILL)
        for c in got:
            assert c.done.wait(120), "a stream never ended"
        assert [c.error for c in got] == [None] * len(got)
        assert [tokens_of(c) for c in got] == want
        assert seqs.replayed >= 1 and any(n < len(w) for n, w in zip(cut, want, strict=True))
        assert job.state.failure is None
        # Chain 1's survivor was retired (the dispatcher's STOP or the supervisor's, whichever came first),
        # and the replacement chain joined (waiting for it also keeps the job's stop from cutting its start short).
        wait_for(lambda: not job.group.handles[Node(0, 1)].process.is_alive(), "0.1 to retire")
        assert job.recoverer is not None and job.recoverer.wait_state(JobState.RUNNING, 120)
        wait_for(lambda: {c.replica for c in seqs.chains.values()} == {0, 2}, "the new chain 2 to open")


def test_with_no_chain_left_sequences_wait_for_the_replacement_and_continue_exactly() -> None:
    """The only chain dies mid-stream: its sequences wait (a new one, with a short timeout, times
    out saying what it waited for) and continue exactly on the replacement chain."""
    cfg = recovering_job(1)
    prompts = [[5, 6, 7, 8, 9], [11, 12, 13]]
    params = [SamplingParams(max_new_tokens=80, temperature=0.0), sampled(9, 80, presence_penalty=0.5)]
    want = expected_tokens(Monolith(resolve(cfg.model.source), "cpu", "float32", 0), prompts, params, 1)
    with LocalJob(prepare(cfg)) as job:
        seqs = job.generator
        got = [Collected() for _ in prompts]
        for p, sp, c in zip(prompts, params, got, strict=True):
            seqs.submit(p, sp, c)
        wait_for(lambda: all(len(c.tokens) >= 2 for c in got), "the first tokens")
        victim = job.group.handles[Node(1, 0)].process.pid
        assert victim is not None
        os.kill(victim, signal.SIGSTOP)
        assert not any(c.done.is_set() for c in got)
        # No chain serves until the replacement has started: hold its start (the fork server every
        # member is forked from, worker/start.py, answers once continued) while a late request times out.
        server = fork_server()
        if server is not None:
            server.suspend()
        try:
            os.kill(victim, signal.SIGKILL)
            wait_for(lambda: seqs.replayed == 2, "the sequences to wait for a chain")
            seqs.request_timeout_s = 1.0
            late = Collected()
            seqs.submit(prompts[0], SamplingParams(max_new_tokens=4, temperature=0.0), late)
            assert late.done.wait(30) and late.tokens == []
        finally:
            if server is not None:
                server.resume()
        # Lost by its death's declaration or, first, by its broken edge to the dispatcher: either names 1.0.
        assert late.error is not None and late.error.startswith(
            "timed out after 1 s waiting for a live replica chain (replica chain 0 lost: ") and "1.0" in late.error
        for c in got:
            assert c.done.wait(120), "a stream never ended"
        assert [c.error for c in got] == [None, None]
        assert [tokens_of(c) for c in got] == want
        assert {c.replica for c in seqs.chains.values()} == {1}  # the replacement chain
        assert job.state.failure is None


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_replayed_sequence_samples_what_it_would_have_without_the_fault(device: str) -> None:
    """The sampler state rebuilt from a replay's SequenceSpec alone continues a sequence exactly:
    the seeded generator skips the draws already made (in a batch with other sequences, which
    draw from their own generators), penalties and min_tokens see the tokens so far,
    max_new_tokens counts them; on both sampling paths (sample_step, sample_async)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    vocab, steps, cut = 97, 12, 5
    logits = (torch.randn(steps, 3, vocab, generator=torch.Generator().manual_seed(0)) * 3).to(device)
    prompt = (4, 8, 15, 16, 23)
    cases = [SamplingParams(max_new_tokens=steps, temperature=0.8, top_p=0.9, seed=42),
             SamplingParams(max_new_tokens=steps, temperature=1.1, top_k=20, seed=7, frequency_penalty=1.5,
                            presence_penalty=0.5, repetition_penalty=1.4, min_tokens=steps, stop_token_ids=(3,))]
    for params in cases:
        # Without the fault: row 1 of a batch whose other rows sample too.
        batch = [resume_sampling(SequenceSpec(s, len(prompt), 64, replace(params, seed=s * 100 + 1) if s != 1
                                              else params, 0, prompt), vocab, device) for s in range(3)]
        straight = [sample_step(logits[i], batch)[0][1] for i in range(steps)]
        history = params.needs_history
        spec = SequenceSpec(1, len(prompt) + cut, 64, params, cut, prompt, tuple(straight[:cut]) if history else ())
        assert decode_specs(encode_specs([spec])) == [spec]
        resumed = resume_sampling(spec, vocab, device)
        assert resumed.produced == cut
        if history:
            rest = [sample_step(logits[i, 1:2], [resumed])[0][0] for i in range(cut, steps)]
        else:  # the hot path's sampler
            rest = [sample_async(logits[i, 1:2], [params], [resumed.generator]).tokens()[0]
                    for i in range(cut, steps)]
        assert rest == straight[cut:], params
    # skip_draws draws what the steps drew, one row at a time.
    a, b = make_generator(5, device), make_generator(5, device)
    for _ in range(3):
        noise = torch.empty(4, vocab, device=device)
        noise[2].exponential_(generator=a)
    skip_draws(b, 3, vocab)
    assert torch.equal(torch.empty(vocab, device=device).exponential_(generator=a),
                       torch.empty(vocab, device=device).exponential_(generator=b))


def test_sequence_spec_rejects_generated_ids_that_do_not_match_produced() -> None:
    from infscaled.errors import WireError

    with pytest.raises(WireError, match="produced 3, 2 generated ids are inconsistent"):
        SequenceSpec(1, 8, 20, SamplingParams(max_new_tokens=5), 3, (), (1, 2))
