//! The committed CRDs in `crds/` must equal what `crdgen` prints, so a
//! change to the Rust types cannot ship without its CRD.

use std::process::Command;

fn committed(file: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("crds").join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Every committed CRD, in `crdgen`'s order.
const FILES: [&str; 3] = ["testruns.yaml", "prebuildpresets.yaml", "vmclasses.yaml"];

const REGENERATE: &str = "regenerate with `cargo run -- crdgen --out-dir crds`";

#[test]
fn committed_crds_match_the_rust_types() {
    for generated in testrun_controller::crd::all() {
        let expected = testrun_controller::crd::to_yaml(&generated.crd).expect("rendering a CRD");
        assert!(
            committed(generated.file_name) == expected,
            "crds/{} is out of date; {REGENERATE}",
            generated.file_name
        );
    }
}

#[test]
fn crdgen_prints_every_committed_crd() {
    let out = Command::new(env!("CARGO_BIN_EXE_testrun-controller")).arg("crdgen").output().expect("running crdgen");
    assert!(out.status.success(), "crdgen failed: {}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8(out.stdout).expect("crdgen prints UTF-8");
    let expected: String = FILES.iter().map(|f| committed(f)).collect();
    assert!(printed == expected, "crdgen output differs from crds/; {REGENERATE}");
    assert_eq!(printed.matches("\nkind: CustomResourceDefinition\n").count(), FILES.len());
}

#[test]
fn crdgen_out_dir_writes_the_committed_files() {
    let dir = std::env::temp_dir().join(format!("crdgen-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("creating a temp dir");
    let status = Command::new(env!("CARGO_BIN_EXE_testrun-controller"))
        .args(["crdgen", "--out-dir"])
        .arg(&dir)
        .status()
        .expect("running crdgen --out-dir");
    assert!(status.success());
    for file in FILES {
        let written = std::fs::read_to_string(dir.join(file)).expect("crdgen wrote the file");
        assert!(written == committed(file), "crdgen --out-dir wrote a different {file}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn crdgen_out_dir_reports_a_missing_folder() {
    let out = Command::new(env!("CARGO_BIN_EXE_testrun-controller"))
        .args(["crdgen", "--out-dir", "/nonexistent/crds"])
        .output()
        .expect("running crdgen");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent/crds/testruns.yaml"), "{stderr}");
}
