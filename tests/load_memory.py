"""Memory over a long run: train tiny models on 2 ranks through the `deepspeed` launcher for many tiny steps with
checkpoints, sample the resident memory (RSS) of both rank processes every 0.5 s from outside, and print an RSS table
and the growth between the second and the last quarter of the steps (also written to <output_dir>/memory.json).

    python tests/load_memory.py --steps 20000 --checkpoint-every 500 --output-dir /tmp/jsarag-load

tests/test_load.py runs the same measurement for 1,500 steps in CI.
"""
from __future__ import annotations

import argparse
import bisect
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil
import yaml

REPO = Path(__file__).resolve().parent.parent
MIB = 2**20


def recipe_dict(data_dir: Path | None, output_dir: Path, steps: int, checkpoint_every: int,
                full: bool = False) -> dict[str, Any]:
    """The cheapest real run: tiny models, batch 1, two candidates, short texts, evaluation only at the end; the
    generator trains LoRA adapters and the retriever is frozen (their embeddings' Adam steps would cost 2/3 of a
    step) unless ``full``."""
    return {
        "output_dir": str(output_dir),
        "data": {"dir": str(data_dir) if data_dir else None, "max_history_turns": 1},
        "retriever": {"name": "dense", "model": "jsarag/tiny-bert", "lr": 1e-4 if full else 0, "max_length": 32},
        "candidates": {"prior_top_k": 2},
        "index": {"name": "faiss"},
        "generator": {"name": "causal_lm", "model": "jsarag/tiny-gpt2", "lr": 1e-4, "max_passage_tokens": 16,
                      "max_prompt_tokens": 32, "max_answer_tokens": 8, "max_new_tokens": 2,
                      "lora": None if full else {"r": 4}},
        "estimator": {"name": "rag"},
        "observers": ["jsonl_log"],
        "train": {"max_steps": steps, "batch_size": 1, "seed": 0, "schedule": "constant", "eval_every": 0,
                  "checkpoint_every": checkpoint_every},
        "eval": {"max_examples": 2, "batch_size": 2},
        "deepspeed": {"config": "zero1.json"},
    }


@dataclass
class Sample:
    """Both ranks' RSS at one moment."""

    time: float
    rss: list[int]  # bytes, rank 0 first


def rank_processes(job: psutil.Process) -> list[psutil.Process]:
    """The job's rank processes (`... --local_rank=N ...`), rank 0 first."""
    ranks = {}
    for child in job.children(recursive=True):
        try:
            flags = [a for a in child.cmdline() if a.startswith("--local_rank=")]
        except psutil.Error:
            continue
        if flags:
            ranks[int(flags[0].split("=")[1])] = child
    return [ranks[r] for r in sorted(ranks)]


