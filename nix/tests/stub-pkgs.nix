# A stand-in for a nixpkgs package set: callPackage, buildRustPackage and formats.toml return
# plain attribute sets that look like derivations and keep what they were given, so tests can
# read it back (the TOML value under `stubData`).
{
  lib ? import ./stub-lib.nix,
  system ? "x86_64-linux",
}:

let
  mkDrv =
    attrs:
    let
      name = attrs.name or "${attrs.pname}-${attrs.version}";
    in
    attrs
    // {
      inherit name system;
      type = "derivation";
      outPath = "/nix/store/00000000000000000000000000000000-${name}";
    };
  self = {
    inherit lib mkDrv;
    stdenv.hostPlatform.system = system;
    callPackage =
      fn: overrides:
      let
        f = if builtins.isFunction fn then fn else import fn;
      in
      f (builtins.intersectAttrs (builtins.functionArgs f) self // overrides);
    rustPlatform.buildRustPackage = args: mkDrv (args // (args.passthru or { }));
    formats.toml =
      _:
      {
        type = lib.types.attrsOf (lib.types.either lib.types.str lib.types.bool);
        generate =
          name: value:
          mkDrv {
            inherit name;
            stubData = {
              format = "toml";
              inherit value;
            };
          };
      };
  };
in
self
