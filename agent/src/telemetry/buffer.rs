//! The durable, bounded FIFO of samples not yet acknowledged by the coordinator: a tree of
//! the agent's journal database (sled).
//!
//! Keys: `s` + the sample's seq (big-endian, so keys sort like seqs) → the sample as JSON;
//! `m:next_seq` and `m:dropped_total` → big-endian `u64`s.
//!
//! **Invariants**:
//! - seqs are handed out from 1, one per sample, and never again, across restarts: the next
//!   seq is written in the same atomic batch as the sample that used the previous one;
//! - the buffer holds at most `capacity` samples; a push into a full buffer removes the
//!   oldest in the same atomic batch and adds it to `dropped_total`, which also survives
//!   restarts;
//! - every mutation is flushed to disk before it returns, like the rest of the journal
//!   (sled makes writes durable only at `flush`).
//!
//! Every method does blocking disk I/O: call them off the async runtime's thread.

use std::collections::BTreeMap;

use protocol::telemetry::Sample;
use protocol::{ReleaseId, UnixSeconds};

const SAMPLE_PREFIX: u8 = b's';
const NEXT_SEQ: &[u8] = b"m:next_seq";
const DROPPED_TOTAL: &[u8] = b"m:dropped_total";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BufferError {
    #[error("telemetry buffer: the journal database failed: {0}")]
    Db(#[from] sled::Error),
    /// A counter the buffer keeps is not 8 bytes: the database was written by something else.
    #[error(
        "telemetry buffer: {key} holds {len} bytes, not a number; the journal database is damaged"
    )]
    Corrupt { key: &'static str, len: usize },
}

pub struct SampleBuffer {
    tree: sled::Tree,
    capacity: u64,
    /// Samples in the tree, kept here because sled counts by scanning.
    len: u64,
    next_seq: u64,
    dropped_total: u64,
}

impl SampleBuffer {
    /// Opens the buffer in `tree` (created empty if new). If it holds more than `capacity`
    /// samples (the capacity was lowered), the oldest are dropped and counted now.
    pub fn open(tree: sled::Tree, capacity: u64) -> Result<SampleBuffer, BufferError> {
        let capacity = capacity.max(1);
        let next_seq = read_u64(&tree, NEXT_SEQ, "next_seq")?.unwrap_or(1);
        let dropped_total = read_u64(&tree, DROPPED_TOTAL, "dropped_total")?.unwrap_or(0);
        let len = tree.scan_prefix([SAMPLE_PREFIX]).count() as u64;
        let mut buffer = SampleBuffer {
            tree,
            capacity,
            len,
            next_seq,
            dropped_total,
        };
        if buffer.len > capacity {
            let excess = buffer.len - capacity;
            let mut batch = sled::Batch::default();
            for key in buffer
                .tree
                .scan_prefix([SAMPLE_PREFIX])
                .keys()
                .take(excess as usize)
            {
                batch.remove(key?);
            }
            batch.insert(DROPPED_TOTAL, &(dropped_total + excess).to_be_bytes());
            buffer.tree.apply_batch(batch)?;
            buffer.tree.flush()?;
            buffer.len = capacity;
            buffer.dropped_total += excess;
            tracing::warn!(
                dropped = excess,
                capacity,
                "telemetry buffer over its capacity; dropped the oldest samples"
            );
        }
        Ok(buffer)
    }

    /// Numbers and stores a new sample, dropping the oldest if the buffer is full. Returns
    /// the sample's seq once it is on disk.
    pub fn push(
        &mut self,
        at: UnixSeconds,
        version: Option<ReleaseId>,
        values: BTreeMap<String, f64>,
    ) -> Result<u64, BufferError> {
        let seq = self.next_seq;
        let sample = Sample {
            seq,
            at,
            version,
            values,
        };
        let mut batch = sled::Batch::default();
        batch.insert(
            &key(seq),
            serde_json::to_vec(&sample).expect("samples serialize"),
        );
        batch.insert(NEXT_SEQ, &(seq + 1).to_be_bytes());
        let drop_oldest = self.len >= self.capacity;
        if drop_oldest {
            if let Some(oldest) = self.tree.scan_prefix([SAMPLE_PREFIX]).keys().next() {
                batch.remove(oldest?);
            }
            batch.insert(DROPPED_TOTAL, &(self.dropped_total + 1).to_be_bytes());
        }
        self.tree.apply_batch(batch)?;
        self.tree.flush()?;
        self.next_seq = seq + 1;
        if drop_oldest {
            self.dropped_total += 1;
        } else {
            self.len += 1;
        }
        Ok(seq)
    }

