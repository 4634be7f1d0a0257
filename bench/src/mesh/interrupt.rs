//! Ctrl-C and SIGTERM during `weft-bench mesh`: the run stops after the path it is measuring
//! and cleans up (namespaces, sidecars, the control plane, the idle-priority CPU spinners), as
//! it does when it ends, instead of dying with all of that left behind. Left behind, the
//! spinners alone skew every later run on the machine. A second signal exits at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::signal::unix::{SignalKind, signal};

/// Watches SIGINT and SIGTERM for the rest of the process's life.
#[derive(Debug)]
pub struct Interrupt {
    requested: Arc<AtomicBool>,
}

impl Interrupt {
    /// Starts watching on a thread of its own; `None` when signals cannot be watched (then
    /// they end the process as before).
    pub fn watch() -> Option<Interrupt> {
        let requested = Arc::new(AtomicBool::new(false));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?;
        // Registered before `watch` returns, so that no signal after it is missed.
        let (mut interrupt, mut terminate) = runtime
            .block_on(async {
                Ok::<_, std::io::Error>((
                    signal(SignalKind::interrupt())?,
                    signal(SignalKind::terminate())?,
                ))
            })
            .ok()?;
        let flag = requested.clone();
        std::thread::Builder::new()
            .name("interrupt".into())
            .spawn(move || {
                runtime.block_on(async move {
                    loop {
                        tokio::select! {
                            _ = interrupt.recv() => {}
                            _ = terminate.recv() => {}
                        }
                        if flag.swap(true, Ordering::SeqCst) {
                            eprintln!(
                                "interrupted again: exiting now; this run's namespaces and \
                                 processes may be left behind"
                            );
                            std::process::exit(130);
                        }
                        eprintln!(
                            "interrupted: finishing the path under way, then cleaning up \
                             (interrupt again to exit at once)"
                        );
                    }
                })
            })
            .ok()?;
        Some(Interrupt { requested })
    }

    /// Whether a signal came.
    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }
}
