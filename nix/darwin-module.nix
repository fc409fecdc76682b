# nix-darwin module: services.nixdock.
#
# Does what `nixdock install --service-manager launchd` does, the nix-darwin way:
#   - Nix < 2.25 and >= 2.34: nix.settings.build-hook (/etc/nix/nix.conf);
#   - Nix 2.25 - 2.33 ignore build-hook in /etc/nix/nix.conf, so the launchd job
#     org.nixos.nix-daemon gets NIX_CONFIG="build-hook = ..." in its EnvironmentVariables.
#     Another definition of that NIX_CONFIG conflicts (evaluation fails and names both)
#     rather than one silently losing; keep other daemon settings in nix.settings, or define
#     NIX_CONFIG yourself with lib.mkForce and include
#     "build-hook = ${config.services.nixdock.hook}".
#     Builds that root runs without the daemon read the hook only from
#     /var/root/.config/nix/nix.conf on those versions, which nix-darwin does not manage.
#   - /etc/nixdock/nixdock.toml from services.nixdock.settings.
# The Docker engine on macOS (Docker Desktop, OrbStack, colima, Podman machine) is an app
# the module does not manage, and its socket lies in a user's home, where nixdock-hook (root)
# never looks: settings.docker-host must name it (a warning says so when it is unset).
{
  config,
  lib,
  pkgs,
  ...
}:

let
  inherit (lib) mkIf mkMerge;
  cfg = config.services.nixdock;
  common = import ./common.nix { inherit lib pkgs config; };
  # Without nix.enable there is no nix.conf or daemon unit to set; the assertion says so.
  nixManaged = config.nix.enable or true;
  viaEnvironment = common.nixConfIgnoresHook config.nix.package.version;
in
{
  options.services.nixdock = common.options // {
    settings = common.options.settings // {
      description = common.options.settings.description + ''

        On macOS the Docker engine is an app this module does not install or start: Docker
        Desktop, OrbStack, colima or a Podman machine. Its socket lies in a user's home, and
        nix-daemon runs the hook as root, which uses no socket in anyone's home unless
        `docker-host` names it, e.g. `unix:///Users/<you>/.docker/run/docker.sock`.
      '';
    };
  };

  config = mkIf cfg.enable (mkMerge [
    {
      assertions = common.settingsAssertions ++ [
        {
          assertion = nixManaged;
          message = ''
            services.nixdock needs nix.enable: with nix.enable = false nix-darwin does not
            manage nix-daemon or nix.conf (e.g. Determinate Nix); run `sudo nixdock install`
            instead.
          '';
        }
      ];

      # Not an assertion: an engine reached through DOCKER_HOST in the daemon's environment,
      # or a root-owned /var/run/docker.sock, needs no docker-host.
      warnings = lib.optionals (cfg.settings.docker-host == null) [
        ''
          services.nixdock.settings.docker-host is not set. On macOS the Docker engine's socket
          is in a user's home, where nixdock-hook (run as root by nix-daemon) does not look.
          Name it: "unix:///Users/<you>/.docker/run/docker.sock" (Docker Desktop),
          "unix:///Users/<you>/.orbstack/run/docker.sock" (OrbStack) or
          "unix:///Users/<you>/.colima/default/docker.sock" (colima).
        ''
      ];

      environment.systemPackages = [ cfg.package ];
      environment.etc.${common.configEtcName}.source = common.configFile cfg.settings;
    }

    (mkIf (nixManaged && !viaEnvironment) {
      nix.settings.build-hook = cfg.hook;
    })

    (mkIf (nixManaged && viaEnvironment) {
      launchd.daemons.nix-daemon.serviceConfig.EnvironmentVariables.NIX_CONFIG =
        common.daemonNixConfig cfg.hook;
    })

    (mkIf cfg.serve.enable {
      launchd.daemons.nixdock-serve.serviceConfig = {
        ProgramArguments = [
          "${cfg.package}/bin/nixdock"
          "serve"
          "--listen"
          cfg.serve.listen
        ];
        RunAtLoad = true;
        KeepAlive = true;
      };
    })
  ]);
}