    /// Up to `max` of the oldest samples, oldest first. A stored sample that no longer
    /// decodes is removed and counted as dropped (it could never be delivered).
    pub fn oldest(&mut self, max: usize) -> Result<Vec<Sample>, BufferError> {
        let mut samples = Vec::with_capacity(max.min(self.len as usize));
        let mut undecodable = Vec::new();
        for entry in self.tree.scan_prefix([SAMPLE_PREFIX]) {
            if samples.len() >= max {
                break;
            }
            let (key, bytes) = entry?;
            match serde_json::from_slice::<Sample>(&bytes) {
                Ok(sample) => samples.push(sample),
                Err(error) => {
                    tracing::warn!(%error, "dropping an unreadable sample from the telemetry buffer");
                    undecodable.push(key);
                }
            }
        }
        if !undecodable.is_empty() {
            let count = undecodable.len() as u64;
            let mut batch = sled::Batch::default();
            for key in undecodable {
                batch.remove(key);
            }
            batch.insert(DROPPED_TOTAL, &(self.dropped_total + count).to_be_bytes());
            self.tree.apply_batch(batch)?;
            self.tree.flush()?;
            self.len -= count;
            self.dropped_total += count;
        }
        Ok(samples)
    }

    /// Forgets every sample up to and including `up_to` (the coordinator has them). Returns
    /// how many were removed.
    pub fn ack(&mut self, up_to: u64) -> Result<u64, BufferError> {
        let mut batch = sled::Batch::default();
        let mut removed = 0;
        for key in self.tree.range(key(0)..=key(up_to)).keys() {
            batch.remove(key?);
            removed += 1;
        }
        if removed > 0 {
            self.tree.apply_batch(batch)?;
            self.tree.flush()?;
            self.len -= removed;
        }
        Ok(removed)
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Samples dropped because the buffer was full, since the data directory was created.
    pub fn dropped_total(&self) -> u64 {
        self.dropped_total
    }

    /// The seq the next sample gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }
}

fn key(seq: u64) -> [u8; 9] {
    let mut key = [SAMPLE_PREFIX; 9];
    key[1..].copy_from_slice(&seq.to_be_bytes());
    key
}

fn read_u64(tree: &sled::Tree, key: &[u8], name: &'static str) -> Result<Option<u64>, BufferError> {
    let Some(bytes) = tree.get(key)? else {
        return Ok(None);
    };
    let bytes: [u8; 8] = bytes
        .as_ref()
        .try_into()
        .map_err(|_| BufferError::Corrupt {
            key: name,
            len: bytes.len(),
        })?;
    Ok(Some(u64::from_be_bytes(bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::Journal;

    fn values(x: f64) -> BTreeMap<String, f64> {
        BTreeMap::from([("host_load1".to_owned(), x)])
    }

    fn seqs(samples: &[Sample]) -> Vec<u64> {
        samples.iter().map(|s| s.seq).collect()
    }

    #[test]
    fn samples_come_out_oldest_first_numbered_from_one() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        let mut buffer = SampleBuffer::open(journal.telemetry_tree().unwrap(), 10).unwrap();
        assert!(buffer.is_empty());
        for i in 0..4 {
            assert_eq!(buffer.push(100 + i, None, values(i as f64)).unwrap(), i + 1);
        }
        let oldest = buffer.oldest(3).unwrap();
        assert_eq!(seqs(&oldest), [1, 2, 3]);
        assert_eq!(oldest[1].at, 101);
        assert_eq!(oldest[1].values, values(1.0));
        assert_eq!(buffer.len(), 4);
    }

    #[test]
    fn a_full_buffer_drops_the_oldest_and_counts_it() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        let mut buffer = SampleBuffer::open(journal.telemetry_tree().unwrap(), 3).unwrap();
        for i in 0..5 {
            buffer.push(i, None, values(0.0)).unwrap();
        }
        assert_eq!(buffer.len(), 3);
        assert_eq!(buffer.dropped_total(), 2);
        assert_eq!(seqs(&buffer.oldest(10).unwrap()), [3, 4, 5]);
    }

    #[test]
    fn acks_remove_samples_up_to_and_including_the_seq() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        let mut buffer = SampleBuffer::open(journal.telemetry_tree().unwrap(), 10).unwrap();
        for i in 0..5 {
            buffer.push(i, None, values(0.0)).unwrap();
        }
        assert_eq!(buffer.ack(2).unwrap(), 2);
        assert_eq!(seqs(&buffer.oldest(10).unwrap()), [3, 4, 5]);
        // A repeated or older ack changes nothing; one past the end empties the buffer.
        assert_eq!(buffer.ack(2).unwrap(), 0);
        assert_eq!(buffer.ack(99).unwrap(), 3);
        assert!(buffer.is_empty());
        assert!(buffer.oldest(10).unwrap().is_empty());
        // Acks do not rewind numbering.
        assert_eq!(buffer.push(9, None, values(0.0)).unwrap(), 6);
    }

    #[test]
    fn contents_seqs_and_drops_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let journal = Journal::open(dir.path()).unwrap();
            let mut buffer = SampleBuffer::open(journal.telemetry_tree().unwrap(), 2).unwrap();
            for i in 0..4 {
                buffer.push(i, None, values(i as f64)).unwrap();
            }
            buffer.ack(3).unwrap();
        }
        let journal = Journal::open(dir.path()).unwrap();
        let mut buffer = SampleBuffer::open(journal.telemetry_tree().unwrap(), 2).unwrap();
        assert_eq!(buffer.len(), 1);
        assert_eq!(buffer.dropped_total(), 2);
        assert_eq!(buffer.next_seq(), 5);
        let left = buffer.oldest(10).unwrap();
        assert_eq!(seqs(&left), [4]);
        assert_eq!(left[0].values, values(3.0));
    }

    #[test]
    fn reopening_with_a_smaller_capacity_drops_the_oldest_and_counts_them() {
        let dir = tempfile::tempdir().unwrap();
        {
            let journal = Journal::open(dir.path()).unwrap();
            let mut buffer = SampleBuffer::open(journal.telemetry_tree().unwrap(), 10).unwrap();
            for i in 0..6 {
                buffer.push(i, None, values(0.0)).unwrap();
            }
        }
        let journal = Journal::open(dir.path()).unwrap();
        let mut buffer = SampleBuffer::open(journal.telemetry_tree().unwrap(), 4).unwrap();
        assert_eq!(buffer.dropped_total(), 2);
        assert_eq!(seqs(&buffer.oldest(10).unwrap()), [3, 4, 5, 6]);
        drop(buffer);
        let buffer = SampleBuffer::open(journal.telemetry_tree().unwrap(), 4).unwrap();
        assert_eq!(buffer.dropped_total(), 2, "counted once");
    }

    #[test]
    fn an_unreadable_sample_is_dropped_and_counted_not_stuck() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        let tree = journal.telemetry_tree().unwrap();
        let mut buffer = SampleBuffer::open(tree.clone(), 10).unwrap();
        for i in 0..3 {
            buffer.push(i, None, values(0.0)).unwrap();
        }
        tree.insert(key(2), b"not json".as_slice()).unwrap();
        assert_eq!(seqs(&buffer.oldest(10).unwrap()), [1, 3]);
        assert_eq!(buffer.dropped_total(), 1);
        assert_eq!(buffer.len(), 2);
    }

    #[test]
    fn a_damaged_counter_is_an_error_not_a_restart_from_one() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        let tree = journal.telemetry_tree().unwrap();
        tree.insert(NEXT_SEQ, b"abc".as_slice()).unwrap();
        assert!(matches!(
            SampleBuffer::open(tree, 10),
            Err(BufferError::Corrupt {
                key: "next_seq",
                len: 3
            })
        ));
    }
}
