//! The `nodes` table: the peer store, one value per 32-byte node ID.

use anyhow::{anyhow, Result};

use super::seal::Table;
use super::Vault;

/// Version byte leading every peer value.
const VALUE_VERSION: u8 = 1;
/// Version, source and last-seen bytes before the record.
const VALUE_HEADER_LEN: usize = 1 + 1 + 8;

/// One remembered node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredPeer {
    /// The node's signed record, as received (opaque bytes here).
    pub record: Vec<u8>,
    /// Where the entry came from first: 0 = config, 1 = network, 2 = store,
    /// 3 = lan (opaque u8 here).
    pub source: u8,
    /// Unix seconds when the node was last heard from.
    pub last_seen_unix: u64,
}

impl Vault {
    /// All stored peers, keyed by 32-byte node ID, in key order. Entries
    /// whose key or value does not decode are skipped (and counted in a
    /// warning), never a panic. An entry that fails authentication is an
    /// error.
    pub fn load(&self) -> Result<Vec<([u8; 32], StoredPeer)>> {
        let rtxn = self.rtxn()?;
        let mut peers = Vec::new();
        let mut skipped = 0usize;
        for o in self.entries(&rtxn, Table::Nodes)? {
            match (<[u8; 32]>::try_from(&o.key[..]), decode_value(&o.value)) {
                (Ok(id), Some(peer)) => peers.push((id, peer)),
                _ => skipped += 1,
            }
        }
        if skipped > 0 {
            tracing::warn!(
                skipped,
                loaded = peers.len(),
                "vault: skipped peer entries that do not decode"
            );
        }
        Ok(peers)
    }

    /// Replaces the whole peer table with `peers` in ONE write transaction,
    /// so a crash leaves either the old or the new set.
    pub fn replace_all(&self, peers: &[([u8; 32], StoredPeer)]) -> Result<()> {
        let mut wtxn = self.wtxn()?;
        let mut tally = self.clear(&mut wtxn, Table::Nodes)?;
        let mut value = Vec::new();
        for (id, peer) in peers {
            encode_value(peer, &mut value);
            self.put_counted(&mut wtxn, Table::Nodes, id, &value, &mut tally)?;
        }
        self.write_tally(&mut wtxn, Table::Nodes, &tally)?;
        wtxn.commit().map_err(|e| self.err(e))
    }

    /// Number of stored peers.
    pub fn len(&self) -> Result<usize> {
        let rtxn = self.rtxn()?;
        let n = self.nodes.len(&rtxn).map_err(|e| self.err(e))?;
        usize::try_from(n).map_err(|_| anyhow!("peer count overflows"))
    }

    /// Whether the peer table is empty.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }
}

/// Writes `peer`'s value encoding into `out` (cleared first).
pub(super) fn encode_value(peer: &StoredPeer, out: &mut Vec<u8>) {
    out.clear();
    out.reserve(VALUE_HEADER_LEN + peer.record.len());
    out.push(VALUE_VERSION);
    out.push(peer.source);
    out.extend_from_slice(&peer.last_seen_unix.to_be_bytes());
    out.extend_from_slice(&peer.record);
}

/// Decodes a value; `None` for an unknown version or a short value.
fn decode_value(value: &[u8]) -> Option<StoredPeer> {
    let (&version, rest) = value.split_first()?;
    if version != VALUE_VERSION {
        return None;
    }
    let (&source, rest) = rest.split_first()?;
    let (seen, record) = rest.split_first_chunk::<8>()?;
    Some(StoredPeer {
        record: record.to_vec(),
        source,
        last_seen_unix: u64::from_be_bytes(*seen),
    })
}
