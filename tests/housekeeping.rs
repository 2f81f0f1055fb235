//! What the repository says about itself agrees with Cargo.toml: the
//! licence and the Rust version.

mod common;

fn cargo_field(name: &str) -> String {
    let manifest = std::fs::read_to_string(common::repo_root().join("Cargo.toml")).expect("Cargo.toml");
    manifest
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} = ")))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_else(|| panic!("no {name} in Cargo.toml"))
}

#[test]
fn the_license_file_is_the_license_cargo_toml_names() {
    assert_eq!(cargo_field("license"), "Apache-2.0");
    let license = std::fs::read_to_string(common::repo_root().join("LICENSE")).expect("LICENSE");
    assert!(
        license.contains("Apache License") && license.contains("Version 2.0, January 2004"),
        "LICENSE is not Apache-2.0"
    );
    assert!(license.contains("END OF TERMS AND CONDITIONS"), "LICENSE is cut short");
    for chart in ["charts/testrun-controller/Chart.yaml", "charts/testrun-controller-crds/Chart.yaml"] {
        let text = std::fs::read_to_string(common::repo_root().join(chart)).expect("Chart.yaml");
        assert!(text.contains("artifacthub.io/license: Apache-2.0"), "{chart} names another licence");
    }
}

#[test]
fn every_rust_version_the_repository_names_is_cargo_tomls_rust_version() {
    let wanted = format!("rustc {} or newer", cargo_field("rust-version"));
    for file in ["README.md", "scripts/test.sh"] {
        let text = std::fs::read_to_string(common::repo_root().join(file)).expect("a file");
        let named: Vec<&str> =
            text.match_indices("rustc 1.").map(|(i, _)| &text[i..(i + wanted.len()).min(text.len())]).collect();
        assert!(!named.is_empty(), "{file} names no Rust version");
        assert!(named.iter().all(|n| *n == wanted), "{file} names {named:?}, Cargo.toml says {wanted:?}");
    }
}
