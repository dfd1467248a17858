//! The CDR store: a RocksDB of its own in `<data_dir>/cdr`, apart from the replica's, so
//! CDR writes, their compactions and their purges never share a write-ahead log or a
//! memtable with Raft (node/DESIGN.md, "CDRs").
//!
//! Keys, each starting with one byte that names the kind:
//!
//! | key | value |
//! |---|---|
//! | `b` span customer `0x00` start_ms node seq | the record (JSON) |
//! | `c` peer | the highest seq of this node's records that peer has stored |
//! | `n` | the next seq this node gives a record |
//! | `o` seq | the key of one of this node's own records not yet shipped to every peer |
//!
//! Numbers are 8 bytes big-endian. A span is ten minutes of start times (`start_ms /
//! SPAN_MS`), so records sort by span, then customer, then start time: time first, so
//! that what a node writes now lands after everything older, and customer next, so that
//! one customer's records of a span are together. The bookkeeping keys (`c`, `n`, `o`),
//! rewritten all the time, sort after every record. Both orders keep a flushed table file
//! from overlapping the tables of older spans, and overlap is what decides what RocksDB's
//! compactions rewrite (node/DESIGN.md, "CDRs", says why and what it measured). A record's key is made from
//! its own fields, so a record stored twice (shipped again after a lost answer) is one
//! record.
//!
//! Stores written by releases before the spans keyed records `r` customer `0x00` start_ms
//! node seq; [`CdrStore::open`] moves them to the layout above once.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use rocksdb::{Options, WriteBatch, WriteOptions, DB};

use super::Cdr;
use crate::Error;

const RECORD: u8 = b'b';
const CURSOR: u8 = b'c';
const NEXT_SEQ: &[u8] = b"n";
const OUTBOX: u8 = b'o';
/// The kind byte of records in the layout before spans (moved at open).
const OLD_RECORD: u8 = b'r';
/// Milliseconds of start times one span holds. A compaction rewrites at most the newest
/// span's records, the table that holds the bookkeeping keys, and whatever arrives late
/// for an older span, so a span should hold little; a query visits every span of its time
/// range that holds any record, so it should not hold too little. Ten minutes: at 300
/// records a second (the soak's calls) a span is about 70 MB of records, and 90 days are
/// 12,960 spans.
const SPAN_MS: u64 = 600_000;
/// Bytes the memtable may hold before it is flushed (two may exist while one flushes): a
/// steady call load fills and empties it over and over, and a node's memory rides on
/// that saw-tooth, so it is kept small (raft-store's store.rs says the same of its own).
const MEMTABLE: usize = 4 << 20;
/// Bytes per second the store's flushes and compactions may write: purges leave range
/// deletes that compaction turns into rewrites, and those must not take the disk (or the
/// cores that drive it) from the Raft log in bursts. Far above what calls write.
const BACKGROUND_WRITE_RATE: i64 = 16 << 20;
/// Keys a query looks at for one page at most (records, matching or not, and the seeks
/// from one span to the next): a filter that matches little returns a short page with a
/// cursor rather than scanning the whole store.
const MAX_SCAN: usize = 50_000;
/// A day, the unit of retention (config and customer settings both refuse 0 days, so no
/// span younger than a day is ever looked at by a purge).
const DAY_MS: u64 = 86_400_000;
/// Records moved per batch when an old layout is moved at open.
const MIGRATE_BATCH: usize = 10_000;

fn err(what: &str) -> impl Fn(rocksdb::Error) -> Error + '_ {
    move |e| Error::Cdr(format!("{what}: {e}"))
}

fn be(n: u64) -> [u8; 8] {
    n.to_be_bytes()
}

fn read_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    let n = b.len().min(8);
    a[..n].copy_from_slice(&b[..n]);
    u64::from_be_bytes(a)
}

/// The key prefix of `customer`'s records in `span`.
fn run_prefix(span: u64, customer: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(customer.len() + 34);
    k.push(RECORD);
    k.extend_from_slice(&be(span));
    k.extend_from_slice(customer.as_bytes());
    k.push(0);
    k
}

/// The first key after every record of `customer` in `span` (customer ids hold no
/// control characters, so `0x01` sorts after the `0x00` that ends the customer).
fn run_end(span: u64, customer: &str) -> Vec<u8> {
    let mut k = run_prefix(span, customer);
    *k.last_mut().expect("a prefix ends in 0") = 1;
    k
}

/// The first key of `customer`'s records in `span` that start at or after `ms`.
fn run_from(span: u64, customer: &str, ms: u64) -> Vec<u8> {
    let mut k = run_prefix(span, customer);
    k.extend_from_slice(&be(ms));
    k
}

/// The first key of `span`.
fn span_start(span: u64) -> Vec<u8> {
    let mut k = vec![RECORD];
    k.extend_from_slice(&be(span));
    k
}

fn span_of(ms: u64) -> u64 {
    ms / SPAN_MS
}

