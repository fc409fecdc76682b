# The options of services.nixdock.settings, shared by the NixOS and nix-darwin modules.
#
# They mirror src/config.rs exactly: nixdock rejects unknown keys, so there is no freeform
# part here either, and a misspelt key fails the evaluation instead of every build. Every
# option defaults to null ("not in the file"), and nulls are dropped before the TOML is
# written, so nixdock's own defaults apply to whatever is not set.
{ lib }:

let
  inherit (lib) mkOption types;

  nullable =
    type: description:
    mkOption {
      type = types.nullOr type;
      default = null;
      inherit description;
    };

  builderOptions = {
    options = {
      image = nullable types.str ''
        Builder image: any image with Nix >= 2.8 and OpenSSH's sshd. Default: the official
        `nixos/nix` at a tag nixdock pins, pulled on the first build; without a registry, one
        made by `nixdock image build --from-debian` (`nixdock/builder:<system>`).
      '';
      platform = nullable types.str "Platform passed to the engine when the image must be pulled (default: the system's, e.g. `linux/arm64` for aarch64-linux).";
      max-jobs = nullable types.ints.positive "Builds at once in this builder (nixdock's default: 8).";
      cpus = nullable (types.either types.ints.positive types.float) "CPU limit of the container.";
      memory = nullable types.str "Memory limit of the container, e.g. `\"8g\"` or `\"512m\"`.";
      max-store-size = nullable types.str "Collect garbage in the builder's store when a build ends and it holds more than this, e.g. `\"20G\"`.";
      idle-timeout = nullable types.ints.unsigned "Seconds without a build before the container stops itself (default 1800).";
      features = nullable (types.listOf types.str) "System features the builder offers (default: big-parallel, benchmark).";
      extra-nix-conf = nullable (types.listOf types.str) "Lines added to the builder's nix.conf, one setting each.";
      kvm = nullable types.bool "Pass /dev/kvm through (adds the kvm and nixos-test features).";
      speed-factor = nullable (types.either types.ints.positive types.float) "Relative speed against the machines in Nix's `builders` (default 1): builds go where busy slots / speed factor is least.";
      sandbox = nullable (types.either types.bool (types.enum [ "auto" ])) "Nix's sandbox for builds in this builder: true, false or \"auto\" (default: the top-level `sandbox`).";
      emulation = nullable (types.enum [ "native-builder" "container" ]) ''
        For a system its engine emulates (aarch64-linux on x86_64, say): "native-builder" (the
        default) builds it in the engine's native builder, whose nix.conf lists it in
        extra-platforms, only the build's own programs running under qemu-user (binfmt_misc
        with flag F); that builder's settings (image, max-jobs, sandbox, …) and slots are the
        ones used, this table's container settings are not. "container" gives it a container
        of its own architecture (an image for it), everything under qemu-user and no sandbox.
        Default: the top-level `emulation`.
      '';
    };
  };

  accessOptions = {
    tls-ca = nullable types.str "For a `tcp://` engine: the CA certificate (PEM) its server certificate must chain to; the only CA trusted (as `docker --tlsverify --tlscacert`).";
    tls-cert = nullable types.str "For a `tcp://` engine: the client certificate (PEM) nixdock presents.";
    tls-key = nullable types.str "For a `tcp://` engine: the client certificate's private key (PEM).";
    ssh-key = nullable types.str "For an `ssh://` engine: the private key file nixdock logs in with (never root's ~/.ssh).";
    ssh-host-key = nullable types.str "For an `ssh://` engine: the base64 of its host's OpenSSH public key line, as in a machines line (`base64 -w0 /etc/ssh/ssh_host_ed25519_key.pub`); never trusted on first use.";
  };

  engineOptions = {
    options = accessOptions // {
      docker-host = mkOption {
        type = types.str;
        description = "The engine's address: `unix:///path`, `tcp://host:port` (with the tls-* options) or `ssh://user@host` (with ssh-key and ssh-host-key).";
      };
      systems = nullable (types.listOf types.str) "The systems this engine may serve (default: the `builders` tables' systems, else its own).";
      speed-factor = nullable (types.either types.ints.positive types.float) "Multiplies the speed factor of this engine's builders (default 1).";
      max-jobs = nullable types.ints.positive "Caps the builds at once in each builder on this engine.";
    };
  };
