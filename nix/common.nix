# What the NixOS and nix-darwin modules share: the options that mean the same on both, how
# the hook reaches Nix for a given Nix version, and the config file.
{
  lib,
  pkgs,
  config,
}:

let
  inherit (lib) mkOption types;
  cfg = config.services.nixdock;
in
rec {
  options = {
    enable = lib.mkEnableOption "nixdock-hook as Nix's build hook, building foreign-system derivations in Docker builder containers";

    package = mkOption {
      type = types.package;
      default = pkgs.callPackage ./package.nix { };
      defaultText = lib.literalExpression "pkgs.callPackage (nixdock + \"/nix/package.nix\") { }";
      description = "The nixdock package; its `bin/nixdock-hook` becomes Nix's build hook.";
    };

    settings = mkOption {
      type = types.submodule (import ./settings.nix { inherit lib; });
      default = { };
      example = lib.literalExpression ''
        {
          builders."aarch64-linux" = { max-jobs = 4; memory = "8g"; };
        }
      '';
      description = ''
        nixdock's configuration, written to /etc/nixdock/nixdock.toml (where nixdock-hook and
        `nixdock` read it). The keys are those of that file; unset keys are left out, so
        nixdock's defaults apply.
      '';
    };

    serve = {
      enable = lib.mkEnableOption ''
        `nixdock serve` as a service (with services.nixdock.enable): an ssh-ng endpoint that
        serves nixdock's builders to any Nix (stock build-remote, Lix, Determinate Nix, other
        machines). Authorise client keys with `sudo nixdock serve --authorize KEY.pub` and
        print their machines lines with `sudo nixdock serve --machines-line --key KEY`; see the
        README, "Using nixdock without its hook"'';
      listen = mkOption {
        type = types.strMatching "[^[:space:]]+:[0-9]+";
        default = "127.0.0.1:3022";
        example = "127.0.0.2:22";
        description = ''
          Address and port `nixdock serve` listens on. Nix before 2.31 cannot carry a port in
          an ssh-ng URI: for those clients listen on port 22 of an address of its own.
        '';
      };
    };

    hook = mkOption {
      type = types.str;
      default = "${cfg.package}/bin/nixdock-hook";
      defaultText = lib.literalExpression ''"''${config.services.nixdock.package}/bin/nixdock-hook"'';
      description = ''
        The build-hook Nix is given. Read it when you put the setting somewhere yourself (your
        own NIX_CONFIG for nix-daemon, see the module's notes); set it only to wrap the hook.
        Nix splits build-hook at spaces, so the path must have none.
      '';
    };
  };

  # Nix 2.25.0 - 2.33.x overwrite build-hook from the system nix.conf with the compiled
  # default (fixed in 2.34.0); values from NIX_CONFIG in the daemon's environment still count.
  # Lix forked before 2.25 and numbers its releases 2.90+, which this test already places
  # on the working side.
  nixConfIgnoresHook =
    version: lib.versionAtLeast version "2.25" && lib.versionOlder version "2.34";

  daemonNixConfig = hook: "build-hook = ${hook}";

  # The value checks src/config.rs makes when it loads the file, made at evaluation time
  # instead, so a bad value fails the switch rather than every build.
  settingsAssertions =
    let
      builders = if cfg.settings.builders == null then { } else cfg.settings.builders;
      check = system: what: ok: {
        assertion = ok;
        message = "services.nixdock.settings.builders.\"${system}\": ${what}";
      };
      perBuilder =
        system: b:
        [
          (check system "a system looks like \"x86_64-linux\"" (lib.hasInfix "-" system))
          (check system "memory must look like \"8g\", \"512m\" or a byte count" (
            b.memory == null
            || builtins.match "[[:space:]]*[+-]?[0-9]+[[:space:]]*[kmgtKMGT]?[bB]?[[:space:]]*" b.memory != null
          ))
          (check system "cpus must be positive" (b.cpus == null || b.cpus > 0))
          (check system "speed-factor must be a positive number" (
            b.speed-factor == null || b.speed-factor > 0
          ))
          (check system "extra-nix-conf holds one setting per list element" (
            b.extra-nix-conf == null || !(builtins.any (lib.hasInfix "\n") b.extra-nix-conf)
          ))
        ]
        ++ map (
          line:
          let
            why = refusedNixConfLine line;
          in
          check system "extra-nix-conf line \"${line}\" is refused: ${toString why}; remove it" (
            why == null
          )
        ) (if b.extra-nix-conf == null then [ ] else b.extra-nix-conf);

      # Mirrors refused_nix_conf_line in src/config.rs (see the reasons there): settings a
      # builder's nix.conf must not get from extra-nix-conf, read as Nix reads a line.
      refusedNixConf = {
        sandbox = "the builder's `sandbox` setting decides it, together with the container options the sandbox needs; set `sandbox = true | false | \"auto\"` for the builder instead";
        sandbox-fallback = "a sandbox that cannot start must fail the build, never build unsandboxed in silence";
        build-users-group = "builds in a builder must run as its unprivileged build users (nixbld, which nixdock sets up); as root a build would own the shared builder and every later build in it";
        auto-allocate-uids = "builds must run as nixdock's build users, whose uids no host allocates; auto-allocated uids are the ones the host's own Nix kills around its builds";
        require-drop-supplementary-groups = "a build must never keep the daemon's (root's) supplementary groups";
        trusted-users = "only root (nixdock) may be trusted by a builder's nix-daemon; a trusted build user could reconfigure the daemon and so run as root";
        allowed-users = "who may connect to a builder's nix-daemon is nixdock's to decide";
        require-sigs = "without signatures a build user could add any content under any store path to the shared builder's store, poisoning later builds";
      };
      refusedNixConfLine =
        line:
        let
          uncommented = builtins.head (lib.splitString "#" line);
          words = builtins.filter (w: builtins.isString w && w != "") (
            builtins.split "[[:space:]]+" uncommented
          );
          first = if words == [ ] then "" else builtins.head words;
          name = builtins.head (lib.splitString "=" first);
          base = lib.removePrefix "extra-" name;
        in
        if first == "include" || first == "!include" then
          "an included file could set anything, including what nixdock must control (build-users-group, trusted-users, allowed-users, …); put the settings here instead"
        else if refusedNixConf ? ${base} then
          "`${base}` is nixdock's to set: ${refusedNixConf.${base}}"
        else
          null;
    in
    builtins.concatLists (lib.mapAttrsToList perBuilder builders);

  # nixdock's TOML: nulls (unset options) dropped at every level, as TOML has no null.
  cleanSettings =
    value:
    if builtins.isAttrs value then
      lib.mapAttrs (_: cleanSettings) (
        lib.filterAttrs (name: v: v != null && name != "_module") value
      )
    else if builtins.isList value then
      map cleanSettings value
    else
      value;

  configFile = settings: (pkgs.formats.toml { }).generate "nixdock.toml" (cleanSettings settings);

  # Path below /etc; src/config.rs's DEFAULT_CONFIG_PATH is /etc/nixdock/nixdock.toml.
  configEtcName = "nixdock/nixdock.toml";
}
