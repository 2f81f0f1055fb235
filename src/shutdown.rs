//! The process's one stop request: SIGTERM or SIGINT. A second signal
//! ends the process at once.
//!
//! Signals are listened for once, from the moment [`listen`] is called, and
//! remembered: a signal that arrives while no part of the process is
//! waiting for one (say, between winning the leader Lease and starting the
//! controllers) still stops everything that waits afterwards. Waiting on
//! the OS signal directly in several places would lose such a signal.

use std::sync::OnceLock;

use tokio::sync::watch;

static STOP: OnceLock<watch::Sender<bool>> = OnceLock::new();

fn sender() -> &'static watch::Sender<bool> {
    STOP.get_or_init(|| {
        let (tx, _) = watch::channel(false);
        tokio::spawn(async {
            wait_for_signal().await;
            tracing::info!("shutting down (a second signal stops at once)");
            if let Some(stop) = STOP.get() {
                stop.send_replace(true);
            }
            wait_for_signal().await;
            tracing::warn!("second signal: stopping at once");
            std::process::exit(130);
        });
        tx
    })
}

/// Starts listening for SIGTERM and SIGINT (once per process; later calls
/// do nothing). Must run inside a Tokio runtime.
pub fn listen() {
    sender();
}

/// Resolves once a stop was requested, however long ago. Starts listening
/// when nothing did yet.
pub async fn requested() {
    let mut stop = sender().subscribe();
    // An error means the sender is gone, which a static never is.
    let _ = stop.wait_for(|stopping| *stopping).await;
}

async fn wait_for_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}
