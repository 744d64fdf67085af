"""Third-party clients against `infscaled serve`, unmodified: aiperf's load test (its own TTFT,
inter-token latency and throughput, and the server's Prometheus histograms it scrapes from
/metrics), guidellm's Poisson-arrival run over streamed chat completions (it asks for vLLM's
per-chunk usage, `stream_options.continuous_usage_stats`) and lm-eval's `local-completions` on
two tiny local tasks (generate_until, and a multiple-choice one scored by loglikelihood, which
needs the job's engine to report log-probabilities).

    python -m benchmarks.serve_clients [--job configs/jobs/llama-generate.toml] [--aiperf PATH]
                                      [--guidellm PATH] [--requests 96] [--concurrency 8]
                                      [--rate 4] [--out out/bench]

aiperf and guidellm run from their own environments (`--aiperf`, `--guidellm`, default: on PATH;
each skipped when absent), since they pin their own dependencies; lm-eval from this one.
Writes serve_clients.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "infscaled" / "models" / "builtin_tokenizer"
SERVE_TIMEOUT_S = 300.0

MC = [{"question": "Which is larger, 7 or 9?", "choices": ["7", "9"], "answer": 1},
      {"question": "Is the sky blue?", "choices": ["Yes", "No"], "answer": 0},
      {"question": "What is the capital of France?", "choices": ["Paris", "Rome", "Oslo"], "answer": 0},
      {"question": "Pick a colour.", "choices": ["red", "green", "blue", "yellow"], "answer": 2}]
GEN = [{"question": "Q: What is the capital of France?\nA:", "answer": " Paris"},
       {"question": "Q: Is the sky blue?\nA:", "answer": " Yes"},
       {"question": "Once upon a time", "answer": " there"}]
MC_TASK = """task: infscaled_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""
GEN_TASK = """task: infscaled_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n", "\\nclass", "\\ndef", "\\n#", "Q:"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
"""


def write_lm_eval_tasks(directory: Path) -> list[str]:
    """The two tiny tasks as YAML + JSONL files in `directory`; returns their names."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, rows, template in (("infscaled_mc", MC, MC_TASK), ("infscaled_gen", GEN, GEN_TASK)):
        data = directory / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (directory / f"{name}.yaml").write_text(template.format(data=data))
    return ["infscaled_mc", "infscaled_gen"]


def lm_eval_command(url: str, model: str, token: str, tasks: list[str], include: Path, out: Path,
                    limit: int = 4) -> list[str]:
    args = (f"model={model},base_url={url}/v1/completions,tokenizer_backend=remote,auth_token={token},"
            "max_length=256,num_concurrent=2,max_retries=1,timeout=120")
    return [sys.executable, "-m", "lm_eval", "run", "--model", "local-completions", "--model_args", args,
            "--tasks", ",".join(tasks), "--include_path", str(include), "--limit", str(limit), "--batch_size", "2",
            "--output_path", str(out)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Served:
    """`infscaled serve JOB` in a subprocess with its own state directory (and so its own token)."""

    def __init__(self, job: str, state_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "INFSCALED_STATE_DIR": str(state_dir), "HF_HUB_OFFLINE": "1",
                    "PYTHONPATH": str(ROOT)}
        self.env.pop("INFSCALED_TOKEN", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "infscaled.cli", "serve", job, "--port", str(self.port)],
                                     env=self.env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.model = ""
        deadline = time.monotonic() + SERVE_TIMEOUT_S
        assert self.proc.stdout is not None
        for line in self.proc.stdout:  # the "serving" lines come once the job runs
            if line.strip().startswith("model:"):
                self.model = line.split()[1]
                break
            if time.monotonic() > deadline:
                break
        if not self.model:
            self.stop()
            raise RuntimeError(f"serve did not start within {SERVE_TIMEOUT_S:g} s")
        self.token = subprocess.run([sys.executable, "-m", "infscaled.cli", "token"], env=self.env, cwd=ROOT,
                                    capture_output=True, text=True, check=True).stdout.strip()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def scrape_histograms(url: str, model: str) -> dict[str, dict[str, float]]:
    """The server's vLLM-named histograms for `model`: count, mean and p50 / p90 (bucket upper edges)."""
    text = urllib.request.urlopen(f"{url}/metrics", timeout=30).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        if family.type != "histogram" or not family.name.startswith("infscaled:"):
            continue
        samples = [s for s in family.samples if s.labels.get("model_name") == model]
        count = next((s.value for s in samples if s.name.endswith("_count")), 0.0)
        total = next((s.value for s in samples if s.name.endswith("_sum")), 0.0)
        buckets = sorted((float(s.labels["le"]), s.value) for s in samples if s.name.endswith("_bucket"))
        row = {"count": count, "mean_s": total / count if count else 0.0}
        for q in (0.5, 0.9):
            row[f"p{int(q * 100)}_le_s"] = next((le for le, c in buckets if count and c >= q * count), float("inf"))
        out[family.name.removeprefix("infscaled:")] = row
    return out


