//! The address guard for sources reached by URL (http, https, hf): a URL whose host resolves into a
//! refused range is never connected to. The check runs on the resolved addresses, inside the
//! resolver the HTTP client connects with, so a DNS answer cannot change between check and
//! connection, and it runs again for every redirect hop.
//!
//! Always refused: link-local (where cloud metadata services live), known metadata addresses,
//! unspecified, multicast, broadcast and reserved ranges. Refused unless `--allow-private-addresses`:
//! loopback and private ranges (on-prem stores live there; a pod fetching from them is a choice).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

/// Why an address is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Allowed.
    Allowed,
    /// Refused unless private addresses are allowed.
    Private(&'static str),
    /// Always refused.
    Never(&'static str),
}

fn classify_v4(ip: Ipv4Addr) -> Verdict {
    let o = ip.octets();
    if ip == Ipv4Addr::new(100, 100, 100, 200) {
        return Verdict::Never("a cloud metadata address (Alibaba Cloud)");
    }
    if o[0] == 169 && o[1] == 254 {
        return Verdict::Never("link-local (169.254.0.0/16, where cloud metadata services answer)");
    }
    if o[0] == 0 {
        return Verdict::Never("unspecified (0.0.0.0/8)");
    }
    if o[..3] == [192, 0, 0] {
        return Verdict::Never(
            "an IETF protocol assignment (192.0.0.0/24; Oracle Compute Cloud@Customer's metadata service answers at 192.0.0.192)",
        );
    }
    if ip.is_multicast() || ip.is_broadcast() || o[0] >= 240 {
        return Verdict::Never("multicast, broadcast or reserved");
    }
    if ip.is_loopback() {
        return Verdict::Private("loopback (127.0.0.0/8)");
    }
    if ip.is_private() {
        return Verdict::Private("a private range (RFC 1918)");
    }
    if o[0] == 100 && (o[1] & 0xc0) == 64 {
        return Verdict::Private("the shared address space (RFC 6598)");
    }
    Verdict::Allowed
}

/// The IPv4 addresses an IPv6 address may lead to: IPv4-mapped and IPv4-translated, the deprecated
/// IPv4-compatible form, NAT64 with the well-known prefix and with a local-use one (RFC 8215, whose
/// prefix length is the site's choice, so every RFC 6052 layout that fits is taken), 6to4, and
/// Teredo's server and (obfuscated) client.
fn embedded_v4(ip: Ipv6Addr) -> Vec<Ipv4Addr> {
    let b = ip.octets();
    let v4 = |i: [usize; 4]| Ipv4Addr::new(b[i[0]], b[i[1]], b[i[2]], b[i[3]]);
    let s = ip.segments();
    let last = v4([12, 13, 14, 15]);
    match s {
        // ::ffff:a.b.c.d (mapped), ::ffff:0:a.b.c.d (translated), ::a.b.c.d (compatible; `::`
        // and `::1` are themselves).
        [0, 0, 0, 0, 0, 0xffff, _, _] | [0, 0, 0, 0, 0xffff, 0, _, _] => vec![last],
        [0, 0, 0, 0, 0, 0, _, _] if !ip.is_unspecified() && !ip.is_loopback() => vec![last],
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => vec![last],
        // A layout that reads 0.0.0.0/8 is not the one in use: its bytes are the prefix's or the
        // suffix's zeros (and refusing them as "unspecified" would refuse every address).
        [0x64, 0xff9b, 1, ..] => [v4([6, 7, 9, 10]), v4([7, 9, 10, 11]), v4([9, 10, 11, 12]), last]
            .into_iter()
            .filter(|a| a.octets()[0] != 0)
            .collect(),
        [0x2002, ..] => vec![v4([2, 3, 4, 5])],
        [0x2001, 0, ..] => vec![v4([4, 5, 6, 7]), Ipv4Addr::from(!u32::from(last))],
        _ => Vec::new(),
    }
}

fn classify_v6(ip: Ipv6Addr) -> Verdict {
    // The strictest verdict of the IPv4 addresses it may lead to.
    let mut carried = Verdict::Allowed;
    for v4 in embedded_v4(ip) {
        match classify_v4(v4) {
            never @ Verdict::Never(_) => return never,
            private @ Verdict::Private(_) => carried = private,
            Verdict::Allowed => {}
        }
    }
    if carried != Verdict::Allowed {
        return carried;
    }
    let s = ip.segments();
    if ip == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) {
        return Verdict::Never("a cloud metadata address (AWS, fd00:ec2::254)");
    }
    if ip.is_unspecified() {
        return Verdict::Never("unspecified (::)");
    }
    if ip.is_multicast() {
        return Verdict::Never("multicast");
    }
    if (s[0] & 0xffc0) == 0xfe80 {
        return Verdict::Never("link-local (fe80::/10)");
    }
    if ip.is_loopback() {
        return Verdict::Private("loopback (::1)");
    }
    if (s[0] & 0xfe00) == 0xfc00 {
        return Verdict::Private("IPv6 unique-local");
    }
    Verdict::Allowed
}

