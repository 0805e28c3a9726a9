"""Run the registered benchmarks, or time this checkout against another commit.

    python benchmarks/run.py list                     # the registry (registry.py)
    python benchmarks/run.py run sweep decode --quick  # scripts one after another
    python benchmarks/run.py ab --base <commit>        # A/B: <commit> against this tree

`ab` builds <commit> once in a git worktree under .bench/<commit> (kept for
the next run), then times fastcells modules of both builds in separate
processes that alternate (base, head, head, base, ...), each process timing
every case once, so that drift on a shared machine lands on both sides. It
prints and writes (results/ab_<base>_<head>.json and .md) the per-case
median times and the speed-up base / head with its spread: the commits are
recorded with the numbers, so no write-up has to name them. ``--base-root
DIR`` takes an already built checkout instead of a commit.

Cases are CELL:T,B,I,H[:LAYERS]:MODE:DTYPE with MODE fwd (no_grad forward),
fb (forward+backward) or step (a T=1 call with explicit state, as a decoding
loop makes them); the default set covers the forecasting regime.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from registry import BENCHMARKS, BY_NAME  # noqa: E402

DEFAULT_CASES = (
    "LSTM:112,1,3,6:2:fb:float32",      # the airline model
    "LSTM:168,64,16,64:fwd:float32",
    "LSTM:168,64,16,64:fb:float32",
    "GRU:168,64,16,64:fb:float32",
    "RNN:168,64,16,64:fb:float32",
    "LSTM:112,64,16,64:fb:bfloat16",
    "LSTM:112,8,16,256:fb:float32",
    "LSTM:1,100,16,40:2:step:float32",  # one decoding step
    "GRU:1,100,16,40:2:step:float32",
)

# Runs in a child process whose sys.path starts with the build under test;
# prints {case: seconds} as JSON.
CHILD = r'''
import json, sys, torch
from torch.utils import benchmark
root, threads, min_run_time = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
import fastcells
if not fastcells.__file__.startswith(root):
    sys.exit(f"fastcells came from {fastcells.__file__}, not from {root}")
torch.set_num_threads(threads)
out = {}
for case in sys.argv[4:]:
    parts = case.split(":")
    cell, shape, mode, dtype = parts[0], parts[1], parts[-2], getattr(torch, parts[-1])
    layers = int(parts[2]) if len(parts) == 5 else 1
    T, B, I, H = map(int, shape.split(","))
    torch.manual_seed(0)
    m = getattr(fastcells, cell)(I, H, layers).to(dtype)
    x = torch.randn(T, B, I, dtype=dtype)
    state = torch.zeros(layers, B, H, dtype=dtype)
    hx = (state, state) if cell == "LSTM" else state
    def fwd():
        with torch.no_grad():
            m(x)
    def fb():
        m(x)[0].float().sum().backward()
    def step():
        with torch.inference_mode():
            m(x, hx)
    f = {"fwd": fwd, "fb": fb, "step": step}[mode]
    f()
    t = benchmark.Timer("f()", globals={"f": f}, num_threads=threads)
    out[case] = t.blocked_autorange(min_run_time=min_run_time).median
print(json.dumps(out))
'''

MODES = ("fwd", "fb", "step")


def check_case(case: str) -> str:
    """`case` if it reads CELL:T,B,I,H[:LAYERS]:MODE:DTYPE, else argparse's error."""
    parts = case.split(":")
    ok = len(parts) in (4, 5) and parts[0] in ("LSTM", "GRU", "RNN") and \
        parts[-2] in MODES and parts[-1] in ("float32", "bfloat16", "float64")
    try:
        ok = ok and len([int(v) for v in parts[1].split(",")]) == 4
        ok = ok and (len(parts) == 4 or int(parts[2]) >= 1)
    except ValueError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(
            f"case {case!r}: expected CELL:T,B,I,H[:LAYERS]:MODE:DTYPE with CELL LSTM|GRU|RNN, "
            f"MODE {'|'.join(MODES)}, DTYPE float32|bfloat16|float64")
    return case


