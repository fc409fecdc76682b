//! The upstream machines-file vectors (`src/libstore-tests/data/machines/` at 2.26.3 and
//! 2.35.2), with the values Nix's own `machines.cc` unit tests expect of them.

use std::collections::BTreeSet;
use std::path::PathBuf;

use hook_protocol::machines::{MachinesError, parse_config_fs};

const VECTORS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/upstream");
const VERSIONS: [&str; 2] = ["2.26.3", "2.35.2"];

fn vector(version: &str, name: &str) -> PathBuf {
    let p = PathBuf::from(VECTORS)
        .join(version)
        .join("machines")
        .join(name);
    assert!(
        p.is_file(),
        "Nix machines vector not found at {}",
        p.display()
    );
    p
}

fn set(s: &[&str]) -> BTreeSet<String> {
    s.iter().map(|x| x.to_string()).collect()
}

#[test]
fn valid_file_parses_to_what_nix_expects() {
    for version in VERSIONS {
        let path = vector(version, "valid");
        let ms = parse_config_fs(&set(&["x86_64-linux"]), &format!("@{}", path.display()))
            .unwrap_or_else(|e| panic!("{version}: {e}"));
        assert_eq!(ms.len(), 3, "{version}");
        let hosts: Vec<(&str, &str)> = ms
            .iter()
            .map(|m| {
                (
                    m.store_uri.user.as_deref().unwrap_or(""),
                    m.store_uri.host.as_str(),
                )
            })
            .collect();
        assert_eq!(
            hosts,
            [
                ("nix", "scratchy.labs.cs.uu.nl"),
                ("nix", "itchy.labs.cs.uu.nl"),
                ("nix", "poochie.labs.cs.uu.nl")
            ]
        );
        for m in &ms {
            assert_eq!(m.store_uri.scheme, "ssh", "schemeless entries are ssh://");
            assert!(m.store_uri.uri.starts_with("ssh://nix@"));
            assert_eq!(m.systems, set(&["i686-linux"]));
            assert_eq!(
                m.ssh_key.as_deref(),
                Some("/home/nix/.ssh/id_scratchy_auto")
            );
        }
        assert_eq!(
            ms.iter()
                .map(|m| (m.max_jobs, m.speed_factor))
                .collect::<Vec<_>>(),
            [(8, 1.0), (8, 2.0), (1, 2.0)]
        );
        assert_eq!(ms[0].supported_features, set(&["kvm"]));
        assert!(ms[0].mandatory_features.is_empty());
        assert!(ms[1].supported_features.is_empty() && ms[1].mandatory_features.is_empty());
        assert_eq!(ms[2].supported_features, set(&["kvm"]));
        assert_eq!(ms[2].mandatory_features, set(&["benchmark"]));
        assert_eq!(ms[0].public_host_key, None);
        let key = ms[2]
            .public_host_key
            .as_deref()
            .expect("poochie has a host key");
        assert!(
            key.starts_with("ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAACAQCYeyGYZ53sw"),
            "{key}"
        );
    }
}

#[test]
fn bad_format_file_is_rejected() {
    for version in VERSIONS {
        let path = vector(version, "bad_format");
        let e = parse_config_fs(&set(&["x86_64-linux"]), &format!("@{}", path.display()))
            .expect_err("bad_format must not parse");
        assert!(
            matches!(e, MachinesError::BadNumber { column: 3, .. }),
            "{version}: {e}"
        );
        assert!(e.to_string().contains("nix@scratchy.labs.cs.uu.nl"), "{e}");
    }
}

#[test]
fn missing_and_empty_files_give_no_machines() {
    assert!(
        parse_config_fs(&set(&["x"]), "@/not/a/file")
            .unwrap()
            .is_empty()
    );
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("empty-machines");
    std::fs::write(&p, "").unwrap();
    assert!(
        parse_config_fs(&set(&["x"]), &format!("@{}", p.display()))
            .unwrap()
            .is_empty()
    );
}