/// The key of record `c`.
pub fn record_key(c: &Cdr) -> Vec<u8> {
    let mut k = run_from(span_of(c.start_ms), &c.customer, c.start_ms);
    k.extend_from_slice(&be(c.node));
    k.extend_from_slice(&be(c.seq));
    k
}

/// The span, customer and start time a record key names.
fn parse_record_key(k: &[u8]) -> Option<(u64, &str, u64)> {
    let (span, customer) = parse_position(k)?;
    let times = &k[customer.len() + 10..];
    (times.len() == 24).then(|| (span, customer, read_u64(&times[..8])))
}

/// The key a record had in the layout before spans, in today's layout.
fn key_from_old(k: &[u8]) -> Option<Vec<u8>> {
    let rest = k.strip_prefix(&[OLD_RECORD])?;
    let zero = rest.iter().position(|&b| b == 0)?;
    let customer = std::str::from_utf8(&rest[..zero]).ok()?;
    let times = &rest[zero + 1..];
    if times.len() != 24 {
        return None;
    }
    let mut key = run_prefix(span_of(read_u64(&times[..8])), customer);
    key.extend_from_slice(times);
    Some(key)
}

/// Where a query for `customer`'s records from `from_ms` goes on from key `k` (a record of
/// span `span` and customer `at`): the record itself if it is the customer's, else the
/// customer's records in this span (if `at` sorts before it) or in the next.
fn position_for(customer: &str, from_ms: u64, span: u64, at: &str, k: &[u8]) -> Vec<u8> {
    match at.cmp(customer) {
        std::cmp::Ordering::Equal => k.to_vec(),
        std::cmp::Ordering::Less => run_from(span, customer, from_ms),
        std::cmp::Ordering::Greater => run_from(span + 1, customer, from_ms),
    }
}

/// The span and customer of a position among the records: a record's key, or where a
/// customer's records of a span begin (from some start time on).
fn parse_position(k: &[u8]) -> Option<(u64, &str)> {
    let rest = k.strip_prefix(&[RECORD])?;
    let span = read_u64(rest.get(..8)?);
    let rest = &rest[8..];
    let zero = rest.iter().position(|&b| b == 0)?;
    Some((span, std::str::from_utf8(&rest[..zero]).ok()?))
}

/// What a page of records is asked for.
#[derive(Clone, Debug, Default)]
pub struct Query {
    pub customer: Option<String>,
    /// `user@domain`: only records of this account.
    pub account: Option<String>,
    /// Records that started at or after this time (Unix ms).
    pub from_ms: u64,
    /// Records that started before this time (Unix ms).
    pub to_ms: u64,
    /// Where to go on: the previous page's `next`.
    pub after: Option<Vec<u8>>,
    pub limit: usize,
}

/// One page of records, and where the next page starts if there are more records in the
/// range (they may all be filtered out).
pub struct Page {
    pub records: Vec<Cdr>,
    pub next: Option<Vec<u8>>,
}

/// What one purge step did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Purged {
    /// Records removed.
    pub removed: usize,
    /// Whether the step reached the spans too young to hold anything to purge: the pass
    /// over the store is over, and the next step starts again from the oldest span.
    pub pass_done: bool,
}

pub struct CdrStore {
    db: DB,
    node: u64,
    next_seq: AtomicU64,
    /// The highest seq whose write has completed: what the shipper may send and the
    /// outbox may be trimmed to (seqs are given out before their write lands).
    written: AtomicU64,
    /// The outbox holds no seq at or below this.
    trimmed: AtomicU64,
    /// Where the purge's pass goes on (`None`: at the oldest span).
    purge_at: Mutex<Option<Vec<u8>>>,
}

/// The most outbox entries one trim deletes one by one; a longer stretch (a peer that was
/// away for a long time) goes in one range delete. Range deletes are kept rare: every
/// read of the store must fragment the range tombstones of its memtable, and a range
/// delete after every shipping round (several a second) made each outbox read sort
/// thousands of them.
const POINT_TRIM_MAX: u64 = 10_000;

impl CdrStore {
    /// What this store's RocksDB holds in memory.
    pub fn memory(&self) -> tandem_raft_store::StoreMemory {
        tandem_raft_store::StoreMemory::of(&self.db, &[])
    }

