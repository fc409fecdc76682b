#!/usr/bin/env python3
"""Writes the seed corpora in fuzz/corpus/<target>/ from the repository's vectors (upstream Nix's
vendored test data, the recorded hook transcripts, the README's config) and a few hand-made
inputs. Files are named by their SHA-1, so running it again adds nothing twice. Run from
anywhere: `python3 fuzz/make_seeds.py`."""
import base64, glob, hashlib, hmac, os, struct

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UP = os.path.join(ROOT, "hook-protocol/tests/data/upstream")
MIN_MINOR = 21


def seed(target, data):
    if isinstance(data, str):
        data = data.encode()
    d = os.path.join(ROOT, "fuzz/corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, hashlib.sha1(data).hexdigest()), "wb") as f:
        f.write(data)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def u64(v):
    return struct.pack("<Q", v)


def s(b):
    if isinstance(b, str):
        b = b.encode()
    return u64(len(b)) + b + b"\0" * ((8 - len(b) % 8) % 8)


def strings(items):
    return u64(len(items)) + b"".join(s(i) for i in items)


def vbyte(minor):
    return bytes([minor - MIN_MINOR])


P = "/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo"
P2 = "/nix/store/n5wkd9frr45pa74if5gpz9j7mifg27fh-bar"
DRV = "/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo.drv"

# --- hook_channel: the recorded stdin of real hooks, and its parts.
for t in glob.glob(os.path.join(ROOT, "fixtures/hook-transcripts/*/*/")):
    parts = {n: read(os.path.join(t, n)) for n in os.listdir(t) if n.endswith(".bin")}
    if "stdin.bin" in parts:
        seed("hook_channel", parts["stdin.bin"])
    if "preamble.bin" in parts and "try-1.bin" in parts:
        seed("hook_channel", parts["preamble.bin"] + parts["try-1.bin"])
        seed("hook_channel", parts["preamble.bin"] + parts["try-1.bin"] + parts.get("post-accept.bin", b""))

# --- NARs (nar_parse, nar_unpack).
def node_file(data, exe=False):
    out = s("type") + s("regular")
    if exe:
        out += s("executable") + s("")
    return out + s("contents") + s(data)


def node(n):
    return s("(") + n + s(")")


def directory(entries):
    out = s("type") + s("directory")
    for name, n in sorted(entries):
        out += s("entry") + s("(") + s("name") + s(name) + s("node") + node(n) + s(")")
    return out


def symlink(target):
    return s("type") + s("symlink") + s("target") + s(target)


def nar(n):
    return s("nix-archive-1") + node(n)


nars = [
    nar(node_file(b"hello\n")),
    nar(node_file(b"")),
    nar(node_file(b"#!/bin/sh\necho hi\n", exe=True)),
    nar(symlink("/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo")),
    nar(directory([])),
    nar(directory([
        ("bin", directory([("tool", node_file(b"#!/bin/sh\n", exe=True)), ("link", symlink("tool"))])),
        ("lib", directory([("a", node_file(b"x" * 100)), ("b", node_file(b"y" * 9))])),
        ("share", symlink("../x")),
        ("README", node_file(b"readme")),
    ])),
    nar(directory([("d", directory([("e", directory([("f", node_file(b"deep"))]))]))])),
    # Names that differ only in case (the case hack's business).
    nar(directory([("A", node_file(b"1")), ("a", node_file(b"2")), ("a~nix~case~hack~1", node_file(b"3"))])),
]
for n in nars:
    seed("nar_parse", n)
    seed("nar_unpack", n)
# The same with one byte more: the unpack target's case-hack runs.
seed("nar_unpack", nars[7] + b"\0")

# --- drv_aterm: every .drv in the repository.
for p in glob.glob(os.path.join(ROOT, "hook-protocol/tests/data/**/*.drv"), recursive=True):
    seed("drv_aterm", read(p))

# --- machines: upstream's files and a few lines of each form.
for p in glob.glob(os.path.join(UP, "*/machines/*")):
    seed("machines", read(p))
seed("machines", "ssh://root@host x86_64-linux,aarch64-linux /root/.ssh/id 4 2 kvm,big-parallel big-parallel c3NoLWVkMjU1MTkgQUFBQQ==\n")
seed("machines", "ssh-ng://b1 - - 1 1 - - -; ssh://b2 i686-linux\n# comment\n\nlocalhost\n")

# --- known_hosts.
def ed25519_line_key(seed_byte):
    body = struct.pack(">I", 11) + b"ssh-ed25519" + struct.pack(">I", 32) + bytes([seed_byte]) * 32
    return "ssh-ed25519 " + base64.b64encode(body).decode()


k1, k2 = ed25519_line_key(1), ed25519_line_key(2)
salt = bytes(range(20))
hashed = "|1|%s|%s" % (base64.b64encode(salt).decode(),
                        base64.b64encode(hmac.new(salt, b"[127.0.0.1]:2222", "sha1").digest()).decode())
seed("known_hosts", f"localhost {k1}\n[127.0.0.1]:2222 {k2} comment\n")
seed("known_hosts", f"{hashed} {k1}\n@revoked * {k2}\n@cert-authority *.example.org {k1}\n")
seed("known_hosts", f"*.example.org,!bad.example.org,10.0.0.? {k1}\n# comment\n\nh1,h2 {k2}\n")

# --- config: the README's example and the test suites' configs.
readme = read(os.path.join(ROOT, "README.md")).decode()
for block in readme.split("```toml\n")[1:]:
    seed("config", block.split("```")[0])
seed("config", '[builders."x86_64-linux"]\nimage = "nixdock-test/bookworm-amd64"\nidle-timeout = 900\nmax-jobs = 16\n'
               '[builders."aarch64-linux"]\nimage = "nixdock-test/bookworm-arm64"\nidle-timeout = 900\n')
seed("config", 'transport = "ssh"\noffload-local = true\n[builders."riscv64-linux"]\nimage = "x"\nmemory = "512m"\ncpus = 0.5\nkvm = true\n')

# --- log_json: every action Nix writes.
for line in [
    '@nix {"action":"msg","level":0,"msg":"error: oops"}',
    '@nix {"action":"start","id":1,"level":3,"type":105,"text":"building \'/nix/store/x.drv\'","fields":["/nix/store/x.drv","host",1,1],"parent":0}',
    '@nix {"action":"stop","id":1}',
    '@nix {"action":"result","id":1,"type":101,"fields":["a build log line"]}',
    '@nix {"action":"result","id":2,"type":105,"fields":[1,2,3,4]}',
    '@nix {"action":"setPhase","phase":"buildPhase"}',
    '@nix {"action":"msg","level":9,"msg":"\\u00ff\\ud83d\\ude00","extra":null}\n',
]:
    seed("log_json", line)

# --- worker_values: upstream's vectors, each with its version and type bytes.
KINDS = {  # file name prefix -> (type byte, versions)
    "valid-path-info-1.16": (0, [21, 30, 38]),
    "unkeyed-valid-path-info-1.15": (1, [21]),
    "set": (2, [38]),
    "build-result-1.27": (3, [27]),
    "build-result-1.28": (3, [28]),
    "build-result-1.29": (3, [29]),
    "build-result-1.37": (3, [37, 38]),
    "keyed-build-result-1.29": (5, [29, 38]),
    "derived-path-1.29": (6, [29]),
    "derived-path-1.30": (6, [30, 38]),
    "client-handshake-info_1_33": (9, [33]),
    "client-handshake-info_1_35": (9, [35, 38]),
    "optional-trusted-flag": (10, [38]),
}
for p in glob.glob(os.path.join(UP, "*/worker-protocol/*.bin")) + glob.glob(os.path.join(UP, "*/common-protocol/set.bin")):
    name = os.path.basename(p)[:-4]
    if name in KINDS:
        kind, versions = KINDS[name]
        for v in versions:
            seed("worker_values", vbyte(v) + bytes([kind]) + read(p))
seed("worker_values", vbyte(38) + bytes([7]) + strings([P]) + strings([P2]) + strings([]) + u64(10) + u64(20))
settings = u64(0) * 3 + u64(3) + u64(1) + u64(0) + u64(1) + u64(0) + u64(0) + u64(0) + u64(0) + u64(1)
seed("worker_values", vbyte(38) + bytes([8]) + settings + u64(1) + s("substituters") + s("https://cache.nixos.org"))
basic = (u64(1) + s("out") + s(P) + s("") + s("") + strings([P2]) + s("x86_64-linux") + s("/bin/sh")
         + strings(["-c", "echo > $out"]) + u64(1) + s("out") + s(P))
seed("worker_values", vbyte(38) + bytes([11]) + basic)
seed("worker_values", vbyte(38) + bytes([12]) + b'{"id":"sha256:15e3c560894cbb27085cf65b5a2ecb18488c999497f4531b6907a7581ce6d527!baz","outPath":"g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo","signatures":["asdf:qwer"],"dependentRealisations":{}}')

# --- worker_client: the daemon's side of each operation, after a valid handshake.
NEXT, LAST, ERROR, START, STOP, RESULT, READ = 0x6f6c6d67, 0x616c7473, 0x63787470, 0x53545254, 0x53544f50, 0x52534c54, 0x64617461
logs = (u64(NEXT) + s("a log line\n")
        + u64(START) + u64(7) + u64(3) + u64(105) + s("building") + u64(2) + u64(1) + s("f") + u64(0) + u64(9) + u64(0)
        + u64(RESULT) + u64(7) + u64(101) + u64(1) + u64(1) + s("build output")
        + u64(STOP) + u64(7))


def error(minor):
    if minor >= 26:
        return u64(ERROR) + s("Error") + u64(0) + s("Error") + s("it failed") + u64(0) + u64(1) + u64(0) + s("a trace")
    return u64(ERROR) + s("it failed") + u64(1)


def unkeyed_info(minor):
    out = s("") + s("00" * 32) + strings([P2]) + u64(0) + u64(40)
    if minor >= 16:
        out += u64(0) + strings([]) + s("")
    return out


up = lambda rel: read(os.path.join(UP, "2.26.3/worker-protocol", rel))
for minor in [21, 25, 27, 28, 29, 30, 35, 37, 38]:
    br = up("build-result-1.37.bin" if minor >= 37 else "build-result-1.29.bin" if minor >= 29
            else "build-result-1.28.bin" if minor >= 28 else "build-result-1.27.bin")
    replies = {
        0: u64(1) + unkeyed_info(minor),
        1: strings([P]),
        2: nars[0],
        3: br,
        4: (u64(1) + up("keyed-build-result-1.29.bin")) if minor >= 29 else b"",
        5: strings([P]) + strings([]) + strings([]) + u64(0) + u64(0),
        6: b"",
        7: (u64(READ) + u64(64) + u64(READ) + u64(64)) if minor < 23 else b"",
    }
    for op, reply in replies.items():
        if op == 4 and minor < 29:
            continue
        sel = bytes([op | (op << 3), op | (op << 3)])
        seed("worker_client", vbyte(minor) + sel + logs + u64(LAST) + reply)
    seed("worker_client", vbyte(minor) + bytes([0, 0]) + logs + error(minor))
    # The whole handshake from the input (top bit of byte 1).
    hs = u64(0x6478696F) + u64(0x100 | minor)
    if minor >= 38:
        hs += strings([])
    if minor >= 33:
        hs += s("2.26.3")
    if minor >= 35:
        hs += u64(1)
    seed("worker_client", vbyte(minor) + bytes([0x80 | 6, 6]) + hs + u64(LAST) + u64(LAST))

# terminal_text: what builders and engines say, with what a terminal must not get.
for t in [
    "error: builder for '/nix/store/x-a.drv' failed with exit code 1",
    "\x1b[31;1merror:\x1b[0m colour\r\nCRLF line\n\ttab",
    "\x1b]0;title\x07 OSC \x1b[2J clear \x1bc reset \x9b31m C1",
    "abc\u202efed \u2066isolate\u2069 zero\u200bwidth \u00adsoft \U000e0041tag \ufeffbom",
    "qemu: uncaught target signal 11 (Segmentation fault) - core dumped",
    "\n".join(f"line {i}" for i in range(150)),
    "x" * 1500,
]:
    seed("terminal_text", t)