/// Classifies one address.
pub fn classify(ip: IpAddr) -> Verdict {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

/// Why a host could not be used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GuardError {
    /// The host resolves to a refused address.
    #[error("{host} resolves to {ip}, which is {why}; {hint}")]
    Refused {
        /// Host name or literal.
        host: String,
        /// The refused address.
        ip: IpAddr,
        /// The range it is in.
        why: &'static str,
        /// What the user can do.
        hint: &'static str,
    },
    /// Name resolution failed.
    #[error("cannot resolve {host}: {message}")]
    Dns {
        /// Host name.
        host: String,
        /// Resolver's words.
        message: String,
    },
}

/// Resolves host names (honouring `--resolve` overrides) and refuses addresses by range.
#[derive(Debug, Clone, Default)]
pub struct AddressGuard {
    allow_private: bool,
    overrides: HashMap<String, Vec<IpAddr>>,
}

impl AddressGuard {
    /// A guard; `overrides` pin host names to addresses (like curl's `--resolve`).
    pub fn new(allow_private: bool, overrides: HashMap<String, Vec<IpAddr>>) -> Self {
        AddressGuard {
            allow_private,
            overrides,
        }
    }

    /// Refuses one address.
    pub fn check_ip(&self, host: &str, ip: IpAddr) -> Result<(), GuardError> {
        let refused = |why, hint| {
            Err(GuardError::Refused {
                host: host.to_string(),
                ip,
                why,
                hint,
            })
        };
        match classify(ip) {
            Verdict::Allowed => Ok(()),
            Verdict::Private(_) if self.allow_private => Ok(()),
            Verdict::Private(why) => refused(
                why,
                "pass --allow-private-addresses (spec.model.allowPrivateAddresses) for a store inside your network",
            ),
            Verdict::Never(why) => refused(why, "such addresses are never fetched from"),
        }
    }

    /// Resolves a host and checks every address; all must be allowed.
    pub async fn resolve(&self, host: &str) -> Result<Vec<IpAddr>, GuardError> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let ips: Vec<IpAddr> = if let Ok(ip) = bare.parse::<IpAddr>() {
            vec![ip]
        } else if let Some(pinned) = self.overrides.get(&bare.to_ascii_lowercase()) {
            pinned.clone()
        } else {
            tokio::net::lookup_host((bare, 0))
                .await
                .map_err(|e| GuardError::Dns {
                    host: bare.to_string(),
                    message: e.to_string(),
                })?
                .map(|a| a.ip())
                .collect()
        };
        if ips.is_empty() {
            return Err(GuardError::Dns {
                host: bare.to_string(),
                message: "no addresses".into(),
            });
        }
        for ip in &ips {
            self.check_ip(bare, *ip)?;
        }
        Ok(ips)
    }
}

/// The guard as the HTTP client's resolver: the client connects only to what this returns.
#[derive(Debug, Clone)]
pub struct GuardResolver(pub Arc<AddressGuard>);

impl reqwest::dns::Resolve for GuardResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let guard = self.0.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let ips = guard.resolve(&host).await?;
            let addrs: reqwest::dns::Addrs = Box::new(ips.into_iter().map(|ip| SocketAddr::new(ip, 0)));
            Ok(addrs)
        })
    }
}

