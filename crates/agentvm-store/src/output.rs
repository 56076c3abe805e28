//! The output of runs: stdout and stderr appended in chunks as they come, capped per
//! stream, read back interleaved from an offset (`agentvm logs`, `logs -f`).

use std::str::FromStr;

use agentvm_api::Kind;
use redb::{Durability, ReadableTable};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::{ObjectKey, Store, StoreError, OUTPUT, OUTPUT_META};

/// Most output bytes kept per stream of a run, whatever cap the caller asks for: the largest
/// `output.maxMib` (64 MiB).
pub const MAX_OUTPUT_BYTES_PER_STREAM: u64 =
    (agentvm_api::kinds::agent_run::MAX_OUTPUT_MAX_MIB as u64) << 20;

/// Which output stream of a run bytes came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

impl OutputStream {
    pub(crate) fn tag(self) -> u8 {
        match self {
            OutputStream::Stdout => 1,
            OutputStream::Stderr => 2,
        }
    }

    pub(crate) fn from_tag(tag: u8) -> Self {
        if tag == 2 {
            OutputStream::Stderr
        } else {
            OutputStream::Stdout
        }
    }
}

impl FromStr for OutputStream {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stdout" => Ok(OutputStream::Stdout),
            "stderr" => Ok(OutputStream::Stderr),
            other => Err(format!("unknown stream {other:?}: use stdout or stderr")),
        }
    }
}

/// Bytes of one stream, in the order they were appended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputChunk {
    /// The stream.
    pub stream: OutputStream,
    /// The bytes.
    pub data: Vec<u8>,
}

/// Result of [`Store::read_output`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutputRead {
    /// The chunks from the requested offset on, both streams interleaved in append order.
    pub chunks: Vec<OutputChunk>,
    /// Offset to read from next time.
    pub next_offset: u64,
    /// Bytes stored so far (both streams).
    pub total: u64,
    /// True when output beyond the run's cap was dropped.
    pub truncated: bool,
    /// Bytes dropped at the cap, both streams.
    pub dropped: u64,
}

impl OutputRead {
    /// Both streams' bytes concatenated.
    pub fn bytes(&self) -> Vec<u8> {
        self.chunks.iter().flat_map(|c| c.data.clone()).collect()
    }
}

/// Size bookkeeping of a run's output.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct OutputMeta {
    /// Bytes kept, both streams.
    len: u64,
    truncated: bool,
    /// Bytes kept of stdout.
    #[serde(default)]
    stdout: u64,
    /// Bytes kept of stderr.
    #[serde(default)]
    stderr: u64,
    /// Bytes dropped at the cap, both streams.
    #[serde(default)]
    dropped: u64,
}

impl Store {
    /// The names of runs whose output grew, from now on (for `logs -f`).
    pub fn subscribe_output(&self) -> broadcast::Receiver<String> {
        self.inner.output_events.subscribe()
    }

    /// Appends output of the AgentRun `run` to `stream`. At most `cap` bytes of each stream
    /// are kept (the run's `output.maxMib`; never more than [`MAX_OUTPUT_BYTES_PER_STREAM`]):
    /// bytes past it are dropped and counted, and the output is marked truncated. Returns how
    /// many bytes were kept. Flushed lazily (see the module docs).
    pub fn append_output(
        &self,
        run: &str,
        stream: OutputStream,
        bytes: &[u8],
        cap: u64,
    ) -> Result<usize, StoreError> {
        let key = ObjectKey::new(Kind::AgentRun, run);
        // The run must exist when its output starts (in a cluster store, a round trip):
        // checked once, while it has none. Its removal removes its output, so a later append
        // is checked again.
        let started = self.inner.local.with_db(|db| {
            Ok(db
                .begin_read()?
                .open_table(OUTPUT_META)?
                .get(run)?
                .is_some())
        })?;
        if !started && self.inner.records.get(&key.db_key())?.is_none() {
            return Err(StoreError::NotFound(key));
        }
        self.inner.local.with_db(|db| {
            let mut txn = db.begin_write()?;
            txn.set_durability(Durability::Eventual);
            let kept = {
                let mut meta_table = txn.open_table(OUTPUT_META)?;
                let mut meta: OutputMeta = match meta_table.get(run)? {
                    Some(v) => serde_json::from_slice(v.value()).unwrap_or_default(),
                    None => OutputMeta::default(),
                };
                let cap = cap.min(MAX_OUTPUT_BYTES_PER_STREAM);
                let stream_len = match stream {
                    OutputStream::Stdout => &mut meta.stdout,
                    OutputStream::Stderr => &mut meta.stderr,
                };
                let room = cap.saturating_sub(*stream_len);
                let kept = bytes.len().min(usize::try_from(room).unwrap_or(usize::MAX));
                *stream_len += kept as u64;
                if kept < bytes.len() {
                    meta.truncated = true;
                    meta.dropped += (bytes.len() - kept) as u64;
                }
                if kept > 0 {
                    let mut value = Vec::with_capacity(kept + 1);
                    value.push(stream.tag());
                    value.extend_from_slice(&bytes[..kept]);
                    txn.open_table(OUTPUT)?
                        .insert((run, meta.len), value.as_slice())?;
                    meta.len += kept as u64;
                }
                let meta_bytes = serde_json::to_vec(&meta).unwrap_or_default();
                meta_table.insert(run, meta_bytes.as_slice())?;
                kept
            };
            txn.commit()?;
            let _ = self.inner.output_events.send(run.to_string());
            Ok(kept)
        })
    }

