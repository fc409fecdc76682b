# NixOS module: services.nixdock.
#
# Does what `nixdock install` does on other Linux systems, the NixOS way:
#   - Nix < 2.25 and >= 2.34: nix.settings.build-hook (/etc/nix/nix.conf);
#   - Nix 2.25 - 2.33 ignore build-hook in /etc/nix/nix.conf, so nix-daemon gets
#     NIX_CONFIG="build-hook = ..." in its systemd environment instead. That is the
#     whole of NIX_CONFIG for the unit: another definition of
#     systemd.services.nix-daemon.environment.NIX_CONFIG conflicts (evaluation fails and
#     names both), rather than one silently losing. Keep other daemon settings in
#     nix.settings, or define NIX_CONFIG yourself with lib.mkForce and include
#     "build-hook = ${config.services.nixdock.hook}".
#     Builds that root runs without the daemon (root's Nix opens the store directly unless
#     NIX_REMOTE=daemon) read the hook only from root's ~/.config/nix/nix.conf on those
#     versions, which NixOS does not manage: use NIX_REMOTE=daemon for them, or Nix >= 2.34.
#   - /etc/nixdock/nixdock.toml from services.nixdock.settings;
#   - optionally `nixdock serve` as a systemd service (services.nixdock.serve);
#   - a Docker engine (virtualisation.docker.enable, as a default you can override);
#   - optionally binfmt emulation with the F flag for foreign Linux systems.
{
  config,
  lib,
  pkgs,
  ...
}:

let
  inherit (lib)
    mkIf
    mkMerge
    mkDefault
    mkOption
    types
    ;
  cfg = config.services.nixdock;
  common = import ./common.nix { inherit lib pkgs config; };
  nixVersion = config.nix.package.version;
  # Without nix.enable there is no nix.conf or daemon unit to set; the assertion says so.
  nixManaged = config.nix.enable or true;
  viaEnvironment = common.nixConfIgnoresHook nixVersion;
  engineConfigured =
    config.virtualisation.docker.enable
    || (config.virtualisation.podman.enable or false)
    || (cfg.settings.docker-host or null) != null;
in
{
  options.services.nixdock = common.options // {
    emulatedSystems = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "aarch64-linux" ];
      description = ''
        Foreign Linux systems to emulate with qemu through binfmt_misc, so that nixdock can
        build for them on this machine's engine: by default in the native builder, whose
        nix.conf lists them in extra-platforms (settings.emulation = "native-builder"), or
        in containers of their own (settings.emulation = "container"). Opt-in because it changes the kernel's
        binfmt registrations for the whole machine. The registrations get the F flag
        (boot.binfmt.registrations.<system>.fixBinary) and static emulators
        (boot.binfmt.preferStaticEmulators): the kernel then opens the interpreter when it is
        registered, which is what lets it run inside a container, where the host's /nix/store
        (and a dynamic qemu's libraries) is not visible. A system nixpkgs has no static qemu
        for will not work in a builder.

        These systems are not added to Nix's extra-platforms
        (boot.binfmt.addEmulatedSystemsToNixSandbox = false, as a default): the host Nix
        would otherwise build them itself under emulation, and nixdock-hook declines what the
        host can build.
      '';
    };
  };

  config = mkIf cfg.enable (mkMerge [
    {
      assertions = common.settingsAssertions ++ [
        {
          assertion = nixManaged;
          message = "services.nixdock needs nix.enable: it sets Nix's build hook through nix.settings or nix-daemon's unit.";
        }
        {
          assertion = engineConfigured;
          message = ''
            services.nixdock needs a Docker engine, but virtualisation.docker.enable is false,
            virtualisation.podman is not enabled and services.nixdock.settings.docker-host is
            not set. Enable one of them, or name your engine's socket in docker-host.
          '';
        }
        {
          assertion = builtins.all (lib.hasSuffix "-linux") cfg.emulatedSystems;
          message = "services.nixdock.emulatedSystems: only Linux systems can be emulated for Docker builders (got ${toString cfg.emulatedSystems}).";
        }
      ];

      environment.systemPackages = [ cfg.package ];
      environment.etc.${common.configEtcName}.source = common.configFile cfg.settings;

      # The engine nixdock's builders run on; mkDefault so Podman or an external engine
      # (settings.docker-host) can take its place.
      virtualisation.docker.enable = mkDefault true;
    }

    (mkIf (nixManaged && !viaEnvironment) {
      nix.settings.build-hook = cfg.hook;
    })

    (mkIf (nixManaged && viaEnvironment) {
      # The unit changes with the hook path, so a switch restarts nix-daemon with it.
      systemd.services.nix-daemon.environment.NIX_CONFIG = common.daemonNixConfig cfg.hook;
    })

    (mkIf cfg.serve.enable {
      systemd.services.nixdock-serve = {
        description = "nixdock serve: an ssh-ng endpoint for nixdock's builders";
        wantedBy = [ "multi-user.target" ];
        after = [
          "network.target"
          "docker.service"
        ];
        serviceConfig = {
          ExecStart = "${cfg.package}/bin/nixdock serve --listen ${cfg.serve.listen}";
          Restart = "on-failure";
          # It exits when no engine answers (started before it): retry, within the start limit.
          RestartSec = "5s";
        };
      };
    })

    (mkIf (cfg.emulatedSystems != [ ]) {
      boot.binfmt.emulatedSystems = cfg.emulatedSystems;
      boot.binfmt.preferStaticEmulators = mkDefault true;
      boot.binfmt.addEmulatedSystemsToNixSandbox = mkDefault false;
      boot.binfmt.registrations = lib.genAttrs cfg.emulatedSystems (_: {
        fixBinary = true;
      });
    })
  ]);
}
