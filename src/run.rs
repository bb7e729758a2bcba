//! `keygate run`: start a command with the env vars of a scope decrypted into its environment.
//!
//! ```text
//!  org-scoped vars (object_type organization, object_id = the org's id or name)
//!    overlaid by the scope's own vars (narrower scope wins)
//!  ─▶ spawn CMD with them (stdin/stdout/stderr inherited) ─▶ stamp `used` on each injected var
//!  ─▶ forward INT, TERM, HUP, QUIT, USR1, USR2 to the child ─▶ exit with the child's code
//!     (128 + signal number when a signal ended it)
//! ```
//!
//! Values go into the child's environment only: never into a log line or an error message.

use crate::secret::Secret;
use crate::store::EnvVarRecord;

/// Starts `command` with `env` added to this process's environment.
pub fn spawn(
    command: &[String],
    env: &[(EnvVarRecord, Secret)],
) -> Result<tokio::process::Child, String> {
    let (program, args) = command.split_first().ok_or("no command given after --")?;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args);
    for (rec, value) in env {
        cmd.env(&rec.name, value.expose());
    }
    cmd.spawn()
        .map_err(|e| format!("cannot start {program}: {e}"))
}

/// Signals caught for the child. Installed *before* the child is spawned: a signal that
/// arrives between the spawn and the first wait must be forwarded, not kill keygate with
/// its default action and orphan the child.
pub struct SignalForwarder {
    rx: tokio::sync::mpsc::UnboundedReceiver<nix::sys::signal::Signal>,
}

impl SignalForwarder {
    /// Starts catching INT, TERM, HUP, QUIT, USR1 and USR2. Needs a tokio runtime.
    pub fn install() -> Result<Self, String> {
        use nix::sys::signal::Signal;
        use tokio::signal::unix::{signal, SignalKind};
        let kinds = [
            (SignalKind::interrupt(), Signal::SIGINT),
            (SignalKind::terminate(), Signal::SIGTERM),
            (SignalKind::hangup(), Signal::SIGHUP),
            (SignalKind::quit(), Signal::SIGQUIT),
            (SignalKind::user_defined1(), Signal::SIGUSR1),
            (SignalKind::user_defined2(), Signal::SIGUSR2),
        ];
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        for (kind, sig) in kinds {
            let mut stream = signal(kind).map_err(|e| format!("cannot watch signals: {e}"))?;
            let tx = tx.clone();
            tokio::spawn(async move {
                while stream.recv().await.is_some() {
                    if tx.send(sig).is_err() {
                        return;
                    }
                }
            });
        }
        Ok(Self { rx })
    }

    /// Forwards caught signals to the child until it exits; returns the exit code to pass on.
    pub async fn supervise(mut self, mut child: tokio::process::Child) -> Result<i32, String> {
        let Some(pid) = child.id() else {
            // Already reaped: report its status.
            let status = child.wait().await.map_err(|e| e.to_string())?;
            return Ok(exit_code(status));
        };
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        loop {
            tokio::select! {
                status = child.wait() => {
                    return Ok(exit_code(status.map_err(|e| format!("waiting for the command: {e}"))?));
                }
                Some(sig) = self.rx.recv() => {
                    let _ = nix::sys::signal::kill(pid, sig);
                }
            }
        }
    }
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}
