//! Call detail records: one record per leg of every call the app server handles and of
//! every call the proxy carries to a local account, written by the node that handled it,
//! copied to every other full node, and removed in bounded steps once older than the
//! customer's retention (node/DESIGN.md, "CDRs").
//!
//! A call's task (or, for the proxy, the call's dialog entry) keeps an [`Open`] record
//! per leg and hands the closed [`Cdr`] to the [`Recorder`], which never blocks a SIP
//! thread: a writer thread of its own stores records in groups (what ends within 20 ms),
//! each group fsynced once ([`store::CdrStore`], a RocksDB apart from the replica's), and
//! runs the purge steps between groups. The shipper sends each node's own records to
//! every peer over the cluster link and forgets them from its outbox once every peer has
//! stored them, so a record survives the loss of the node that wrote it once it has
//! shipped (within a second of the call's end while the peers are up).

pub mod store;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tandem_raft_store::command::Role;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::clock::now_ms;
use crate::cluster::ClusterNode;
use store::CdrStore;

/// Records waiting for the writer thread; a node that cannot write them this fast counts
/// the rest as dropped and says so. The queue holds boxed records: a bounded channel
/// allocates and touches all its slots at once, and at a record's size (about 330 bytes)
/// this many would be about 21 MB of resident memory on an idle node.
const QUEUE: usize = 65_536;
/// How long the purge rests after a pass over the store before it starts the next. A pass
/// passes over the old records of customers who keep them longer than others, one seek per
/// customer and span (store.rs), so passes back to back would keep a core busy for nothing;
/// records come due only as time passes, and go at most this much later.
const PURGE_REST: Duration = Duration::from_secs(10);
/// Records stored in one write (one fsync).
const WRITE_GROUP: usize = 1024;
/// How long the writer gathers records after the first one before it writes them: calls
/// end at thousands a second under load, and one fsync each would cost more CPU than the
/// calls themselves. A record waits this much longer for its disk, not for its call.
const GROUP_WAIT: Duration = Duration::from_millis(20);
/// How long the shipper gathers after the writer stored something, for the same reason:
/// each round is a message to every peer.
const SHIP_GATHER: Duration = Duration::from_millis(100);
/// Records sent to a peer in one message.
const SHIP_BATCH: usize = 256;
/// How often the shipper looks for records a peer does not have yet, at the latest.
const SHIP_EVERY: Duration = Duration::from_secs(1);
/// The most records a peer may send in one message.
const MAX_RECEIVED: usize = 4 * SHIP_BATCH;
/// The longest a record's names (call, leg, direction, customer, account, provider) and
/// texts (from, to, reason, outcome) may be, in bytes. A record is made from what a caller
/// sent, and SIP bounds only the whole message.
const MAX_NAME: usize = 256;
const MAX_TEXT: usize = 1024;

/// `s` cut to at most `max` bytes, on a character boundary.
fn cap(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// One leg of one call.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Cdr {
    /// The node that wrote the record, and its number there: together the record's id.
    pub node: u64,
    pub seq: u64,
    /// Shared by every leg of one call.
    pub call: String,
    /// `a`: the caller's leg; `b1`, `b2`, ...: the legs dialled, in order.
    pub leg: String,
    /// `in`: a leg that reached this node; `out`: one this node placed.
    pub direction: String,
    pub customer: String,
    /// The local account whose call it is (`user@domain`).
    pub account: String,
    /// The customer's provider account the leg went through, if any.
    pub provider: String,
    pub from: String,
    pub to: String,
    /// Unix milliseconds: the INVITE, the first ringing, the answer, the end.
    pub start_ms: u64,
    pub ring_ms: Option<u64>,
    pub answer_ms: Option<u64>,
    pub end_ms: u64,
    /// The final status of the leg's INVITE (200 if answered), and its reason.
    pub code: u16,
    pub reason: String,
    /// Seconds from the answer to the end.
    pub duration_s: u64,
    /// What became of the leg, or for the caller's leg of the whole call: `answered`,
    /// `busy`, `no answer`, `failed`, `cancelled`, `refused`, or the dialplan's error.
    pub outcome: String,
}

/// The CSV columns, in order.
pub const CSV_HEADER: &str = "node,seq,call,leg,direction,customer,account,provider,from,to,\
start_ms,ring_ms,answer_ms,end_ms,code,reason,duration_s,outcome";