in
{
  options = accessOptions // {
    docker-host = nullable types.str ''
      Docker engine address (`unix:///path`, a socket path, or `tcp://host:port`). nixdock-hook
      runs as root under nix-daemon and then uses only this engine, else DOCKER_HOST from the
      daemon's environment, else the system sockets /var/run/docker.sock and
      /run/podman/podman.sock when they and every directory above them belong to root. It
      never looks in users' homes, so an engine there (Docker Desktop, OrbStack, colima, a
      Podman machine, rootless Docker) must be named here, e.g.
      `unix:///Users/<you>/.docker/run/docker.sock`. An engine named here that does not answer
      is an error: no other is tried.
    '';
    offload-local = nullable types.bool "Also send builds for this machine's own system to a builder.";
    serve-shares-builders = nullable types.bool ''
      Let `nixdock serve` use the hook's builders (their containers and stores) instead of
      builders of its own. An authorised serve client is a trusted user of the builder daemon
      it reaches and could put unsigned paths into the store the hook later imports from.
    '';
    transport = nullable (types.enum [ "auto" "ssh" "engine-exec" ]) ''
      How the hook reaches a builder's nix-daemon: "auto" goes straight to the daemon's socket
      in the builder's /nix volume when the engine is local and that socket is the hook's
      user's (root on a rootful engine, the engine's own user on a rootless one), over
      SSH to a loopback port on other local engines, and through the engine's exec on tcp://
      and ssh:// engines (no sshd exposed); "ssh" always uses SSH (a remote engine's builders
      then publish sshd on its address); "engine-exec" always uses the engine's exec.
    '';
    ssh-persist = nullable types.ints.unsigned ''
      Seconds a holder keeps a builder's connection after its last use (nixdock's default: 60):
      a small process started by the first hook that reaches a builder over SSH or through the
      engine's exec. Over SSH it keeps the SSH session, which later hooks use instead of
      connecting themselves (no key exchange or authentication on a warm build); through the
      engine's exec (a remote engine's builders) it keeps an SSH session with the builder's sshd,
      run by one exec (`sshd -i`), so a warm build starts no process in the container through
      the engine for its store connection and its log. 0: every hook
      connects itself. Unused on the local-socket path (a local Linux engine's default).
    '';
    sandbox = nullable (types.either types.bool (types.enum [ "auto" ])) ''
      Nix's sandbox inside the builders (each builder's own `sandbox` overrides it): true,
      false or "auto" (nixdock's default). "auto" turns it on where it costs the host nothing:
      an engine inside a VM (Docker Desktop, OrbStack, colima, Lima) or a user-namespaced one
      (rootless, userns-remap), and leaves it off for emulated builders (qemu-user cannot start
      it) and on a rootful engine on its host (the sandbox needs an unmasked /proc, whose
      /proc/sys the container's root, the host's root, could then write). An emulated system
      built by the native builder (emulation = "native-builder") has that builder's sandbox;
      true on an emulated builder of its own (emulation = "container") fails its builds,
      naming the sandbox.
    '';
    emulation = nullable (types.enum [ "native-builder" "container" ]) ''
      How emulated systems are built, for every builder that does not set its own
      `emulation`: "native-builder" (nixdock's default: by the engine's native builder through
      extra-platforms and binfmt_misc) or "container" (a container of the system's own
      architecture, everything in it under qemu-user).
    '';
    engines = nullable (types.attrsOf (types.submodule engineOptions)) ''
      More engines for the pool, by name (lowercase letters, digits, '-'), beside the
      top-level docker-host: e.g. `engines.arm-server.docker-host = "tcp://arm:2376"`.
      Builds go native first, then to the least busy builder per speed factor.
    '';
    builders = nullable (types.attrsOf (types.submodule builderOptions)) ''
      One table per Nix system, e.g. `builders."aarch64-linux"`. Without it nixdock serves the
      engine's own Linux system and those it can emulate.
    '';
  };
}