    /// Opens (creating if needed) the store in `dir` for node `node`, moving records of
    /// the layout before spans to today's first.
    pub fn open(dir: &Path, node: u64) -> Result<CdrStore, Error> {
        let mut options = Options::default();
        options.create_if_missing(true);
        options.set_keep_log_file_num(2);
        options.set_max_open_files(128);
        options.set_write_buffer_size(MEMTABLE);
        options.set_max_write_buffer_number(2);
        options.set_ratelimiter(BACKGROUND_WRITE_RATE, 100_000, 10);
        let mut table = rocksdb::BlockBasedOptions::default();
        table.set_block_cache(&rocksdb::Cache::new_lru_cache(8 << 20));
        options.set_block_based_table_factory(&table);
        let db = DB::open(&options, dir)
            .map_err(|e| Error::Cdr(format!("opening {}: {e}", dir.display())))?;
        migrate(&db)?;
        let next = db
            .get(NEXT_SEQ)
            .map_err(err("reading the next seq"))?
            .map_or(1, |v| read_u64(&v));
        let trimmed = {
            let mut it = db.raw_iterator();
            it.seek([OUTBOX]);
            match it.key().filter(|k| k.first() == Some(&OUTBOX)) {
                Some(k) => read_u64(&k[1..]).saturating_sub(1),
                None => next.saturating_sub(1),
            }
        };
        Ok(CdrStore {
            db,
            node,
            next_seq: AtomicU64::new(next),
            written: AtomicU64::new(next.saturating_sub(1)),
            trimmed: AtomicU64::new(trimmed),
            purge_at: Mutex::new(None),
        })
    }

    pub fn node(&self) -> u64 {
        self.node
    }

    /// Stores records this node wrote, giving each its node and seq, and puts them in the
    /// outbox for the peers; the write is on disk (fsynced) when this returns.
    pub fn write_own(&self, records: &mut [Cdr]) -> Result<(), Error> {
        self.write_local(records, true)
    }

    /// [`CdrStore::write_own`], with the outbox only if `ship`.
    pub fn write_local(&self, records: &mut [Cdr], ship: bool) -> Result<(), Error> {
        if records.is_empty() {
            return Ok(());
        }
        let mut batch = WriteBatch::default();
        let first = self
            .next_seq
            .fetch_add(records.len() as u64, Ordering::Relaxed);
        for (i, r) in records.iter_mut().enumerate() {
            r.node = self.node;
            r.seq = first + i as u64;
            let key = record_key(r);
            batch.put(&key, serde_json::to_vec(r).expect("a record serialises"));
            if ship {
                let mut o = vec![OUTBOX];
                o.extend_from_slice(&be(r.seq));
                batch.put(o, key);
            }
        }
        let last = first + records.len() as u64 - 1;
        batch.put(NEXT_SEQ, be(last + 1));
        let mut sync = WriteOptions::default();
        sync.set_sync(true);
        self.db
            .write_opt(batch, &sync)
            .map_err(err("writing CDRs"))?;
        self.written.fetch_max(last, Ordering::Release);
        Ok(())
    }

    /// Stores records another node shipped (not fsynced: the sender keeps them until
    /// this answers, and a process crash keeps what the write-ahead log holds).
    pub fn write_received(&self, records: &[Cdr]) -> Result<(), Error> {
        let mut batch = WriteBatch::default();
        for r in records {
            batch.put(
                record_key(r),
                serde_json::to_vec(r).expect("a record serialises"),
            );
        }
        self.db.write(batch).map_err(err("writing shipped CDRs"))
    }

    /// Up to `max` of this node's own records with a seq above `after`, in seq order: each
    /// record's seq and its stored JSON.
    pub fn unshipped(&self, after: u64, max: usize) -> Result<Vec<(u64, Vec<u8>)>, Error> {
        let mut out = Vec::new();
        let mut start = vec![OUTBOX];
        start.extend_from_slice(&be(after.saturating_add(1)));
        let mut it = self.db.raw_iterator();
        it.seek(&start);
        while it.valid() && out.len() < max {
            let (Some(k), Some(record_key)) = (it.key(), it.value()) else {
                break;
            };
            if k.first() != Some(&OUTBOX) {
                break;
            }
            if let Some(v) = self.db.get(record_key).map_err(err("reading a CDR"))? {
                out.push((read_u64(&k[1..]), v));
            }
            it.next();
        }
        it.status().map_err(err("reading the outbox"))?;
        Ok(out)
    }

    /// The highest seq of this node's records that `peer` has stored.
    pub fn shipped(&self, peer: u64) -> Result<u64, Error> {
        let mut k = vec![CURSOR];
        k.extend_from_slice(&be(peer));
        Ok(self
            .db
            .get(k)
            .map_err(err("reading a cursor"))?
            .map_or(0, |v| read_u64(&v)))
    }

    pub fn set_shipped(&self, peer: u64, seq: u64) -> Result<(), Error> {
        let mut k = vec![CURSOR];
        k.extend_from_slice(&be(peer));
        self.db.put(k, be(seq)).map_err(err("writing a cursor"))
    }

    /// The peers this node keeps a cursor for.
    pub fn cursors(&self) -> Result<Vec<u64>, Error> {
        let mut out = Vec::new();
        let mut it = self.db.raw_iterator();
        it.seek([CURSOR]);
        while let Some(k) = it.key().filter(|k| k.first() == Some(&CURSOR)) {
            out.push(read_u64(&k[1..]));
            it.next();
        }
        it.status().map_err(err("reading the cursors"))?;
        Ok(out)
    }

