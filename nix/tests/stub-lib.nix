# A small stand-in for nixpkgs' `lib`, enough to evaluate nixdock's package and modules
# without nixpkgs (the tests run where there is no network and no nixpkgs checkout).
# Written for these tests: option declarations keep their type so that eval-module.nix can
# check definitions against them; mkIf/mkMerge/mkOverride are markers that eval-module.nix
# resolves.
let
  inherit (builtins)
    all
    any
    attrNames
    compareVersions
    elem
    filter
    isAttrs
    isBool
    isFloat
    isInt
    isList
    isString
    listToAttrs
    stringLength
    substring
    ;

  mkType =
    name: check: extra:
    {
      _type = "type";
      inherit name check;
    }
    // extra;

  isDerivation = v: isAttrs v && (v.type or null) == "derivation";

  hasPrefix = pre: s: substring 0 (stringLength pre) s == pre;
  hasSuffix =
    suf: s:
    let
      ls = stringLength s;
      lf = stringLength suf;
    in
    lf <= ls && substring (ls - lf) lf s == suf;

  types = rec {
    str = mkType "string" isString { };
    bool = mkType "boolean" isBool { };
    float = mkType "float" isFloat { };
    int = mkType "signed integer" isInt { };
    ints = {
      positive = mkType "positive integer" (v: isInt v && v > 0) { };
      unsigned = mkType "unsigned integer" (v: isInt v && v >= 0) { };
    };
    package = mkType "package" isDerivation { };
    path = mkType "path" (v: builtins.isPath v || (isString v && hasPrefix "/" v)) { };
    listOf = t: mkType "list of ${t.name}" (v: isList v && all t.check v) { kind = "list"; elem = t; };
    attrsOf =
      t: mkType "attribute set of ${t.name}" (v: isAttrs v && all (n: t.check v.${n}) (attrNames v)) {
        kind = "attrs";
        elem = t;
      };
    nullOr = t: mkType "null or ${t.name}" (v: v == null || t.check v) { kind = "nullOr"; elem = t; };
    either =
      a: b:
      mkType "${a.name} or ${b.name}" (v: a.check v || b.check v) {
        kind = "either";
        left = a;
        right = b;
      };
    enum = vs: mkType "one of ${builtins.toJSON vs}" (v: elem v vs) { };
    strMatching = re: mkType "string matching the pattern ${re}" (v: isString v && builtins.match re v != null) { };
    # A module with `options` only (no freeform part, like the real one without freeformType).
    submodule =
      m:
      mkType "submodule" isAttrs {
        kind = "submodule";
        options = (if builtins.isFunction m then m { } else m).options;
      };
  };
in
rec {
  inherit types hasPrefix hasSuffix isDerivation;

  mkOption = args: args // { _type = "option"; };
  mkEnableOption =
    what:
    mkOption {
      type = types.bool;
      default = false;
      description = "Whether to enable ${what}.";
    };
  literalExpression = text: {
    _type = "literalExpression";
    inherit text;
  };

  mkIf = condition: content: {
    _type = "if";
    inherit condition content;
  };
  mkMerge = contents: {
    _type = "merge";
    inherit contents;
  };
  mkOverride = priority: content: {
    _type = "override";
    inherit priority content;
  };
  mkDefault = mkOverride 1000;
  mkForce = mkOverride 50;

  versionOlder = a: b: compareVersions a b < 0;
  versionAtLeast = a: b: !(versionOlder a b);

  removePrefix = pre: s: if hasPrefix pre s then substring (stringLength pre) (-1) s else s;
  escapeRegex = builtins.replaceStrings [ "." "+" "*" "(" ")" "[" "]" "?" "^" "$" "|" "{" "}" "\\" ] [ "\\." "\\+" "\\*" "\\(" "\\)" "\\[" "\\]" "\\?" "\\^" "\\$" "\\|" "\\{" "\\}" "\\\\" ];
  splitString = sep: s: filter isString (builtins.split (escapeRegex sep) s);
  filterAttrs =
    pred: set:
    listToAttrs (
      map (n: {
        name = n;
        value = set.${n};
      }) (filter (n: pred n set.${n}) (attrNames set))
    );
  mapAttrs = builtins.mapAttrs;
  mapAttrsToList = f: set: map (n: f n set.${n}) (attrNames set);
  hasInfix = infix: s: builtins.match ".*${escapeRegex infix}.*" s != null;
  genAttrs =
    names: f:
    listToAttrs (
      map (n: {
        name = n;
        value = f n;
      }) names
    );
  optionalAttrs = cond: set: if cond then set else { };
  optionals = cond: list: if cond then list else [ ];
  importTOML = path: builtins.fromTOML (builtins.readFile path);
  # Enough of lib.licenses for the SPDX ids nixdock's Cargo.toml can name.
  getLicenseFromSpdxId =
    id:
    {
      spdxId = id;
      shortName =
        {
          "MIT" = "mit";
          "Apache-2.0" = "asl20";
        }
        .${id} or (throw "stub lib: no licence for SPDX id ${id}");
    };
  platforms = {
    linux = [
      "x86_64-linux"
      "aarch64-linux"
    ];
    darwin = [
      "x86_64-darwin"
      "aarch64-darwin"
    ];
  };
  inherit any all;
}
