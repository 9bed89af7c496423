"""The training loop. One micro-step runs the four hook points (``micro_step``):

    candidates = run.retrieve(batch)                  # the framework: prior ∪ posterior ∪ extra rows, both logits
    request    = run.sample(batch, candidates)        # the estimator: which (example, passage) pairs to score
    scores     = run.score(batch, candidates, request)            # the generator: log p(y|x,h), batched
    result     = run.update(batch, candidates, request, scores)   # the estimator: the loss
    engine.backward(result.loss); engine.step()

plus evaluation every ``eval_every`` steps, checkpoints every ``checkpoint_every`` steps, and ``resume``. On SIGINT or
SIGTERM every rank finishes the step in progress (or abandons the evaluation in progress), a checkpoint is written
and ``Interrupted`` (exit code 130 / 143) is raised (``jsarag.safety.GracefulStop``).
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from jsarag import __version__, checkpoint
from jsarag.api import Batch, StepResult
from jsarag.engine import (
    CHECKPOINT_LOAD_ERRORS,
    all_ranks_finite,
    checkpoint_weights,
    inference_engine,
    module_tree,
)
from jsarag.errors import Interrupted, RecipeError, TrainingError
from jsarag.evaluate import evaluate, write_predictions
from jsarag.faults import fault_point, poisoned
from jsarag.run import Run, trainables
from jsarag.safety import GracefulStop, StopRequested, recipe_changes, stop_agreed

log = logging.getLogger("jsarag.loop")


@dataclass
class LoopState:
    """Where training stands; saved with every checkpoint."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    cursor: int = 0  # micro-batches of this epoch consumed (all ranks together)
    nonfinite_in_row: int = 0
    nonfinite_total: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # evaluations so far


def train(run: Run) -> dict[str, Any]:
    """Train until ``train.max_steps`` (or ``train.stop_at``); return the content of metrics.json. A run that fails
    tells every component and observer (``on_train_failed``) before the error goes on; one stopped by a signal has
    written its checkpoint and ended normally (``on_train_end``)."""
    state, changes = _resume(run)
    session = _open_session(run, state, changes)
    record_run(run, state.step)
    try:
        return _train(run, state, session)
    except Interrupted:
        raise
    except BaseException as error:
        _notify_failure(run, state.step, error)
        raise


def _train(run: Run, state: LoopState, session: dict[str, Any]) -> dict[str, Any]:
    cfg = run.recipe.train
    run.engine.train()
    run.notify("on_train_start", start_step=state.step, max_steps=cfg.max_steps)
    with GracefulStop(cfg.grace_seconds, lambda reason, code: _give_up(run, reason, code)) as stop:
        try:
            _train_steps(run, state)
        except StopRequested as request:
            raise _stopped(run, state, session, request, stop) from None
        session["ended"] = "finished" if state.step >= cfg.max_steps else f"stopped at train.stop_at={cfg.stop_at}"
        if not _checkpointed(run, state.step):
            _checkpoint(run, state)
    _close_session(run, state)
    metrics = write_metrics(run, state)
    run.notify("on_train_end", step=state.step, metrics=metrics)
    return metrics


def _train_steps(run: Run, state: LoopState) -> None:
    """The steps of this invocation, with their evaluations and checkpoints (all but the last checkpoint)."""
    cfg = run.recipe.train
    if state.step == 0 and run.recipe.eval.at_start or _evaluation_missing(run, state):
        _evaluate(run, state)
    stop = min(cfg.max_steps, cfg.stop_at or cfg.max_steps)
    while state.step < stop:
        loss, stats = _optimizer_step(run, state)
        state.step += 1
        run.notify("on_step_end", step=state.step, loss=loss, stats=stats)
        stop_agreed(run.ctx.world_size)
        if _evaluation_due(run, state.step):
            _evaluate(run, state)
        if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0 and state.step < stop:
            _checkpoint(run, state)
    if state.step >= cfg.max_steps and (not state.history or state.history[-1]["step"] != state.step):
        _evaluate(run, state)


