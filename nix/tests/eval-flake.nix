# Evaluates the repository's flake.nix outputs against a stub nixpkgs (stub-lib.nix,
# stub-pkgs.nix) and reports their shape as plain data, for tests/nix_packaging.rs:
#
#   nix-instantiate --eval --strict --json nix/tests/eval-flake.nix \
#     --arg paths '[ "src/lib.rs" "target/x" ]'
#
# `paths` (relative to the repository root, each with its type) are run through the
# package's source filter, so the test can check what the build sees.
{
  paths ? [ ],
}:

let
  lib = import ./stub-lib.nix;
  root = ../..;
  flake = import (root + "/flake.nix");
  systems = [
    "x86_64-linux"
    "aarch64-linux"
    "x86_64-darwin"
    "aarch64-darwin"
  ];
  nixpkgs = {
    inherit lib;
    legacyPackages = lib.genAttrs systems (system: import ./stub-pkgs.nix { inherit lib system; });
  };
  outputs = flake.outputs {
    self = outputs;
    inherit nixpkgs;
  };

  describe = pkg: {
    inherit (pkg) pname version doCheck;
    cargoLock = toString pkg.cargoLock.lockFile;
    isDerivation = lib.isDerivation pkg;
    meta = {
      inherit (pkg.meta) description mainProgram platforms;
      license = map (l: l.spdxId) pkg.meta.license;
    };
    installCheckPhase = pkg.installCheckPhase or "";
  };

  pkg = outputs.packages.x86_64-linux.default;
  # The overlay applied to a package set that lacks nixdock.
  overlaid =
    let
      base = import ./stub-pkgs.nix { inherit lib; };
      final = base // outputs.overlays.default final base;
    in
    final;
in
{
  inputs = builtins.attrNames flake.inputs;
  nixpkgsUrl = flake.inputs.nixpkgs.url;
  outputNames = builtins.attrNames outputs;
  packageSystems = builtins.attrNames outputs.packages;
  packageNames = lib.genAttrs systems (s: builtins.attrNames outputs.packages.${s});
  packages = lib.genAttrs systems (s: builtins.mapAttrs (_: describe) outputs.packages.${s});
  defaultIsNixdock = lib.genAttrs systems (
    s: outputs.packages.${s}.default.outPath == outputs.packages.${s}.nixdock.outPath
  );
  overlay = describe overlaid.nixdock;
  nixosModule = map toString outputs.nixosModules.default.imports;
  darwinModule = map toString outputs.darwinModules.default.imports;
  repoRoot = toString root;
  sourceFilter = map (p: {
    inherit (p) path type;
    kept = pkg.sourceFilter (toString root + "/" + p.path) p.type;
  }) paths;
}
