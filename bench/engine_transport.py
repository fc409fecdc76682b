#!/usr/bin/env python3
"""How nixdock reaches a builder on a remote engine (issue 15): measured, to choose.

The test bed's second engine (scripts/testbed: a dockerd in its own network namespace at
10.231.0.2, reached over tcp:// with TLS) stands in for a server or Docker Desktop's VM. The same
builds run through nixdock-hook with each way to the builder's nix-daemon, alternating run by run:

  engine-exec  the Engine API's exec stream (`nix-daemon --stdio` in the container), over the TLS
               engine connection; no sshd published anywhere (transport = "auto" on a remote
               engine)
  ssh          SSH to the builder's sshd published on the engine's address (transport = "ssh")

Scenarios: a warm trivial build (latency), a 200 MB output copied back, a 200 MB input closure
copied in (throughput). Prints medians and writes bench/results/engine-transport.json.

    python3 bench/engine_transport.py [--runs N] [--big-runs N] [--hook PATH]
"""

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("nixdock_bench", REPO / "bench/run.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

ENGINE2 = "tcp://10.231.0.2:2376"
ENGINE2_UNIX = "unix:///run/nixdock-testbed/engine2/docker.sock"
TLS = Path("/var/cache/nixdock-testbed/engine2/tls")


class RemoteNixdock(bench.NixdockSystem):
    def __init__(self, tmp: Path, hook: Path, image: str, transport: str) -> None:
        super().__init__(tmp, hook, image, transport)
        self.name = transport
        self.config.write_text(
            f'docker-host = "{ENGINE2}"\n'
            f'tls-ca = "{TLS}/ca.pem"\ntls-cert = "{TLS}/cert.pem"\ntls-key = "{TLS}/key.pem"\n'
            f'transport = "{transport}"\n'
            f'[builders."{bench.SYSTEM}"]\nimage = "{image}"\nidle-timeout = 3600\n'
        )

    def container_cpu_ns(self):
        return None

    def discover(self) -> None:
        self.instance = (self.state / "instance-id").read_text().strip()

    def remove(self) -> None:
        if not self.instance:
            return
        label = f"label=nixdock.instance={self.instance}"
        for kind, rm in ((["ps", "-aq"], ["rm", "-f", "-v"]), (["volume", "ls", "-q"], ["volume", "rm", "-f"])):
            ids = bench.run(["docker", "-H", ENGINE2_UNIX, *kind, "--filter", label], check=False).stdout.split()
            if ids:
                bench.run(["docker", "-H", ENGINE2_UNIX, *rm, *ids], check=False)


def median(xs):
    return statistics.median(xs) if xs else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", default="nixdock-test/bookworm-amd64")
    ap.add_argument("--hook", help="nixdock-hook binary (default: build target/release)")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--big-runs", type=int, default=3)
    args = ap.parse_args()
    hook = bench.build_hook(args)
    results = {}
    with tempfile.TemporaryDirectory(prefix="nixdock-engine-bench-") as t:
        tmp = Path(t)
        systems = []
        for transport in ("engine-exec", "ssh"):
            d = tmp / transport
            d.mkdir()
            systems.append(RemoteNixdock(d, hook, args.image, transport))
        try:
            for s in systems:
                r = s.build(bench.trivial_expr("engine-cold"), cpu=False)
                s.discover()
                bench.forget(r["outs"])
                results.setdefault(s.name, {})["cold"] = r["seconds"]
            warm = {s.name: [] for s in systems}
            for i in range(args.runs):
                for s in bench.pair_order(i, systems):
                    r = s.build(bench.trivial_expr("engine-warm"), cpu=False)
                    warm[s.name].append(r["seconds"])
                    bench.forget(r["outs"])
            out = {s.name: [] for s in systems}
            for i in range(args.big_runs):
                for s in bench.pair_order(i, systems):
                    r = s.build(bench.output_expr(200 * 1024 * 1024), cpu=False)
                    out[s.name].append(r["seconds"])
                    bench.forget(r["outs"])
            inp = {s.name: [] for s in systems}
            scratch = tmp / "scratch"
            scratch.mkdir()
            for i in range(args.big_runs):
                inputs = bench.make_closure(scratch, 200 * 1024 * 1024, 2000)
                for s in bench.pair_order(i, systems):
                    r = s.build(bench.closure_expr(inputs), cpu=False)
                    inp[s.name].append(r["seconds"])
                    bench.forget(r["outs"])
                    # The next run of the other transport must copy the closure again.
                    for p in inputs:
                        bench.run(["docker", "-H", ENGINE2_UNIX, "exec", s.container(),
                                   "/etc/nixdock/bin/nix-store", "--delete", p], check=False)
                bench.forget(inputs)
            for s in systems:
                results[s.name].update({
                    "warm_median_s": median(warm[s.name]),
                    "warm_runs": warm[s.name],
                    "output_200mb_median_s": median(out[s.name]),
                    "output_200mb_runs": out[s.name],
                    "closure_200mb_median_s": median(inp[s.name]),
                    "closure_200mb_runs": inp[s.name],
                })
        finally:
            for s in systems:
                s.remove()
    results["commit"] = bench.git_state()
    dest = REPO / "bench/results/engine-transport.json"
    dest.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{'':14}{'cold':>8}{'warm':>8}{'200MB out':>11}{'200MB in':>10}")
    for name in ("engine-exec", "ssh"):
        r = results[name]
        print(f"{name:14}{r['cold']:8.2f}{r['warm_median_s']:8.3f}{r['output_200mb_median_s']:11.2f}"
              f"{r['closure_200mb_median_s']:10.2f}")
    print(f"written to {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