def _evaluation_due(run: Run, step: int) -> bool:
    """Whether ``train.eval_every`` evaluates after ``step`` (the last step's evaluation is the final one)."""
    every = run.recipe.train.eval_every
    return bool(every) and step % every == 0 and step < run.recipe.train.max_steps


def _evaluation_missing(run: Run, state: LoopState) -> bool:
    """Whether the evaluation due at the resumed step was abandoned by a stop (the checkpoint came before it)."""
    last = state.history[-1]["step"] if state.history else None
    return state.step > 0 and _evaluation_due(run, state.step) and last != state.step


def _stopped(run: Run, state: LoopState, session: dict[str, Any], request: StopRequested,
             stop: GracefulStop) -> Interrupted:
    """Checkpoint a run every rank agreed to stop (a signal), write its metrics and report; return the error to
    raise (exit code 128 + the signal's number)."""
    name, code = signal.Signals(request.signum).name, 128 + request.signum
    if state.step == 0:
        return Interrupted(f"stopped by {name} before the first step: nothing to save; the same command starts "
                           "the run afresh", code)
    session["ended"] = f"interrupted by {name}"
    if not _checkpointed(run, state.step):
        _checkpoint(run, state, rng=request.rng)
    stop.settle()  # the checkpoint is in place: the grace period no longer matters
    _close_session(run, state)
    metrics = write_metrics(run, state)
    run.notify("on_train_end", step=state.step, metrics=metrics)
    where = _root(run) / checkpoint.tag_for(state.step)
    error = Interrupted(f"stopped by {name} after step {state.step} of {run.recipe.train.max_steps}: checkpoint "
                        f"{where} written; run the same command again to resume", code)
    error.every_rank = True
    return error


def _give_up(run: Run, reason: str, code: int) -> None:
    """End the process at once without a checkpoint (the grace period ran out, or a second Ctrl-C)."""
    last = checkpoint.latest(_root(run))
    resume = f"resumes from {_root(run) / last}" if last else "starts afresh (no checkpoint yet)"
    print(f"jsarag: {reason}: stopping now without a checkpoint; the same command {resume}", file=sys.stderr,
          flush=True)
    os._exit(code)


def learning_rates(engine: Any) -> dict[str, float]:
    """The learning rate of each trained module after a step, as ``lr/<role>.<name>`` (the optimizer's groups)."""
    return {f"lr/{group['name']}": float(group["lr"]) for group in engine.optimizer.param_groups}


def _notify_failure(run: Run, step: int, error: BaseException) -> None:
    """Tell every component and observer that training failed after ``step`` (one that raises is logged, not
    allowed to hide the error)."""
    for component in [*run.components().values(), *run.observers]:
        try:
            component.on_train_failed(step=step, error=error)
        except Exception:
            log.exception("%s could not note the failure", component.ctx.role)


