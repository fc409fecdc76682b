#!/usr/bin/env python3
"""nixdock benchmark harness (issue 7).

Measures nixdock-hook against what users run today: Nix's own build hook (the default
`build-hook`, i.e. `build-remote`) with `ssh-ng://` to an identical builder container, set up by
hand the classic way (sshd in the container, loopback port, a Host alias in a temporary ssh
config, OpenSSH as the client). The two systems alternate run by run in one invocation.

Everything it creates (containers, volumes, temp files, store paths) is removed at the end, also
on Ctrl-C. Only the Python 3 standard library is used. See BENCHMARKS.md for the figures and how
to read them.

    python3 bench/run.py            # full run (~3.5 min of measuring on 2 cores after the
                                    # release build), writes bench/results/latest.json
    python3 bench/run.py --quick    # a smoke run with few repetitions
    python3 bench/run.py --transport ssh              # nixdock over SSH (an engine in a VM)
    python3 bench/run.py --engine e2 [--transport ssh]  # both systems' builders on the test
                                    # bed's second engine, at its own address
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SYSTEM = "x86_64-linux"
STOCK_ALIAS = "nixdock-bench-stock"
MB = 1_000_000

# The engine the builders run on: this host's (`--engine local`) or the test bed's second engine
# (`--engine e2`: a dockerd in its own network namespace at 10.231.0.2, reached over tcp:// with
# TLS; it stands in for Docker Desktop's VM or a server, so its builders' ports and volumes are
# not on this host). main() fills these in.
DOCKER: list[str] = ["docker"]
PUBLISH_HOST = "127.0.0.1"
ENGINE2_ADDR = "10.231.0.2"
ENGINE2_UNIX = "unix:///run/nixdock-testbed/engine2/docker.sock"
ENGINE2_TLS = Path("/var/cache/nixdock-testbed/engine2/tls")
NIXDOCK_ENGINE_CONF = ""

def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd, check=True, timeout=300, env=None, input=None, quiet=False) -> subprocess.CompletedProcess:
    p = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=env, input=input
    )
    if check and p.returncode != 0:
        raise RuntimeError(
            f"{' '.join(map(str, cmd))} failed ({p.returncode}):\n{p.stdout[-2000:]}{p.stderr[-4000:]}"
        )
    return p


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def summary(xs: list[float]) -> dict:
    if not xs:
        return {"runs": 0}
    return {
        "runs": len(xs),
        "median": statistics.median(xs),
        "min": min(xs),
        "max": max(xs),
        "samples": [round(x, 4) for x in xs],
    }


# --------------------------------------------------------------------------------------------
# Resource accounting: everything made here is registered and removed at the end.


class Cleanup:
    def __init__(self) -> None:
        self.containers: list[str] = []
        self.volume_labels: list[str] = []  # label filters, e.g. nixdock.instance=ID
        self.volumes: list[str] = []
        self.store_paths: list[str] = []  # deleted from the host store at the end, in one call
        self.dirs: list[str] = []
        self.done = False

    def host_store_delete(self, paths: list[str]) -> None:
        """Deletes the paths this run made from the host store: only those (never a full GC:
        the host store is shared with other test runs), all in one call so referrers within the
        set do not keep each other alive."""
        paths = list(dict.fromkeys(p for p in paths if p))
        if paths:
            run(["nix-store", "--delete"] + paths, check=False, timeout=900)

    def all(self) -> None:
        if self.done:
            return
        self.done = True
        for c in self.containers:
            run([*DOCKER, "rm", "-f", "-v", c], check=False, timeout=120)
        for lab in self.volume_labels:
            p = run([*DOCKER, "volume", "ls", "-q", "--filter", f"label={lab}"], check=False)
            self.volumes += p.stdout.split()
        for v in dict.fromkeys(self.volumes):
            run([*DOCKER, "volume", "rm", "-f", v], check=False, timeout=120)
        self.host_store_delete(self.store_paths)
        for d in self.dirs:
            shutil.rmtree(d, ignore_errors=True)


CLEAN = Cleanup()


# --------------------------------------------------------------------------------------------
# Peak RSS of a build's hook processes, sampled from /proc (works for both systems; the exact
# nixdock figure comes from /usr/bin/time in a wrapper, see NixdockSystem).


class RssSampler(threading.Thread):
    def __init__(self, root_pid: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.root = root_pid
        self.interval = interval
        self.stop_evt = threading.Event()
        self.peak: dict[str, int] = {}  # comm -> max VmHWM kB over processes with that comm

    def descendants(self, pid: int) -> list[int]:
        out, todo = [], [pid]
        while todo:
            p = todo.pop()
            try:
                kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
            except OSError:
                continue
            for k in kids:
                out.append(int(k))
                todo.append(int(k))
        return out

    def run(self) -> None:
        while not self.stop_evt.is_set():
            for pid in self.descendants(self.root):
                try:
                    st = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue
                m = re.search(r"^VmHWM:\s+(\d+) kB", st, re.M)
                n = re.search(r"^Name:\s+(.*)$", st, re.M)
                if m and n:
                    name = n.group(1).strip()
                    self.peak[name] = max(self.peak.get(name, 0), int(m.group(1)))
            self.stop_evt.wait(self.interval)

    def stop(self) -> dict[str, int]:
        self.stop_evt.set()
        self.join()
        return self.peak


# --------------------------------------------------------------------------------------------
# The two systems under test.


class System:
    name = "?"

    def args(self, rss: bool) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        raise NotImplementedError

    def machine_marker(self) -> str:
        raise NotImplementedError

    def container(self) -> str:
        raise NotImplementedError

    def exact_rss(self) -> list[int]:
        return []

    _cid: tuple[str, str] | None = None

    def container_cpu_ns(self) -> int | None:
        """CPU time used so far by everything in the builder container (cgroup v1 cpuacct, or
        v2 cpu.stat), or None where neither is readable."""
        try:
            name = self.container()
            if not self._cid or self._cid[0] != name:
                cid = run([*DOCKER, "inspect", "-f", "{{.Id}}", name]).stdout.strip()
                self._cid = (name, cid)
            cid = self._cid[1]
            for f in (f"/sys/fs/cgroup/cpuacct/docker/{cid}/cpuacct.usage",
                      f"/sys/fs/cgroup/cpu,cpuacct/docker/{cid}/cpuacct.usage"):
                if os.path.exists(f):
                    return int(Path(f).read_text())
            for f in (f"/sys/fs/cgroup/system.slice/docker-{cid}.scope/cpu.stat",
                      f"/sys/fs/cgroup/docker/{cid}/cpu.stat"):
                if os.path.exists(f):
                    m = re.search(r"^usage_usec (\d+)", Path(f).read_text(), re.M)
                    return int(m.group(1)) * 1000 if m else None
        except Exception:
            return None
        return None

    def build(self, expr: str, rss: bool = False, cpu: bool = True, timeout: int = 900) -> dict:
        """One timed nix-build; returns seconds, out paths and sampled hook RSS."""
        cmd = ["nix-build", "--no-out-link", "-E", expr, "--max-jobs", "0"] + self.args(rss)
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        c0 = self.container_cpu_ns() if cpu else None
        t0 = time.perf_counter()
        p = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env()
        )
        sampler = RssSampler(p.pid) if rss else None
        if sampler:
            sampler.start()
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            raise RuntimeError(f"{self.name}: nix-build timed out after {timeout}s:\n{err[-3000:]}")
        dt = time.perf_counter() - t0
        sampled = sampler.stop() if sampler else {}
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        c1 = self.container_cpu_ns() if cpu else None
        # CPU seconds on the host side (nix-build and everything it waited for: the hook, ssh,
        # nix-store) and inside the builder container (sshd, nix-daemon, the build).
        host_cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        builder_cpu = (c1 - c0) / 1e9 if c0 is not None and c1 is not None else None
        if p.returncode != 0:
            raise RuntimeError(f"{self.name}: nix-build failed ({p.returncode}):\n{err[-4000:]}")
        if self.machine_marker() not in err:
            raise RuntimeError(
                f"{self.name}: the build did not run on {self.machine_marker()!r}:\n{err[-3000:]}"
            )
        outs = [l for l in out.splitlines() if l.startswith("/nix/store/")]
        return {"seconds": dt, "outs": outs, "sampled_rss_kb": sampled,
                "exact_rss_kb": self.exact_rss(), "host_cpu": host_cpu, "builder_cpu": builder_cpu}


class NixdockSystem(System):
    name = "nixdock"

    def __init__(self, tmp: Path, hook: Path, image: str, transport: str = "auto") -> None:
        self.hook = hook
        self.state = tmp / "nixdock-state"
        self.config = tmp / "nixdock.toml"
        self.config.write_text(
            NIXDOCK_ENGINE_CONF + f'transport = "{transport}"\n'
            f'[builders."{SYSTEM}"]\nimage = "{image}"\nidle-timeout = 3600\n'
        )
        self.rss_dir = tmp / "rss"
        self.rss_dir.mkdir()
        # A wrapper for the exact peak RSS: GNU time runs the hook as its child with fds 0, 1,
        # 2 and 4 inherited and argv passed through, writes the peak to a file (never to fd 2,
        # which belongs to Nix) and exits with the hook's status.
        self.wrapper = tmp / "nixdock-hook-rss"
        self.wrapper.write_text(
            "#!/bin/sh\n"
            f'exec /usr/bin/time -f "%M %e" -o "{self.rss_dir}/hook.$$" "{hook}" "$@"\n'
        )
        self.wrapper.chmod(0o755)
        self.instance: str | None = None

    def args(self, rss: bool) -> list[str]:
        return ["--option", "build-hook", str(self.wrapper if rss else self.hook)]

    def env(self) -> dict[str, str]:
        e = {k: v for k, v in os.environ.items() if not k.startswith(("NIXDOCK_", "NIX_SSHOPTS"))}
        e["NIXDOCK_CONFIG"] = str(self.config)
        e["NIXDOCK_STATE_DIR"] = str(self.state)
        return e

    def machine_marker(self) -> str:
        return f"nixdock {SYSTEM} builder"

    def discover(self) -> None:
        self.instance = (self.state / "instance-id").read_text().strip()
        CLEAN.containers.append(self.container())
        CLEAN.volume_labels.append(f"nixdock.instance={self.instance}")

    def container(self) -> str:
        return f"nixdock-{self.instance}-{SYSTEM}"

    def exact_rss(self) -> list[int]:
        """Peak RSS (kB) of each hook process since the last call."""
        peaks = []
        for f in sorted(self.rss_dir.glob("hook.*")):
            first = f.read_text().strip().splitlines()
            # "Command exited with non-zero status N" may precede the figures.
            for line in first:
                parts = line.split()
                if len(parts) == 2 and parts[0].isdigit():
                    peaks.append(int(parts[0]))
            f.unlink()
        return peaks


class EmulatedNixdock(NixdockSystem):
    """nixdock building aarch64-linux on this x86_64 host, two ways (issue 16): `mode =
    "native-builder"` (the x86_64 builder with `extra-platforms`, only the build's programs
    under qemu) or `"container"` (an arm64 container of its own, everything under qemu)."""

    def __init__(self, tmp: Path, hook: Path, image: str, arm64_image: str, mode: str) -> None:
        sub = tmp / f"emulated-{mode}"
        sub.mkdir()
        super().__init__(sub, hook, image)
        self.name = f"nixdock-{mode}"
        self.mode = mode
        self.config.write_text(
            f'[builders."{SYSTEM}"]\nimage = "{image}"\nidle-timeout = 3600\n'
            f'[builders."aarch64-linux"]\nemulation = "{mode}"\n'
            + (f'image = "{arm64_image}"\nidle-timeout = 3600\n' if mode == "container" else "")
        )

    def machine_marker(self) -> str:
        return "nixdock aarch64-linux builder"

    def container(self) -> str:
        system = SYSTEM if self.mode == "native-builder" else "aarch64-linux"
        return f"nixdock-{self.instance}-{system}"


def aarch64_probe(tmp: Path, arm64_image: str) -> str:
    """`uname` with the arm64 image's dynamic loader and libc, as one path in the host store:
    an emulated build runs an aarch64 program in both modes (the native builder's /bin/sh is
    x86_64)."""
    d = tmp / "aarch64-uname"
    d.mkdir()
    name = f"nixdock-bench-arm64-files-{nonce()}"
    run([*DOCKER, "create", "--name", name, arm64_image, "/bin/true"])
    try:
        for f in ("/usr/lib/aarch64-linux-gnu/ld-linux-aarch64.so.1",
                  "/usr/lib/aarch64-linux-gnu/libc.so.6", "/usr/bin/uname"):
            run([*DOCKER, "cp", "-L", f"{name}:{f}", str(d)])
    finally:
        run([*DOCKER, "rm", "-f", name], check=False)
    p = run(["nix-store", "--add", str(d)]).stdout.strip()
    CLEAN.store_paths.append(p)
    return p


def emulated_expr(probe: str) -> str:
    return (
        f'derivation {{ name = "bench-emulated"; system = "aarch64-linux"; builder = "/bin/sh"; '
        f'args = ["-c" "{probe}/ld-linux-aarch64.so.1 --library-path {probe} {probe}/uname -m '
        f'> $out"]; probe = builtins.storePath "{probe}"; nonce = "{nonce()}"; }}'
    )


class StockSystem(System):
    """Nix's own hook with ssh-ng:// to a container set up by hand (sshd, loopback port, Host
    alias in a temporary ssh config, OpenSSH client)."""

    name = "stock"

    def __init__(self, tmp: Path, image: str, nix_conf: str, sshd_config: str) -> None:
        self.tmp = tmp
        tag = os.urandom(4).hex()
        self.name_ = f"nixdock-bench-stock-{tag}"
        self.volume = self.name_
        d = tmp / "stock"
        (d / "etc/bench").mkdir(parents=True)
        self.key = d / "client_key"
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bench-client", "-f", str(self.key)])
        hostkey = d / "etc/bench/ssh_host_ed25519_key"
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bench-host", "-f", str(hostkey)])
        host_pub = (d / "etc/bench/ssh_host_ed25519_key.pub").read_text().split()
        self.host_pub = host_pub
        shutil.copy(str(self.key) + ".pub", d / "etc/bench/authorized_keys")
        # The same nix.conf as the nixdock builder runs with (read back from it), plus
        # `substituters =` as any reachable-cache-less setup has it.
        (d / "etc/bench/nix.conf").write_text(
            "# stock remote-building setup for the benchmark\n" + nix_conf + "substituters =\n"
        )
        # The same sshd_config as nixdock's, with this container's paths.
        (d / "etc/bench/sshd_config").write_text(
            sshd_config.replace("/etc/nixdock/", "/etc/bench/").replace(
                "PidFile /run/nixdock-sshd.pid", "PidFile /run/bench-sshd.pid"
            )
        )
        (d / "etc/bench/entry.sh").write_text(
            "#!/bin/sh\n"
            "# By hand, the classic way: nix.conf, sshd's directories, sshd in the foreground.\n"
            "set -eu\n"
            "mkdir -p /etc/nix /run/sshd /var/empty\n"
            "chmod 0755 /run/sshd /var/empty\n"
            "cp /etc/bench/nix.conf /etc/nix/nix.conf\n"
            "chmod 0600 /etc/bench/ssh_host_ed25519_key /etc/bench/authorized_keys\n"
            "exec /usr/sbin/sshd -D -e -f /etc/bench/sshd_config\n"
        )
        CLEAN.containers.append(self.name_)
        CLEAN.volumes.append(self.volume)
        # Like a nixdock builder: /nix on a named volume (filled from the image), tini as init,
        # sshd on an ephemeral loopback port.
        run([*DOCKER, "volume", "create", self.volume])
        run([
            *DOCKER, "create", "--name", self.name_, "--init", "--hostname", "bench-stock",
            "-p", f"{PUBLISH_HOST}::22", "--mount", f"type=volume,source={self.volume},target=/nix",
            "--entrypoint", "/bin/sh", image, "/etc/bench/entry.sh",
        ])
        run([*DOCKER, "cp", f"{d}/etc/.", f"{self.name_}:/etc/"])
        run([*DOCKER, "start", self.name_])
        port = run([*DOCKER, "port", self.name_, "22/tcp"]).stdout.split()[0].rsplit(":", 1)[1]
        self.known_hosts = d / "known_hosts"
        self.known_hosts.write_text(f"[{PUBLISH_HOST}]:{port} {host_pub[0]} {host_pub[1]}\n")
        self.ssh_config = d / "ssh_config"
        self.ssh_config.write_text(
            f"Host {STOCK_ALIAS}\n"
            f"  HostName {PUBLISH_HOST}\n"
            f"  Port {port}\n"
            f"  User root\n"
            f"  IdentityFile {self.key}\n"
            f"  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {self.known_hosts}\n"
            f"  GlobalKnownHostsFile /dev/null\n"
            f"  StrictHostKeyChecking yes\n"
            f"  BatchMode yes\n"
        )
        deadline = time.time() + 60
        while True:
            p = run(["ssh", "-F", str(self.ssh_config), STOCK_ALIAS, "nix-daemon", "--version"], check=False)
            if p.returncode == 0:
                break
            if time.time() > deadline:
                logs = run([*DOCKER, "logs", self.name_], check=False)
                raise RuntimeError(f"stock container's sshd never answered: {p.stderr}\n{logs.stderr}")
            time.sleep(0.3)

    def repoint(self, port: int) -> None:
        """After a restart the engine may publish sshd on another port."""
        self.known_hosts.write_text(f"[{PUBLISH_HOST}]:{port} {self.host_pub[0]} {self.host_pub[1]}\n")
        self.ssh_config.write_text(re.sub(r"(?m)^  Port \d+$", f"  Port {port}",
                                          self.ssh_config.read_text()))

    def args(self, rss: bool) -> list[str]:
        return ["--builders", f"ssh-ng://{STOCK_ALIAS} {SYSTEM} {self.key} 8 1"]

    def env(self) -> dict[str, str]:
        e = {k: v for k, v in os.environ.items() if not k.startswith("NIXDOCK_")}
        e["NIX_SSHOPTS"] = f"-F {self.ssh_config}"
        return e

    def machine_marker(self) -> str:
        return f"ssh-ng://{STOCK_ALIAS}"

    def container(self) -> str:
        return self.name_


# --------------------------------------------------------------------------------------------
# Workloads.


def nonce() -> str:
    return os.urandom(8).hex()


def trivial_expr(tag: str) -> str:
    return (
        f'derivation {{ name = "bench-{tag}"; system = "{SYSTEM}"; builder = "/bin/sh"; '
        f'args = ["-c" "echo hi > $out"]; nonce = "{nonce()}"; }}'
    )


def parallel_expr(n: int) -> str:
    return (
        f"builtins.genList (i: derivation {{ name = \"bench-par-${{toString i}}\"; "
        f'system = "{SYSTEM}"; builder = "/bin/sh"; args = ["-c" "echo hi > $out"]; '
        f'nonce = "{nonce()}"; }}) {n}'
    )


def output_expr(nbytes: int) -> str:
    return (
        f'derivation {{ name = "bench-output"; system = "{SYSTEM}"; builder = "/bin/sh"; '
        f'args = ["-c" "/usr/bin/head -c {nbytes} /dev/urandom > $out"]; nonce = "{nonce()}"; }}'
    )


def closure_expr(inputs: list[str]) -> str:
    paths = " ".join(f'(builtins.storePath "{p}")' for p in inputs)
    return (
        f'derivation {{ name = "bench-closure"; system = "{SYSTEM}"; builder = "/bin/sh"; '
        f"inputs = [ {paths} ]; "
        f'args = ["-c" "for i in $inputs; do [ -d $i ] || exit 1; done; echo ok > $out"]; '
        f'nonce = "{nonce()}"; }}'
    )


def file_sizes(total: int, nfiles: int, rng: random.Random) -> list[int]:
    """A closure-like mix: many small files, a few large ones (log-normal), summing to total."""
    raw = [rng.lognormvariate(0, 1.6) for _ in range(nfiles)]
    s = sum(raw)
    sizes = [max(1, int(r / s * total)) for r in raw]
    sizes[sizes.index(max(sizes))] += total - sum(sizes)
    return sizes


def scratch_dir(tmp: Path) -> Path:
    """Where closures are written before `nix-store --add`: tmpfs when there is one, so that
    making and removing them does not churn the disk's inodes (see BENCHMARKS.md)."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 2 * 400 * MB:
        d = Path(tempfile.mkdtemp(prefix="nixdock-bench-", dir=shm))
        CLEAN.dirs.append(str(d))
        return d
    return tmp


