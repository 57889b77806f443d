//! Checks the schema cannot express (the CRD's CEL rules catch the rest at admission).

use kube::ResourceExt;
use kubemaas_crds::v1alpha1::ModelDeployment;

/// Why a spec cannot be reconciled; surfaced as a `Ready=False, reason InvalidSpec` condition.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum InvalidSpec {
    /// The name cannot be a Service name.
    #[error(
        "metadata.name {0:?} must be a DNS-1035 label (lower-case letters, digits and '-', starting with a letter, at most 63 characters) because it names the Service"
    )]
    BadName(String),
    /// A namespaced object without a namespace.
    #[error("the ModelDeployment has no namespace")]
    NoNamespace,
}

fn dns1035(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[b.len() - 1] != b'-'
}

/// Validates what the builders rely on.
pub fn validate(md: &ModelDeployment) -> Result<(), InvalidSpec> {
    let name = md.name_any();
    if !dns1035(&name) {
        return Err(InvalidSpec::BadName(name));
    }
    if md.namespace().is_none() {
        return Err(InvalidSpec::NoNamespace);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::build::tests::md;

    #[test]
    fn names_that_cannot_name_a_service_are_invalid() {
        let mut m = md(serde_json::json!({"model": {"uri": "s3://models/m.onnx"}}));
        assert!(validate(&m).is_ok());
        for bad in ["1abc", "a.b", "Upper", "x-", &"a".repeat(64)] {
            m.metadata.name = Some(bad.into());
            assert!(validate(&m).is_err(), "{bad}");
        }
    }
}
