# nixdock and nixdock-hook, built from this repository with nixpkgs' Rust tooling.
# callPackage-style: `pkgs.callPackage ./nix/package.nix { }`.
{
  lib,
  rustPlatform,
}:

let
  manifest = lib.importTOML ../Cargo.toml;
  root = ../.;

  # Only what `cargo build` reads: the two manifests, the lock file and the two crates'
  # sources. Everything else (tests, fixtures, bench, scripts, docs, target/) stays out, so
  # editing it does not change the source hash and rebuild the package.
  wanted = [
    "Cargo.toml"
    "Cargo.lock"
    "src"
    "hook-protocol"
    "hook-protocol/Cargo.toml"
    "hook-protocol/src"
  ];
  sourceFilter =
    path: type:
    let
      rel = lib.removePrefix (toString root + "/") (toString path);
    in
    builtins.elem rel wanted
    || lib.hasPrefix "src/" rel
    || lib.hasPrefix "hook-protocol/src/" rel;

  # Cargo.toml's `license` is an SPDX expression of alternatives ("MIT OR Apache-2.0").
  licenses = map lib.getLicenseFromSpdxId (
    lib.splitString " OR " manifest.workspace.package.license
  );
in
rustPlatform.buildRustPackage {
  pname = manifest.package.name;
  inherit (manifest.package) version;

  src = builtins.path {
    path = root;
    name = "nixdock-source";
    filter = sourceFilter;
  };

  cargoLock.lockFile = ../Cargo.lock;

  # The integration tests need a Docker engine, a running nix-daemon and the builder images
  # (scripts/testbed), none of which exist in the build sandbox; the project's CI
  # (scripts/test) runs every test against the real thing instead.
  doCheck = false;

  # What can be checked in the sandbox: both programs are installed and start.
  doInstallCheck = true;
  installCheckPhase = ''
    runHook preInstallCheck
    $out/bin/nixdock --version | grep -F '${manifest.package.version}'
    $out/bin/nixdock-hook --help | grep -F 'build hook'
    runHook postInstallCheck
  '';

  passthru = {
    # For tests of the filter (nix/tests) and for anyone reusing it.
    inherit sourceFilter;
  };

  meta = {
    description = manifest.package.description;
    license = licenses;
    mainProgram = "nixdock";
    platforms = lib.platforms.linux ++ lib.platforms.darwin;
  };
}