impl Cdr {
    /// The record as one CSV line (RFC 4180 quoting), without the line break.
    pub fn csv(&self) -> String {
        let q = |s: &str| {
            // A leading =, +, - or @ would be a formula to a spreadsheet: quoted as text.
            let formula = s.starts_with(['=', '+', '-', '@']);
            if formula || s.contains([',', '"', '\n', '\r']) {
                let lead = if formula { "'" } else { "" };
                format!("\"{lead}{}\"", s.replace('"', "\"\""))
            } else {
                s.to_owned()
            }
        };
        let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_default();
        [
            self.node.to_string(),
            self.seq.to_string(),
            q(&self.call),
            q(&self.leg),
            q(&self.direction),
            q(&self.customer),
            q(&self.account),
            q(&self.provider),
            q(&self.from),
            q(&self.to),
            self.start_ms.to_string(),
            opt(self.ring_ms),
            opt(self.answer_ms),
            self.end_ms.to_string(),
            self.code.to_string(),
            q(&self.reason),
            self.duration_s.to_string(),
            q(&self.outcome),
        ]
        .join(",")
    }

    /// Whether a record shipped by a peer is well formed enough to store.
    fn plausible(&self) -> bool {
        let short = |s: &str, n: usize| s.len() <= n;
        !self.customer.is_empty()
            && !self.customer.contains('\0')
            && [
                &self.call,
                &self.leg,
                &self.direction,
                &self.customer,
                &self.account,
                &self.provider,
            ]
            .iter()
            .all(|s| short(s, MAX_NAME))
            && [&self.from, &self.to, &self.reason, &self.outcome]
                .iter()
                .all(|s| short(s, MAX_TEXT))
    }
}

/// A leg's record while the leg lasts.
#[derive(Clone, Debug)]
pub struct Open {
    cdr: Cdr,
}

impl Open {
    pub fn new(call: &str, leg: &str, direction: &str, customer: &str, account: &str) -> Open {
        Open {
            cdr: Cdr {
                call: cap(call, MAX_NAME),
                leg: cap(leg, MAX_NAME),
                direction: cap(direction, MAX_NAME),
                customer: cap(customer, MAX_NAME),
                account: cap(account, MAX_NAME),
                start_ms: now_ms(),
                ..Cdr::default()
            },
        }
    }

    pub fn with_parties(mut self, from: &str, to: &str) -> Open {
        self.cdr.from = cap(from, MAX_TEXT);
        self.cdr.to = cap(to, MAX_TEXT);
        self
    }

    pub fn via_provider(mut self, provider: &str) -> Open {
        self.cdr.provider = cap(provider, MAX_NAME);
        self
    }

    /// The leg rings (the first time counts).
    pub fn ringing(&mut self) {
        self.cdr.ring_ms.get_or_insert_with(now_ms);
    }

    pub fn answered(&mut self) {
        self.cdr.answer_ms.get_or_insert_with(now_ms);
    }

    /// The leg ended now with `code`.
    pub fn close(self, code: u16, reason: &str, outcome: &str) -> Cdr {
        self.close_at(now_ms(), code, reason, outcome)
    }

    /// The leg ended at `end` (Unix milliseconds) with `code`.
    pub fn close_at(mut self, end: u64, code: u16, reason: &str, outcome: &str) -> Cdr {
        let end = end.max(self.cdr.start_ms);
        self.cdr.end_ms = end;
        self.cdr.code = code;
        self.cdr.reason = cap(reason, MAX_TEXT);
        self.cdr.outcome = cap(outcome, MAX_TEXT);
        self.cdr.duration_s = self
            .cdr
            .answer_ms
            .map_or(0, |a| end.saturating_sub(a) / 1000);
        self.cdr
    }
}

/// What a call that failed with `code` came to, for its record.
pub fn outcome_of(code: u16) -> &'static str {
    match code {
        486 | 600 => "busy",
        408 | 480 | 487 => "no answer",
        401 | 403 | 404 | 484 | 488 | 603 => "refused",
        _ => "failed",
    }
}

/// Where closed records go: the writer thread's queue.
#[derive(Clone, Debug)]
pub struct Recorder {
    queue: SyncSender<Box<Cdr>>,
    dropped: Arc<AtomicU64>,
}

impl Recorder {
    /// A recorder whose records come out of the receiver, for unit tests.
    #[cfg(test)]
    pub fn for_tests() -> (Recorder, mpsc::Receiver<Box<Cdr>>) {
        let (queue, rx) = mpsc::sync_channel(QUEUE);
        let dropped = Arc::default();
        (Recorder { queue, dropped }, rx)
    }

