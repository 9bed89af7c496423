"""Knowledge-base cost at scale: write a synthetic passages.jsonl of N passages (random words, ~600 bytes of text),
then, each in a fresh process, convert it into an empty KB cache, load the converted KB, and time lookups; print one
table row per N (also written as JSON with --out).

    python tests/kb_scale.py --passages 100000 2000000 --workdir /tmp/kb-scale

Columns: conversion seconds (first load_kb: check, write Arrow, hash table, fingerprint), load seconds of the
converted KB, the process's RSS before and after that load and after the lookups (the part of it that is anonymous
memory, i.e. not the page cache's pages of the mapped files, in brackets), row(id) and render(row) per second on
random keys, render_many of 64 rows per second. --before COMMIT also loads the JSONL with that commit's jsarag/kb.py
(the in-memory lists) for comparison. Generated files stay in --workdir.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jsarag.tools.bench_kb import write_passages

REPO = Path(__file__).resolve().parent.parent
MIB = 2**20
LOOKUPS = 200_000

MEASURE = r"""
import json, os, sys, time, random
import psutil
import jsarag.kb, jsarag.models  # imports first, so RSS "before" counts them
from pathlib import Path
process = psutil.Process()
def memory():
    info = process.memory_full_info()
    anon = 0
    with open(f"/proc/{os.getpid()}/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                anon = int(line.split()[1]) * 1024
    return info.rss, anon
path, mode = Path(sys.argv[1]), sys.argv[2]
out = dict(zip(("rss_before", "anon_before"), memory()))
if mode == "before":
    import importlib.util
    spec = importlib.util.spec_from_file_location("old_kb", sys.argv[3])
    old = sys.modules['old_kb'] = importlib.util.module_from_spec(spec); spec.loader.exec_module(old)
    started = time.perf_counter(); kb = old.load_kb(path); fingerprint = kb.fingerprint
else:
    started = time.perf_counter(); kb = jsarag.kb.load_kb(path)
out["seconds"] = time.perf_counter() - started
out["rss_after_load"], out["anon_after_load"] = memory()
n = len(kb)
rng = random.Random(0)
rows = [rng.randrange(n) for _ in range(%(lookups)d)]
ids = [kb.ids[r] for r in rows]
started = time.perf_counter()
assert all(kb.row(pid) == r for pid, r in zip(ids, rows))
out["row_per_s"] = len(ids) / (time.perf_counter() - started)
started = time.perf_counter()
for r in rows:
    kb.render(r)
out["render_per_s"] = len(rows) / (time.perf_counter() - started)
if hasattr(kb, "render_many"):
    started = time.perf_counter()
    for i in range(0, len(rows), 64):
        kb.render_many(rows[i:i + 64])
    out["render_many_rows_per_s"] = len(rows) / (time.perf_counter() - started)
out["rss_after_lookups"], out["anon_after_lookups"] = memory()
out["passages"] = n
print(json.dumps(out))
""" % {"lookups": LOOKUPS}


def measure(path: Path, cache: Path, mode: str, old_kb: Path | None = None) -> dict:
    """Run MEASURE in a fresh process with the given KB cache; return its JSON."""
    env = {**os.environ, "JSARAG_KB_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", MEASURE, str(path), mode] + ([str(old_kb)] if old_kb else [])
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO)
    if done.returncode:
        raise SystemExit(f"measurement failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passages", type=int, nargs="+", default=[100_000, 2_000_000])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "kb-scale")
    parser.add_argument("--before", metavar="COMMIT", help="also load with this commit's jsarag/kb.py (in memory)")
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    old_kb = None
    if args.before:
        old_kb = args.workdir / f"kb_{args.before}.py"
        old_kb.write_text(subprocess.run(["git", "show", f"{args.before}:jsarag/kb.py"], cwd=REPO, check=True,
                                         capture_output=True, text=True).stdout)
    results = []
    print("| passages | file MiB | first load s | later load s | RSS before MiB (anon) | after load | after lookups | "
          "row()/s | render()/s | render_many rows/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in args.passages:
        path = args.workdir / f"passages-{n}.jsonl"
        if not path.is_file():
            started = time.perf_counter()
            write_passages(path, n)
            print(f"(wrote {path} in {time.perf_counter() - started:.0f} s)", file=sys.stderr)
        cache = Path(tempfile.mkdtemp(dir=args.workdir, prefix="cache-"))
        converted = measure(path, cache, "convert")
        loaded = measure(path, cache, "load")
        row = {"passages": n, "file_bytes": path.stat().st_size, "convert_s": converted["seconds"], **{
            k: loaded[k] for k in loaded if k != "passages"}}
        if old_kb:
            row["before"] = measure(path, cache, "before", old_kb)
        results.append(row)
        for label, r in [("", row)] + ([(f" ({args.before})", row["before"])] if old_kb else []):
            first = row["convert_s"] if not label else r["seconds"]  # before: every start parses it all again
            print(f"| {n:,}{label} | {row['file_bytes'] / MIB:,.0f} | {first:.1f} | {r['seconds']:.3f} | "
                  f"{r['rss_before'] / MIB:.0f} ({r['anon_before'] / MIB:.0f}) | "
                  f"{r['rss_after_load'] / MIB:.0f} ({r['anon_after_load'] / MIB:.0f}) | "
                  f"{r['rss_after_lookups'] / MIB:.0f} ({r['anon_after_lookups'] / MIB:.0f}) | "
                  f"{r['row_per_s']:,.0f} | {r['render_per_s']:,.0f} | "
                  f"{r.get('render_many_rows_per_s', float('nan')):,.0f} |", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
