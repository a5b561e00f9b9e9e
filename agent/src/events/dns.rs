//! DNS responses a confined server received (`op::DNS` events, learn and
//! audit mode): the kernel copies the message, up to `EVENT_PATH_LEN`
//! bytes; this reads the question name and the A/AAAA answers from it with
//! `hickory-proto`, record by record, so a message cut by the copy still
//! gives the answers that fit.
use std::net::IpAddr;

use hickory_proto::{
    op::{Header, MessageType, Query},
    rr::{RData, Record},
    serialize::binary::{BinDecodable, BinDecoder},
};

/// What one DNS response said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// The question, lowercase, without the final dot.
    pub name: String,
    /// The response code ("NoError", "NXDomain", ...).
    pub rcode: String,
    /// A and AAAA records of the answer section (CNAME targets included:
    /// the client asked for `name` and got these), in message order.
    pub addrs: Vec<IpAddr>,
    /// Answer records that did not fit in the copy (0 when it was whole).
    pub cut: u16,
}

/// Parse a DNS response. `whole` is the message's full length (the copy in
/// `msg` may be shorter). None when it is not a response with a question.
pub fn parse(msg: &[u8], whole: usize) -> Option<Answer> {
    let mut d = BinDecoder::new(msg);
    let h = Header::read(&mut d).ok()?;
    if h.message_type() != MessageType::Response || h.query_count() == 0 {
        return None;
    }
    let q = Query::read(&mut d).ok()?;
    for _ in 1..h.query_count() {
        Query::read(&mut d).ok()?;
    }
    let name = q.name().to_lowercase().to_ascii();
    let name = name.trim_end_matches('.').to_string();
    let mut addrs = Vec::new();
    let mut read = 0u16;
    while read < h.answer_count() {
        let Ok(r) = Record::<RData>::read(&mut d) else {
            break;
        };
        read += 1;
        match r.data() {
            Some(RData::A(a)) => addrs.push(IpAddr::V4(a.0)),
            Some(RData::AAAA(a)) => addrs.push(IpAddr::V6(a.0)),
            _ => {}
        }
    }
    let cut = if msg.len() < whole {
        h.answer_count() - read
    } else {
        0
    };
    Some(Answer {
        name,
        rcode: format!("{:?}", h.response_code()),
        addrs,
        cut,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::{
        op::{Message, ResponseCode},
        rr::{rdata, Name, RecordType},
        serialize::binary::BinEncodable,
    };
    use std::str::FromStr;

    fn response(name: &str, answers: Vec<Record>) -> Vec<u8> {
        let mut m = Message::new();
        m.set_message_type(MessageType::Response);
        m.set_id(7);
        let n = Name::from_str(name).unwrap();
        m.add_query(Query::query(n, RecordType::A));
        m.add_answers(answers);
        m.to_bytes().unwrap()
    }

    #[test]
    fn question_and_addresses() {
        let n = Name::from_str("API.Example.test.").unwrap();
        let cname = Name::from_str("edge.example.test.").unwrap();
        let msg = response(
            "API.Example.test.",
            vec![
                Record::from_rdata(n.clone(), 60, RData::CNAME(rdata::CNAME(cname.clone()))),
                Record::from_rdata(cname.clone(), 60, RData::A(rdata::A::new(127, 0, 0, 77))),
                Record::from_rdata(
                    cname,
                    60,
                    RData::AAAA(rdata::AAAA::from_str("::1").unwrap()),
                ),
            ],
        );
        let a = parse(&msg, msg.len()).unwrap();
        assert_eq!(a.name, "api.example.test");
        assert_eq!(a.rcode, "NoError");
        assert_eq!(
            a.addrs,
            vec![
                "127.0.0.77".parse::<IpAddr>().unwrap(),
                "::1".parse().unwrap()
            ]
        );
        assert_eq!(a.cut, 0);
        // Cut inside the last record: the first two still count.
        let short = &msg[..msg.len() - 3];
        let a = parse(short, msg.len()).unwrap();
        assert_eq!(a.addrs, vec!["127.0.0.77".parse::<IpAddr>().unwrap()]);
        assert_eq!(a.cut, 1);
        // A query is not a response; garbage is nothing.
        let mut q = Message::new();
        q.add_query(Query::query(
            Name::from_str("x.test.").unwrap(),
            RecordType::A,
        ));
        assert_eq!(parse(&q.to_bytes().unwrap(), 100), None);
        assert_eq!(parse(&[1, 2, 3], 3), None);
        let mut nx = Message::new();
        nx.set_message_type(MessageType::Response);
        nx.set_response_code(ResponseCode::NXDomain);
        nx.add_query(Query::query(
            Name::from_str("no.test.").unwrap(),
            RecordType::A,
        ));
        let a = parse(&nx.to_bytes().unwrap(), 100).unwrap();
        assert_eq!((a.name.as_str(), a.rcode.as_str()), ("no.test", "NXDomain"));
        assert!(a.addrs.is_empty());
    }

    #[test]
    fn kernel_record_of_an_answer() {
        use crate::events::{kernel_record, Attribution, InstanceInfo};
        use mcp_warden_common::{decision, kind, op, Event};
        let n = Name::from_str("api.example.test.").unwrap();
        let msg = response(
            "api.example.test.",
            vec![Record::from_rdata(
                n,
                60,
                RData::A(rdata::A::new(127, 0, 0, 77)),
            )],
        );
        let mut ev = Event {
            kind: kind::NET,
            op: op::DNS,
            decision: decision::ALLOW,
            family: libc::AF_INET as u32,
            protocol: libc::IPPROTO_UDP as u32,
            port: 53,
            sock_type: msg.len() as u32,
            ..Event::default()
        };
        ev.addr[..4].copy_from_slice(&[127, 0, 0, 53]);
        ev.path[..msg.len()].copy_from_slice(&msg);
        let attr = Attribution {
            calls: vec![(serde_json::json!(3), "fetch".into())],
        };
        let r = kernel_record(&ev, &InstanceInfo::default(), &attr);
        assert_eq!(r["kind"], "net");
        assert_eq!(r["op"], "dns");
        assert_eq!(r["decision"], "allow");
        assert_eq!(r["name"], "api.example.test");
        assert_eq!(r["answers"], serde_json::json!(["127.0.0.77"]));
        assert_eq!(r["addr"], "127.0.0.53");
        assert_eq!(r["port"], 53);
        assert_eq!(r["protocol"], "udp");
        assert_eq!(r["tool"], "fetch");
        assert!(r["pid"].is_null() && r["comm"].is_null() && r["exe"].is_null());
        assert!(r.get("sock_type").is_none());
        // A copy that holds no response: the record says so.
        ev.path = [0; mcp_warden_common::EVENT_PATH_LEN];
        let r = kernel_record(&ev, &InstanceInfo::default(), &attr);
        assert!(r["name"].is_null());
    }
}