def run_aiperf(aiperf: str, served: Served, requests: int, concurrency: int, out: Path) -> dict[str, Any]:
    artifacts = out / "aiperf"
    shutil.rmtree(artifacts, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}  # its offline mode wants a hub id
    cmd = [aiperf, "profile", "--model", served.model, "--url", served.url, "--endpoint-type", "completions",
           "--streaming", "--api-key", served.token, "--tokenizer", str(TOKENIZER), "--use-server-token-count",
           "--prompt-input-tokens-mean", "32", "--prompt-input-tokens-stddev", "0",
           "--prompt-output-tokens-mean", "32", "--prompt-output-tokens-stddev", "0",
           "--extra-inputs", "ignore_eos:true", "--request-count", str(requests), "--concurrency", str(concurrency),
           "--random-seed", "1", "--ui", "none", "--output-artifact-dir", str(artifacts), "--workers-max", "2"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    (out / "aiperf.log").write_text(run.stdout + run.stderr)
    if run.returncode != 0:
        raise RuntimeError(f"aiperf exited {run.returncode}; see {out / 'aiperf.log'}")
    doc = json.loads((artifacts / "profile_export_aiperf.json").read_text())
    server = json.loads((artifacts / "server_metrics_export.json").read_text())
    return {
        "requests": requests, "concurrency": concurrency, "input_tokens": 32, "output_tokens": 32,
        "request_throughput_rps": doc["request_throughput"]["avg"],
        "output_token_throughput_tps": doc["output_token_throughput"]["avg"],
        "ttft_ms": {k: doc["time_to_first_token"][k] for k in ("avg", "p50", "p99")},
        "itl_ms": {k: doc["inter_token_latency"][k] for k in ("avg", "p50", "p99")},
        "errors": doc.get("error_summary") or [],
        "server_series_scraped": sorted(k for k in server.get("metrics", {}) if k.startswith("infscaled:")),
    }


def run_guidellm(guidellm: str, served: Served, requests: int, rate: float, out: Path) -> dict[str, Any]:
    """guidellm's Poisson profile at `rate` requests/s, `requests` streamed chat completions of 32
    prompt and 32 output tokens (it sends ignore_eos and per-chunk usage)."""
    artifacts = out / "guidellm"
    shutil.rmtree(artifacts, ignore_errors=True)
    artifacts.mkdir(parents=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [guidellm, "run", "--backend", f"kind=openai_http,target={served.url},api_key={served.token}",
           "--profile", f"kind=poisson,rate={rate:g}", "--constraint", f"kind=max_requests,count={requests}",
           "--data", "kind=synthetic_text,prompt_tokens=32,output_tokens=32",
           "--tokenizer", f"kind=hf_auto,model={TOKENIZER}", "--output", "kind=json",
           "--disable-console-interactive"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=artifacts)
    (out / "guidellm.log").write_text(run.stdout + run.stderr)
    if run.returncode != 0:
        raise RuntimeError(f"guidellm exited {run.returncode}; see {out / 'guidellm.log'}")
    bench = json.loads((artifacts / "benchmarks.json").read_text())["benchmarks"][0]["metrics"]

    def ok(name: str) -> dict[str, float]:
        stats = bench[name]["successful"]
        return {"mean": stats["mean"], "p50": stats["percentiles"]["p50"], "p99": stats["percentiles"]["p99"]}

    totals = bench["request_totals"]
    return {
        "requests": requests, "rate_rps": rate, "input_tokens": 32, "output_tokens": 32,
        "successful": totals["successful"], "errored": totals["errored"], "incomplete": totals["incomplete"],
        "output_tokens_per_second": bench["output_tokens_per_second"]["successful"]["mean"],
        "ttft_ms": ok("time_to_first_token_ms"), "itl_ms": ok("inter_token_latency_ms"),
        "output_tokens_per_request": ok("output_token_count"),
    }


def run_lm_eval(served: Served, out: Path) -> dict[str, Any]:
    include = out / "lm_eval_tasks"
    tasks = write_lm_eval_tasks(include)
    env = {**os.environ, "OPENAI_API_KEY": served.token, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    results = {}
    for task in tasks:  # one run each, so a task the engine cannot score does not hide the other
        run = subprocess.run(lm_eval_command(served.url, served.model, served.token, [task], include,
                                             out / "lm_eval"), env=env, capture_output=True, text=True, timeout=900)
        (out / f"lm_eval_{task}.log").write_text(run.stdout + run.stderr)
        results[task] = {"exit": run.returncode,
                         "table": [line for line in run.stdout.splitlines() if line.startswith("|")]}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", default="configs/jobs/llama-generate.toml")
    parser.add_argument("--aiperf", default=shutil.which("aiperf"), help="aiperf executable (its own venv)")
    parser.add_argument("--guidellm", default=shutil.which("guidellm"), help="guidellm executable (its own venv)")
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--concurrency", type=int, default=8, help="aiperf's concurrent requests")
    parser.add_argument("--rate", type=float, default=4.0, help="guidellm's Poisson arrival rate, requests/s")
    parser.add_argument("--out", type=Path, default=Path("out/bench"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"job": args.job, "loadavg_at_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="infscaled-serve-bench-") as state:
        served = Served(args.job, Path(state))
        try:
            if args.aiperf:
                doc["aiperf"] = run_aiperf(args.aiperf, served, args.requests, args.concurrency, args.out)
                doc["server_histograms"] = scrape_histograms(served.url, served.model)
            else:
                print("aiperf not found (pass --aiperf PATH): load test skipped")
            if args.guidellm:
                doc["guidellm"] = run_guidellm(args.guidellm, served, args.requests, args.rate, args.out)
            else:
                print("guidellm not found (pass --guidellm PATH): Poisson run skipped")
            doc["lm_eval"] = run_lm_eval(served, args.out)
        finally:
            served.stop()
    (args.out / "serve_clients.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