    /// Drops outbox entries up to `seq` (every peer has them), and the cursors of
    /// `retired` nodes.
    pub fn trim_outbox(&self, seq: u64, retired: &[u64]) -> Result<(), Error> {
        let from = self.trimmed.load(Ordering::Acquire);
        if seq <= from && retired.is_empty() {
            return Ok(());
        }
        let mut batch = WriteBatch::default();
        if seq > from && seq - from <= POINT_TRIM_MAX {
            for s in from + 1..=seq {
                let mut k = vec![OUTBOX];
                k.extend_from_slice(&be(s));
                batch.delete(k);
            }
        } else if seq > from {
            let mut end = vec![OUTBOX];
            end.extend_from_slice(&be(seq.saturating_add(1)));
            batch.delete_range(vec![OUTBOX], end);
        }
        for id in retired {
            let mut k = vec![CURSOR];
            k.extend_from_slice(&be(*id));
            batch.delete(k);
        }
        self.db.write(batch).map_err(err("trimming the outbox"))?;
        self.trimmed.fetch_max(seq, Ordering::AcqRel);
        Ok(())
    }

    /// Compacts the whole store: for a store filled at once (`tandem cdr seed`), so that it
    /// starts in the shape months of calls would have left it in.
    pub fn compact(&self) {
        self.db.compact_range(None::<&[u8]>, None::<&[u8]>);
    }

    /// The highest seq of this node's records that is on disk.
    pub fn last_seq(&self) -> u64 {
        self.written.load(Ordering::Acquire)
    }

    /// Whether `after` is a page cursor this store could have given out: a position among
    /// the records.
    pub fn is_cursor(after: &[u8]) -> bool {
        parse_position(after).is_some()
    }

    /// Whether a page cursor (`after`) lies among `customer`'s records: the cursors of a
    /// customer's pages always do.
    pub fn cursor_of(after: &[u8], customer: &str) -> bool {
        parse_position(after).is_some_and(|(_, c)| c == customer)
    }

    /// One page of records: by span (ten minutes of start times), then customer, then start
    /// time, so one customer's records come in start-time order.
    pub fn query(&self, q: &Query) -> Result<Page, Error> {
        let limit = q.limit.max(1);
        let last_span = span_of(q.to_ms.saturating_sub(1));
        let mut records = Vec::new();
        let seek = match (&q.after, &q.customer) {
            (Some(after), _) => after.clone(),
            (None, Some(c)) => run_from(span_of(q.from_ms), c, q.from_ms),
            (None, None) => span_start(span_of(q.from_ms)),
        };
        let mut it = self.db.raw_iterator();
        it.seek(&seek);
        let mut scanned = 0;
        let next = loop {
            let Some(k) = it.key().filter(|_| it.valid()) else {
                break None;
            };
            if k.first() != Some(&RECORD) {
                break None;
            }
            let parsed = parse_record_key(k);
            if parsed.is_some_and(|(span, _, _)| span > last_span) {
                break None;
            }
            if records.len() >= limit || scanned >= MAX_SCAN {
                break Some(match (&q.customer, parsed) {
                    (Some(c), Some((span, at, _))) => position_for(c, q.from_ms, span, at, k),
                    _ => k.to_vec(),
                });
            }
            scanned += 1;
            let Some((span, customer, start)) = parsed else {
                it.next();
                continue;
            };
            if let Some(c) = q.customer.as_deref().filter(|c| *c != customer) {
                let to = position_for(c, q.from_ms, span, customer, k);
                it.seek(&to);
                continue;
            }
            if start < q.from_ms {
                let to = run_from(span, customer, q.from_ms);
                it.seek(&to);
                continue;
            }
            if start >= q.to_ms {
                if q.customer.is_some() {
                    // The customer's later spans start later still.
                    break None;
                }
                let to = run_end(span, customer);
                it.seek(&to);
                continue;
            }
            if let Some(v) = it.value() {
                if let Ok(c) = serde_json::from_slice::<Cdr>(v) {
                    if q.account.as_deref().is_none_or(|a| c.account == a) {
                        records.push(c);
                    }
                }
            }
            it.next();
        };
        it.status().map_err(err("reading CDRs"))?;
        Ok(Page { records, next })
    }

