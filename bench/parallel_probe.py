#!/usr/bin/env python3
"""Eight trivial builds in one nix-build, for finding where the time goes (issue 19).

Alternates, run by run, in one invocation:
  local       the same 8 derivations built by the host itself, no hook (`--max-jobs 8`): the floor
  <label>     for each `--hook LABEL=PATH`: that nixdock-hook, default transport, one state dir
              and builder container per hook (made by a warm-up build first)
and prints medians. Uses bench/run.py's expressions and clean-up (imported, not changed): the
builder containers, their volumes and every store path built are removed at the end.

    python3 bench/parallel_probe.py --hook main=/path/a --hook new=/path/b --runs 9
    python3 bench/parallel_probe.py --hook new=/path/b --runs 1 --strace /tmp/trace   # strace -f -ttt
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402


def timed(cmd: list[str], env: dict, strace: str | None = None) -> tuple[float, list[str]]:
    if strace:
        calls = os.environ.get("PROBE_STRACE_CALLS",
                               "execve,clone,clone3,vfork,write,connect,flock,exit_group,wait4")
        cmd = ["strace", "--seccomp-bpf", "-f", "-ttt", "-s", "80", "-o", strace, "-e", f"trace={calls}"] + cmd
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed:\n{p.stderr[-3000:]}")
    outs = [line for line in p.stdout.splitlines() if line.startswith("/nix/store/")]
    if len(outs) != 8:
        raise RuntimeError(f"expected 8 outputs, got {outs}")
    bench.forget(outs)
    return dt, outs


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hook", action="append", default=[], help="LABEL=PATH")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--image", default="nixdock-test/bookworm-amd64")
    ap.add_argument("--strace", help="strace -f output prefix (one run per system)")
    ap.add_argument("--no-local", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="nixdock-parprobe-"))
    bench.CLEAN.dirs.append(str(tmp))
    base = {k: v for k, v in os.environ.items() if not k.startswith(("NIXDOCK_", "NIX_SSHOPTS"))}
    systems = []
    try:
        if not args.no_local:
            systems.append(("local", ["--max-jobs", "8", "--builders", ""], base))
        for spec in args.hook:
            label, path = spec.split("=", 1)
            (tmp / label).mkdir()
            nd = bench.NixdockSystem(tmp / label, Path(path), args.image)
            env = nd.env()
            # Warm-up: makes the builder container.
            timed(["nix-build", "--no-out-link", "-E", bench.parallel_expr(8), "--max-jobs", "0"]
                  + nd.args(False), env)
            nd.discover()
            systems.append((label, ["--max-jobs", "0"] + nd.args(False), env))
        res: dict[str, list[float]] = {s[0]: [] for s in systems}
        print(f"load average at start {os.getloadavg()}", flush=True)
        for i in range(args.runs):
            order = systems if i % 2 == 0 else list(reversed(systems))
            for label, extra, env in order:
                st = f"{args.strace}.{label}" if args.strace and i == 0 else None
                dt, _ = timed(["nix-build", "--no-out-link", "-E", bench.parallel_expr(8)] + extra,
                              env, st)
                res[label].append(dt)
        print(f"load average at end {os.getloadavg()}")
        for label, xs in res.items():
            print(f"{label:>10}: median {statistics.median(xs):.3f} s "
                  f"(min {min(xs):.3f}, max {max(xs):.3f}) over {len(xs)}: "
                  + " ".join(f"{x:.3f}" for x in xs))
    finally:
        bench.CLEAN.all()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
