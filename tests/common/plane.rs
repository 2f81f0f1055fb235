//! A control plane of a test's own (etcd and kube-apiserver on free ports),
//! for tests that change cluster-wide state or restart the apiserver.

use std::path::PathBuf;
use std::process::Command;

use super::controller::free_port;

/// A control plane of the test's own, on free ports, sharing the cached
/// kube-apiserver build.
pub struct ControlPlane {
    env: Vec<(String, String)>,
    /// Its kubeconfig.
    pub kubeconfig: PathBuf,
}

impl ControlPlane {
    /// Runs `scripts/control-plane.sh COMMAND` against this control plane.
    pub fn script(&self, command: &str) {
        let out = Command::new("bash")
            .arg(super::repo_root().join("scripts/control-plane.sh"))
            .arg(command)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .expect("running control-plane.sh");
        assert!(out.status.success(), "control-plane.sh {command}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Starts one; `name` names its state folder.
    pub fn start(name: &str) -> Self {
        let shared = super::control_plane_kubeconfig();
        let bin = shared.parent().expect("state folder").join("bin");
        let state = std::env::temp_dir().join(format!("{name}-plane-{}", std::process::id()));
        let etcd = loop {
            let port = free_port();
            if std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
                break port;
            }
        };
        let env = vec![
            ("TESTRUN_STATE_DIR".to_string(), state.display().to_string()),
            ("TESTRUN_BIN_DIR".to_string(), bin.display().to_string()),
            ("TESTRUN_APISERVER_PORT".to_string(), free_port().to_string()),
            ("TESTRUN_ETCD_PORT".to_string(), etcd.to_string()),
        ];
        let plane = Self { env, kubeconfig: state.join("kubeconfig") };
        plane.script("up");
        plane
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.script("down");
        if let Some((_, state)) = self.env.iter().find(|(k, _)| k == "TESTRUN_STATE_DIR") {
            let _ = std::fs::remove_dir_all(state);
        }
    }
}