def record_run(run: Run, start_step: int) -> None:
    """Write <output_dir>/recipe.yaml (the recipe as written, extends merged, overrides applied) and run.json (the
    folder it ran from, each command that trained the run) on rank 0: ``jsarag export`` and ``ask`` rebuild the run
    from them."""
    if run.ctx.rank != 0:
        return
    path = run.recipe.output_dir / "run.json"
    earlier = json.loads(path.read_text()).get("invocations", []) if start_step > 0 and path.exists() else []
    invocation = {"command": shlex.join(command_line(run.ctx.world_size)), "start_step": start_step,
                  "world_size": run.ctx.world_size, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    recipe = yaml.safe_dump(run.recipe.source, sort_keys=False, allow_unicode=True)
    checkpoint.atomic_write(run.recipe.output_dir / "recipe.yaml", recipe)
    info = {"jsarag": __version__, "cwd": os.getcwd(), "recipe": "recipe.yaml", "invocations": [*earlier, invocation]}
    checkpoint.atomic_write(path, json.dumps(info, indent=2))


def command_line(world_size: int) -> list[str]:
    """The command this process was started with, as a user would type it (``deepspeed`` added when its launcher
    started the process, ``--local_rank`` left out)."""
    argv = [a for a in sys.argv if not a.startswith("--local_rank")]
    launched = len(argv) < len(sys.argv)
    program = Path(argv[0])
    if program.name == "jsarag" or program.parent.name == "jsarag" and program.name == "__main__.py":
        head = ["jsarag"]
    else:
        head = [argv[0]] if launched else ["python", argv[0]]
    if launched:
        head = ["deepspeed", *(["--num_gpus", str(world_size)] if world_size > 1 else []), *head]
    return [*head, *argv[1:]]


def _optimizer_step(run: Run, state: LoopState) -> tuple[float, dict[str, float]]:
    """Run ``grad_accum`` micro-steps (one optimizer step); return the mean loss and stats over ranks."""
    losses, stats = [], []
    rates = learning_rates(run.engine)  # the rates this step applies (the scheduler moves them in engine.step)
    while len(losses) < run.recipe.train.grad_accum:
        batch = next_batch(run, state)
        _, result = run.engine(lambda: micro_step(run, batch))  # (loss, StepResult)
        if poisoned("nonfinite_loss"):  # fault injection (JSARAG_FAULT): a transient NaN loss
            result.loss = result.loss * float("nan")
        if not all_ranks_finite(result.loss):
            _count_nonfinite(run, state)
            continue
        state.nonfinite_in_row = 0
        run.engine.backward(result.loss)
        fault_point("step")
        run.engine.step()
        losses.append(float(result.loss.detach()))
        stats.append(result.stats)
    loss, means = _reduce_mean(losses, stats)
    return loss, {**means, **rates}


def micro_step(run: Run, batch: Batch) -> StepResult:
    """The four hook points for one micro-batch; the loss carries the gradient of every trainable module."""
    candidates = run.retrieve(batch)
    request = run.sample(batch, candidates)
    scores = run.score(batch, candidates, request)
    return run.update(batch, candidates, request, scores)


def _count_nonfinite(run: Run, state: LoopState) -> None:
    state.nonfinite_in_row += 1
    state.nonfinite_total += 1
    log.warning("non-finite loss at step %d: micro-batch skipped (%d in a row)", state.step + 1, state.nonfinite_in_row)
    if state.nonfinite_in_row >= run.recipe.train.max_nonfinite:
        write_metrics(run, state)  # every rank is here (they agreed the loss was non-finite): a collective is safe
        last = checkpoint.latest(_root(run))
        kept = f"the last good checkpoint is {_root(run) / last}" if last else "no checkpoint was written yet"
        raise TrainingError(
            f"{state.nonfinite_in_row} non-finite losses in a row at step {state.step + 1} (train.max_nonfinite); "
            f"stopping with {state.nonfinite_total} skipped in all (metrics.json: nonfinite_skipped); {kept}. Lower "
            "the learning rate, set train.grad_clip, or check the data, then run again"
        )


def next_batch(run: Run, state: LoopState) -> Batch:
    """This rank's share of the next global micro-batch; a fresh seeded permutation each epoch."""
    per_rank, world, rank = run.recipe.train.batch_size, run.ctx.world_size, run.ctx.rank
    n = len(run.train_set)
    per_epoch = n // (per_rank * world)
    if per_epoch == 0:
        raise TrainingError(f"{run.train_set.path}: {n} examples cannot fill one batch of {per_rank} x {world} ranks")
    if state.cursor >= per_epoch:
        state.epoch, state.cursor = state.epoch + 1, 0
    order = np.random.default_rng([run.recipe.train.seed, state.epoch]).permutation(n)
    start = (state.cursor * world + rank) * per_rank
    positions = [int(p) for p in order[start : start + per_rank]]
    state.cursor += 1
    return Batch(examples=[run.train_set[p] for p in positions], positions=positions)


def _reduce_mean(losses: list[float], stats: list[dict[str, float]]) -> tuple[float, dict[str, float]]:
    """Average the loss and each stat over the micro-steps, then over the ranks that report it (collective)."""
    everyone = [(losses, stats)]
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        everyone = [None] * torch.distributed.get_world_size()  # small dicts, whose keys may differ across ranks
        torch.distributed.all_gather_object(everyone, (losses, stats))
    loss = float(np.mean([np.mean(rank_losses) for rank_losses, _ in everyone]))
    keys = sorted({k for _, rank_stats in everyone for s in rank_stats for k in s})
    means = {}
    for key in keys:
        per_rank = [np.mean([s[key] for s in rank_stats if key in s]) for _, rank_stats in everyone
                    if any(key in s for s in rank_stats)]
        means[key] = float(np.mean(per_rank))
    return loss, means


# -- evaluation, metrics.json, checkpoints --------------------------------------------------------------------------

def _evaluate(run: Run, state: LoopState) -> None:
    """Evaluate every split, then record and announce the results (an evaluation a stop abandons leaves nothing)."""
    before = checkpoint.rng_state()
    try:
        results = {split: evaluate(run, split) for split in run.eval_sets}
    except StopRequested as request:
        request.rng = before  # the checkpoint of a stop must resume to this same evaluation
        raise
    record: dict[str, Any] = {"step": state.step}
    for split, (metrics, samples, predictions) in results.items():
        record[split] = metrics
        write_predictions(run, split, state.step, predictions)
        run.notify("on_eval_end", step=state.step, split=split, metrics=metrics, samples=samples)
    state.history.append(record)
    write_metrics(run, state)


def write_metrics(run: Run, state: LoopState) -> dict[str, Any]:
    """Write <output_dir>/metrics.json (rank 0) and return its content."""
    final = {k: v for k, v in state.history[-1].items() if k != "step"} if state.history else {}
    metrics = {"final": final if state.step >= run.recipe.train.max_steps else {}, "history": state.history,
               "nonfinite_skipped": state.nonfinite_total, "counters": counters(run)}
    if run.ctx.rank == 0:
        checkpoint.atomic_write(run.recipe.output_dir / "metrics.json", json.dumps(metrics, indent=2))
    return metrics


def counters(run: Run) -> dict[str, dict[str, int]]:
    """What loading and the components left out or altered: data lines skipped, answers dropped, inputs truncated
    (component counts summed over ranks; a collective when the run has several ranks)."""
    splits = {run.recipe.data.train_split: run.train_set, **run.eval_sets} if run.train_set is not None else run.eval_sets
    found = {"data": {f"{split}_{what}": getattr(examples, what) for split, examples in splits.items()
                      for what in ("skipped", "dropped_unanswerable")}}
    found["data"]["kb_duplicate_texts"] = run.ctx.kb.duplicate_texts  # passages repeating a text
    if run.clamped:  # top-k settings larger than the KB: the k used
        found["clamped_to_kb"] = dict(run.clamped)
    mine = {role: component.counters() for role, component in run.components().items()}
    everyone = [mine]
    if run.ctx.world_size > 1:
        everyone = [None] * run.ctx.world_size
        torch.distributed.all_gather_object(everyone, mine)
    for part in everyone:
        for kind, counts in part.items():
            for name, value in counts.items():
                found.setdefault(kind, {})[name] = found.get(kind, {}).get(name, 0) + int(value)
    return found


def _root(run: Run):
    return run.recipe.output_dir / "checkpoints"


def _checkpointed(run: Run, step: int) -> bool:
    return checkpoint.latest(_root(run)) == checkpoint.tag_for(step)


def _checkpoint(run: Run, state: LoopState, rng: dict[str, Any] | None = None) -> None:
    _close_session(run, state)
    loop_state = {"loop": asdict(state), "rng": rng or checkpoint.rng_state(),
                  "components": {role: c.state_dict() for role, c in run.components().items()},
                  "run": {"recipe": run.ctx.recipe, "ranks": run.ctx.world_size, "sessions": run.ctx.sessions}}
    path = checkpoint.save(run.engine, _root(run), state.step, run.ctx.rank, loop_state)
    if run.ctx.rank == 0:
        checkpoint.prune(_root(run), run.recipe.train.keep_checkpoints)
    run.notify("on_checkpoint", step=state.step, path=path)


def _resume(run: Run) -> tuple[LoopState, dict[str, list[Any]]]:
    """Restore the latest complete checkpoint (``resume: auto``), a fresh state when there is none; return it with
    the recipe keys changed since the checkpoint (``resume: force``), as [old, new]."""
    root = _root(run)
    tag = checkpoint.latest(root)
    if tag is None:
        return LoopState(), {}
    if run.recipe.resume == "never":
        raise RecipeError(f"resume: never, but {root} already holds checkpoints (the latest is {tag}); a new run there "
                          "would mix two runs' checkpoints. Choose another output_dir, delete that folder, or set "
                          "resume: auto to continue the run")
    saved = checkpoint.load_loop_state(root, tag, run.ctx.rank)
    _load_engine(run, root, tag)
    checkpoint.set_rng_state(saved["rng"])
    recorded = saved.get("run")  # absent from checkpoints of jsarag 0.2.0
    run.ctx.sessions[:] = recorded["sessions"] if recorded else []
    for role, component in run.components().items():
        component.load_state_dict(saved["components"].get(role, {}))
    log.info("resumed from %s", root / tag)
    changes = recipe_changes(recorded["recipe"], run.ctx.recipe) if recorded else {}
    return LoopState(**saved["loop"]), {key: list(values) for key, values in changes.items()}


def _open_session(run: Run, state: LoopState, changes: dict[str, list[Any]]) -> dict[str, Any]:
    """Record this invocation in ``ctx.sessions`` (the first start, then each resume): when, from which step, with
    which jsarag version and commit, on which host, and the recipe keys changed since the checkpoint."""
    session = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "start_step": state.step, "end_step": state.step,
               "seconds": 0.0, "ended": "running", **provenance(), "host": socket.gethostname(),
               "ranks": run.ctx.world_size, "command": " ".join(sys.argv)[:500], "changes": changes}
    run.ctx.sessions.append(session)
    return session