def git(*args: str, cwd: Path = C.REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout.strip()


def built_base(commit: str) -> Path:
    """A worktree of `commit` with the extension built in place (.bench/<sha>)."""
    sha = git("rev-parse", "--verify", f"{commit}^{{commit}}")
    root = C.REPO / ".bench" / sha[:12]
    if not root.exists():
        git("worktree", "add", "--detach", str(root), sha)
    if not list((root / "fastcells").glob("_C*.so")):
        print(f"building {sha[:12]} in {root} (minutes)", file=sys.stderr, flush=True)
        env = dict(os.environ, MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
        subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=root,
                       env=env, check=True, stdout=subprocess.DEVNULL)
    return root


def time_build(root: Path, cases, threads: int, min_run_time: float) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(root))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(root), str(threads),
                           str(min_run_time), *cases], env=env, cwd=root, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        sys.exit(f"timing the build in {root} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def commit_of(root: Path) -> str:
    sha = git("rev-parse", "HEAD", cwd=root)
    dirty = git("status", "--porcelain", "--untracked-files=no", cwd=root)
    return sha[:12] + ("+dirty" if dirty else "")


def ab(args) -> int:
    base = Path(args.base_root).resolve() if args.base_root else built_base(args.base)
    head = C.REPO
    cases = args.cases or list(DEFAULT_CASES)
    times: dict[str, dict[str, list[float]]] = {"base": {}, "head": {}}
    for r in range(args.rounds):
        order = (("base", base), ("head", head)) if r % 2 == 0 else (("head", head), ("base", base))
        for side, root in order:
            for case, s in time_build(root, cases, args.threads, args.min_run_time).items():
                times[side].setdefault(case, []).append(s)
    rows = []
    for case in cases:
        b, h = times["base"][case], times["head"][case]
        rows.append({"case": case, "base_ms": statistics.median(b) * 1e3,
                     "head_ms": statistics.median(h) * 1e3,
                     "speedup": C.ratio_summary(b, h)})
    out = {"benchmark": "ab", "machine": C.machine_info("cpu"),
           "base": {"root": str(base), "commit": commit_of(base)},
           "head": {"root": str(head), "commit": commit_of(head)},
           "config": {"threads": args.threads, "rounds": args.rounds,
                      "min_run_time": args.min_run_time},
           "rows": rows}
    stem = f"ab_{out['base']['commit']}_{out['head']['commit']}".replace("+", "_")
    C.write_results(args.out, stem, out, markdown(out))
    return 0


def markdown(out: dict) -> str:
    rows = [[r["case"], f"{r['base_ms']:.3f}", f"{r['head_ms']:.3f}",
             f"{r['speedup']['median']:.2f}x ({r['speedup']['min']:.2f}-{r['speedup']['max']:.2f})"]
            for r in out["rows"]]
    return (f"# A/B: {out['base']['commit']} (base) against {out['head']['commit']} (head)\n\n"
            f"{C.machine_line(out['machine'])}; {out['config']['rounds']} alternating rounds, one process per build and round. "
            "Speed-up = base time / head time per round: median (min-max); above 1.00x the "
            "head is faster.\n\n"
            + C.md_table(["case", "base ms", "head ms", "speed-up"], rows))


def run(args, extra: list[str]) -> int:
    for name in args.names:
        b = BY_NAME[name]
        cmd = [sys.executable, str(Path(__file__).resolve().parent / b.script),
               *(b.quick if args.quick else ()), *extra]
        print("+", " ".join(cmd[1:]), file=sys.stderr, flush=True)
        rc = subprocess.run(cmd).returncode
        if rc != 0:
            return rc
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the registered benchmarks")
    rp = sub.add_parser("run", help="run benchmarks one after another (never at once)")
    rp.add_argument("names", nargs="+", choices=sorted(BY_NAME))
    rp.add_argument("--quick", action="store_true", help="each script's quick form")
    abp = sub.add_parser("ab", help="time a base commit's build against this tree's")
    where = abp.add_mutually_exclusive_group(required=True)
    where.add_argument("--base", help="commit, branch or tag to compare against")
    where.add_argument("--base-root", help="an already built checkout to compare against")
    abp.add_argument("--cases", nargs="+", type=check_case, default=None)
    abp.add_argument("--threads", type=int, default=2)
    abp.add_argument("--rounds", type=int, default=4)
    abp.add_argument("--min-run-time", type=float, default=0.3)
    abp.add_argument("--out", default=str(C.RESULTS))
    args, extra = ap.parse_known_args(argv)
    if args.command == "list":
        for b in BENCHMARKS:
            print(f"{b.name:14} {b.script:24} {b.what}"
                  + (f" (needs {', '.join(b.needs)})" if b.needs else ""))
        return 0
    if extra and args.command != "run":
        ap.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "run":
        return run(args, extra)
    if args.rounds < 1 or args.threads < 1 or args.min_run_time <= 0:
        ap.error("--rounds and --threads must be >= 1 and --min-run-time > 0")
    return ab(args)


if __name__ == "__main__":
    raise SystemExit(main())
