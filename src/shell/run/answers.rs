//! The node's side of the control API: each `qgate-api` [`Request`] turned
//! into its typed [`Response`] from the running node.
//!
//! The reports (`status`, `peers`, `circuits`) are the core's own report
//! structs (`NodeStatus`, `PeersReport`, `CircuitsReport`) read into the
//! API's types field by field name: the protocol core stays free of the API
//! crate (it builds without the shell), and a field the two disagree on
//! fails the answer with [`ControlError::Report`] instead of going missing
//! (tests/cli.rs compares the typed answers with the node's raw JSON).

use std::net::{Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use qgate_api::{
    DhtValue, DhtValues, ExtenderKey, Identity, Lookup, LookupRecord, Preset, Request, Response,
    Role, ServiceRecord, Services, Stored, Target, Tun,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{flush, keep_put_value, Holder, Shared};
use crate::proto::dht::{LookupDone, Outcome};
use crate::proto::node::LookupTarget;
use crate::proto::records::SignedValue;
use crate::proto::{NodeId, NodeRecord};
use crate::shell::control::{ControlError, Handler, API_VERSION};
use crate::shell::extender::ExtenderKeys;

/// What the answers say about the node beyond the core's reports.
pub(super) struct NodeInfo {
    pub(super) started: Instant,
    pub(super) node_id: NodeId,
    pub(super) address: Ipv6Addr,
    pub(super) listen: SocketAddr,
    /// None: a relay (no TUN).
    pub(super) tun: Option<Tun>,
    pub(super) role: Role,
    pub(super) preset: Preset,
    pub(super) extender_keys: ExtenderKeys,
}

/// The control socket's handler for this node.
pub(super) fn handler(shared: Arc<Shared>, info: NodeInfo) -> Handler {
    Arc::new(move |req: Request| answer(&shared, &info, req))
}

/// A core report as the API's type (see the module doc).
fn typed<T: DeserializeOwned>(
    what: &'static str,
    report: impl Serialize,
) -> Result<T, ControlError> {
    serde_json::to_value(report)
        .and_then(serde_json::from_value)
        .map_err(|source| ControlError::Report { what, source })
}

fn answer(sh: &Shared, info: &NodeInfo, req: Request) -> Result<Response, ControlError> {
    let api_id = qgate_api::NodeId(info.node_id.0);
    Ok(match req {
        Request::Status => {
            sh.mailbox.refresh();
            let report = sh.node.lock(Holder::Control).status();
            let mut st: qgate_api::Status = {
                // The core's report, completed with what the shell knows.
                let mut v =
                    serde_json::to_value(report).map_err(|source| ControlError::Report {
                        what: "status",
                        source,
                    })?;
                let extra = serde_json::json!({
                    "api": API_VERSION,
                    "version": env!("CARGO_PKG_VERSION"),
                    "uptime_secs": info.started.elapsed().as_secs_f64(),
                    "listen": info.listen,
                    "tun": info.tun,
                    "role": info.role,
                    "preset": info.preset,
                });
                if let (Some(v), serde_json::Value::Object(extra)) = (v.as_object_mut(), extra) {
                    v.extend(extra);
                }
                typed("status", v)?
            };
            st.data_path.long_holds = sh.node.long_holds();
            Response::Status(Box::new(st))
        }
        Request::Peers => {
            let report = sh.node.lock(Holder::Control).peers(Instant::now());
            let mut p: qgate_api::Peers = typed("peers", report)?;
            p.api = API_VERSION;
            Response::Peers(Box::new(p))
        }
        Request::Circuits => {
            let report = sh.node.lock(Holder::Control).circuits(Instant::now());
            let mut c: qgate_api::Circuits = typed("circuits", report)?;
            c.api = API_VERSION;
            Response::Circuits(Box::new(c))
        }
        Request::Lookup { target } => Response::Lookup(Box::new(lookup(sh, target)?)),
        Request::DhtPut {
            ref namespace,
            ref key,
            ref value,
            ..
        } => {
            let ttl = req.ttl().unwrap_or(qgate_api::DEFAULT_TTL);
            Response::Stored(put(sh, namespace, key, value, ttl)?)
        }
        Request::DhtGet { namespace, key } => {
            let (values, queries) = newest(sh, &namespace, &key)?;
            Response::DhtValues(DhtValues {
                values,
                queries: queries as u64,
            })
        }
        Request::Identity => Response::Identity(Identity {
            api: API_VERSION,
            version: env!("CARGO_PKG_VERSION").into(),
            node_id: api_id,
            address: info.address,
        }),
        Request::ExtenderKey { name } => Response::ExtenderKey(ExtenderKey {
            key: info.extender_keys.key(&name),
            name,
        }),
        Request::ServiceAnnounce {
            ref name,
            port,
            version,
            ..
        } => {
            let ttl = req.ttl().unwrap_or(qgate_api::DEFAULT_TTL);
            let record = ServiceRecord { port, version };
            Response::Stored(put(
                sh,
                qgate_api::SERVICE_NAMESPACE,
                name,
                &record.encode(),
                ttl,
            )?)
        }
        Request::ServiceLookup { name } => {
            let (values, _) = newest(sh, qgate_api::SERVICE_NAMESPACE, &name)?;
            Response::Services(Services::from_values(&values))
        }
    })
}

/// Waits (up to 30 s) for a control-API lookup to finish.
///
/// First sends what the request queued (its first DHT queries): left in
/// the node, they would wait for the next timer tick, up to 250 ms. Then
/// polls the node, 1 ms after the request and doubling to 20 ms, so an
/// answer from a LAN (a millisecond or two) is not held for a whole poll
/// interval, while a slow one costs a lock acquisition only every 20 ms.
fn wait_result(sh: &Shared, id: u64) -> Result<LookupDone, ControlError> {
    flush(sh, Holder::Control);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(r) = sh.node.lock(Holder::Control).take_api_result(id) {
            return Ok(r);
        }
        if Instant::now() >= deadline {
            return Err(ControlError::Timeout);
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

fn record(record: &[u8]) -> Option<LookupRecord> {
    let r = NodeRecord::parse_unverified(record).ok()?;
    let f = r.fields().unwrap_or_default();
    Some(LookupRecord {
        node_id: qgate_api::NodeId(r.node_id().0),
        address: r.overlay_address(),
        link_key: base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r.link_key),
        seq: r.seq,
        expires: f.expires,
        endpoints: f.endpoints,
        roles: f.roles,
    })
}

fn lookup(sh: &Shared, target: Target) -> Result<Lookup, ControlError> {
    let target = match target {
        Target::Id(id) => LookupTarget::Id(NodeId(id.0)),
        Target::Address(a) => LookupTarget::Address(a),
    };
    let id = sh
        .node
        .lock(Holder::Control)
        .api_lookup(Instant::now(), &target)
        .ok_or(ControlError::Busy)?;
    let r = wait_result(sh, id)?;
    let found = match &r.outcome {
        Outcome::Found(c) => Some(record(&c.record)),
        _ => None,
    };
    Ok(Lookup {
        found: found.is_some(),
        hops: r.hops,
        queries: r.queries as u64,
        elapsed_ms: r.elapsed.as_secs_f64() * 1000.0,
        // Answered from what the node already held: no query went out.
        already_known: found.is_some() && r.queries == 0,
        // Not found without asking anyone: nobody to ask.
        no_contacts: found.is_none() && r.queries == 0,
        record: found.flatten(),
    })
}

fn put(sh: &Shared, ns: &str, key: &str, value: &[u8], ttl: u64) -> Result<Stored, ControlError> {
    use crate::proto::node::PutError;
    // RSA signing takes milliseconds: done outside the node lock, so the
    // data path doesn't wait on a storm of puts.
    let (stamp, signer) = {
        let mut node = sh.node.lock(Holder::Control);
        let now = Instant::now();
        node.own_value_fits(now, ns.as_bytes(), key.as_bytes())
            .map_err(PutError::from)?;
        (node.value_stamp(now, ttl), node.signer())
    };
    let (seq, expires) = stamp.map_err(PutError::from)?;
    let signed = SignedValue::sign(&signer, ns.as_bytes(), key.as_bytes(), value, seq, expires)
        .map_err(PutError::from)?;
    let id = sh
        .node
        .lock(Holder::Control)
        .put_signed_value(Instant::now(), &signed)?;
    // Kept in the vault before the answer: a value that was put survives a
    // crash and is published again after a restart.
    keep_put_value(sh, &signed.to_bytes());
    let stored_at = match id {
        Some(id) => match wait_result(sh, id)?.outcome {
            Outcome::Stored(n) => n as u64,
            _ => 0,
        },
        None => {
            flush(sh, Holder::Control);
            0
        }
    };
    Ok(Stored { stored_at, ttl })
}

/// The newest value per publisher under (`ns`, `key`), from this node and
/// the network, and how many queries that took.
fn newest(sh: &Shared, ns: &str, key: &str) -> Result<(Vec<DhtValue>, usize), ControlError> {
    let (id, local) = {
        let mut node = sh.node.lock(Holder::Control);
        let now = Instant::now();
        let local = node.local_values(now, ns.as_bytes(), key.as_bytes());
        (node.dht_get(now, ns.as_bytes(), key.as_bytes()), local)
    };
    let id = id.ok_or(ControlError::Busy)?;
    let r = wait_result(sh, id)?;
    let mut all = local;
    if let Outcome::Values(v) = r.outcome {
        all.extend(v);
    }
    let mut by_publisher: std::collections::BTreeMap<String, SignedValue> = Default::default();
    for raw in all {
        if let Ok(v) = SignedValue::parse(&raw) {
            let p = v.publisher().to_string();
            if by_publisher.get(&p).is_none_or(|o| v.seq > o.seq) {
                by_publisher.insert(p, v);
            }
        }
    }
    let values = by_publisher
        .into_values()
        .map(|v| DhtValue {
            publisher: qgate_api::NodeId(v.publisher().0),
            seq: v.seq,
            expires: v.expires,
            value: v.value,
        })
        .collect();
    Ok((values, r.queries))
}