/// Parses `HOST=IP[,IP…]` (`--resolve`).
pub fn parse_override(s: &str) -> Result<(String, Vec<IpAddr>), String> {
    let (host, ips) = s
        .split_once('=')
        .ok_or_else(|| format!("expected HOST=IP, got {s:?}"))?;
    let ips = ips
        .split(',')
        .map(|ip| ip.trim().parse::<IpAddr>().map_err(|e| format!("{ip:?}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((host.to_ascii_lowercase(), ips))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn metadata_and_link_local_are_never_allowed() {
        let g = AddressGuard::new(true, HashMap::new());
        for a in [
            "169.254.169.254",
            "169.254.170.2",
            "fd00:ec2::254",
            "100.100.100.200",
            "fe80::1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            // IPv6 forms that carry an IPv4 address: IPv4-compatible, IPv4-translated, 6to4,
            // local-use NAT64 (RFC 8215) with a /96 and with a /48 prefix, Teredo's server.
            "::169.254.169.254",
            "::ffff:0:a9fe:a9fe",
            "2002:a9fe:a9fe::1",
            "64:ff9b:1::a9fe:a9fe",
            "64:ff9b:1:a9fe:a9:fe00::",
            "2001:0:a9fe:a9fe::1",
            // 192.0.0.0/24 (IETF protocol assignments), where Oracle Compute Cloud@Customer's
            // metadata service answers (192.0.0.192).
            "192.0.0.192",
            "0.0.0.0",
            "::",
            "224.0.0.1",
        ] {
            assert!(g.check_ip("h", ip(a)).is_err(), "{a} must be refused");
        }
    }

    #[test]
    fn private_ranges_need_the_flag_and_public_ones_pass() {
        // Inputs to the classifier only: nothing here resolves or connects. The "public" ones are
        // documentation ranges (RFC 5737, RFC 3849).
        let strict = AddressGuard::default();
        let open = AddressGuard::new(true, HashMap::new());
        for a in ["127.0.0.1", "::1", "fd12::1"] {
            assert!(strict.check_ip("h", ip(a)).is_err(), "{a}");
            assert!(open.check_ip("h", ip(a)).is_ok(), "{a}");
        }
        // RFC 1918 and RFC 6598 blocks as (first address, prefix length): the first, middle and
        // last address of each needs the flag, the addresses just outside do not.
        let blocks: [(u32, u32); 4] = [
            (0x0a00_0000, 8),
            (0xac10_0000, 12),
            (0xc0a8_0000, 16),
            (0x6440_0000, 10),
        ];
        for (first, len) in blocks {
            let size = 1u32 << (32 - len);
            for inside in [first, first + size / 2, first + size - 1] {
                // The address itself and the IPv6 forms that carry it: IPv4-compatible
                // (::a.b.c.d), SIIT (::ffff:0:a.b.c.d), 6to4 (2002:ab:cd::1) and NAT64 with the
                // local-use /48 prefix (64:ff9b:1::a.b.c.d), built here rather than written out.
                let v4 = u128::from(inside);
                for a in [
                    IpAddr::V4(Ipv4Addr::from(inside)),
                    IpAddr::V6(Ipv6Addr::from(v4)),
                    IpAddr::V6(Ipv6Addr::from((0xffff_0000u128 << 32) | v4)),
                    IpAddr::V6(Ipv6Addr::from((0x2002u128 << 112) | (v4 << 80) | 1)),
                    IpAddr::V6(Ipv6Addr::from((0x0064_ff9b_0001u128 << 80) | v4)),
                ] {
                    assert!(strict.check_ip("h", a).is_err(), "{a}");
                    assert!(open.check_ip("h", a).is_ok(), "{a}");
                }
            }
            for outside in [first - 1, first + size] {
                let a = IpAddr::V4(Ipv4Addr::from(outside));
                assert!(strict.check_ip("h", a).is_ok(), "{a} is public");
            }
        }
        // Public IPv4 addresses reached through the IPv6 forms that carry them (NAT64 with a
        // local-use /96 and /48 prefix, 6to4), as an IPv6-only cluster reaches IPv4-only stores.
        for a in [
            "192.0.2.1",
            "2001:db8::1",
            "203.0.113.7",
            "64:ff9b:1::cb00:7107",
            "64:ff9b:1:cb00:71:700::",
            "64:ff9b::cb00:7107",
            "2002:cb00:7107::1",
        ] {
            assert!(strict.check_ip("h", ip(a)).is_ok(), "{a}");
        }
    }

    #[tokio::test]
    async fn overrides_pin_names_and_are_still_checked() {
        let (host, ips) = parse_override("Metadata.Test=169.254.169.254").unwrap();
        let g = AddressGuard::new(true, HashMap::from([(host, ips)]));
        let e = g.resolve("metadata.test").await.unwrap_err();
        assert!(e.to_string().contains("169.254.169.254"), "{e}");
        assert!(parse_override("nohost").is_err());
    }
}
