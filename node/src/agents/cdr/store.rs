//! The CDR store: a RocksDB of its own in `<data_dir>/cdr`, apart from the replica's, so
//! CDR writes, their compactions and their purges never share a write-ahead log or a
//! memtable with Raft (node/DESIGN.md, "CDRs").
//!
//! Keys, each starting with one byte that names the kind:
//!
//! | key | value |
//! |---|---|
//! | `r` customer `0x00` start_ms node seq | the record (JSON) |
//! | `o` seq | the key of one of this node's own records not yet shipped to every peer |
//! | `c` peer | the highest seq of this node's records that peer has stored |
//! | `n` | the next seq this node gives a record |
//!
//! Numbers are 8 bytes big-endian, so keys sort by customer, then start time. A record's
//! key is made from its own fields, so a record stored twice (shipped again after a lost
//! answer) is one record.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use rocksdb::{Options, WriteBatch, WriteOptions, DB};

use super::Cdr;
use crate::Error;

const RECORD: u8 = b'r';
const OUTBOX: u8 = b'o';
const CURSOR: u8 = b'c';
const NEXT_SEQ: &[u8] = b"n";
/// Bytes the memtable may hold before it is flushed (two may exist while one flushes): a
/// steady call load fills and empties it over and over, and a node's memory rides on
/// that saw-tooth, so it is kept small (raft-store's store.rs says the same of its own).
const MEMTABLE: usize = 4 << 20;
/// Bytes per second the store's flushes and compactions may write: purges leave range
/// deletes that compaction turns into rewrites, and those must not take the disk (or the
/// cores that drive it) from the Raft log in bursts. Far above what calls write.
const BACKGROUND_WRITE_RATE: i64 = 16 << 20;
/// Records a query looks at for one page at most, matching or not: a filter that matches
/// little returns a short page with a cursor rather than scanning the whole store.
const MAX_SCAN: usize = 50_000;

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

/// The key prefix of one customer's records.
fn customer_prefix(customer: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(customer.len() + 2);
    k.push(RECORD);
    k.extend_from_slice(customer.as_bytes());
    k.push(0);
    k
}

/// The first key of `customer`'s records that start at or after `ms`.
fn customer_from(customer: &str, ms: u64) -> Vec<u8> {
    let mut k = customer_prefix(customer);
    k.extend_from_slice(&be(ms));
    k
}

/// The key of record `c`.
pub fn record_key(c: &Cdr) -> Vec<u8> {
    let mut k = customer_from(&c.customer, c.start_ms);
    k.extend_from_slice(&be(c.node));
    k.extend_from_slice(&be(c.seq));
    k
}

/// The customer and start time a record key names.
fn parse_record_key(k: &[u8]) -> Option<(&str, u64)> {
    let rest = k.strip_prefix(&[RECORD])?;
    let zero = rest.iter().position(|&b| b == 0)?;
    let customer = std::str::from_utf8(&rest[..zero]).ok()?;
    let times = &rest[zero + 1..];
    (times.len() == 24).then(|| (customer, read_u64(&times[..8])))
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

pub struct CdrStore {
    db: DB,
    node: u64,
    next_seq: AtomicU64,
    /// The highest seq whose write has completed: what the shipper may send and the
    /// outbox may be trimmed to (seqs are given out before their write lands).
    written: AtomicU64,
    /// The outbox holds no seq at or below this.
    trimmed: AtomicU64,
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

    /// Opens (creating if needed) the store in `dir` for node `node`.
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

    /// Whether a page cursor (`after`) lies among `customer`'s records.
    pub fn cursor_of(after: &[u8], customer: &str) -> bool {
        after.starts_with(&customer_prefix(customer))
    }

    /// One page of records, in customer and start-time order.
    pub fn query(&self, q: &Query) -> Result<Page, Error> {
        let limit = q.limit.max(1);
        let mut records = Vec::new();
        let upper: Vec<u8> = match &q.customer {
            Some(c) => {
                let mut u = customer_prefix(c);
                *u.last_mut().expect("prefix ends in 0") = 1;
                u
            }
            None => vec![RECORD + 1],
        };
        let seek = match (&q.after, &q.customer) {
            (Some(after), _) => after.clone(),
            (None, Some(c)) => customer_from(c, q.from_ms),
            (None, None) => vec![RECORD],
        };
        let mut it = self.db.raw_iterator();
        it.seek(&seek);
        let mut scanned = 0;
        let next = loop {
            let Some(k) = it.key().filter(|_| it.valid()) else {
                break None;
            };
            if k >= upper.as_slice() {
                break None;
            }
            if records.len() >= limit || scanned >= MAX_SCAN {
                break Some(k.to_vec());
            }
            scanned += 1;
            let Some((customer, start)) = parse_record_key(k) else {
                it.next();
                continue;
            };
            if start < q.from_ms {
                let to = customer_from(customer, q.from_ms);
                it.seek(&to);
                continue;
            }
            if start >= q.to_ms {
                // On to the next customer.
                let mut to = customer_prefix(customer);
                *to.last_mut().expect("prefix ends in 0") = 1;
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

    /// Removes at most `budget` records that are older than their customer's retention
    /// (`days_for(customer)` days before `now_ms`), as one range delete per customer.
    /// Returns how many it removed.
    pub fn purge_step(
        &self,
        days_for: &dyn Fn(&str) -> u32,
        now_ms: u64,
        budget: usize,
    ) -> Result<usize, Error> {
        let mut removed = 0;
        let mut batch = WriteBatch::default();
        // Read once, not kept: old records must not push anything out of the cache.
        let mut read = rocksdb::ReadOptions::default();
        read.fill_cache(false);
        let mut it = self.db.raw_iterator_opt(read);
        it.seek([RECORD]);
        while it.valid() && removed < budget {
            let Some(k) = it.key().filter(|k| k.first() == Some(&RECORD)) else {
                break;
            };
            let Some((customer, _)) = parse_record_key(k) else {
                it.next();
                continue;
            };
            let customer = customer.to_owned();
            let days = u64::from(days_for(&customer));
            let cutoff = customer_from(&customer, now_ms.saturating_sub(days * 86_400_000));
            let mut last: Option<Vec<u8>> = None;
            while it.valid() && removed < budget {
                let Some(k) = it.key() else { break };
                if k >= cutoff.as_slice() {
                    break;
                }
                last = Some(k.to_vec());
                removed += 1;
                it.next();
            }
            if let Some(mut last) = last {
                last.push(0);
                batch.delete_range(customer_prefix(&customer), last);
            }
            let mut next = customer_prefix(&customer);
            *next.last_mut().expect("prefix ends in 0") = 1;
            it.seek(&next);
        }
        it.status().map_err(err("reading CDRs to purge"))?;
        drop(it);
        if removed > 0 {
            self.db.write(batch).map_err(err("purging CDRs"))?;
        }
        Ok(removed)
    }
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
        assert_eq!(store.purge_step(&days, now, 2).unwrap(), 2);
        let mut total = 2;
        loop {
            let n = store.purge_step(&days, now, 2).unwrap();
            if n == 0 {
                break;
            }
            total += n;
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
}