    /// One step of the purge: removes records older than their customer's retention
    /// (`days_for(customer)` days before `now_ms`), looking at `budget` keys at most (each
    /// record it removes, and each customer's records of a span it passes over), as one
    /// range delete per customer and span. A pass goes from the oldest span to the last
    /// one older than `shortest_days` (no customer keeps its records for less) over as many
    /// steps as it takes, each going on where the one before stopped.
    pub fn purge_step(
        &self,
        days_for: &dyn Fn(&str) -> u32,
        shortest_days: u32,
        now_ms: u64,
        budget: usize,
    ) -> Result<Purged, Error> {
        let horizon = span_of(now_ms.saturating_sub(u64::from(shortest_days.max(1)) * DAY_MS));
        let budget = budget.max(1);
        let mut resume = self.purge_at.lock().unwrap_or_else(|e| e.into_inner());
        let start = resume.take().unwrap_or_else(|| vec![RECORD]);
        // Read once, not kept: old records must not push anything out of the cache.
        let mut read = rocksdb::ReadOptions::default();
        read.fill_cache(false);
        let mut it = self.db.raw_iterator_opt(read);
        it.seek(&start);
        let mut batch = WriteBatch::default();
        let mut cutoffs: std::collections::HashMap<String, u64> = Default::default();
        let (mut removed, mut work) = (0, 0);
        let pass_done = loop {
            let Some(k) = it.key().filter(|_| it.valid()) else {
                break true;
            };
            if k.first() != Some(&RECORD) {
                break true;
            }
            let parsed = parse_record_key(k);
            if parsed.is_some_and(|(span, _, _)| span > horizon) {
                break true;
            }
            if work >= budget {
                *resume = Some(k.to_vec());
                break false;
            }
            let Some((span, customer, _)) = parsed else {
                work += 1;
                it.next();
                continue;
            };
            let customer = customer.to_owned();
            let cutoff = *cutoffs
                .entry(customer.clone())
                .or_insert_with(|| now_ms.saturating_sub(u64::from(days_for(&customer)) * DAY_MS));
            if span * SPAN_MS < cutoff {
                let limit = run_from(span, &customer, cutoff);
                let mut last: Option<Vec<u8>> = None;
                while let Some(k) = it.key().filter(|_| it.valid()) {
                    if k >= limit.as_slice() {
                        break;
                    }
                    if work >= budget {
                        break;
                    }
                    last = Some(k.to_vec());
                    removed += 1;
                    work += 1;
                    it.next();
                }
                match last {
                    Some(mut last) => {
                        last.push(0);
                        batch.delete_range(run_prefix(span, &customer), last);
                    }
                    None => work += 1,
                }
                if work >= budget {
                    if let Some(k) = it.key().filter(|k| it.valid() && *k < limit.as_slice()) {
                        *resume = Some(k.to_vec());
                        break false;
                    }
                }
            } else {
                work += 1;
            }
            it.seek(run_end(span, &customer));
        };
        it.status().map_err(err("reading CDRs to purge"))?;
        drop(it);
        if removed > 0 {
            self.db.write(batch).map_err(err("purging CDRs"))?;
        }
        Ok(Purged { removed, pass_done })
    }
}