    /// Queues a record for writing; never blocks.
    pub fn record(&self, cdr: Cdr) {
        match self.queue.try_send(Box::new(cdr)) {
            Ok(()) => {}
            Err(TrySendError::Full(c)) | Err(TrySendError::Disconnected(c)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::error!(call = %c.call, leg = %c.leg, "CDR dropped: the CDR writer is not keeping up or has stopped");
            }
        }
    }
}

/// Retention and purge pacing (`[cdr]`).
#[derive(Clone, Debug)]
pub struct Settings {
    pub retention_days: u32,
    pub purge_batch: usize,
    pub purge_every: Duration,
}

impl Settings {
    pub fn from_config(c: &crate::config::CdrConfig) -> Settings {
        Settings {
            retention_days: c.retention_days,
            purge_batch: c.purge_batch as usize,
            purge_every: Duration::from_millis(c.purge_every_ms),
        }
    }
}

/// Counts for `/metrics`.
#[derive(Default)]
pub struct CdrStats {
    pub written: AtomicU64,
    pub dropped: Arc<AtomicU64>,
    pub purged: AtomicU64,
    pub received: AtomicU64,
}

/// The CDR service of a full node: the writer thread, the shipper, and the answer to
/// peers' shipments.
pub struct CdrService {
    store: Arc<CdrStore>,
    cluster: ClusterNode,
    recorder: Recorder,
    stats: Arc<CdrStats>,
    closing: Arc<AtomicBool>,
    writer: Option<std::thread::JoinHandle<()>>,
    stop: CancellationToken,
    shipper: Option<tokio::task::JoinHandle<()>>,
}

impl CdrService {
    /// Starts the writer thread and the shipper (on the current runtime), and answers
    /// peers' shipments from now on.
    pub fn start(
        store: Arc<CdrStore>,
        cluster: ClusterNode,
        settings: Settings,
        stats: Arc<CdrStats>,
    ) -> std::io::Result<CdrService> {
        let (queue, rx) = mpsc::sync_channel(QUEUE);
        let closing = Arc::new(AtomicBool::new(false));
        let shipped = Arc::new(Notify::new());
        let writer = {
            let (store, closing, stats) = (store.clone(), closing.clone(), stats.clone());
            let (cluster, wake) = (cluster.clone(), shipped.clone());
            std::thread::Builder::new()
                .name("cdr-writer".into())
                .spawn(move || {
                    write_loop(&store, &cluster, &settings, &stats, &rx, &closing, &wake)
                })?
        };
        {
            let (store, stats) = (store.clone(), stats.clone());
            cluster.answer_agent_questions(
                &["cdr"],
                Arc::new(move |q: &str| receive(&store, &stats, q)),
            );
        }
        let stop = CancellationToken::new();
        let shipper = tokio::spawn(ship_loop(
            store.clone(),
            cluster.clone(),
            shipped,
            stop.clone(),
        ));
        Ok(CdrService {
            recorder: Recorder {
                queue,
                dropped: stats.dropped.clone(),
            },
            store,
            cluster,
            stats,
            closing,
            writer: Some(writer),
            stop,
            shipper: Some(shipper),
        })
    }

    pub fn recorder(&self) -> Recorder {
        self.recorder.clone()
    }

    /// Stores what is queued, stops the writer, and ships once more (for at most
    /// `wait`), so a node that stops for good leaves its records with its peers.
    pub async fn finish(mut self, wait: Duration) {
        self.closing.store(true, Ordering::Release);
        self.stop.cancel();
        if let Some(s) = self.shipper.take() {
            let _ = s.await;
        }
        if let Some(w) = self.writer.take() {
            let _ = tokio::task::spawn_blocking(move || w.join()).await;
        }
        let (store, cluster) = (self.store.clone(), self.cluster.clone());
        if tokio::time::timeout(wait, ship_round(&store, &cluster))
            .await
            .is_err()
        {
            tracing::warn!("some CDRs were not shipped to every peer before the stop; they ship when this node starts again");
        }
        tracing::info!(
            written = self.stats.written.load(Ordering::Relaxed),
            dropped = self.stats.dropped.load(Ordering::Relaxed),
            "CDR writer stopped"
        );
    }
}