def make_closure(scratch: Path, total: int, nfiles: int, files_per_path: int = 100) -> list[str]:
    """Fresh random content in nfiles files, split over store paths of ~files_per_path files
    each, added with `nix-store --add`. Returns the store paths."""
    rng = random.Random(os.urandom(8))
    sizes = file_sizes(total, nfiles, rng)
    npaths = max(1, nfiles // files_per_path)
    root = Path(tempfile.mkdtemp(prefix="closure-", dir=scratch))
    dirs = []
    for k in range(npaths):
        d = root / f"bench-input-{k:02d}"
        d.mkdir()
        dirs.append(d)
    for i, sz in enumerate(sizes):
        d = dirs[min(i // files_per_path, npaths - 1)]
        sub = d / f"d{(i % files_per_path) // 10}"
        sub.mkdir(exist_ok=True)
        (sub / f"f{i:04d}").write_bytes(os.urandom(sz))
    out = run(["nix-store", "--add"] + [str(d) for d in dirs], timeout=600).stdout.split()
    shutil.rmtree(root, ignore_errors=True)
    CLEAN.store_paths += out
    return out


def drv_of(out: str) -> str:
    p = run(["nix-store", "-q", "--deriver", out], check=False)
    d = p.stdout.strip()
    return d if d.endswith(".drv") else ""


def forget(outs: list[str]) -> None:
    """Marks a run's outputs and their .drv files for removal from the host store at the end.
    Nothing is deleted between runs: on a file system without a journal, ext4 skips recently
    freed inodes one by one when it allocates new ones, so deleting thousands of files just
    before a copy makes the copy's file creation slower (see BENCHMARKS.md)."""
    CLEAN.store_paths += list(outs) + [drv_of(o) for o in outs]


# --------------------------------------------------------------------------------------------
# Scenarios. Each alternates the systems run by run (stock first on even runs).


def pair_order(i: int, systems: list[System]) -> list[System]:
    return systems if i % 2 == 0 else list(reversed(systems))


def keep(r: dict) -> dict:
    """What a run contributes to the results."""
    return {k: r[k] for k in ("seconds", "host_cpu", "builder_cpu", "exact_rss_kb", "sampled_rss_kb")}


def scenario_warm(systems, runs: int) -> dict:
    res = {s.name: [] for s in systems}
    for i in range(runs):
        for s in pair_order(i, systems):
            r = s.build(trivial_expr("warm"))
            res[s.name].append(keep(r))
            forget(r["outs"])
    return res


def scenario_local(runs: int) -> dict:
    """The same trivial build on the host with no hook, for scale."""
    xs = []
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NIXDOCK_", "NIX_SSHOPTS"))}
    for _ in range(runs):
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        p = run(["nix-build", "--no-out-link", "-E", trivial_expr("local"), "--max-jobs", "1",
                 "--builders", ""], env=env)
        dt = time.perf_counter() - t0
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        xs.append({"seconds": dt, "host_cpu": ru1.ru_utime - ru0.ru_utime + ru1.ru_stime - ru0.ru_stime})
        forget(p.stdout.split())
    return {"local": xs}


def scenario_closure(systems, runs: int, scratch: Path, total: int, nfiles: int) -> dict:
    res = {s.name: [] for s in systems}
    for i in range(runs):
        inputs = make_closure(scratch, total, nfiles)
        for s in pair_order(i, systems):
            r = s.build(closure_expr(inputs), rss=True)
            res[s.name].append(keep(r))
            forget(r["outs"])
    return res


def scenario_output(systems, runs: int, nbytes: int) -> dict:
    res = {s.name: [] for s in systems}
    for i in range(runs):
        for s in pair_order(i, systems):
            r = s.build(output_expr(nbytes), rss=True)
            size = os.path.getsize(r["outs"][0])
            if size != nbytes:
                raise RuntimeError(f"{s.name}: output has {size} bytes, expected {nbytes}")
            res[s.name].append(keep(r))
            forget(r["outs"])
    return res


def scenario_parallel(systems, runs: int, n: int) -> dict:
    res = {s.name: [] for s in systems}
    for i in range(runs):
        for s in pair_order(i, systems):
            r = s.build(parallel_expr(n), rss=True)
            if len(r["outs"]) != n:
                raise RuntimeError(f"{s.name}: expected {n} outputs, got {r['outs']}")
            res[s.name].append(keep(r))
            forget(r["outs"])
    return res


def scenario_cold(nd: NixdockSystem, runs: int, how: str) -> dict:
    """No running container → first result. how = "removed" (docker rm -f: create, upload,
    start) or "stopped" (the idle-timeout case: start only)."""
    xs = []
    for _ in range(runs):
        if how == "removed":
            run([*DOCKER, "rm", "-f", nd.container()])
        else:
            run([*DOCKER, "stop", "-t", "5", nd.container()])
        r = nd.build(trivial_expr("cold"), cpu=False)
        xs.append(keep(r))
        forget(r["outs"])
    return {"nixdock": xs}


def sshd_banner(host: str, port: int, deadline: float) -> float:
    """Polls until sshd at host:port sends its banner; returns when it did."""
    import socket
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5) as c:
                c.settimeout(0.5)
                if c.recv(8).startswith(b"SSH-"):
                    return time.perf_counter()
        except OSError:
            pass
        if time.perf_counter() > deadline:
            raise RuntimeError(f"sshd at {host}:{port} sent no banner in time")
        time.sleep(0.005)


def scenario_cold_floor(st: "StockSystem", runs: int) -> dict:
    """What the engine allows for a cold start: the hand-made stock container (entry script:
    nix.conf, then `exec sshd`) stopped, then `docker start` until its sshd sends a banner."""
    xs = []
    for _ in range(runs):
        run([*DOCKER, "stop", "-t", "5", st.container()])
        t0 = time.perf_counter()
        run([*DOCKER, "start", st.container()])
        port = int(run([*DOCKER, "port", st.container(), "22/tcp"]).stdout.split()[0].rsplit(":", 1)[1])
        t1 = sshd_banner(PUBLISH_HOST, port, t0 + 60)
        xs.append({"seconds": t1 - t0})
    # The port may change across starts: point the stock ssh config at the current one.
    st.repoint(port)
    return {"floor": xs}


def scenario_emulated(tmp: Path, hook: Path, image: str, arm64_image: str, warm_runs: int,
                      cold_runs: int) -> dict[str, dict]:
    """aarch64-linux, native builder vs a container of its own: the first build (container
    created), warm builds alternating, then cold starts (container removed; its volume, so
    the store, stays)."""
    probe = aarch64_probe(tmp, arm64_image)
    modes = [EmulatedNixdock(tmp, hook, image, arm64_image, m) for m in ("native-builder", "container")]
    out: dict[str, dict] = {"emulated-first": {}, "emulated-warm": {}, "emulated-cold-removed": {}}
    for m in modes:
        try:
            r = m.build(emulated_expr(probe), cpu=False)
        finally:
            if (m.state / "instance-id").exists():
                m.discover()
        if Path(r["outs"][0]).read_text().strip() != "aarch64":
            raise RuntimeError(f"{m.name}: the probe did not run as aarch64")
        out["emulated-first"][m.name] = [keep(r)]
        forget(r["outs"])
    for i in range(warm_runs):
        for m in pair_order(i, modes):
            r = m.build(emulated_expr(probe))
            out["emulated-warm"].setdefault(m.name, []).append(keep(r))
            forget(r["outs"])
    for i in range(cold_runs):
        for m in pair_order(i, modes):
            run([*DOCKER, "rm", "-f", m.container()])
            r = m.build(emulated_expr(probe), cpu=False)
            out["emulated-cold-removed"].setdefault(m.name, []).append(keep(r))
            forget(r["outs"])
    return out


# --------------------------------------------------------------------------------------------


def machine_info() -> dict:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    def out(cmd):
        p = run(cmd, check=False)
        return (p.stdout or p.stderr).strip().splitlines()[0] if (p.stdout or p.stderr) else "?"
    def fs(path: str) -> str:
        """File system of `path`, and whether ext4 keeps a journal on it (without one, inode
        allocation checks recently deleted inodes one by one)."""
        best = ("", "?", "?")
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, typ = line.split()[:3]
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
                best = (mnt, dev, typ)
        mnt, dev, typ = best
        note = ""
        if typ == "ext4":
            name = os.path.basename(dev)
            jbd = Path("/proc/fs/jbd2")
            has = jbd.is_dir() and any(e.name.startswith(name + "-") for e in jbd.iterdir())
            note = ", journal" if has else ", no journal"
        return f"{typ} on {dev} at {mnt}{note}"

    return {
        "nproc": os.cpu_count(),
        "fs_nix_store": fs("/nix/store"),
        "fs_docker": fs("/var/lib/docker"),
        "cpu": cpu,
        "kernel": os.uname().release,
        "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "nix": out(["nix-build", "--version"]),
        "docker": out([*DOCKER, "version", "--format", "{{.Server.Version}}"]),
        "openssh": out(["ssh", "-V"]),
    }


def build_hook(args) -> Path:
    if args.hook:
        return Path(args.hook).resolve()
    log("cargo build --release --bin nixdock-hook")
    run(["cargo", "build", "--release", "--bin", "nixdock-hook"], timeout=1800)
    return REPO / "target/release/nixdock-hook"


def git_state() -> str:
    head = run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], check=False).stdout.strip()
    dirty = run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no", "--", "src", "hook-protocol", "Cargo.toml", "Cargo.lock"], check=False).stdout.strip()
    return head + ("+dirty" if dirty else "")


