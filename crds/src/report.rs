//! How both binaries print an error that ends them: the message, then each cause that adds
//! something, never a backtrace (an expected failure such as a port in use is not a crash, even
//! with `RUST_BACKTRACE=1`).

use std::error::Error;

/// `error: <message>` and one `  caused by: <cause>` line per cause whose text the lines above do
/// not already contain (errors that embed their source in their own message would otherwise print
/// it twice).
pub fn error_report(top: &(dyn Error + 'static)) -> String {
    let mut out = format!("error: {top}");
    let mut cause = top.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !text.is_empty() && !out.contains(&text) {
            out.push_str("\n  caused by: ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

/// The error and each cause that adds something, on one line joined by `: ` (for logs: a client's
/// "client error (Connect)" says nothing until its cause, "Connection refused", follows).
pub fn chain(top: &(dyn Error + 'static)) -> String {
    let mut out = top.to_string();
    let mut cause = top.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !text.is_empty() && !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{chain, error_report};

    #[derive(Debug)]
    struct E(&'static str, Option<Box<E>>);
    impl std::fmt::Display for E {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }
    impl std::error::Error for E {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    #[test]
    fn each_cause_is_printed_once() {
        let io = E("Address already in use (os error 98)", None);
        let bind = E(
            "failed to bind 0.0.0.0:8080: Address already in use (os error 98)",
            Some(Box::new(io)),
        );
        let top = E("failed to start the server", Some(Box::new(bind)));
        assert_eq!(
            error_report(&top),
            "error: failed to start the server\n  caused by: failed to bind 0.0.0.0:8080: Address already in use (os error 98)"
        );
        assert_eq!(error_report(&E("alone", None)), "error: alone");
        let refused = E(
            "client error (Connect)",
            Some(Box::new(E("Connection refused (os error 111)", None))),
        );
        assert_eq!(
            chain(&refused),
            "client error (Connect): Connection refused (os error 111)"
        );
    }
}
