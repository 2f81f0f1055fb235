//! The `testrun-controller` binary: flags in, one subcommand out.

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Runs CI test jobs on ephemeral Compute Engine VMs and keeps warm pools of
/// prebuilt VMs, driven by TestRun and PrebuildPreset custom resources.
#[derive(Parser)]
#[command(name = "testrun-controller", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the TestRun and PrebuildPreset CustomResourceDefinitions as
    /// multi-document YAML (the content of `crds/`).
    Crdgen {
        /// Write one file per CRD into this folder (e.g. `crds/`) instead of
        /// printing them.
        #[arg(long, value_name = "DIR")]
        out_dir: Option<std::path::PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crdgen { out_dir: None } => crdgen(),
        Command::Crdgen { out_dir: Some(dir) } => crdgen_to(&dir),
    }
}

fn crdgen() -> ExitCode {
    match testrun_controller::crd::all_yaml() {
        Ok(yaml) => {
            let mut out = std::io::stdout().lock();
            if let Err(e) = out.write_all(yaml.as_bytes()).and_then(|()| out.flush()) {
                eprintln!("testrun-controller crdgen: writing to stdout: {e}");
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("testrun-controller crdgen: {e}");
            ExitCode::FAILURE
        }
    }
}

fn crdgen_to(dir: &std::path::Path) -> ExitCode {
    for generated in testrun_controller::crd::all() {
        let path = dir.join(generated.file_name);
        let written = testrun_controller::crd::to_yaml(&generated.crd)
            .map_err(|e| e.to_string())
            .and_then(|yaml| std::fs::write(&path, yaml).map_err(|e| format!("writing {}: {e}", path.display())));
        if let Err(e) = written {
            eprintln!("testrun-controller crdgen: {e}");
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}