def _close_session(run: Run, state: LoopState) -> None:
    """Bring the current session's end step and wall time (since the run was built) up to date."""
    if run.ctx.sessions and "started" in run.ctx.sessions[-1]:
        run.ctx.sessions[-1].update(end_step=state.step, seconds=round(time.monotonic() - run.started, 1))


def provenance() -> dict[str, str | None]:
    """The installed jsarag version and, for a git checkout, its commit (``+changes`` when files were modified)."""
    try:
        version = metadata.version("jsarag")
    except metadata.PackageNotFoundError:
        version = None
    folder = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(folder), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {"version": version, "commit": None}
    commit = head.stdout.strip() if head.returncode == 0 else None
    if commit and dirty.returncode == 0 and dirty.stdout.strip():
        commit += "+changes"
    return {"version": version, "commit": commit}


def evaluate_checkpoint(run: Run, tag: str | None = None, out: Path | None = None) -> dict[str, Any]:
    """Evaluate a checkpoint's models (the latest, or ``tag``) on the recipe's eval splits with no optimizer; write
    the predictions and <output_dir>/eval/<checkpoint>.json (or ``out``); return what that file holds."""
    step, folder = load_weights(run, tag, engine=True)
    if folder is None:
        log.warning("no checkpoint in %s: evaluating the models as built", _root(run))
    result: dict[str, Any] = {"step": step, "checkpoint": str(folder) if folder else None, "metrics": {}}
    for split in run.eval_sets:
        result["metrics"][split], _, predictions = evaluate(run, split)
        write_predictions(run, split, step, predictions)
        if run.ctx.rank == 0:
            print(f"step {step} {split}: " + " ".join(f"{k}={v:.4f}" for k, v in result["metrics"][split].items()))
    path = out or run.recipe.output_dir / "eval" / f"{folder.name if folder else 'untrained'}.json"
    if run.ctx.rank == 0:
        checkpoint.atomic_write(path, json.dumps(result, indent=2))
        print(f"metrics: {path}")
    return result


