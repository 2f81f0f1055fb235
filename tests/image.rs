//! The controller image as `scripts/image.sh` writes it
//! (`target/testrun-controller-image.tar`, which `scripts/test.sh` builds
//! first): unpacked with umoci, its entrypoint run from the unpacked root
//! alone (chroot, nothing of this machine's libraries) as uid 65532 against
//! the local control plane, running a TestRun whose VMs fetch their agent
//! from it.

mod common;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::controller::ControllerProcess;
use common::emulator::EmulatorProcess;
use kube::Api;
use serde_json::{Value, json};
use testrun_controller::api::testrun::{TestRun, TestRunPhase};

const UID: u32 = 65532;

fn archive() -> PathBuf {
    let path = common::repo_root().join("target/testrun-controller-image.tar");
    assert!(path.exists(), "{} is missing: build it with scripts/image.sh (scripts/test.sh does)", path.display());
    path
}

fn run(command: &mut Command) -> String {
    let out = command.output().unwrap_or_else(|e| panic!("running {command:?}: {e}"));
    assert!(out.status.success(), "{command:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Unpacks the archive into a fresh folder: the OCI runtime bundle (its
/// `config.json` and `rootfs/`).
fn unpack(test: &str) -> PathBuf {
    let work = std::env::temp_dir().join(format!("image-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let layout = work.join("oci");
    std::fs::create_dir_all(&layout).expect("a folder for the layout");
    run(Command::new("tar").arg("-xf").arg(archive()).arg("-C").arg(&layout));
    let version = env!("CARGO_PKG_VERSION");
    let image = format!("{}:testrun-controller:{version}", layout.display());
    let bundle = work.join("bundle");
    run(Command::new("umoci").args(["unpack", "--image", &image]).arg(&bundle));
    bundle
}

fn files_in(root: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("reading the root").flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                found.push(path.strip_prefix(root).expect("under the root").display().to_string());
            }
        }
    }
    found.sort();
    found
}

#[test]
fn the_image_holds_one_static_executable_its_sbom_and_ca_bundle_and_runs_it_as_65532() {
    let bundle = unpack("shape");
    let config: Value =
        serde_json::from_slice(&std::fs::read(bundle.join("config.json")).expect("config.json")).expect("JSON");
    assert_eq!(config["process"]["user"]["uid"], json!(UID), "{config}");
    assert_eq!(config["process"]["user"]["gid"], json!(UID), "{config}");
    assert_eq!(config["process"]["args"], json!(["/testrun-controller", "run"]), "{config}");
    let labels = &config["annotations"];
    assert_eq!(labels["org.opencontainers.image.title"], json!("testrun-controller"), "{config}");
    assert_eq!(labels["org.opencontainers.image.licenses"], json!("Apache-2.0"), "{config}");
    assert_eq!(labels["org.opencontainers.image.version"], json!(env!("CARGO_PKG_VERSION")), "{config}");

    let root = bundle.join("rootfs");
    assert_eq!(
        files_in(&root),
        ["etc/ssl/certs/ca-certificates.crt", "sbom/testrun-controller.cdx.json", "testrun-controller"]
    );
    let elf = std::fs::read(root.join("testrun-controller")).expect("the executable");
    assert_eq!(&elf[..4], b"\x7fELF");
    // No program interpreter: the executable needs no library of the image.
    let header = run(Command::new("readelf").arg("-lW").arg(root.join("testrun-controller")));
    assert!(!header.contains("INTERP"), "the executable is linked dynamically:\n{header}");

    let sbom: Value =
        serde_json::from_slice(&std::fs::read(root.join("sbom/testrun-controller.cdx.json")).expect("the SBOM"))
            .expect("the SBOM is JSON");
    assert_eq!(sbom["bomFormat"], json!("CycloneDX"));
    let names: Vec<&str> =
        sbom["components"].as_array().expect("components").iter().filter_map(|c| c["name"].as_str()).collect();
    for dependency in ["kube", "google-cloud-compute-v1", "tokio", "axum"] {
        assert!(names.contains(&dependency), "{dependency} is not in the SBOM");
    }

    // Run from the unpacked root alone, as the image's user.
    let help = run(Command::new("chroot").arg(format!("--userspec={UID}:{UID}")).arg(&root).args([
        "/testrun-controller",
        "run",
        "--help",
    ]));
    assert!(help.contains("--agent-url"), "{help}");
}

#[tokio::test]
async fn the_controller_from_the_image_runs_a_testrun_whose_vms_fetch_the_agent_from_it() {
    let bundle = unpack("run");
    let root = bundle.join("rootfs");
    // The admin kubeconfig (a token and the CA inline), readable by 65532.
    let kubeconfig = root.join("kubeconfig");
    std::fs::copy(common::control_plane_kubeconfig(), &kubeconfig).expect("copying the kubeconfig");
    std::fs::set_permissions(&kubeconfig, std::os::unix::fs::PermissionsExt::from_mode(0o644)).expect("chmod");

    let (client, ns) = common::setup("image").await;
    let emulator = EmulatorProcess::start(&["--operation-delay", "100ms", "--boot-delay", "50ms"]);
    let program: Vec<OsString> = vec![
        "chroot".into(),
        format!("--userspec={UID}:{UID}").into(),
        root.clone().into(),
        "/testrun-controller".into(),
    ];
    let controller = ControllerProcess::start_program(program, PathBuf::from("/kubeconfig"), &ns, &emulator.url, &[]);

    let runs: Api<TestRun> = Api::namespaced(client, &ns);
    common::create_shell_run(&runs, "from-the-image", 2, "echo shard $TESTRUN_SHARD").await;

    let deadline = Instant::now() + Duration::from_secs(90);
    let finished = loop {
        let run = runs.get("from-the-image").await.expect("reading the TestRun");
        if run.status.as_ref().and_then(|s| s.phase).is_some_and(|p| p.is_finished()) {
            break run;
        }
        assert!(Instant::now() < deadline, "the run did not finish; controller log:\n{}", controller.log());
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let status = finished.status.expect("status");
    assert_eq!(status.phase, Some(TestRunPhase::Succeeded), "{status:?}\n{}", controller.log());
    for shard in &status.shards {
        let result = shard.result.as_ref().expect("a result");
        assert_eq!(result.output_tail.trim(), format!("shard {}", shard.index));
    }
    // The VMs ran the image's own executable, fetched from the controller.
    let image_exe = std::fs::read(root.join("testrun-controller")).expect("the image's executable");
    let kept: Vec<_> =
        std::fs::read_dir(emulator.work_dir.join("agent")).expect("the agent folder").flatten().collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert!(std::fs::read(kept[0].path()).expect("the fetched agent") == image_exe, "the VMs ran another executable");
    drop(controller);
    let _ = std::fs::remove_dir_all(bundle.parent().expect("the work folder"));
}
