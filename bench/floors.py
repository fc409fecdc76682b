#!/usr/bin/env python3
"""What this machine allows for copying NARs (issue 19): the floors the copy figures of
`bench/run.py` are measured against.

Each floor is one stock tool doing one part of the copy, timed the same way (wall clock,
median of N runs), on the same 200 MB single-file output `run.py`'s `output-200` makes and on a
fresh 346 MB / 2,003-file closure like `closure-346`:

  build        the output-200 build alone: `head -c 200000000 /dev/urandom` into the builder's
               volume (`docker exec`), what both systems pay before any copy
  local-build  the output-200 derivation built by the host's Nix itself, no hook: build +
               registration, the best any build hook can do for that figure
  dump         `nix-store --dump` of the 200 MB path to /dev/null (reading a NAR)
  restore      `nix-store --restore` of that NAR (in /dev/shm) into a directory on the store's
               file system (writing a tree: parse, create, write)
  sha256       SHA-256 of 200 MB in memory (Python's hashlib, OpenSSL: SHA-NI when present)
  cp           `cp` of the 200 MB path to the store's file system (a plain file copy)
  ssh-out      OpenSSH: 200 MB from the builder container to /dev/null here
               (`ssh builder 'head -c 200000000 /dev/zero'`), each cipher below
  ssh-in       OpenSSH: 200 MB from here into `cat > /dev/null` in the builder
  closure-dump `nix-store --dump` of each path of the 346 MB closure to /dev/null
  closure-import  `nix-store --export` of the closure piped into `nix-store --import` in the
               builder (`docker exec -i`): the receiving Nix's own cost, no SSH
  closure-ssh  the export piped through OpenSSH into `nix-store --import` in the builder

The builder is a container of the bench image with sshd (the stock system of `run.py`, which this
script imports), removed at the end with every store path it added. As root, on the test bed:

    python3 bench/floors.py                       # ~2 min
    python3 bench/floors.py --runs 3 --out bench/results/floors.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (bench/run.py: its container setup and clean-up)

MB = bench.MB
SIZE = 200 * MB


def timed(fn, runs: int) -> dict:
    xs = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        xs.append(time.perf_counter() - t0)
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs),
            "samples": [round(x, 4) for x in xs]}


def sh(cmd: str, timeout: int = 600) -> None:
    p = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{cmd} failed ({p.returncode}): {p.stderr[-2000:]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", default="nixdock-test/bookworm-amd64")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--skip-closure", action="store_true")
    ap.add_argument("--out", default=str(bench.REPO / "bench/results/floors.json"))
    args = ap.parse_args()
    runs = args.runs

    tmp = Path(tempfile.mkdtemp(prefix="nixdock-floors-"))
    bench.CLEAN.dirs.append(str(tmp))
    shm = bench.scratch_dir(tmp)
    # A directory on the store's file system, for the writes (restore, cp).
    store_fs = Path(tempfile.mkdtemp(prefix="nixdock-floors-", dir="/nix/var"))
    bench.CLEAN.dirs.append(str(store_fs))
    res: dict = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": bench.machine_info(),
                 "loadavg": {"start": bench.loadavg()}, "runs": runs, "floors": {}}
    fl = res["floors"]

    def record(key: str, r: dict, nbytes: int | None = None) -> None:
        if nbytes:
            r["MB_per_s"] = round(nbytes / MB / r["median"], 1)
        fl[key] = r
        rate = f", {r['MB_per_s']} MB/s" if "MB_per_s" in r else ""
        bench.log(f"{key}: {r['median']:.3f} s ({r['min']:.3f}-{r['max']:.3f}){rate}")

    try:
        # The 200 MB path: one random file, like output-200's.
        src = shm / "out200"
        with open(src, "wb") as f:
            for _ in range(SIZE // MB):
                f.write(os.urandom(MB))
        path = bench.run(["nix-store", "--add", str(src)]).stdout.strip()
        bench.CLEAN.store_paths.append(path)
        nar = shm / "out200.nar"
        sh(f"nix-store --dump {path} > {nar}")
        nar_size = nar.stat().st_size

        record("dump", timed(lambda: sh(f"nix-store --dump {path} > /dev/null"), runs), nar_size)

        def restore():
            d = store_fs / "restored"
            sh(f"nix-store --restore {d} < {nar}")
            sh(f"rm -rf {d}")
        record("restore (incl. rm)", timed(restore, runs), nar_size)

        data = src.read_bytes()

        def sha():
            h = hashlib.sha256()
            mv = memoryview(data)
            for i in range(0, len(mv), 256 * 1024):
                h.update(mv[i:i + 256 * 1024])
            h.digest()
        record("sha256 (hashlib)", timed(sha, runs), SIZE)
        del data

        def cp():
            sh(f"cp {path} {store_fs}/copy && rm -f {store_fs}/copy")
        record("cp (incl. rm)", timed(cp, runs), SIZE)

        # A builder container with sshd, as run.py's stock system makes it.
        sshd_config = "\n".join([
            "Port 22", "HostKey /etc/nixdock/ssh_host_ed25519_key",
            "PermitRootLogin prohibit-password", "AuthorizedKeysFile /etc/nixdock/authorized_keys",
            "PubkeyAuthentication yes", "PasswordAuthentication no", "UseDNS no",
            "PermitUserEnvironment yes", "PidFile /run/nixdock-sshd.pid", ""])
        st = bench.StockSystem(tmp, args.image, "build-users-group =\nsandbox = false\n",
                               sshd_config)
        ssh = f"ssh -F {st.ssh_config} {bench.STOCK_ALIAS}"
        record("build (docker exec head -c 200MB urandom)", timed(lambda: sh(
            f"docker exec {st.container()} sh -c "
            f"'head -c {SIZE} /dev/urandom > /nix/floor-out && rm -f /nix/floor-out'"), runs), SIZE)

        def local_build():
            p = bench.run(["nix-build", "--no-out-link", "-E", bench.output_expr(SIZE),
                           "--max-jobs", "1", "--builders", ""], timeout=600)
            bench.CLEAN.store_paths += p.stdout.split()
            drv = bench.drv_of(p.stdout.split()[0])
            if drv:
                bench.CLEAN.store_paths.append(drv)
        record("local-build (output-200 without a hook)", timed(local_build, runs))

        for cipher in ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com"):
            record(f"ssh-out {cipher}", timed(lambda: sh(
                f"{ssh} -c {cipher} 'head -c {SIZE} /dev/zero' > /dev/null"), runs), SIZE)
            record(f"ssh-in {cipher}", timed(lambda: sh(
                f"{ssh} -c {cipher} 'cat > /dev/null' < {nar}"), runs), nar_size)
        nar.unlink()
        src.unlink()

        if not args.skip_closure:
            bench.log("closure: a fresh 346 MB / 2,003-file closure")
            paths = bench.make_closure(shm, 346 * MB, 2003)
            total = sum(int(bench.run(["nix-store", "-q", "--size", p]).stdout) for p in paths)
            res["closure"] = {"paths": len(paths), "nar_bytes": total}
            plist = " ".join(paths)
            record("closure-dump", timed(lambda: sh(
                f"for p in {plist}; do nix-store --dump $p; done > /dev/null"), runs), total)

            def imp(via: str):
                # Fresh each run: delete them in the builder first (they have no referrers).
                sh(f"{ssh} 'nix-store --delete {plist}' >/dev/null 2>&1 || true")
                t0 = time.perf_counter()
                sh(f"nix-store --export {plist} | {via} 'nix-store --import' > /dev/null")
                return time.perf_counter() - t0

            for key, via in (("closure-import (docker exec)", f"docker exec -i {st.container()} sh -c"),
                             ("closure-ssh (OpenSSH, aes128-gcm)", f"{ssh} -c aes128-gcm@openssh.com")):
                xs = [imp(via) for _ in range(runs)]
                record(key, {"median": statistics.median(xs), "min": min(xs), "max": max(xs),
                             "samples": [round(x, 4) for x in xs]}, total)
    finally:
        res["loadavg"]["end"] = bench.loadavg()
        bench.log("cleaning up")
        bench.CLEAN.all()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    bench.log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