    /// Reads the output of `run` from byte `offset` on (both streams, interleaved as
    /// appended), at most about `max_bytes` (whole chunks; at least one chunk when there is
    /// one). An offset inside a chunk returns the rest of that chunk first.
    pub fn read_output(
        &self,
        run: &str,
        offset: u64,
        max_bytes: usize,
    ) -> Result<OutputRead, StoreError> {
        let key = ObjectKey::new(Kind::AgentRun, run);
        let read = self.inner.local.with_db(|db| {
            let txn = db.begin_read()?;
            let meta: Option<OutputMeta> = txn
                .open_table(OUTPUT_META)?
                .get(run)?
                .map(|v| serde_json::from_slice(v.value()).unwrap_or_default());
            let Some(meta) = meta else {
                return Ok(None);
            };
            let table = txn.open_table(OUTPUT)?;
            let mut read = OutputRead {
                chunks: Vec::new(),
                next_offset: offset.min(meta.len),
                total: meta.len,
                truncated: meta.truncated,
                dropped: meta.dropped,
            };
            let mut taken = 0usize;
            let push = |start: u64, value: &[u8], read: &mut OutputRead| -> usize {
                let Some((&tag, data)) = value.split_first() else {
                    return 0;
                };
                let end = start + data.len() as u64;
                if end <= read.next_offset {
                    return 0;
                }
                let skip = usize::try_from(read.next_offset.saturating_sub(start)).unwrap_or(0);
                let data = &data[skip..];
                read.next_offset = end;
                read.chunks.push(OutputChunk {
                    stream: OutputStream::from_tag(tag),
                    data: data.to_vec(),
                });
                data.len()
            };
            // The chunk that contains `offset`, then everything after it.
            if let Some(entry) = table.range((run, 0u64)..=(run, offset))?.next_back() {
                let (k, v) = entry?;
                taken += push(k.value().1, v.value(), &mut read);
            }
            if offset < u64::MAX {
                for entry in table.range((run, offset + 1)..=(run, u64::MAX))? {
                    if taken >= max_bytes && !read.chunks.is_empty() {
                        break;
                    }
                    let (k, v) = entry?;
                    taken += push(k.value().1, v.value(), &mut read);
                }
            }
            Ok(Some(read))
        })?;
        match read {
            Some(read) => Ok(read),
            None if self.inner.records.get(&key.db_key())?.is_none() => {
                Err(StoreError::NotFound(key))
            }
            None => Ok(OutputRead::default()),
        }
    }

    /// Removes the output of `run`.
    pub(crate) fn remove_output(&self, run: &str) -> Result<(), StoreError> {
        self.inner.local.with_db(|db| {
            let txn = db.begin_write()?;
            txn.open_table(OUTPUT_META)?.remove(run)?;
            txn.open_table(OUTPUT)?
                .retain_in((run, 0u64)..=(run, u64::MAX), |_, _| false)?;
            txn.commit()?;
            Ok(())
        })
    }

    /// Removes the output of runs that are no longer stored (left by a crash between a run's
    /// removal and its output's, or, in a cluster, by a run another node finalized).
    pub(crate) fn prune_output(&self) -> Result<(), StoreError> {
        let runs: Vec<String> = self.inner.local.with_db(|db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(OUTPUT_META)?;
            let mut runs = Vec::new();
            for entry in table.iter()? {
                runs.push(entry?.0.value().to_string());
            }
            Ok(runs)
        })?;
        for run in runs {
            if self.get(Kind::AgentRun, &run)?.is_none() {
                tracing::info!("removing the output of AgentRun/{run}, which no longer exists");
                self.remove_output(&run)?;
            }
        }
        Ok(())
    }
}