def fmt_s(d: dict) -> str:
    if not d or not d.get("runs"):
        return "—"
    return f"{d['median']:.3f} s ({d['min']:.2f}–{d['max']:.2f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", default="nixdock-test/bookworm-amd64")
    ap.add_argument("--hook", help="use this nixdock-hook binary instead of building target/release")
    ap.add_argument("--warm-runs", type=int, default=15)
    ap.add_argument("--big-runs", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="3 warm runs, 1 of everything else")
    ap.add_argument("--only", help="comma-separated scenarios: warm,closure-200,closure-346,output-200,parallel-8,cold,emulated")
    ap.add_argument("--arm64-image", default="nixdock-test/bookworm-arm64",
                    help="the emulated scenario's image for aarch64-linux in a container of its own")
    ap.add_argument("--out", default=str(REPO / "bench/results/latest.json"))
    ap.add_argument(
        "--transport",
        choices=["auto", "ssh"],
        default="auto",
        help="nixdock's transport: auto (the local socket on this Linux engine) or ssh (what an engine in a VM, e.g. Docker Desktop, gets)",
    )
    ap.add_argument(
        "--engine",
        choices=["local", "e2"],
        default="local",
        help="where both systems' builders run: this host's engine, or the test bed's second "
        "engine (e2: its own address, reached over tcp:// with TLS, as Docker Desktop's VM or a "
        "server would be)",
    )
    args = ap.parse_args()
    if args.engine == "e2":
        global PUBLISH_HOST, NIXDOCK_ENGINE_CONF
        DOCKER[:] = ["docker", "-H", ENGINE2_UNIX]
        PUBLISH_HOST = ENGINE2_ADDR
        NIXDOCK_ENGINE_CONF = (
            f'docker-host = "tcp://{ENGINE2_ADDR}:2376"\n'
            f'tls-ca = "{ENGINE2_TLS}/ca.pem"\ntls-cert = "{ENGINE2_TLS}/cert.pem"\n'
            f'tls-key = "{ENGINE2_TLS}/key.pem"\n'
        )
        if args.only and "emulated" in args.only:
            ap.error("--engine e2 does not run the emulated scenario")
    if args.quick:
        args.warm_runs, args.big_runs = 3, 1
    only = set(args.only.split(",")) if args.only else None
    want = lambda s: only is None or s in only

    if os.geteuid() != 0:
        log("warning: not root; the host store and Docker must be writable by this user")

    hook_src = build_hook(args)
    tmp = Path(tempfile.mkdtemp(prefix="nixdock-bench-"))
    CLEAN.dirs.append(str(tmp))
    # A private copy, so a concurrent `cargo build` cannot swap the binary mid-run.
    hook = tmp / "nixdock-hook"
    shutil.copy2(hook_src, hook)

    def on_signal(sig, _frame):
        log(f"signal {sig}: cleaning up")
        CLEAN.all()
        sys.exit(130)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    started = time.time()
    result: dict = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "hook": {
            "source": str(hook_src),
            "git": git_state(),
            "sha256": hashlib.sha256(hook.read_bytes()).hexdigest()[:16],
        },
        "image": args.image,
        "transport": args.transport,
        "engine": args.engine,
        "loadavg": {"start": loadavg()},
        "scenarios": {},
    }
    try:
        nd = NixdockSystem(tmp, hook, args.image, args.transport)
        log("nixdock: first build (creates the builder)")
        t0 = time.perf_counter()
        try:
            r = nd.build(trivial_expr("first"))
        finally:
            if (nd.state / "instance-id").exists():
                nd.discover()
        result["nixdock_first_build_s"] = round(time.perf_counter() - t0, 3)
        forget(r["outs"])
        nix_conf = run([*DOCKER, "exec", nd.container(), "cat", "/etc/nix/nix.conf"]).stdout
        sshd_config = run([*DOCKER, "exec", nd.container(), "cat", "/etc/nixdock/sshd_config"]).stdout
        # The first line is nixdock's comment; the rest is the builder's effective nix.conf.
        nix_conf = "".join(l + "\n" for l in nix_conf.splitlines() if not l.startswith("#"))
        if "build-users-group = nixbld" not in nix_conf:
            log("note: the nixdock builder runs without build users")
        log("stock: starting a container by hand (sshd, Host alias in a temporary ssh config)")
        st = StockSystem(tmp, args.image, nix_conf, sshd_config)
        result["builder_nix_conf"] = nix_conf
        r = st.build(trivial_expr("first"))
        forget(r["outs"])
        systems: list[System] = [st, nd]
        scratch = scratch_dir(tmp)

        sc = result["scenarios"]

        def record(key, res, extra=None):
            entry = {}
            for name, runs_ in res.items():
                e = summary([x["seconds"] for x in runs_])
                for k in ("host_cpu", "builder_cpu"):
                    vals = [x[k] for x in runs_ if x.get(k) is not None]
                    if vals:
                        e[k + "_median"] = statistics.median(vals)
                exact = [max(x["exact_rss_kb"]) for x in runs_ if x.get("exact_rss_kb")]
                if exact:
                    e["hook_peak_rss_kb"] = max(exact)
                sampled = {}
                for x in runs_:
                    for comm, kb in (x.get("sampled_rss_kb") or {}).items():
                        sampled[comm] = max(sampled.get(comm, 0), kb)
                if sampled:
                    e["sampled_peak_rss_kb"] = sampled
                entry[name] = e
            if "stock" in entry and "nixdock" in entry:
                entry["ratio"] = entry["nixdock"]["median"] / entry["stock"]["median"]
            entry["loadavg_after"] = loadavg()
            if extra:
                entry.update(extra)
            sc[key] = entry
            log(f"{key}: " + ", ".join(f"{k} {fmt_s(entry[k])}" for k in res)
                + (f", ratio {entry['ratio']:.2f}" if "ratio" in entry else ""))

        if want("warm"):
            log(f"warm: {args.warm_runs} trivial builds each, alternating")
            record("warm", scenario_warm(systems, args.warm_runs))
            record("local-no-hook", scenario_local(max(3, args.big_runs)))
        for key, total, nfiles in (("closure-200", 200 * MB, 1000), ("closure-346", 346 * MB, 2003)):
            if want(key):
                log(f"{key}: fresh {total // MB} MB / {nfiles}-file closure, {args.big_runs} runs each")
                res = scenario_closure(systems, args.big_runs, scratch, total, nfiles)
                record(key, res, {"closure": {"bytes": total, "files": nfiles, "store_paths": max(1, nfiles // 100)}})
        if want("output-200"):
            log(f"output-200: a 200 MB output copied back, {args.big_runs} runs each")
            record("output-200", scenario_output(systems, args.big_runs, 200 * MB))
        if want("parallel-8"):
            log(f"parallel-8: 8 trivial builds in one nix-build, {args.big_runs} runs each")
            record("parallel-8", scenario_parallel(systems, args.big_runs, 8))
        if want("cold"):
            log(f"cold: nixdock only, {args.big_runs} runs each of removed and stopped container")
            record("cold-removed", scenario_cold(nd, args.big_runs, "removed"))
            record("cold-stopped", scenario_cold(nd, args.big_runs, "stopped"))
            record("cold-floor", scenario_cold_floor(st, args.big_runs))
        if want("emulated"):
            log(f"emulated: aarch64-linux, native builder vs own container, {args.warm_runs} warm "
                f"and {args.big_runs} cold runs each")
            for key, res in scenario_emulated(tmp, hook, args.image, args.arm64_image,
                                              args.warm_runs, args.big_runs).items():
                record(key, res)
                e = sc[key]
                if "nixdock-native-builder" in e and "nixdock-container" in e:
                    e["native_over_container"] = (e["nixdock-native-builder"]["median"]
                                                  / e["nixdock-container"]["median"])
    finally:
        result["loadavg"]["end"] = loadavg()
        result["wall_s"] = round(time.time() - started, 1)
        log("cleaning up containers, volumes, store paths and temp files")
        CLEAN.all()

    evaluate(result)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    log(f"wrote {args.out} ({result['wall_s']} s)")
    return 0


def evaluate(result: dict) -> None:
    """The targets: issue 7's cold start and memory, issue 19's ratios to stock (stricter than
    issue 7's, which they replace) and cold start against the engine's floor."""
    sc = result["scenarios"]
    targets = {}
    if "parallel-8" in sc and "warm" in sc:
        for name in ("nixdock", "stock"):
            sc["parallel-8"][f"{name}_par_over_one"] = (
                sc["parallel-8"][name]["median"] / sc["warm"][name]["median"]
            )
    if "cold-removed" in sc:
        targets["cold start <= 2 s"] = sc["cold-removed"]["nixdock"]["median"] <= 2.0
    if "cold-stopped" in sc and "cold-floor" in sc:
        # Issue 19: a cold start (container stopped, then a trivial build) within 1.3x of the
        # engine's own start of a minimal sshd container.
        f = sc["cold-stopped"]["nixdock"]["median"] / sc["cold-floor"]["floor"]["median"]
        sc["cold-stopped"]["over_floor"] = f
        targets["cold start <= 1.3x floor"] = f <= 1.3
    # Issue 19's ratios to stock, per transport.
    ssh = result.get("transport") == "ssh"
    for key, limit in (("warm", 0.30), ("output-200", 0.50 if ssh else 0.35),
                       ("closure-200", 0.35), ("closure-346", 0.35), ("parallel-8", 0.10)):
        if limit is not None and key in sc and "ratio" in sc[key]:
            targets[f"{key} ratio <= {limit:.2f}"] = sc[key]["ratio"] <= limit
    peaks = {k: v["nixdock"]["hook_peak_rss_kb"] for k, v in sc.items()
             if "nixdock" in v and "hook_peak_rss_kb" in v["nixdock"]}
    if peaks:
        result["nixdock_hook_peak_rss_kb"] = peaks
        targets["hook peak RSS <= 32 MiB"] = max(peaks.values()) <= 32 * 1024
    result["targets"] = targets


LABELS = {
    "warm": "warm trivial build",
    "local-no-hook": "  (same build locally, no hook)",
    "closure-200": "closure copy 200 MB / 1,000 files",
    "closure-346": "closure copy 346 MB / 2,003 files",
    "output-200": "output copy back 200 MB",
    "parallel-8": "8 trivial builds at once",
    "cold-removed": "cold start, container removed",
    "cold-stopped": "cold start, container stopped",
    "cold-floor": "  (floor: docker start + sshd banner)",
}

EMULATED_LABELS = {
    "emulated-first": "aarch64 first build (creates the builder)",
    "emulated-warm": "aarch64 warm build (an aarch64 program)",
    "emulated-cold-removed": "aarch64 cold start, container removed",
}


def cpu_s(e: dict) -> str:
    if not e or "host_cpu_median" not in e:
        return ""
    b = e.get("builder_cpu_median")
    return f"{e['host_cpu_median']:.2f}" + (f"+{b:.2f}" if b is not None else "")


def table(result: dict) -> str:
    sc = result["scenarios"]
    rows = [("scenario", "runs", "stock: median (min-max)", "nixdock: median (min-max)", "ratio",
             "cpu-s host+builder: stock | nixdock")]
    for k, label in LABELS.items():
        if k not in sc:
            continue
        e = sc[k]
        if k == "local-no-hook":
            rows.append((label, str(e["local"]["runs"]), fmt_s(e["local"]), "", "", cpu_s(e["local"])))
            continue
        if k == "cold-floor":
            rows.append((label, str(e["floor"]["runs"]), "", fmt_s(e["floor"]), "", ""))
            continue
        runs_ = max(e.get(n, {}).get("runs", 0) for n in ("stock", "nixdock"))
        ratio = f"{e['ratio']:.2f}" if "ratio" in e else ""
        if "stock" in e:
            cpu = f"{cpu_s(e['stock'])} | {cpu_s(e['nixdock'])}"
        else:
            cpu = f"- | {cpu_s(e['nixdock'])}"
        rows.append((label, str(runs_), fmt_s(e.get("stock", {})), fmt_s(e.get("nixdock", {})), ratio, cpu))
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(f"{c:<{w[i]}}" for i, c in enumerate(r)).rstrip() for r in rows]
    lines.insert(1, "-" * (sum(w) + 2 * (len(w) - 1)))
    if "parallel-8" in sc and "nixdock_par_over_one" in sc["parallel-8"]:
        p = sc["parallel-8"]
        lines.append(f"8 at once / one warm build: nixdock {p['nixdock_par_over_one']:.2f}, "
                     f"stock {p['stock_par_over_one']:.2f}")
    if "over_floor" in sc.get("cold-stopped", {}):
        lines.append(f"cold start (stopped) / floor: {sc['cold-stopped']['over_floor']:.2f}")
    if "nixdock_hook_peak_rss_kb" in result:
        lines.append("nixdock-hook peak RSS (/usr/bin/time): " + ", ".join(
            f"{k} {kb / 1024:.1f} MiB" for k, kb in result["nixdock_hook_peak_rss_kb"].items()))
    for k in ("closure-346", "output-200"):
        s = sc.get(k, {}).get("stock", {}).get("sampled_peak_rss_kb")
        if s:
            lines.append(f"stock hook processes, {k}, sampled VmHWM: " + ", ".join(
                f"{c} {kb / 1024:.1f} MiB" for c, kb in sorted(s.items()) if c != "nix-build"))
    emu = [(label, sc[k]) for k, label in EMULATED_LABELS.items() if k in sc]
    if emu:
        lines.append("")
        lines.append("emulated aarch64-linux: native builder (extra-platforms) | own container (all under qemu)")
        for label, e in emu:
            n, c = e.get("nixdock-native-builder", {}), e.get("nixdock-container", {})
            ratio = f", ratio {e['native_over_container']:.2f}" if "native_over_container" in e else ""
            lines.append(f"  {label}: {fmt_s(n)} | {fmt_s(c)}{ratio}")
    la = result["loadavg"]
    lines.append(f"load average (1/5/15 min): start {la['start']}, end {la.get('end')}; "
                 f"wall {result.get('wall_s')} s")
    lines.append("targets: " + ", ".join(
        f"{k}: {'met' if v else 'MISSED'}" for k, v in result.get("targets", {}).items()))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
