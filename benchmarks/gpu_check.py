"""The prepared GPU check: one script of at most ~10 minutes on one GPU, writing one JSON of seconds per step,
tokens per second and peak GPU memory per job and estimator.

Jobs (each in its own process, so one failure does not stop the others; each writes its part as soon as it ends):

- ``train-zero0`` / ``train-zero3``: the tiny recipe (``tiny_rag``) on CUDA in bf16 under ZeRO-0 and ZeRO-3;
- ``train-torch-exact``: the same with the ``torch_exact`` index (the passage vectors and their search on the GPU);
- ``step-cost-135m`` / ``step-cost-1b``: ``jsarag bench step-cost`` (the paper's setting, K = 10) on the main
  recipe with a SmolLM2-135M-shaped and a 1B-shaped generator built from a config (random weights: no weights
  travel), LoRA on the last 8 layers; ``-full`` variants fine-tune every weight.

The retrievers are ``jsarag/tiny-bert`` (built from a config and carried; MiniLM's weights do not travel), so the
posterior is untrained: many distinct proposals per example, jsa's worst case.

    bash benchmarks/gpu_prepare.sh                # here: wheels into .whl/, tiny models and tokenizer into .gpu_carry/
    bash benchmarks/gpu_check.sh                  # on the GPU machine (the device tool's command): writes
                                                  #   $OUT/gpu_check.json and $OUT/gpu_check.log
    python benchmarks/gpu_check.py --dry-run      # here, on CPU: every job at toy sizes (checks the plumbing)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))  # shaped_models
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
TINY_RETRIEVER = ["retriever.model=jsarag/tiny-bert"]  # the posterior copies the prior's options
BENCH_ESTIMATORS = "jsa,jsa_plain:jsa,jsa_single:jsa,rag,vrag,floor:supervised"


def jobs(dry: bool) -> dict[str, dict]:
    """What each job runs: a training run (``train``: recipe overrides) or a step-cost benchmark (``bench``)."""
    steps = "train.max_steps=3" if dry else "train.max_steps=30"
    train = [steps, *TINY_RETRIEVER, "eval.max_examples=8", "eval.at_start=false", "train.checkpoint_every=0",
             "train.eval_every=0", "generator.dtype=auto"]
    rounds = ["--rounds", "1", "--warmup", "0"] if dry else ["--rounds", "5", "--warmup", "2"]
    lora = ["generator.lora.last_layers=2"] if dry else []  # the recipe's last 8 (of 30, or of 16 for 1b)
    full = ["generator.lora=null"]
    return {
        "train-zero0": {"train": [*train, "deepspeed.config=zero0.json"]},
        "train-zero3": {"train": [*train, "deepspeed.config=zero3.json"]},
        "train-torch-exact": {"train": [*train, "deepspeed.config=zero0.json", "index.name=torch_exact"]},
        "step-cost-135m": {"bench": "smollm2-135m", "args": [*rounds, *lora]},
        "step-cost-135m-full": {"bench": "smollm2-135m", "args": [*rounds, *full]},
        "step-cost-1b": {"bench": "1b", "args": [*rounds, *lora]},
        "step-cost-1b-full": {"bench": "1b", "args": [*rounds, *full]},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/gpu_check")) / "gpu_check.json")
    parser.add_argument("--work", type=Path, default=Path("/tmp/gpu_check"), help="run folders and built models")
    parser.add_argument("--tokenizer", type=Path, help="a folder with the SmolLM2 config and tokenizer files "
                        "(default: .gpu_carry/smollm2 if present, else the resolved SmolLM2 model)")
    parser.add_argument("--dry-run", action="store_true", help="on CPU, every job at toy sizes (plumbing check)")
    parser.add_argument("--only", help="comma-separated job names")
    parser.add_argument("--job", help=argparse.SUPPRESS)  # run one job in this process
    args = parser.parse_args()
    if args.job:
        return run_job(args)
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "dry_run": args.dry_run, "jobs": {}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    chosen = args.only.split(",") if args.only else list(jobs(args.dry_run))
    for name in chosen:
        part = args.work / f"{name}.json"
        part.unlink(missing_ok=True)
        command = [sys.executable, __file__, "--job", name, "--out", str(part), "--work", str(args.work),
                   *(["--tokenizer", str(args.tokenizer)] if args.tokenizer else []),
                   *(["--dry-run"] if args.dry_run else [])]
        started = time.perf_counter()
        done = subprocess.run(command, cwd=REPO)
        entry = json.loads(part.read_text()) if part.exists() else {}
        entry.update(returncode=done.returncode, wall_s=round(time.perf_counter() - started, 1))
        report["jobs"][name] = entry
        args.out.write_text(json.dumps(report, indent=2) + "\n")  # after every job: a timeout keeps the finished
        print(f"[gpu_check] {name}: rc {done.returncode}, {entry['wall_s']} s", flush=True)
    print(json.dumps(report, indent=2))
    return 0 if all(j["returncode"] == 0 for j in report["jobs"].values()) else 1


def run_job(args: argparse.Namespace) -> int:
    """Run one job in this process and write its JSON part."""
    import shutil

    import torch

    spec = jobs(args.dry_run)[args.job]
    folder = args.work / args.job
    shutil.rmtree(folder, ignore_errors=True)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    entry = train_job(spec["train"], folder) if "train" in spec else bench_job(args, spec, folder)
    entry["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    if torch.cuda.is_available():
        entry["peak_gpu_mib_process"] = torch.cuda.max_memory_allocated() / 2**20
    args.out.write_text(json.dumps(entry, indent=2) + "\n")
    from jsarag.engine import shutdown

    shutdown(0)  # ends the process (DeepSpeed's group destroyed)
    return 0


def train_job(overrides: list[str], folder: Path) -> dict:
    """Train the tiny recipe; its seconds per step (median between logged steps) and generator tokens per second."""
    from jsarag.loop import train
    from jsarag.recipe import load_recipe
    from jsarag.run import build_run

    recipe = load_recipe("tiny_rag", [f"output_dir={folder}", "resume=never", *overrides])
    run = build_run(recipe)
    started = time.perf_counter()
    metrics = train(run)
    seconds = time.perf_counter() - started
    times = [r["time"] for r in map(json.loads, (folder / "train_log.jsonl").read_text().splitlines()) if "loss" in r]
    per_step = statistics.median(b - a for a, b in zip(times, times[1:])) if len(times) > 1 else None
    tokens = run.generator.tokens()[0]
    return {"kind": "train", "overrides": overrides, "s_per_step": per_step, "steps": len(times),
            "train_wall_s": seconds, "tokens_per_s": tokens / seconds, "final": metrics.get("final", {})}


def bench_job(args: argparse.Namespace, spec: dict, folder: Path) -> dict:
    """``jsarag bench step-cost`` on the main recipe with a generator of the job's shape."""
    from shaped_models import build  # this folder (on sys.path)

    from jsarag.tools.bench_step import add_arguments
    from jsarag.tools.bench_step import main as step_cost

    shape = "tiny" if args.dry_run else spec["bench"]
    model = build(shape, tokenizer_dir(args), args.work / "models" / shape,
                  dtype="float32" if args.dry_run else "bfloat16")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = folder / "step_cost.json"
    bench = parser.parse_args(["--config", str(REPO / "recipes" / "dialog_jsa.yaml"), "--estimators", BENCH_ESTIMATORS,
                               "--out", str(out), *spec["args"], f"output_dir={folder}", f"generator.model={model}",
                               *TINY_RETRIEVER, "generator.dtype=auto"])
    step_cost(bench)
    report = json.loads(out.read_text())
    return {"kind": "step-cost", "shape": shape, "command": report["command"], "settings": report["settings"],
            "estimators": {label: {k: row[k] for k in ("median_s", "vs_rag", "vs_floor", "tokens", "tokens_with_grad",
                                                       "tokens_per_s", "peak_mib")}
                           for label, row in report["estimators"].items()}}


def tokenizer_dir(args: argparse.Namespace) -> Path:
    """The folder whose config and tokenizer the shaped models take."""
    if args.tokenizer:
        return args.tokenizer
    carried = REPO / ".gpu_carry" / "smollm2"
    if carried.exists():
        return carried
    from jsarag.models import resolve_model

    return resolve_model(SMOLLM2)


if __name__ == "__main__":
    sys.exit(main())