def load_weights(run: Run, tag: str | None = None, engine: bool = False) -> tuple[int, Path | None]:
    """Load a checkpoint's model weights into the run's trainable modules, no optimizer state (the latest complete
    checkpoint, or the one ``tag`` names); return its step and folder ((0, None): no checkpoint, the models as
    built). With ``engine`` the modules are first made ready as training runs them (``jsarag eval``): ZeRO-3
    partitions them in an engine without optimizer, half precision casts them. Only the roles the run built are
    loaded (``jsarag index search`` builds no generator); frozen parameters keep the base model's values."""
    root = _root(run)
    tag = checkpoint.find(root, tag)
    modules = trainables(run) if any(c.trainable() for c in run.components().values()) else {}
    if engine and modules:
        run.engine = inference_engine(modules, run.ctx.ds_config)
    if tag is None:
        return 0, None
    tree = module_tree(modules)
    partitioned = run.engine is not None and run.ctx.zero_stage >= 3
    state = {}
    if run.ctx.rank == 0 or not partitioned:
        state = {k: v for k, v in checkpoint_weights(root / tag).items() if k.split(".", 1)[0] in tree}
    _load_into(run, tree, state, partitioned, root / tag)
    return LoopState(**checkpoint.load_loop_state(root, tag, 0)["loop"]).step, root / tag


