//! The service's lifecycle: readiness (starting, ready, draining) and the signals that start a
//! graceful shutdown.

use std::sync::Arc;

use tokio::sync::watch;

/// Where the service is in its life, as `/health/ready` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Weights loaded, warm-up forward pass not yet done.
    Starting,
    /// Serving predictions.
    Ready,
    /// Shutdown requested: finishing what is queued.
    Draining,
}

/// The current [`Phase`], shared by the model worker, the server and the handlers; changes can be
/// watched ([`Readiness::subscribe`]), which the gRPC health service follows.
#[derive(Debug, Clone)]
pub struct Readiness(Arc<watch::Sender<Phase>>);

impl Default for Readiness {
    fn default() -> Self {
        Self::new()
    }
}

impl Readiness {
    pub fn new() -> Self {
        Self(Arc::new(watch::Sender::new(Phase::Starting)))
    }

    pub fn phase(&self) -> Phase {
        *self.0.borrow()
    }

    /// Starting -> Ready; a server already draining stays draining.
    pub fn set_ready(&self) {
        self.0.send_if_modified(|phase| {
            let starting = *phase == Phase::Starting;
            if starting {
                *phase = Phase::Ready;
            }
            starting
        });
    }

    pub fn set_draining(&self) {
        self.0.send_if_modified(|phase| {
            let changed = *phase != Phase::Draining;
            *phase = Phase::Draining;
            changed
        });
    }

    /// A receiver that sees every later change of phase.
    pub fn subscribe(&self) -> watch::Receiver<Phase> {
        self.0.subscribe()
    }
}

/// Resolves on SIGINT (Ctrl-C) or, on Unix, SIGTERM.
pub async fn signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut stream) => {
                stream.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received"),
        () = terminate => tracing::info!("SIGTERM received"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_moves_forward_only() {
        let r = Readiness::new();
        assert_eq!(r.phase(), Phase::Starting);
        r.set_ready();
        assert_eq!(r.phase(), Phase::Ready);
        r.set_draining();
        r.set_ready();
        assert_eq!(r.phase(), Phase::Draining);
    }
}
