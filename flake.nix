{
  description = "nixdock: build foreign-system Nix derivations in Docker builders, as Nix's build hook";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      systems = [
        "x86_64-linux"
        "aarch64-linux"
        "x86_64-darwin"
        "aarch64-darwin"
      ];
      forAllSystems =
        f:
        builtins.listToAttrs (
          map (system: {
            name = system;
            value = f nixpkgs.legacyPackages.${system};
          }) systems
        );
    in
    {
      packages = forAllSystems (
        pkgs:
        let
          nixdock = pkgs.callPackage ./nix/package.nix { };
        in
        {
          inherit nixdock;
          default = nixdock;
        }
      );

      overlays.default = final: _prev: {
        nixdock = final.callPackage ./nix/package.nix { };
      };

      # The modules build the package from their own revision (services.nixdock.package).
      # Imported by path, so the module system names the file in its messages; wrapped in an
      # attribute set, which `nix flake check` expects of a module.
      nixosModules.default.imports = [ ./nix/nixos-module.nix ];
      darwinModules.default.imports = [ ./nix/darwin-module.nix ];
    };
}