def _load_into(run: Run, tree: torch.nn.Module, state: dict[str, torch.Tensor], partitioned: bool,
               folder: Path) -> None:
    """Copy a whole state into the module tree; under ZeRO-3 rank 0 writes each gathered parameter (collective)."""
    problem = tree.mismatch(state) if run.ctx.rank == 0 or not partitioned else None
    problem = run.ctx.broadcast(problem) if partitioned else problem
    if problem:
        raise TrainingError(f"{folder}: its weights do not fit the recipe's models ({problem}); was it trained "
                            "with other models or options?")
    if not partitioned:
        tree.load_state_dict(state)
        return
    import deepspeed

    with torch.no_grad():
        for name, param in tree.named_parameters():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                if run.ctx.rank == 0 and name in state:
                    param.copy_(state[name])
        for name, buffer in tree.named_buffers():  # not partitioned: every rank takes rank 0's
            value = run.ctx.broadcast(state.get(name) if run.ctx.rank == 0 else None)
            if value is not None:
                buffer.copy_(value.to(buffer.device))


def _load_engine(run: Run, root: Path, tag: str, **options: bool) -> None:
    """Load DeepSpeed's part of a checkpoint; what DeepSpeed cannot load (or only warns about) is a TrainingError."""
    try:
        load_path, _ = run.engine.load_checkpoint(str(root), tag=tag, **options)
    except CHECKPOINT_LOAD_ERRORS as exc:  # missing files, other shapes or ranks
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise TrainingError(f"{root / tag}: DeepSpeed cannot resume from it ({reason}). If the "
                            "recipe's models, ranks or ZeRO stage changed since, use another output_dir; if the folder "
                            "is damaged, delete it to resume from the checkpoint before it") from exc
    if load_path is None:
        raise TrainingError(f"{root / tag}: DeepSpeed found no model states to load in it; delete that folder to "
                            "resume from the checkpoint before it")
