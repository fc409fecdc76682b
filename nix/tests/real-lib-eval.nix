# Manual cross-check of the stub evaluator (eval-module.nix) against nixpkgs' real module
# system, for when a nixpkgs `lib` is at hand (a nixpkgs checkout's lib/, or
# github:nix-community/nixpkgs.lib). Not run by the test suite, which has no nixpkgs:
#
#   nix-instantiate --eval --strict --json nix/tests/real-lib-eval.nix \
#     --arg libPath /path/to/nixpkgs/lib --argstr nixVersion 2.26.3 \
#     --arg user '{ services.nixdock.enable = true; }'            # add --arg darwin true
#
# The options of NixOS / nix-darwin that the modules read or define are declared here with
# the same kinds of types (attrsOf str for a daemon's environment, so two NIX_CONFIGs
# conflict); pkgs is stub-pkgs.nix over the real lib.
{
  libPath,
  nixVersion,
  user ? { },
  darwin ? false,
}:

let
  lib = import libPath;
  inherit (lib) mkOption types;
  pkgs = import ./stub-pkgs.nix { inherit lib; };
  opt = type: default: mkOption { inherit type default; };
  sub = options: types.submodule { inherit options; };

  host = {
    options = {
      assertions = opt (types.listOf types.unspecified) [ ];
      warnings = opt (types.listOf types.str) [ ];
      nix.enable = opt types.bool true;
      nix.package = opt types.raw { version = nixVersion; };
      nix.settings = opt (types.submodule { freeformType = types.attrsOf types.anything; }) { };
      environment.etc = opt (types.attrsOf (sub { source = mkOption { type = types.raw; }; })) { };
      environment.systemPackages = opt (types.listOf types.package) [ ];
    }
    // (
      if darwin then
        {
          launchd.daemons = opt (types.attrsOf (sub {
            serviceConfig.EnvironmentVariables = opt (types.nullOr (types.attrsOf types.str)) null;
            serviceConfig.ProgramArguments = opt (types.listOf types.str) [ ];
            serviceConfig.RunAtLoad = opt types.bool false;
            serviceConfig.KeepAlive = opt types.bool false;
          })) { };
        }
      else
        {
          systemd.services = opt (types.attrsOf (sub {
            environment = opt (types.attrsOf (types.nullOr types.str)) { };
            description = opt types.str "";
            wantedBy = opt (types.listOf types.str) [ ];
            after = opt (types.listOf types.str) [ ];
            serviceConfig = opt (types.attrsOf types.str) { };
          })) { };
          virtualisation.docker.enable = opt types.bool false;
          virtualisation.podman.enable = opt types.bool false;
          boot.binfmt = {
            emulatedSystems = opt (types.listOf types.str) [ ];
            preferStaticEmulators = opt types.bool false;
            addEmulatedSystemsToNixSandbox = opt types.bool true;
            registrations = opt (types.attrsOf (sub { fixBinary = opt types.bool false; })) { };
          };
        }
    );
  };

  evaluated = lib.evalModules {
    modules = [
      host
      (if darwin then ../darwin-module.nix else ../nixos-module.nix)
      user
      { _module.args.pkgs = pkgs; }
    ];
  };
  c = evaluated.config;

  plain =
    v:
    if lib.isDerivation v then
      {
        storePath = v.outPath;
        stubData = plain (v.stubData or null);
      }
    else if builtins.isAttrs v then
      lib.mapAttrs (_: plain) v
    else if builtins.isList v then
      map plain v
    else
      v;
in
plain (
  {
    nixSettings = c.nix.settings;
    daemonEnvironment =
      if darwin then
        lib.mapAttrs (_: d: d.serviceConfig.EnvironmentVariables) c.launchd.daemons
      else
        lib.mapAttrs (_: s: s.environment) c.systemd.services;
    etc = c.environment.etc;
    failedAssertions = map (a: a.message) (builtins.filter (a: !a.assertion) c.assertions);
    nixdock = removeAttrs c.services.nixdock [ "package" ];
  }
  // lib.optionalAttrs (!darwin) {
    docker = c.virtualisation.docker.enable;
    binfmt = c.boot.binfmt;
  }
)
