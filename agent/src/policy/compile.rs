//! Placeholder until the policy compiler lands (branch `policy`).
use std::{collections::HashMap, net::IpAddr};

use mcp_warden_common::{
    rule_kind, Net4Key, Net6Key, NetRule, PathRule as KPathRule, PortRule, UnixKey,
    NET_KEY_FIXED_BITS, SERVER_BIT,
};

use super::{AddrRule, Host, Policy};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompiledNet {
    pub v4: Vec<(u32, Net4Key, NetRule)>,
    pub v6: Vec<(u32, Net6Key, NetRule)>,
    pub unix: Vec<(u32, UnixKey, KPathRule)>,
}

#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error("too many port rules for {0}")]
    TooManyPorts(String),
}

pub fn compile_net(
    policy: &Policy,
    policy_id: u32,
    resolved: &HashMap<String, Vec<IpAddr>>,
) -> Result<CompiledNet, CompileError> {
    let mut out = CompiledNet::default();
    let mut add = |rules: &[AddrRule], kind: u32, mask: u64| {
        for r in rules {
            let addrs: Vec<(IpAddr, u8)> = match &r.host {
                Host::Net(n) => vec![(n.network(), n.prefix_len())],
                Host::Name(name) => resolved
                    .get(name)
                    .map(|v| {
                        v.iter()
                            .map(|a| (*a, if a.is_ipv4() { 32 } else { 128 }))
                            .collect()
                    })
                    .unwrap_or_default(),
            };
            for (a, plen) in addrs {
                let mut rule = NetRule::default();
                rule.rules[0] = PortRule {
                    lo: r.ports.lo,
                    hi: r.ports.hi,
                    _pad: 0,
                    mask,
                };
                rule.count = 1;
                match a {
                    IpAddr::V4(v4) => out.v4.push((
                        NET_KEY_FIXED_BITS + plen as u32,
                        Net4Key {
                            policy_id: policy_id.to_be_bytes(),
                            kind: kind.to_be_bytes(),
                            addr: v4.octets(),
                        },
                        rule,
                    )),
                    IpAddr::V6(v6) => out.v6.push((
                        NET_KEY_FIXED_BITS + plen as u32,
                        Net6Key {
                            policy_id: policy_id.to_be_bytes(),
                            kind: kind.to_be_bytes(),
                            addr: v6.octets(),
                        },
                        rule,
                    )),
                }
            }
        }
    };
    add(
        &policy.rules.network.connect,
        rule_kind::CONNECT,
        SERVER_BIT,
    );
    add(&policy.rules.network.bind, rule_kind::BIND, SERVER_BIT);
    for t in &policy.tools {
        let bit = policy.tool_bit(&t.name).unwrap_or(0);
        add(&t.rules.network.connect, rule_kind::CONNECT, bit);
        add(&t.rules.network.bind, rule_kind::BIND, bit);
    }
    Ok(out)
}
