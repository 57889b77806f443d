//! How both binaries print an error that ends them: the message, then each cause that adds
//! something, never a backtrace (an expected failure such as a port in use is not a crash, even
//! with `RUST_BACKTRACE=1`).

use std::error::Error;

/// The texts of `top`'s causes, skipping each one the text so far already contains (errors that
/// embed their source in their own message would otherwise say it twice).
fn new_causes(top: &(dyn Error + 'static)) -> Vec<String> {
    let mut seen = top.to_string();
    let mut out = Vec::new();
    let mut cause = top.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !text.is_empty() && !seen.contains(&text) {
            seen.push_str(&text);
            out.push(text);
        }
        cause = c.source();
    }
    out
}

/// `error: <message>` and one `  caused by: <cause>` line per cause that adds something.
pub fn error_report(top: &(dyn Error + 'static)) -> String {
    let mut out = format!("error: {top}");
    for c in new_causes(top) {
        out.push_str("\n  caused by: ");
        out.push_str(&c);
    }
    out
}

/// The error and each cause that adds something, on one line joined by `: ` (for logs: a client's
/// "client error (Connect)" says nothing until its cause, "Connection refused", follows).
pub fn chain(top: &(dyn Error + 'static)) -> String {
    std::iter::once(top.to_string())
        .chain(new_causes(top))
        .collect::<Vec<_>>()
        .join(": ")
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
