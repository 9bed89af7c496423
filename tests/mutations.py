"""Mutation testing of the estimators: apply known-wrong versions one at a time and check the tests catch each.

    python tests/mutations.py                 # every mutation; prints a table and the kill rate (about 10 minutes)
    python tests/mutations.py --list          # the mutations, without running anything
    python tests/mutations.py --only jsa-rescore-sign-flip vrag-top-k-no-generator-gradient

Each mutation replaces one exact piece of code in ``plugins/`` (a sign, a dropped gradient, a chain that ignores its
cached state, ...). The script copies ``plugins/`` into a temporary folder as the package ``jsarag_plugins``, applies
the mutation there and runs the mutation's tests with that folder first on PYTHONPATH, so the working tree is never
touched (a killed script leaves nothing behind). A mutation is *killed* when a test fails. Before mutating anything the
script checks that the unmutated copy passes the same tests and is the code the tests import. The exit status is 0
when every mutation was killed, 1 otherwise (2 when the list no longer matches the code: each ``old`` text must occur
exactly once in its file).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ESTIMATOR_TESTS = ("tests/test_estimators.py", "tests/test_rag.py")
SCORING_TESTS = ("tests/test_scoring_law.py",)


@dataclass(frozen=True)
class Mutation:
    """One wrong estimator: in ``file`` (under plugins/), ``old`` becomes ``new``; ``tests`` should catch it."""

    name: str
    file: str
    old: str
    new: str
    why: str
    tests: tuple[str, ...] = ESTIMATOR_TESTS


JSA, VRAG, RAG, EXACT = "estimators/jsa.py", "estimators/vrag.py", "estimators/rag.py", "estimators/exact.py"
RESCORE = "loglik = rescore(again).matrix(again, candidates, self.options.likelihood)"

MUTATIONS = [
    # jsa: the rescore pass
    Mutation("jsa-rescore-sign-flip", JSA, RESCORE,
             "fresh = rescore(again).matrix(again, candidates, self.options.likelihood)\n"
             "            loglik = 2 * fresh.detach() - fresh",
             "the rescore pass's generator gradient has the wrong sign (same loss value)"),
    Mutation("jsa-rescore-gradient-dropped", JSA, RESCORE, RESCORE + ".detach()",
             "the rescore pass carries no generator gradient"),
    Mutation("jsa-rescore-skipped", JSA, "if not request.grad:  # second pass", "if False:  # second pass",
             "grad_pass: rescore never rescores: the loss uses the no-gradient scores"),
    # jsa: the chain
    Mutation("jsa-chain-ignores-cached-state", JSA, "current = torch.where(fresh, proposals[:, 0], start)",
             "current = proposals[:, 0]", "a cached chain starts from its first proposal instead of its cached state"),
    Mutation("jsa-cached-chain-always-moves-first", JSA, "accept = accept & ~fresh",
             "accept = ~fresh", "a cached chain always accepts its first proposal"),
    Mutation("jsa-no-proposal-correction", JSA,
             "log_ratio = log_p.detach().cpu() + loglik.detach() - log_q.detach().cpu()",
             "log_ratio = log_p.detach().cpu() + loglik.detach()",
             "the acceptance ratio leaves out the proposal's q̃(h)/q̃(h')"),
    Mutation("jsa-ratio-reversed", JSA, "log_ratio[rows, candidate] - log_ratio[rows, current]",
             "log_ratio[rows, current] - log_ratio[rows, candidate]", "the acceptance ratio is upside down"),
    Mutation("jsa-accept-everything", JSA, "accept = torch.rand(batch).log() < log_ratio",
             "accept = torch.rand(batch).log() < 1e9 + log_ratio", "every proposal is accepted (no Metropolis test)"),
    Mutation("jsa-cache-not-written", JSA, "if not self.options.cache:\n            return",
             "return", "the chain's last state never reaches the cache"),
    Mutation("jsa-cache-not-read", JSA, "if self.options.cache and position in self.cache:",
             "if False:", "the cached state is never found among the candidates (every chain starts fresh)"),
    # jsa: the weights and the loss
    Mutation("jsa-use-last-weighs-all", JSA, 'chosen = states if use == "all" else states[:, -1:]',
             "chosen = states", "use: last weighs every chain state"),
    Mutation("jsa-weights-unnormalised", JSA, "return counts / chosen.shape[1]", "return counts",
             "chain weights are counts, not shares (the gradient is m times too large)"),
    Mutation("jsa-posterior-sign-flip", JSA, "-(loglik.to(log_p.device) + log_p + log_q)",
             "-(loglik.to(log_p.device) + log_p - log_q)", "the posterior's term has the wrong sign"),
    Mutation("jsa-prior-gradient-dropped", JSA, "-(loglik.to(log_p.device) + log_p + log_q)",
             "-(loglik.to(log_p.device) + log_p.detach() + log_q)", "the prior gets no gradient"),
    Mutation("jsa-sum-as-mean", JSA, "loglik = scores.matrix(request, candidates, self.options.likelihood).cpu()",
             'loglik = scores.matrix(request, candidates, "mean").cpu()',
             "the chain's target uses the mean likelihood when the recipe says sum"),
    # vrag
    Mutation("vrag-top-k-no-generator-gradient", VRAG, "expected = weighted_sum(log_q.exp(), loglik)",
             "expected = weighted_sum(log_q.exp(), loglik.detach())",
             "vrag top-K trains no generator"),
    Mutation("vrag-mc-no-generator-gradient", VRAG, "surrogate = ll.mean(1) + ((ll - baseline).detach() * lq).mean(1)",
             "surrogate = ll.detach().mean(1) + ((ll - baseline).detach() * lq).mean(1)",
             "vrag Monte-Carlo trains no generator"),
    Mutation("vrag-mc-no-score-function", VRAG, "surrogate = ll.mean(1) + ((ll - baseline).detach() * lq).mean(1)",
             "surrogate = ll.mean(1)", "vrag Monte-Carlo drops the score-function term (the posterior sees only KL)"),
    Mutation("vrag-mc-baseline-carries-gradient", VRAG, "((ll - baseline).detach() * lq)",
             "((ll - baseline) * lq)", "the score-function term leaks gradient into the generator"),
    Mutation("vrag-kl-sign-flip", VRAG, "loss = (-expected + self.options.beta * kl).mean()",
             "loss = (-expected - self.options.beta * kl).mean()", "the KL term has the wrong sign"),
    Mutation("vrag-beta-ignored", VRAG, "loss = (-expected + self.options.beta * kl).mean()",
             "loss = (-expected + kl).mean()", "β is ignored in the top-K ELBO"),
    Mutation("vrag-kl-over-ignored", VRAG, 'keep = in_set if self.options.kl_over == "posterior" else',
             "keep = in_set if True else", "kl_over: union renormalises the prior over C_q anyway"),
    Mutation("vrag-mc-draws-outside-top-k", VRAG,
             "q = sampling_probs(masked_log_softmax(candidates.posterior_logits.detach().cpu(), in_set), in_set)",
             "q = sampling_probs(masked_log_softmax(candidates.posterior_logits.detach().cpu(), candidates.mask), "
             "candidates.mask)", "Monte-Carlo draws come from every candidate, not the posterior's top-K"),
    Mutation("vrag-sum-as-mean", VRAG, "loglik = scores.matrix(request, candidates, self.options.likelihood)",
             'loglik = scores.matrix(request, candidates, "mean")', "vrag uses the mean likelihood when told sum"),
    # rag, rag_token
    Mutation("rag-sum-as-mean", RAG, "loglik = scores.matrix(request, candidates, self.options.likelihood)",
             'loglik = scores.matrix(request, candidates, "mean")', "rag uses the mean likelihood when told sum"),
    Mutation("rag-prior-gradient-dropped", RAG, "prior = candidates.prior_log_probs().to(loglik.device)",
             "prior = candidates.prior_log_probs().detach().to(loglik.device)", "rag trains no prior"),
    Mutation("rag-token-as-sequence", "estimators/rag_token.py",
             "per_token = torch.logsumexp(prior + tokens, dim=1)",
             "per_token = torch.logsumexp(prior + tokens.sum(-1, keepdim=True), dim=1).expand(-1, t) / t",
             "rag_token marginalises whole answers (RAG-Sequence) instead of each token"),
    # exact
    Mutation("exact-posterior-not-detached", EXACT, "posterior = torch.softmax(joint.detach(), dim=-1)",
             "posterior = torch.softmax(joint, dim=-1)", "the KL's target leaks gradient into prior and generator"),
    Mutation("exact-exclusive-kl", EXACT, "kl = weighted_sum(posterior, posterior.clamp_min(1e-30).log() - log_q)",
             "kl = weighted_sum(log_q.exp(), log_q - posterior.clamp_min(1e-30).log())",
             "the posterior follows the exclusive KL(q ‖ p) instead of the inclusive one"),
    Mutation("exact-sum-as-mean", EXACT, "loglik = scores.matrix(request, candidates, self.options.likelihood)",
             'loglik = scores.matrix(request, candidates, "mean")', "exact uses the mean likelihood when told sum"),
    # shared helpers, and the generator's scoring law
    Mutation("weighted-sum-lets-infinities-through", "estimators/common.py",
             "safe = torch.where(weights > 0, values, torch.zeros_like(values))", "safe = values",
             "unscored slots (-inf) with zero weight poison the loss (0 · inf = nan)"),
    Mutation("scoring-with-dropout", "generators/causal_lm.py",
             "torch.set_grad_enabled(request.grad and torch.is_grad_enabled()), scoring_mode(self.model)",
             "torch.set_grad_enabled(request.grad and torch.is_grad_enabled()), contextlib.nullcontext()",
             "the generator scores in training mode: dropout makes the no-gradient and gradient passes disagree",
             tests=SCORING_TESTS),
]


def mutate(source: str, mutation: Mutation) -> str:
    """Return ``source`` with the mutation applied; raise ValueError unless ``old`` occurs exactly once."""
    count = source.count(mutation.old)
    if count != 1:
        raise ValueError(f"{mutation.name}: the text to replace occurs {count} times in plugins/{mutation.file}")
    return source.replace(mutation.old, mutation.new)


def copy_plugins(into: Path) -> Path:
    """Copy plugins/ into ``into``/jsarag_plugins (the installed package's name); return that folder."""
    target = into / "jsarag_plugins"
    shutil.copytree(REPO / "plugins", target, ignore=shutil.ignore_patterns("__pycache__"))
    return target


def run_tests(pythonpath: Path, tests: tuple[str, ...]) -> tuple[bool, str]:
    """Run ``tests`` with ``pythonpath`` first on the path; (passed, the first failing test or the last lines)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(pythonpath), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests], cwd=REPO,
                          env=env, capture_output=True, text=True)
    failed = re.findall(r"^FAILED (\S+)", done.stdout, flags=re.M)
    return done.returncode == 0, failed[0] if failed else done.stdout.strip().splitlines()[-1:]


def imported_from(pythonpath: Path) -> Path:
    """Where the tests' ``import jsarag_plugins`` finds the package with ``pythonpath`` first on the path."""
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    out = subprocess.run([sys.executable, "-c", "import jsarag_plugins; print(jsarag_plugins.__file__)"], cwd=REPO,
                         env=env, capture_output=True, text=True, check=True).stdout
    return Path(out.strip()).parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print the mutations and exit")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutations")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    unknown = set(args.only or ()) - {m.name for m in MUTATIONS}
    if unknown:
        print(f"unknown mutation(s): {', '.join(sorted(unknown))} (see --list)", file=sys.stderr)
        return 2
    try:
        for m in chosen:
            mutate((REPO / "plugins" / m.file).read_text(), m)
    except ValueError as exc:
        print(f"the mutation list no longer matches the code: {exc}", file=sys.stderr)
        return 2
    if args.list:
        for m in chosen:
            print(f"{m.name:42} plugins/{m.file}: {m.why}")
        return 0
    with tempfile.TemporaryDirectory(prefix="jsarag-mutants-") as tmp:
        root = Path(tmp)
        package = copy_plugins(root)
        if imported_from(root) != package:
            print(f"the tests would not import the mutated copy ({imported_from(root)} instead of {package})",
                  file=sys.stderr)
            return 2
        for tests in sorted({m.tests for m in chosen}):
            passed, detail = run_tests(root, tests)
            if not passed:
                print(f"the unmutated code fails {' '.join(tests)}: {detail}; fix that first", file=sys.stderr)
                return 2
        results = []
        for m in chosen:
            path = package / m.file
            original = path.read_text()
            path.write_text(mutate(original, m))
            started = time.perf_counter()
            passed, detail = run_tests(root, m.tests)
            path.write_text(original)
            results.append((m, not passed, detail, time.perf_counter() - started))
            print(f"{'killed ' if not passed else 'SURVIVED'} {m.name:42} {time.perf_counter() - started:5.1f} s  "
                  f"{detail if not passed else m.why}", flush=True)
    return report(results)


def report(results: list[tuple[Mutation, bool, str, float]]) -> int:
    """Print the Markdown table and the kill rate; 0 when every mutation was killed."""
    print("\n| mutation | file | what is wrong | caught by |\n|---|---|---|---|")
    for m, killed, detail, _ in results:
        caught = f"`{detail.split('::', 1)[-1]}`" if killed else "**survived**"
        print(f"| `{m.name}` | plugins/{m.file} | {m.why} | {caught} |")
    killed = sum(1 for r in results if r[1])
    print(f"\nkill rate: {killed}/{len(results)} wrong estimators caught ({100 * killed / max(len(results), 1):.0f}%)")
    return 0 if killed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