/// Moves the records of a store written before spans (`r` keys) to today's keys, and
/// points its outbox at them, in batches; the old keys go in one range delete at the end.
/// A crash part way leaves both copies of some records, and the next open moves them again
/// (a record's key is its own fields, so copying one twice is one record). The outbox goes
/// first: the shipper reads records by the key an outbox entry holds.
fn migrate(db: &DB) -> Result<(), Error> {
    let mut it = db.raw_iterator();
    it.seek([OLD_RECORD]);
    if it.key().and_then(|k| k.first()) != Some(&OLD_RECORD) {
        return it.status().map_err(err("reading the store"));
    }
    tracing::info!("moving CDRs to the layout by time span (once, after an upgrade)");
    let mut batch = WriteBatch::default();
    it.seek([OUTBOX]);
    while let (Some(k), Some(v)) = (it.key(), it.value()) {
        if k.first() != Some(&OUTBOX) {
            break;
        }
        if let Some(new) = key_from_old(v) {
            batch.put(k, new);
        }
        it.next();
    }
    it.status().map_err(err("reading the outbox"))?;
    db.write(batch).map_err(err("moving the outbox"))?;
    let (mut moved, mut batches) = (0u64, 0u64);
    let mut batch = WriteBatch::default();
    it.seek([OLD_RECORD]);
    while let (Some(k), Some(v)) = (it.key(), it.value()) {
        if k.first() != Some(&OLD_RECORD) {
            break;
        }
        match key_from_old(k) {
            Some(new) => batch.put(new, v),
            None => {
                tracing::warn!(key = %crate::hex::encode(k), "dropping a CDR key of no known form")
            }
        }
        moved += 1;
        if batch.len() >= MIGRATE_BATCH {
            db.write(std::mem::take(&mut batch))
                .map_err(err("moving CDRs"))?;
            batches += 1;
            if batches % 10 == 0 {
                tracing::info!(moved, "moving CDRs to the layout by time span…");
            }
        }
        it.next();
    }
    it.status().map_err(err("reading CDRs to move"))?;
    drop(it);
    batch.delete_range(vec![OLD_RECORD], vec![OLD_RECORD + 1]);
    let mut sync = WriteOptions::default();
    sync.set_sync(true);
    db.write_opt(batch, &sync).map_err(err("moving CDRs"))?;
    db.compact_range(Some([OLD_RECORD]), Some([OLD_RECORD + 1]));
    tracing::info!(moved, "CDRs moved to the layout by time span");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cdr(customer: &str, start_ms: u64, account: &str) -> Cdr {
        Cdr {
            customer: customer.into(),
            account: account.into(),
            start_ms,
            end_ms: start_ms + 1000,
            ..Cdr::default()
        }
    }

    #[test]
    fn pages_follow_customer_and_time_and_purges_take_only_what_is_old() {
        let dir = tempfile::tempdir().unwrap();
        let store = CdrStore::open(dir.path(), 7).unwrap();
        let mut records: Vec<Cdr> = (0..10)
            .map(|i| cdr(if i % 2 == 0 { "a" } else { "b" }, 1_000 * i, "x@d"))
            .collect();
        records.push(cdr("a", 500, "y@d"));
        store.write_own(&mut records).unwrap();
        assert_eq!(store.last_seq(), 11);

        let mut q = Query {
            customer: Some("a".into()),
            to_ms: u64::MAX,
            limit: 2,
            ..Query::default()
        };
        let mut starts = Vec::new();
        loop {
            let page = store.query(&q).unwrap();
            starts.extend(page.records.iter().map(|r| r.start_ms));
            match page.next {
                Some(n) => q.after = Some(n),
                None => break,
            }
        }
        assert_eq!(starts, [0, 500, 2000, 4000, 6000, 8000]);

        let all = store
            .query(&Query {
                from_ms: 1000,
                to_ms: 5000,
                limit: 100,
                ..Query::default()
            })
            .unwrap();
        let got: Vec<_> = all
            .records
            .iter()
            .map(|r| (r.customer.as_str(), r.start_ms))
            .collect();
        assert_eq!(got, [("a", 2000), ("a", 4000), ("b", 1000), ("b", 3000)]);
        assert!(all.next.is_none());

        let mine = store
            .query(&Query {
                account: Some("y@d".into()),
                to_ms: u64::MAX,
                limit: 100,
                ..Query::default()
            })
            .unwrap();
        assert_eq!(mine.records.len(), 1);

        // Retention of 1 day at "now" = 1 day + 4500 ms: records before 4500 go, two per
        // step.
        let now = 86_400_000 + 4500;
        let days = |_: &str| 1;
        let first = store.purge_step(&days, 1, now, 2).unwrap();
        assert_eq!(first.removed, 2);
        assert!(!first.pass_done);
        let mut total = 2;
        loop {
            let step = store.purge_step(&days, 1, now, 2).unwrap();
            total += step.removed;
            if step.pass_done {
                break;
            }
        }
        assert_eq!(total, 6, "0, 500, 2000, 4000 of a and 1000, 3000 of b");
        let left = store
            .query(&Query {
                to_ms: u64::MAX,
                limit: 100,
                ..Query::default()
            })
            .unwrap();
        assert!(left.records.iter().all(|r| r.start_ms >= 4500));
        assert_eq!(left.records.len(), 5);
    }

    #[test]
    fn the_outbox_holds_what_a_peer_has_not_stored_and_a_reopened_store_keeps_counting() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = CdrStore::open(dir.path(), 1).unwrap();
            let mut r: Vec<Cdr> = (0..5).map(|i| cdr("a", i, "x@d")).collect();
            store.write_own(&mut r).unwrap();
            assert_eq!(store.unshipped(0, 100).unwrap().len(), 5);
            assert_eq!(store.unshipped(3, 100).unwrap().len(), 2);
            store.set_shipped(2, 3).unwrap();
            assert_eq!(store.shipped(2).unwrap(), 3);
            store.set_shipped(9, 1).unwrap();
            assert_eq!(store.cursors().unwrap(), [2, 9]);
            store.trim_outbox(3, &[9]).unwrap();
            assert_eq!(store.unshipped(0, 100).unwrap().len(), 2);
            assert_eq!(store.cursors().unwrap(), [2]);
        }
        let store = CdrStore::open(dir.path(), 1).unwrap();
        assert_eq!(
            store.unshipped(0, 100).unwrap().len(),
            2,
            "the outbox outlives a restart"
        );
        let mut r = vec![cdr("a", 9, "x@d")];
        store.write_own(&mut r).unwrap();
        assert_eq!(r[0].seq, 6, "seqs go on after a restart");
        store.trim_outbox(6, &[]).unwrap();
        assert!(store.unshipped(0, 100).unwrap().is_empty());
        // A record shipped twice is one record.
        store.write_received(&r).unwrap();
        let page = store
            .query(&Query {
                to_ms: u64::MAX,
                limit: 100,
                ..Query::default()
            })
            .unwrap();
        assert_eq!(page.records.len(), 6);
    }

    #[test]
    fn shipping_rounds_leave_no_range_tombstones_behind() {
        let dir = tempfile::tempdir().unwrap();
        let store = CdrStore::open(dir.path(), 1).unwrap();
        // Each write in a batch takes one sequence number: a range delete one, point
        // deletes one each.
        let seq = || store.db.latest_sequence_number();
        let mut r: Vec<Cdr> = (0..3).map(|i| cdr("a", i, "x@d")).collect();
        store.write_own(&mut r).unwrap();
        let before = seq();
        store.trim_outbox(3, &[]).unwrap();
        assert_eq!(seq() - before, 3, "three point deletes, no range delete");
        let before = seq();
        store.trim_outbox(3, &[]).unwrap();
        assert_eq!(seq(), before, "a round that shipped nothing writes nothing");
        assert!(store.unshipped(0, 10).unwrap().is_empty());
        // A peer away for long: one range delete for the whole stretch.
        let mut r: Vec<Cdr> = (0..(POINT_TRIM_MAX + 5))
            .map(|i| cdr("b", i, "y@d"))
            .collect();
        store.write_own(&mut r).unwrap();
        let before = seq();
        store.trim_outbox(r.last().unwrap().seq, &[]).unwrap();
        assert_eq!(seq() - before, 1);
        assert!(store.unshipped(0, 10).unwrap().is_empty());
    }

    /// Every record of `q`'s pages, following each page's cursor, and the cursors.
    fn every_page(store: &CdrStore, mut q: Query) -> (Vec<(String, u64)>, Vec<Vec<u8>>) {
        let (mut got, mut cursors) = (Vec::new(), Vec::new());
        loop {
            let page = store.query(&q).unwrap();
            got.extend(
                page.records
                    .iter()
                    .map(|r| (r.customer.clone(), r.start_ms)),
            );
            match page.next {
                Some(n) => {
                    cursors.push(n.clone());
                    q.after = Some(n);
                }
                None => return (got, cursors),
            }
        }
    }

    #[test]
    fn a_customers_pages_run_in_time_order_across_spans_and_never_reach_another_customer() {
        let dir = tempfile::tempdir().unwrap();
        let store = CdrStore::open(dir.path(), 1).unwrap();
        // Three customers, a record each every quarter span for six spans.
        let quarter = SPAN_MS / 4;
        let mut records: Vec<Cdr> = (0..24)
            .flat_map(|i| ["a", "b", "c"].map(|c| cdr(c, i * quarter + 7, "x@d")))
            .collect();
        store.write_own(&mut records).unwrap();
        let query = |customer: Option<&str>, from_ms, to_ms, limit| Query {
            customer: customer.map(str::to_owned),
            from_ms,
            to_ms,
            limit,
            ..Query::default()
        };

        let (b, cursors) = every_page(&store, query(Some("b"), 0, u64::MAX, 3));
        let starts: Vec<u64> = (0..24).map(|i| i * quarter + 7).collect();
        assert_eq!(
            b,
            starts
                .iter()
                .map(|s| ("b".to_owned(), *s))
                .collect::<Vec<_>>()
        );
        assert!(cursors.len() >= 7);
        for c in &cursors {
            assert!(CdrStore::is_cursor(c));
            assert!(
                CdrStore::cursor_of(c, "b"),
                "a cursor of b's pages lies among b's records"
            );
            assert!(!CdrStore::cursor_of(c, "a"));
        }

        // A window from the middle of span 1 to the middle of span 4.
        let (a, _) = every_page(&store, query(Some("a"), 6 * quarter, 18 * quarter, 2));
        let want: Vec<_> = (6..18).map(|i| ("a".to_owned(), i * quarter + 7)).collect();
        assert_eq!(a, want);

        // Everyone's records: by span, then customer, then time.
        let (all, _) = every_page(&store, query(None, 0, u64::MAX, 7));
        let mut want: Vec<_> = records
            .iter()
            .map(|r| (r.customer.clone(), r.start_ms))
            .collect();
        want.sort_by_key(|(c, s)| (s / SPAN_MS, c.clone(), *s));
        assert_eq!(all, want);

        // A cursor forged from another customer's record does not lead into its records.
        let forged = record_key(&records[4]);
        assert_eq!(records[4].customer, "b");
        let mut q = query(Some("c"), 0, u64::MAX, 100);
        q.after = Some(forged);
        let (c, _) = every_page(&store, q);
        assert!(!c.is_empty());
        assert!(c.iter().all(|(customer, _)| customer == "c"), "{c:?}");
        assert!(!CdrStore::is_cursor(b"r\x00garbage"));
    }

    #[test]
    fn a_flushed_table_holds_no_key_among_the_records_of_older_spans() {
        // What a compaction rewrites is decided by which table files' key ranges overlap:
        // a newly flushed table whose range spans older records makes every compaction
        // rewrite those records again. Many customers' calls of one span, and the outbox
        // and cursors in use as the shipper uses them, must flush into a table that lies
        // after every older span's records.
        let dir = tempfile::tempdir().unwrap();
        let store = CdrStore::open(dir.path(), 1).unwrap();
        let write_span = |span: u64| {
            let mut records: Vec<Cdr> = (0..20)
                .flat_map(|c| {
                    (0..5)
                        .map(move |j| cdr(&format!("cust{c:02}"), span * SPAN_MS + j * 1000, "x@d"))
                })
                .collect();
            store.write_own(&mut records).unwrap();
            store.set_shipped(2, store.last_seq()).unwrap();
            store.trim_outbox(store.last_seq(), &[]).unwrap();
            store.db.flush().unwrap();
        };
        for span in 0..3 {
            write_span(span);
        }
        store.compact();
        write_span(5);
        let files = store.db.live_files().unwrap();
        let flushed: Vec<_> = files.iter().filter(|f| f.level == 0).collect();
        assert_eq!(flushed.len(), 1, "{files:?}");
        let (first, last) = (
            flushed[0].start_key.clone().unwrap(),
            flushed[0].end_key.clone().unwrap(),
        );
        let mut it = store.db.raw_iterator();
        it.seek(&first);
        while let Some(k) = it.key().filter(|k| it.valid() && *k <= last.as_slice()) {
            if let Some((span, customer, _)) = parse_record_key(k) {
                assert_eq!(
                    span, 5,
                    "the flushed table's range holds {customer}'s record of span {span}"
                );
            }
            it.next();
        }
    }

    #[test]
    fn a_purge_pass_goes_on_where_its_last_step_stopped_and_ends_at_the_shortest_retention() {
        let dir = tempfile::tempdir().unwrap();
        let store = CdrStore::open(dir.path(), 1).unwrap();
        let day = 86_400_000;
        let now = 400 * day;
        // "keep" keeps 1000 days, "drop" 30; each has a record every day for 200 days.
        let mut records: Vec<Cdr> = (0..200)
            .flat_map(|d| ["keep", "drop"].map(|c| cdr(c, now - (d + 1) * day, "x@d")))
            .collect();
        store.write_own(&mut records).unwrap();
        let days = |c: &str| if c == "keep" { 1000 } else { 30 };
        let mut steps = Vec::new();
        loop {
            let step = store.purge_step(&days, 30, now, 50).unwrap();
            let done = step.pass_done;
            steps.push(step.removed);
            if done {
                break;
            }
            assert!(steps.len() < 100, "the pass never ends: {steps:?}");
        }
        assert_eq!(
            steps.iter().sum::<usize>(),
            170,
            "the records 31 to 200 days old: {steps:?}"
        );
        // Fifty keys a step: the 170 records, and a seek past each of "keep"'s 170 old days.
        assert!(steps.len() >= 7 && steps.len() <= 8, "{steps:?}");
        let count = |c: &str| {
            every_page(
                &store,
                Query {
                    customer: Some(c.into()),
                    to_ms: u64::MAX,
                    limit: 1000,
                    ..Query::default()
                },
            )
            .0
            .len()
        };
        assert_eq!((count("keep"), count("drop")), (200, 30));
        // The next pass starts again from the oldest span: nothing more to take, in steps.
        let step = store.purge_step(&days, 30, now, 50).unwrap();
        assert_eq!(
            step,
            Purged {
                removed: 0,
                pass_done: false
            }
        );
        // With the shortest retention the pass looks no further than 30 days back.
        let step = store.purge_step(&days, 30, now, 10_000).unwrap();
        assert_eq!(
            step,
            Purged {
                removed: 0,
                pass_done: true
            }
        );
    }

    #[test]
    fn a_store_of_the_layout_before_spans_is_moved_at_open_with_its_outbox() {
        let dir = tempfile::tempdir().unwrap();
        let records: Vec<Cdr> = (0..25)
            .map(|i| Cdr {
                node: 1,
                seq: i + 1,
                ..cdr(if i % 2 == 0 { "a" } else { "b" }, i * SPAN_MS / 3, "x@d")
            })
            .collect();
        {
            let store = CdrStore::open(dir.path(), 1).unwrap();
            let mut batch = WriteBatch::default();
            for r in &records {
                let mut old = vec![OLD_RECORD];
                old.extend_from_slice(r.customer.as_bytes());
                old.push(0);
                for n in [r.start_ms, r.node, r.seq] {
                    old.extend_from_slice(&be(n));
                }
                batch.put(&old, serde_json::to_vec(r).unwrap());
                // The last five not yet shipped.
                if r.seq > 20 {
                    let mut o = vec![OUTBOX];
                    o.extend_from_slice(&be(r.seq));
                    batch.put(o, &old);
                }
            }
            batch.put(NEXT_SEQ, be(26));
            store.db.write(batch).unwrap();
        }
        let store = CdrStore::open(dir.path(), 1).unwrap();
        let (all, _) = every_page(
            &store,
            Query {
                to_ms: u64::MAX,
                limit: 10,
                ..Query::default()
            },
        );
        assert_eq!(all.len(), 25);
        let unshipped = store.unshipped(20, 100).unwrap();
        assert_eq!(
            unshipped.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(),
            [21, 22, 23, 24, 25],
            "the outbox points at the moved records"
        );
        let mut it = store.db.raw_iterator();
        it.seek([OLD_RECORD]);
        assert!(
            it.key().is_none_or(|k| k.first() != Some(&OLD_RECORD)),
            "no old key is left"
        );
        drop(it);
        let mut more = vec![cdr("a", 1, "x@d")];
        store.write_own(&mut more).unwrap();
        assert_eq!(more[0].seq, 26);
    }
}
