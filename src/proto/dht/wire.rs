//! The wire format of DHT messages: [`Msg`] with its encoding and parsing
//! (the layout is in the [module header](super)), and [`BadMessage`].

use super::{Key, MAX_RECORD_BYTES};

const T_FIND: u8 = 1;
const T_REPLY: u8 = 2;
const T_STORE: u8 = 3;
const T_STORED: u8 = 4;
const T_PING: u8 = 5;
const T_PONG: u8 = 6;
const STORE_NODE: u8 = 1;
const STORE_VALUE: u8 = 2;

/// A DHT message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Msg {
    /// Asks for the nodes closest to `target` (and values stored there).
    Find {
        /// Transaction.
        txid: u32,
        /// Where.
        target: Key,
        /// Whether values are wanted too.
        values: bool,
    },
    /// Answers a FIND.
    Reply {
        /// Transaction.
        txid: u32,
        /// Value records.
        values: Vec<Vec<u8>>,
        /// Node records.
        nodes: Vec<Vec<u8>>,
    },
    /// Asks to store a node record (`node`) or a value record.
    Store {
        /// Transaction.
        txid: u32,
        /// Node record if true, else value record.
        node: bool,
        /// The record.
        record: Vec<u8>,
    },
    /// Answers a STORE.
    Stored {
        /// Transaction.
        txid: u32,
        /// Whether it was kept.
        ok: bool,
    },
    /// Liveness check.
    Ping {
        /// Transaction.
        txid: u32,
    },
    /// Answers a PING.
    Pong {
        /// Transaction.
        txid: u32,
    },
}

/// A DHT message that does not parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed DHT message")]
pub struct BadMessage;

struct Rd<'a>(&'a [u8]);
impl<'a> Rd<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], BadMessage> {
        if self.0.len() < n {
            return Err(BadMessage);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, BadMessage> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, BadMessage> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> Result<u32, BadMessage> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn records(&mut self) -> Result<Vec<Vec<u8>>, BadMessage> {
        let n = self.u8()? as usize;
        let mut out = Vec::with_capacity(n.min(32));
        for _ in 0..n {
            let len = self.u16()? as usize;
            if len > MAX_RECORD_BYTES {
                return Err(BadMessage);
            }
            out.push(self.take(len)?.to_vec());
        }
        Ok(out)
    }
}

fn put_records(out: &mut Vec<u8>, recs: &[Vec<u8>]) {
    out.push(recs.len() as u8);
    for r in recs {
        out.extend_from_slice(&(r.len() as u16).to_be_bytes());
        out.extend_from_slice(r);
    }
}

impl Msg {
    /// Encodes the message.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        match self {
            Msg::Find {
                txid,
                target,
                values,
            } => {
                out.push(T_FIND);
                out.extend_from_slice(&txid.to_be_bytes());
                out.push(*values as u8);
                out.extend_from_slice(target);
            }
            Msg::Reply {
                txid,
                values,
                nodes,
            } => {
                out.push(T_REPLY);
                out.extend_from_slice(&txid.to_be_bytes());
                put_records(&mut out, values);
                put_records(&mut out, nodes);
            }
            Msg::Store { txid, node, record } => {
                out.push(T_STORE);
                out.extend_from_slice(&txid.to_be_bytes());
                out.push(if *node { STORE_NODE } else { STORE_VALUE });
                out.extend_from_slice(record);
            }
            Msg::Stored { txid, ok } => {
                out.push(T_STORED);
                out.extend_from_slice(&txid.to_be_bytes());
                out.push(*ok as u8);
            }
            Msg::Ping { txid } => {
                out.push(T_PING);
                out.extend_from_slice(&txid.to_be_bytes());
            }
            Msg::Pong { txid } => {
                out.push(T_PONG);
                out.extend_from_slice(&txid.to_be_bytes());
            }
        }
        out
    }

    /// Decodes a message; never panics.
    pub fn parse(bytes: &[u8]) -> Result<Msg, BadMessage> {
        let mut r = Rd(bytes);
        let ty = r.u8()?;
        let txid = r.u32()?;
        let msg = match ty {
            T_FIND => {
                let values = r.u8()? & 1 != 0;
                let target = r.take(32)?.try_into().expect("32");
                Msg::Find {
                    txid,
                    target,
                    values,
                }
            }
            T_REPLY => {
                let values = r.records()?;
                let nodes = r.records()?;
                Msg::Reply {
                    txid,
                    values,
                    nodes,
                }
            }
            T_STORE => {
                let node = match r.u8()? {
                    STORE_NODE => true,
                    STORE_VALUE => false,
                    _ => return Err(BadMessage),
                };
                let record = std::mem::take(&mut r.0).to_vec();
                if record.len() > MAX_RECORD_BYTES {
                    return Err(BadMessage);
                }
                Msg::Store { txid, node, record }
            }
            T_STORED => Msg::Stored {
                txid,
                ok: r.u8()? != 0,
            },
            T_PING => Msg::Ping { txid },
            T_PONG => Msg::Pong { txid },
            _ => return Err(BadMessage),
        };
        if !r.0.is_empty() {
            return Err(BadMessage);
        }
        Ok(msg)
    }
}
