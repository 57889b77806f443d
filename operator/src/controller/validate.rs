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
    /// An `ipBlock` the apiserver would refuse in the NetworkPolicy.
    #[error("{field} {value:?} {why}")]
    BadIpBlock {
        /// Where, e.g. `networkPolicy.inferenceFrom[0].ipBlock.cidr`.
        field: String,
        /// What was given.
        value: String,
        /// What is wrong, and the form wanted.
        why: &'static str,
    },
}

/// A CIDR as `ADDRESS/PREFIX`.
fn cidr(s: &str) -> Option<(std::net::IpAddr, u8)> {
    let (ip, len) = s.split_once('/')?;
    let ip: std::net::IpAddr = ip.parse().ok()?;
    let len: u8 = len.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    (len <= max).then_some((ip, len))
}

/// The first `len` bits of an address, as a number (IPv4 in the low 32 bits).
fn network(ip: std::net::IpAddr, len: u8) -> u128 {
    let (bits, width) = match ip {
        std::net::IpAddr::V4(v) => (u128::from(u32::from(v)), 32),
        std::net::IpAddr::V6(v) => (u128::from(v), 128),
    };
    let keep = u32::from(len);
    if keep == 0 { 0 } else { bits >> (width - keep) }
}

/// Every `ipBlock` of the policy peers: a CIDR, and `except` entries of the same family inside it,
/// as the apiserver checks a NetworkPolicy (which is applied before the Deployment, so a refused
/// one would leave the model without its pods rather than without its policy).
fn ip_blocks(md: &ModelDeployment) -> Result<(), InvalidSpec> {
    let Some(np) = md.spec.network_policy.as_ref() else {
        return Ok(());
    };
    let lists = [
        ("inferenceFrom", &np.inference_from),
        ("metricsFrom", &np.metrics_from),
    ];
    for (list, peers) in lists {
        for (i, block) in peers
            .iter()
            .enumerate()
            .filter_map(|(i, p)| Some((i, p.ip_block.as_ref()?)))
        {
            let at = format!("networkPolicy.{list}[{i}].ipBlock");
            let bad = |field: String, value: &str, why| InvalidSpec::BadIpBlock {
                field,
                value: value.to_string(),
                why,
            };
            let Some((ip, len)) = cidr(&block.cidr) else {
                return Err(bad(
                    format!("{at}.cidr"),
                    &block.cidr,
                    "is not a CIDR: ADDRESS/PREFIX, e.g. 192.0.2.0/24 or 2001:db8::/32 (prefix at most 32 for IPv4, 128 for IPv6)",
                ));
            };
            for (j, e) in block.except.iter().flatten().enumerate() {
                let field = format!("{at}.except[{j}]");
                let Some((eip, elen)) = cidr(e) else {
                    return Err(bad(
                        field,
                        e,
                        "is not a CIDR: ADDRESS/PREFIX, e.g. 192.0.2.128/25",
                    ));
                };
                let inside =
                    eip.is_ipv4() == ip.is_ipv4() && elen >= len && network(eip, len) == network(ip, len);
                if !inside {
                    return Err(bad(
                        field,
                        e,
                        "must lie inside the block's cidr, in the same address family",
                    ));
                }
            }
        }
    }
    Ok(())
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
    ip_blocks(md)
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

    #[test]
    fn ip_blocks_the_apiserver_would_refuse_are_invalid_and_good_ones_pass() {
        let with = |block: serde_json::Value| {
            md(serde_json::json!({"model": {"uri": "s3://models/m.onnx"},
                "networkPolicy": {"metricsFrom": [{"namespaceSelector": {}}, {"ipBlock": block}]}}))
        };
        for good in [
            serde_json::json!({"cidr": "127.0.0.0/8", "except": ["127.1.0.0/16", "127.255.255.255/32"]}),
            serde_json::json!({"cidr": "2001:db8::/32", "except": ["2001:db8:1::/48"]}),
            serde_json::json!({"cidr": "0.0.0.0/0", "except": ["169.254.0.0/16"]}),
            serde_json::json!({"cidr": "192.0.2.7/32"}),
        ] {
            assert_eq!(validate(&with(good.clone())), Ok(()), "{good}");
        }
        for (bad, says) in [
            (
                serde_json::json!({"cidr": "2001:db8::1/129"}),
                "metricsFrom[1].ipBlock.cidr \"2001:db8::1/129\" is not a CIDR",
            ),
            (serde_json::json!({"cidr": "127.0.0.0"}), "is not a CIDR"),
            (
                serde_json::json!({"cidr": "127.0.0.0/8", "except": ["2001:db8::/32"]}),
                "except[0] \"2001:db8::/32\" must lie inside",
            ),
            (
                serde_json::json!({"cidr": "127.0.0.0/16", "except": ["127.1.0.0/24"]}),
                "must lie inside",
            ),
            (
                serde_json::json!({"cidr": "127.0.0.0/16", "except": ["127.0.0.0/8"]}),
                "must lie inside",
            ),
            (
                serde_json::json!({"cidr": "127.0.0.0/8", "except": ["ten"]}),
                "except[0] \"ten\" is not a CIDR",
            ),
        ] {
            let e = validate(&with(bad.clone())).expect_err("refused").to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