/// The writer thread: stores queued records in groups and runs purge steps between them.
fn write_loop(
    store: &CdrStore,
    cluster: &ClusterNode,
    settings: &Settings,
    stats: &CdrStats,
    rx: &mpsc::Receiver<Box<Cdr>>,
    closing: &AtomicBool,
    shipped: &Notify,
) {
    let mut next_purge = Instant::now() + settings.purge_every;
    // The shortest retention any customer has, found when a pass begins.
    let mut pass_shortest: Option<u32> = None;
    let mut pending: Vec<Cdr> = Vec::new();
    let mut failing_since: Option<Instant> = None;
    loop {
        let wait = next_purge
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(200));
        let mut disconnected = false;
        match rx.recv_timeout(wait) {
            Ok(c) => pending.push(*c),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => disconnected = true,
        }
        let drain = |pending: &mut Vec<Cdr>, disconnected: &mut bool| {
            while pending.len() < WRITE_GROUP {
                match rx.try_recv() {
                    Ok(c) => pending.push(*c),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        *disconnected = true;
                        break;
                    }
                }
            }
        };
        drain(&mut pending, &mut disconnected);
        if !pending.is_empty()
            && pending.len() < WRITE_GROUP
            && !disconnected
            && !closing.load(Ordering::Acquire)
        {
            // One sleep rather than a wake-up per record: what ends meanwhile joins.
            std::thread::sleep(GROUP_WAIT);
            drain(&mut pending, &mut disconnected);
        }
        if !pending.is_empty() {
            match store.write_own(&mut pending) {
                Ok(()) => {
                    stats
                        .written
                        .fetch_add(pending.len() as u64, Ordering::Relaxed);
                    pending.clear();
                    failing_since = None;
                    shipped.notify_one();
                }
                Err(e) => {
                    // Kept and tried again; a disk that stays broken loses them only
                    // when the process ends.
                    if failing_since.is_none() {
                        tracing::error!(error = %e, records = pending.len(), "CDRs cannot be written; retrying");
                        failing_since = Some(Instant::now());
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        }
        let quiet = pending.is_empty();
        if (disconnected || closing.load(Ordering::Acquire)) && quiet {
            if rx.try_recv().map(|c| pending.push(*c)).is_err() {
                break;
            }
            continue;
        }
        if Instant::now() >= next_purge {
            next_purge = Instant::now() + settings.purge_every;
            let reader = cluster.replica.reader();
            let default = settings.retention_days;
            let days_for = |customer: &str| {
                reader
                    .cdr_retention(customer)
                    .ok()
                    .flatten()
                    .unwrap_or(default)
            };
            // Fixed for a pass: a customer's shorter retention set meanwhile counts from
            // the next one.
            let shortest = *pass_shortest.get_or_insert_with(|| {
                reader
                    .customers()
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|c| reader.cdr_retention(&c.id).ok().flatten())
                    .fold(default, u32::min)
            });
            match store.purge_step(&days_for, shortest, now_ms(), settings.purge_batch) {
                Ok(step) => {
                    stats
                        .purged
                        .fetch_add(step.removed as u64, Ordering::Relaxed);
                    if step.pass_done {
                        pass_shortest = None;
                        next_purge = Instant::now() + PURGE_REST.max(settings.purge_every);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "CDR purge step failed"),
            }
        }
    }
    if !pending.is_empty() {
        tracing::error!(
            records = pending.len(),
            "CDRs lost at stop: they could not be written"
        );
    }
}

/// A peer's shipment: `cdr <JSON array>`. Answers `ok` once stored.
fn receive(store: &CdrStore, stats: &CdrStats, question: &str) -> String {
    let Some(body) = question.strip_prefix("cdr ") else {
        return "error: expected `cdr <records>`".into();
    };
    let records: Vec<Cdr> = match serde_json::from_str(body) {
        Ok(r) => r,
        Err(e) => return format!("error: {e}"),
    };
    if records.len() > MAX_RECEIVED {
        return format!("error: at most {MAX_RECEIVED} records at once");
    }
    // One malformed record (from a peer running another release, say) must not hold back
    // the rest: the good ones are stored, the others named in the log and dropped, so the
    // sender's cursor moves on.
    let (records, bad): (Vec<Cdr>, Vec<Cdr>) = records.into_iter().partition(Cdr::plausible);
    for b in &bad {
        tracing::warn!(
            node = b.node,
            seq = b.seq,
            "a peer shipped a malformed CDR; dropped"
        );
    }
    match store.write_received(&records) {
        Ok(()) => {
            stats
                .received
                .fetch_add(records.len() as u64, Ordering::Relaxed);
            "ok".into()
        }
        Err(e) => format!("error: {e}"),
    }
}

/// The shipper: a round whenever the writer stored something, and every second.
async fn ship_loop(
    store: Arc<CdrStore>,
    cluster: ClusterNode,
    wake: Arc<Notify>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = wake.notified() => {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(SHIP_GATHER) => {}
                }
            }
            _ = tokio::time::sleep(SHIP_EVERY) => {}
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ship_round(&store, &cluster) => {}
        }
    }
}

