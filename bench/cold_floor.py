#!/usr/bin/env python3
"""The cold-start floor of a nixdock builder container on this machine (issue 19).

For a stopped builder container (made by nixdock, so it has its entry script, its `/nix` volume
and sshd published on loopback), times, per run:

  start   POST /containers/<c>/start on the engine's socket, until the engine answers
          (what `docker start` does, without the CLI's own start-up)
  daemon  from the start request until the builder's nix-daemon socket (beneath the volume on
          the host) accepts a connection
  sshd    from the start request until sshd on the published port sends its banner

and the same for a bare container of the same image and volume layout whose only process is
`nix-daemon --daemon` started at once (no entry script): `bare-daemon`, the engine's floor.

    python3 bench/cold_floor.py CONTAINER [--runs 10] [--bare]

Only the Python standard library. The container is left stopped as found; `--bare` creates
(and removes at the end) one container of its own, `nixdock-coldfloor-<pid>`, on a volume of
its own.
"""
import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import time

DOCKER_SOCK = "/var/run/docker.sock"


class UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=30)
        self.path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(self.path)
        self.sock = s


def api(method: str, path: str, body=None) -> tuple[int, bytes]:
    c = UnixHTTP(DOCKER_SOCK)
    data = json.dumps(body).encode() if body is not None else None
    c.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
    r = c.getresponse()
    out = r.read()
    c.close()
    return r.status, out


def inspect(name: str) -> dict:
    st, out = api("GET", f"/containers/{name}/json")
    if st != 200:
        raise SystemExit(f"inspect {name}: {st} {out[:200]!r}")
    return json.loads(out)


def volume_source(c: dict) -> str:
    for m in c.get("Mounts", []):
        if m.get("Destination") == "/nix":
            return m["Source"]
    raise SystemExit("no /nix mount")


def ssh_port(c: dict) -> int | None:
    b = ((c.get("NetworkSettings") or {}).get("Ports") or {}).get("22/tcp") or []
    return int(b[0]["HostPort"]) if b else None


def daemon_answers(sock_path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(sock_path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def sshd_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.settimeout(1)
            return s.recv(4).startswith(b"SSH-")
    except OSError:
        return False


def stop(name: str) -> None:
    api("POST", f"/containers/{name}/stop?t=5")
    while inspect(name)["State"]["Running"]:
        time.sleep(0.05)


def one_run(name: str, sock_path: str, ssh: bool) -> dict:
    stop(name)
    # The socket file of the last run stays on the volume until the new daemon replaces it.
    time.sleep(0.2)
    t0 = time.perf_counter()
    st, out = api("POST", f"/containers/{name}/start")
    if st not in (204, 304):
        raise SystemExit(f"start {name}: {st} {out[:200]!r}")
    t_start = time.perf_counter() - t0
    t_daemon = t_sshd = None
    # Published ports are assigned anew at each start.
    port = ssh_port(inspect(name)) if ssh else None
    while t_daemon is None or (port is not None and t_sshd is None):
        now = time.perf_counter() - t0
        if now > 30:
            raise SystemExit(f"{name}: not ready within 30 s")
        if t_daemon is None and daemon_answers(sock_path):
            t_daemon = time.perf_counter() - t0
        if port is not None and t_sshd is None and sshd_answers(port):
            t_sshd = time.perf_counter() - t0
        time.sleep(0.002)
    return {"start": t_start, "daemon": t_daemon, "sshd": t_sshd}


def make_bare(image: str) -> str:
    name = f"nixdock-coldfloor-{os.getpid()}"
    subprocess.run(["docker", "volume", "create", name], check=True, capture_output=True)
    subprocess.run(
        ["docker", "create", "--name", name, "--init", "-v", f"{name}:/nix", "-p", "127.0.0.1::22",
         "--entrypoint", "/bin/sh", image, "-c",
         "rm -f /nix/var/nix/daemon-socket/socket; mkdir -p /run/sshd; "
         "/usr/sbin/sshd -e; exec nix-daemon --daemon"],
        check=True, capture_output=True)
    return name


def summarise(runs: list[dict], label: str) -> dict:
    out = {}
    for k in ("start", "daemon", "sshd"):
        xs = [r[k] for r in runs if r[k] is not None]
        if xs:
            out[k] = {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}
            print(f"{label:>12} {k:>6}: median {statistics.median(xs) * 1000:6.0f} ms "
                  f"({min(xs) * 1000:.0f}–{max(xs) * 1000:.0f}), {len(xs)} runs")
    return out


def measure(name: str, runs: int, label: str) -> dict:
    c = inspect(name)
    sock_path = os.path.join(volume_source(c), "var/nix/daemon-socket/socket")
    ssh = "22/tcp" in ((c.get("HostConfig") or {}).get("PortBindings") or {})
    results = [one_run(name, sock_path, ssh) for _ in range(runs)]
    return summarise(results, label)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("container")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--bare", action="store_true", help="also a bare container of the same image")
    ap.add_argument("--out")
    args = ap.parse_args()
    c = inspect(args.container)
    was_running = c["State"]["Running"]
    print(f"load average {os.getloadavg()}")
    res = {"builder": measure(args.container, args.runs, "builder")}
    if not was_running:
        stop(args.container)
    if args.bare:
        bare = make_bare(c["Config"]["Image"])
        try:
            res["bare"] = measure(bare, args.runs, "bare")
        finally:
            subprocess.run(["docker", "rm", "-f", bare], capture_output=True)
            subprocess.run(["docker", "volume", "rm", bare], capture_output=True)
    print(f"load average {os.getloadavg()}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