def run_and_sample(recipe: Path, output_dir: Path, ranks: int = 2, interval: float = 0.5,
                   timeout: float = 3600) -> list[Sample]:
    """Run the recipe under the launcher and sample its ranks' RSS until it ends; raise if it fails."""
    command = [shutil.which("deepspeed") or "deepspeed", "--num_gpus", str(ranks), "--master_port", str(_free_port()),
               "--module", "jsarag", "train", "--config", str(recipe)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    output_dir.mkdir(parents=True, exist_ok=True)
    samples: list[Sample] = []
    with (output_dir / "job.log").open("w") as log:
        job = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
        deadline = time.monotonic() + timeout
        try:
            while job.poll() is None and time.monotonic() < deadline:
                samples.extend(_sample(psutil.Process(job.pid), ranks))
                time.sleep(interval)
        finally:  # past the timeout, or interrupted: take the job down with us
            timed_out = job.poll() is None
            if timed_out:
                os.killpg(job.pid, signal.SIGKILL)
                job.wait()
        if timed_out:
            raise RuntimeError(f"the job ran past {timeout} s; see {output_dir / 'job.log'}")
    if job.returncode != 0:
        raise RuntimeError(f"the job exited {job.returncode}:\n{(output_dir / 'job.log').read_text()[-4000:]}")
    return samples


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sample(job: psutil.Process, ranks: int) -> list[Sample]:
    """One sample when every rank is running, else none."""
    try:
        processes = rank_processes(job)
        if len(processes) == ranks:
            return [Sample(time.time(), [p.memory_info().rss for p in processes])]
    except psutil.Error:  # a rank just ended
        pass
    return []


def summarise(samples: list[Sample], output_dir: Path) -> dict[str, Any]:
    """Tag samples with the step the run was at, and compare the median RSS of the second and last quarter of steps."""
    records = [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines()]
    step_times = [r["time"] for r in records if "loss" in r]
    steps = len(step_times)
    tagged = [(bisect.bisect_right(step_times, s.time), s) for s in samples]
    training = [(step, s) for step, s in tagged if 0 < step < steps]  # not start-up, not the final eval and save
    second = [s for step, s in training if steps / 4 < step <= steps / 2]
    last = [s for step, s in training if step > 3 * steps / 4]
    ranks = len(samples[0].rss)
    per_rank = []
    for rank in range(ranks):
        q2, q4 = statistics.median(s.rss[rank] for s in second), statistics.median(s.rss[rank] for s in last)
        per_rank.append({"rank": rank, "median_second_quarter_mib": q2 / MIB, "median_last_quarter_mib": q4 / MIB,
                         "growth_mib": (q4 - q2) / MIB, "peak_mib": max(s.rss[rank] for _, s in training) / MIB})
    seconds = step_times[-1] - step_times[0]
    return {"steps": steps, "training_seconds": seconds, "steps_per_second": (steps - 1) / seconds,
            "samples": len(training), "ranks": per_rank,
            "table": [{"step": step, "rss_mib": [round(r / MIB, 1) for r in s.rss]} for step, s in training]}


def table(summary: dict[str, Any], rows: int = 12) -> str:
    """A Markdown table of both ranks' RSS at evenly spaced steps, and the quarter medians."""
    samples = summary["table"]
    picked = [samples[round(i * (len(samples) - 1) / (rows - 1))] for i in range(rows)]
    ranks = len(picked[0]["rss_mib"])
    lines = ["| step | " + " | ".join(f"rank {r} RSS MiB" for r in range(ranks)) + " |",
             "|---:|" + "---:|" * ranks]
    lines += [f"| {row['step']} | " + " | ".join(f"{v:.1f}" for v in row["rss_mib"]) + " |" for row in picked]
    lines += [f"| median, steps {summary['steps'] // 4}-{summary['steps'] // 2} | " +
              " | ".join(f"{r['median_second_quarter_mib']:.1f}" for r in summary["ranks"]) + " |",
              f"| median, steps {3 * summary['steps'] // 4}-{summary['steps']} | " +
              " | ".join(f"{r['median_last_quarter_mib']:.1f}" for r in summary["ranks"]) + " |",
              "| growth | " + " | ".join(f"{r['growth_mib']:+.1f}" for r in summary["ranks"]) + " |"]
    return "\n".join(lines)


def measure(data_dir: Path | None, output_dir: Path, steps: int, checkpoint_every: int, full: bool = False,
            timeout: float = 3600) -> dict[str, Any]:
    """Write the recipe, run it, sample RSS, and write <output_dir>/run/memory.json; return the summary."""
    recipe = output_dir / "recipe.yaml"
    output_dir.mkdir(parents=True, exist_ok=True)
    run_dir = output_dir / "run"
    recipe.write_text(yaml.safe_dump(recipe_dict(data_dir, run_dir, steps, checkpoint_every, full)))
    samples = run_and_sample(recipe, run_dir, timeout=timeout)
    summary = summarise(samples, run_dir)
    (run_dir / "memory.json").write_text(json.dumps({**summary, "samples_raw": [asdict(s) for s in samples]}))
    return summary


def main(argv: list[str] | None = None) -> int:
    """Run the measurement from the command line and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--checkpoint-every", type=int, default=500)
    parser.add_argument("--data-dir", type=Path, default=None, help="default: the embedded DoQA cooking data")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/load-memory"))
    parser.add_argument("--full", action="store_true", help="train every weight (retriever, whole generator)")
    args = parser.parse_args(argv)
    if args.output_dir.exists() and any(args.output_dir.iterdir()):
        print(f"{args.output_dir} is not empty: choose another --output-dir", file=sys.stderr)
        return 2
    summary = measure(args.data_dir, args.output_dir, args.steps, args.checkpoint_every, args.full, 24 * 3600)
    print(f"{summary['steps']} steps in {summary['training_seconds']:.0f} s ({summary['steps_per_second']:.1f}/s), "
          f"{summary['samples']} RSS samples of each rank")
    print(table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