/// The question that ships `batch` (the outbox's records after some cursor, each with its
/// seq and its stored JSON) and the highest seq in it; `None` for an empty batch. The
/// stored JSON goes as it is: records are not decoded and encoded again for each peer.
fn shipment(batch: &[(u64, Vec<u8>)]) -> Option<(u64, Arc<str>)> {
    let top = batch.last()?.0;
    let mut q = String::with_capacity(8 + batch.iter().map(|(_, j)| j.len() + 1).sum::<usize>());
    q.push_str("cdr [");
    let mut first = true;
    for (seq, json) in batch {
        // What the writer stored is serde_json's output; anything else is skipped.
        let Ok(text) = std::str::from_utf8(json) else {
            tracing::warn!(seq, "a stored CDR is not UTF-8; not shipped");
            continue;
        };
        if !first {
            q.push(',');
        }
        first = false;
        q.push_str(text);
    }
    q.push(']');
    Some((top, q.into()))
}

/// Sends every peer (each other member that is not a witness; one not in the registry
/// yet counts, so a node that joined and died at once still gets its copy) this node's
/// records it has not stored yet, then forgets from the outbox what every peer has.
async fn ship_round(store: &CdrStore, cluster: &ClusterNode) {
    let me = store.node();
    let reader = cluster.replica.reader();
    let witnesses: HashSet<u64> = reader
        .nodes()
        .unwrap_or_default()
        .into_iter()
        .filter(|n| n.role == Role::Witness)
        .map(|n| n.id)
        .collect();
    let peers: Vec<u64> = cluster
        .replica
        .members()
        .into_iter()
        .map(|m| m.id)
        .filter(|id| *id != me && !witnesses.contains(id))
        .collect();
    let last = store.last_seq();
    let mut everyone_has = last;
    let mut batches: HashMap<u64, Option<(u64, Arc<str>)>> = HashMap::new();
    for &peer in &peers {
        let mut cursor = store.shipped(peer).unwrap_or(0);
        while cursor < last {
            // Peers at the same cursor (the usual case) get the same message, read once.
            let batch = match batches.get(&cursor) {
                Some(b) => b.clone(),
                None => match store.unshipped(cursor, SHIP_BATCH) {
                    Ok(b) => {
                        let b = shipment(&b);
                        batches.insert(cursor, b.clone());
                        b
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "CDR outbox unreadable");
                        break;
                    }
                },
            };
            let Some((top, question)) = batch else {
                cursor = last;
                break;
            };
            match cluster.ask_agent(peer, &question).await {
                Some(a) if a == "ok" => {
                    cursor = top;
                    if let Err(e) = store.set_shipped(peer, cursor) {
                        tracing::warn!(error = %e, "CDR cursor not saved");
                    }
                }
                Some(a) => {
                    tracing::warn!(peer, answer = %a, "a peer refused CDRs");
                    break;
                }
                None => break,
            }
        }
        everyone_has = everyone_has.min(cursor);
    }
    let retired: Vec<u64> = store
        .cursors()
        .unwrap_or_default()
        .into_iter()
        .filter(|id| reader.is_retired(*id).unwrap_or(false))
        .collect();
    if let Err(e) = store.trim_outbox(everyone_has, &retired) {
        tracing::warn!(error = %e, "CDR outbox not trimmed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_what_needs_it_and_defuses_formulas() {
        let c = Cdr {
            from: "\"Bob, Jr\" <sip:bob@x>".into(),
            to: "=HYPERLINK(1)".into(),
            code: 200,
            ..Cdr::default()
        };
        let line = c.csv();
        assert!(line.contains(r#""""Bob, Jr"" <sip:bob@x>""#), "{line}");
        assert!(line.contains(r#""'=HYPERLINK(1)""#), "{line}");
        // One comma more than the header's: the one inside the quoted From.
        assert_eq!(line.split(',').count(), CSV_HEADER.split(',').count() + 1);
    }
}
