"""`rft api`: what serving jobs through OpenAI's API costs, and how fast chat completions answer.

1. Job overhead: a reinforcement job on rft-tiny submitted through the openai SDK (upload, create,
   poll until `succeeded`: file validation, queueing, the worker process, the pipeline flow, the
   recording of its result) against `rft run` on exactly the job's config (the `config.yaml` the
   server wrote for it, with another output directory), each started from nothing (tiny model
   pretraining, Prefect's temporary server, MLflow store). With `--repeats 2` they alternate
   (API, rft run, rft run, API) so that a drift of the machine's load weighs on both sides alike.
   Overhead = median API time / median rft run time - 1.
2. Chat latency: greedy chat completions (temperature 0, the job's `eval.max_new_tokens`) on the
   job's fine-tuned model, from 1 client and from 8 concurrent clients: p50 / p95 latency,
   requests per second, and (1 client, streamed) the time to the first content chunk.

Both sides run with the same thread settings (`--threads`, default 2: OMP_NUM_THREADS for the
server, its workers and `rft run`).

    python bench/api.py --out bench/results/api.json [--iterations 40] [--repeats 2] [--requests 40]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TERMINAL = ("succeeded", "failed", "cancelled")
GRADER = {"type": "string_check", "name": "final_answer", "operation": "like",
          "input": "{{ sample.output_text }}", "reference": "#### {{ item.reference_answer }}"}
QUESTION = "Ann has 3 pens. Bob has 4 more pens than Ann. How many pens does Bob have?"


def base_config(iterations: int) -> dict:
    return {
        "model": {"tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128,
                           "vocab_size": 384, "pretrain_steps": 100}},
        "rl": {"iterations": iterations, "prompts_per_iteration": 8, "samples_per_prompt": 4, "minibatch_size": 16,
               "max_new_tokens": 32, "eval_interval": 10, "checkpoint_interval": 10, "critic_warmup": 0},
        "eval": {"max_new_tokens": 32, "k": 0},
    }


def data_files(root: Path) -> tuple[Path, Path]:
    from rft_core.config import SyntheticConfig
    from rft_core.data.synthetic import generate_arithmetic

    train, val = generate_arithmetic(SyntheticConfig(n_train=256, n_val=32, max_steps=2, seed=1))

    def row(item: dict) -> dict:
        return {"messages": [{"role": "user", "content": item["question"]}],
                "reference_answer": item["answer"].rsplit("####", 1)[1].strip()}

    paths = []
    for name, items in (("train", train), ("val", val)):
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row(i)) + "\n" for i in items))
        paths.append(path)
    return paths[0], paths[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def env(threads: int) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {
        "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120", "RFT_API_KEYS": "bench-key",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }


def start_server(root: Path, config: Path, threads: int) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    log = open(root / "server.log", "wb")  # noqa: SIM115 - the server's for its life
    proc = subprocess.Popen([sys.executable, "-m", "rft", "api", "--port", str(port), "--data-dir", str(root / "data"),
                             "--config", str(config)], env=env(threads), stdout=log, stderr=subprocess.STDOUT, cwd=root)
    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(600):
        try:
            if httpx.get(url + "/models", headers={"Authorization": "Bearer bench-key"}, timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("rft api did not start; see " + str(root / "server.log"))


def api_job(client, train: Path, val: Path) -> tuple[object, float]:
    """Upload, create, poll: the seconds from the first upload to `succeeded`."""
    started = time.perf_counter()
    with open(train, "rb") as f:
        train_id = client.files.create(file=f, purpose="fine-tune").id
    with open(val, "rb") as f:
        val_id = client.files.create(file=f, purpose="fine-tune").id
    job = client.fine_tuning.jobs.create(model="rft-tiny", training_file=train_id, validation_file=val_id,
                                         method={"type": "reinforcement", "reinforcement": {"grader": GRADER}})
    while job.status not in TERMINAL:
        time.sleep(0.25)
        job = client.fine_tuning.jobs.retrieve(job.id)
    seconds = time.perf_counter() - started
    if job.status != "succeeded":
        raise RuntimeError(f"the job {job.id} ended {job.status}: {job.error}")
    return job, seconds


def rft_run(job_config: Path, root: Path, threads: int, index: int = 0) -> float:
    """`rft run` on the job's own config, in another output directory (and its own MLflow store)."""
    out = root / f"rft-run-{index}"
    cmd = [sys.executable, "-m", "rft", "run", "--config", str(job_config), "--json",
           "--set", f"output_dir={out}", "--set", f"tracking.tracking_uri=sqlite:///{out / 'mlflow.db'}"]
    started = time.perf_counter()
    result = subprocess.run(cmd, env=env(threads), capture_output=True, text=True, cwd=root)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError("rft run failed:\n" + result.stderr[-3000:])
    return seconds


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def latency(client, model: str, clients: int, requests: int) -> dict[str, float]:
    """`requests` greedy completions per client, `clients` threads at once."""
    times: list[float] = []
    lock = threading.Lock()

    def one_client() -> None:
        for _ in range(requests):
            t = time.perf_counter()
            client.chat.completions.create(model=model, temperature=0,
                                           messages=[{"role": "user", "content": QUESTION}])
            with lock:
                times.append(time.perf_counter() - t)

    started = time.perf_counter()
    threads = [threading.Thread(target=one_client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return {"clients": clients, "requests": len(times), "p50_ms": 1000 * percentile(times, 50),
            "p95_ms": 1000 * percentile(times, 95), "mean_ms": 1000 * statistics.fmean(times),
            "requests_per_s": len(times) / wall}


def first_chunk(client, model: str, requests: int) -> dict[str, float]:
    firsts, totals = [], []
    for _ in range(requests):
        t = time.perf_counter()
        stream = client.chat.completions.create(model=model, temperature=0, stream=True,
                                                messages=[{"role": "user", "content": QUESTION}])
        first = None
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - t
        totals.append(time.perf_counter() - t)
        firsts.append(first if first is not None else totals[-1])
    return {"requests": requests, "first_chunk_p50_ms": 1000 * percentile(firsts, 50),
            "first_chunk_p95_ms": 1000 * percentile(firsts, 95), "total_p50_ms": 1000 * percentile(totals, 50)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "api.json")
    parser.add_argument("--iterations", type=int, default=40, help="RL iterations of the job")
    parser.add_argument("--repeats", type=int, default=1, help="jobs per side (alternating API / rft run)")
    parser.add_argument("--requests", type=int, default=40, help="chat completions per client")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of every process")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()

    from openai import OpenAI

    root = Path(tempfile.mkdtemp(prefix="rft-bench-api-"))
    config = root / "base.yaml"
    config.write_text(yaml.safe_dump(base_config(args.iterations)))
    train, val = data_files(root)
    proc, url = start_server(root, config, args.threads)
    try:
        client = OpenAI(base_url=url, api_key="bench-key", max_retries=0, timeout=600)
        api_times, run_times = [], []
        for repeat in range(args.repeats):
            if repeat % 2 == 0:
                job, seconds = api_job(client, train, val)
                api_times.append(seconds)
                run_times.append(rft_run(root / "data" / "jobs" / job.id / "config.yaml", root, args.threads, repeat))
            else:
                run_times.append(rft_run(root / "data" / "jobs" / job.id / "config.yaml", root, args.threads, repeat))
                job, seconds = api_job(client, train, val)
                api_times.append(seconds)
        api_seconds, run_seconds = statistics.median(api_times), statistics.median(run_times)
        client.chat.completions.create(model=job.fine_tuned_model, temperature=0,
                                       messages=[{"role": "user", "content": QUESTION}])  # loads the model
        chat = [latency(client, job.fine_tuned_model, 1, args.requests),
                latency(client, job.fine_tuned_model, 8, max(1, args.requests // 4))]
        streamed = first_chunk(client, job.fine_tuned_model, max(5, args.requests // 2))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    report = {
        "job": {"id": job.id, "iterations": args.iterations, "api_s": api_seconds, "rft_run_s": run_seconds,
                "api_runs_s": api_times, "rft_run_runs_s": run_times, "overhead": api_seconds / run_seconds - 1.0},
        "chat": chat,
        "stream": streamed,
        "threads": args.threads,
        "load_average_after": os.getloadavg(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
    }
    print(f"\njob: {args.iterations} RL iterations on rft-tiny")
    print(f"  through the API  {api_seconds:8.1f} s  (runs: {', '.join(f'{t:.1f}' for t in api_times)})")
    print(f"  rft run          {run_seconds:8.1f} s  (runs: {', '.join(f'{t:.1f}' for t in run_times)})")
    print(f"  overhead         {100 * report['job']['overhead']:+7.1f} %")
    print("\nchat completions (greedy, the job's max_new_tokens)")
    print(f"  {'clients':>7} {'requests':>8} {'p50 ms':>8} {'p95 ms':>8} {'req/s':>7}")
    for row in chat:
        print(f"  {row['clients']:>7} {row['requests']:>8} {row['p50_ms']:>8.1f} {row['p95_ms']:>8.1f} "
              f"{row['requests_per_s']:>7.1f}")
    print(f"  streamed, 1 client: first chunk p50 {streamed['first_chunk_p50_ms']:.1f} ms, p95 "
          f"{streamed['first_chunk_p95_ms']:.1f} ms; whole answer p50 {streamed['total_p50_ms']:.1f} ms")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {args.out}" + (f"; kept {root}" if args.keep else ""))
    if not args.keep:
        import shutil

        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
