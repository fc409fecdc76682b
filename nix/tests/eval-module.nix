# A tiny module evaluator for nixdock's NixOS and nix-darwin modules, for nix/tests and
# tests/nix_packaging.rs:
#
#   nix-instantiate --eval --strict --json nix/tests/eval-module.nix \
#     --arg module ./nix/nixos-module.nix --argstr nixVersion 2.26.3 \
#     --arg nixdock '{ enable = true; }'
#
# `nixdock` is the user's services.nixdock definition: it is checked against the module's
# option declarations (unknown options and wrongly typed values are errors, as in the real
# module system) and completed with the options' defaults. `config` is the rest of the
# machine's final configuration as the module reads it (nix.package.version from
# `nixVersion`, virtualisation.docker.enable, ...). The module's `config` is resolved
# (mkIf, mkMerge, mkOverride/mkDefault) together with `userDefinitions`, the user's other
# definitions: the highest priority wins, lists concatenate, differing values of equal
# priority are a conflict error, as in nixpkgs.
#
# `userDefinitions` may be a function of the stub lib, to use lib.mkForce and the like.
#
# Result: { config = <merged definitions, derivations as { storePath; stubData; }>;
#           failedAssertions = [ messages ]; services.nixdock = <the option values> }.
{
  module,
  nixVersion,
  nixdock ? { },
  config ? { },
  userDefinitions ? { },
}:

let
  lib = import ./stub-lib.nix;
  pkgs = import ./stub-pkgs.nix { inherit lib; };
  inherit (builtins)
    all
    attrNames
    concatMap
    filter
    foldl'
    head
    isAttrs
    isList
    listToAttrs
    toJSON
    ;

  isOption = v: isAttrs v && (v._type or null) == "option";

  showPath = path: builtins.concatStringsSep "." path;

  # A definition checked against a type; submodules are completed with their defaults.
  applyType =
    path: type: value:
    let
      kind = type.kind or "leaf";
    in
    if kind == "submodule" then
      applyOptions path type.options value
    else if kind == "attrs" then
      if isAttrs value then
        builtins.mapAttrs (n: v: applyType (path ++ [ n ]) type.elem v) value
      else
        throw "${showPath path}: ${toJSON value} is not of type ${type.name}"
    else if kind == "list" then
      if isList value then
        map (applyType path type.elem) value
      else
        throw "${showPath path}: ${toJSON value} is not of type ${type.name}"
    else if kind == "nullOr" then
      if value == null then null else applyType path type.elem value
    else if kind == "either" then
      if type.left.check value then
        applyType path type.left value
      else
        applyType path type.right value
    else if type.check value then
      value
    else
      throw "${showPath path}: ${toJSON value} is not of type ${type.name}";

  # An options tree (nested attrsets of mkOption) with the user's values.
  applyOptions =
    path: options: value:
    let
      unknown = filter (n: !(options ? ${n})) (attrNames value);
    in
    if !isAttrs value then
      throw "${showPath path}: ${toJSON value} is not an attribute set"
    else if unknown != [ ] then
      throw "The option `${showPath (path ++ [ (head unknown) ])}' does not exist."
    else
      builtins.mapAttrs (
        n: opt:
        let
          p = path ++ [ n ];
        in
        if isOption opt then
          if value ? ${n} then
            applyType p opt.type value.${n}
          else if opt ? default then
            applyType p opt.type opt.default
          else
            throw "The option `${showPath p}' is used but not defined."
        else
          applyOptions p opt (value.${n} or { })
      ) options;

  # The final configuration as the module sees it: its own options' values plus `config`.
  finalConfig = lib.mapAttrs (_: v: v) config // {
    services = (config.services or { }) // {
      nixdock = applyOptions [ "services" "nixdock" ] declared.options.services.nixdock nixdock;
    };
    nix = lib.mapAttrs (_: v: v) (config.nix or { }) // {
      package = (config.nix.package or { }) // {
        version = nixVersion;
      };
    };
  };

  declared = import module {
    config = finalConfig;
    inherit lib pkgs;
  };

  # mkIf/mkMerge/mkOverride turned into a list of { priority; value; }.
  discharge =
    priority: v:
    let
      t = if isAttrs v then v._type or null else null;
    in
    if t == "if" then
      (if v.condition then discharge priority v.content else [ ])
    else if t == "merge" then
      concatMap (discharge priority) v.contents
    else if t == "override" then
      discharge v.priority v.content
    else
      [ { inherit priority; value = v; } ];

  isLeaf = v: !isAttrs v || lib.isDerivation v;

  mergeDefs =
    path: defs:
    let
      ds = concatMap (d: discharge d.priority d.value) defs;
      best = foldl' (m: d: if d.priority < m then d.priority else m) 10000 ds;
      top = filter (d: d.priority == best) ds;
      values = map (d: d.value) top;
    in
    if ds == [ ] then
      null
    else if all (d: !isLeaf d.value) ds then
      let
        names = lib.genAttrs (concatMap (d: attrNames d.value) ds) (n: null);
        children = lib.genAttrs (attrNames names) (
          n:
          mergeDefs (path ++ [ n ]) (
            concatMap (
              d:
              if d.value ? ${n} then
                [
                  {
                    inherit (d) priority;
                    value = d.value.${n};
                  }
                ]
              else
                [ ]
            ) ds
          )
        );
      in
      lib.filterAttrs (_: v: v != null) children
    else if all isList values then
      builtins.concatLists values
    else if all (v: v == head values) values then
      head values
    else
      throw "The option `${showPath path}' has conflicting definition values: ${toJSON (map plain values)}";

  # For JSON: derivations become { storePath; stubData; } (toJSON would print only outPath).
  plain =
    v:
    if lib.isDerivation v then
      {
        storePath = v.outPath;
        stubData = plain (v.stubData or null);
      }
    else if isAttrs v then
      builtins.mapAttrs (_: plain) v
    else if isList v then
      map plain v
    else
      v;

  merged = mergeDefs [ ] [
    {
      priority = 100;
      value = declared.config;
    }
    {
      priority = 100;
      value = if builtins.isFunction userDefinitions then userDefinitions lib else userDefinitions;
    }
  ];
in
{
  config = plain merged;
  failedAssertions = map (a: a.message) (filter (a: !a.assertion) (merged.assertions or [ ]));
  services.nixdock = plain finalConfig.services.nixdock;
}
