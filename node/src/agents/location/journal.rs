//! The held bindings' journal: the binding changes this node answered phones for without a
//! quorum, on its own disk, so that a crash or a restart before the quorum returns loses
//! none of them (node/DESIGN.md, "Degraded mode").
//!
//! One file, `<data_dir>/held-bindings`: a header line naming the layout, then one record
//! per held change, each its length, an FNV-1a checksum and the postcard-encoded
//! [`HeldBinding`]. A later record of the same binding replaces an earlier one. Records are
//! appended by one writer thread, which writes whatever is queued and then syncs once, so
//! a burst of held registrations shares an fsync; a change is acknowledged (and the phone
//! answered) only after its sync. Once changes are replayed or superseded, the file is
//! rewritten with what is still held: a new file synced and renamed over the old one, with
//! the directory synced, so a crash leaves the old file or the new one.
//!
//! A record cut short by a crash was never acknowledged: reading stops there, and the
//! file is cut back to the last whole record before anything is appended.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use tandem_raft_store::command::HeldBinding;
use tokio::sync::oneshot;

use crate::Error;

/// The first line of the file: the layout of what follows.
const HEADER: &[u8] = b"tandem held bindings 1\n";

/// Bytes before each record's body: its length (u32) and checksum (u64), little-endian.
const RECORD_HEAD: usize = 12;

/// The largest record read back; a held binding is a few hundred bytes.
const RECORD_MAX: usize = 1 << 20;

/// What the writer thread is asked to do, in order.
enum Op {
    /// Appends an encoded record, and says when it is synced.
    Append(Vec<u8>, oneshot::Sender<std::io::Result<()>>),
    /// Replaces the file with these encoded records.
    Rewrite(Vec<Vec<u8>>),
}

/// The open journal; see the module docs.
pub struct Journal {
    ops: mpsc::Sender<Op>,
}

/// 64-bit FNV-1a: a checksum that tells a torn or damaged record from a whole one.
fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// A record as stored: head and body.
pub fn encode(held: &HeldBinding) -> Vec<u8> {
    let body = postcard::to_stdvec(held).expect("in-memory serialisation does not fail");
    let mut out = Vec::with_capacity(RECORD_HEAD + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&checksum(&body).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

fn io(context: String) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { context, source }
}

/// What [`read_records`] found.
struct Contents {
    records: Vec<HeldBinding>,
    /// The length of the file up to the end of the last whole record.
    good: usize,
    /// Whether reading stopped at a record that is all there but does not check out:
    /// damage, not an append a crash cut short.
    damaged: bool,
}

/// Reads the records of `bytes` (a whole file, header included).
fn read_records(path: &Path, bytes: &[u8]) -> Result<Contents, Error> {
    let Some(mut rest) = bytes.strip_prefix(HEADER) else {
        return Err(Error::Io {
            context: format!(
                "{}: not a held-bindings journal this release reads (its first line is not {:?})",
                path.display(),
                String::from_utf8_lossy(HEADER).trim_end()
            ),
            source: std::io::ErrorKind::InvalidData.into(),
        });
    };
    let mut records = Vec::new();
    let mut good = HEADER.len();
    let mut damaged = false;
    while rest.len() >= RECORD_HEAD {
        let len = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
        let sum = u64::from_le_bytes(rest[4..RECORD_HEAD].try_into().expect("8 bytes"));
        if len > RECORD_MAX {
            damaged = true;
            break;
        }
        // Past the end of the file: an append a crash cut short.
        let Some(body) = rest.get(RECORD_HEAD..RECORD_HEAD + len) else {
            break;
        };
        let held = (checksum(body) == sum)
            .then(|| postcard::from_bytes::<HeldBinding>(body).ok())
            .flatten();
        let Some(held) = held else {
            damaged = true;
            break;
        };
        records.push(held);
        rest = &rest[RECORD_HEAD + len..];
        good += RECORD_HEAD + len;
    }
    Ok(Contents {
        records,
        good,
        damaged,
    })
}

impl Journal {
    /// Opens (or creates) the journal in `data_dir`, returning it and the changes it
    /// holds, oldest first.
    pub fn open(data_dir: &Path) -> Result<(Journal, Vec<HeldBinding>), Error> {
        let path = data_dir.join("held-bindings");
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(io(format!("opening {}", path.display())))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(io(format!("reading {}", path.display())))?;
        let records = if bytes.is_empty() {
            file.write_all(HEADER)
                .and_then(|()| file.sync_all())
                .map_err(io(format!("writing {}", path.display())))?;
            sync_dir(data_dir).map_err(io(format!("syncing {}", data_dir.display())))?;
            Vec::new()
        } else {
            let Contents {
                records,
                good,
                damaged,
            } = read_records(&path, &bytes)?;
            if damaged {
                // Not a torn append: the file as it was is kept for whoever looks into it.
                let aside = path.with_extension("damaged");
                std::fs::write(&aside, &bytes)
                    .map_err(io(format!("writing {}", aside.display())))?;
                tracing::error!(
                    file = %path.display(),
                    copy = %aside.display(),
                    records = records.len(),
                    "the held-bindings journal is damaged: the records before the damage are replayed, and the file as it was is kept beside it"
                );
            } else if good < bytes.len() {
                tracing::warn!(
                    file = %path.display(),
                    bytes = bytes.len() - good,
                    "the held-bindings journal ends in a record a crash cut short (never acknowledged); dropping it"
                );
            }
            if good < bytes.len() {
                file.set_len(good as u64)
                    .and_then(|()| file.sync_all())
                    .map_err(io(format!("truncating {}", path.display())))?;
            }
            records
        };
        let (ops, rx) = mpsc::channel();
        let dir = data_dir.to_path_buf();
        std::thread::Builder::new()
            .name("held-journal".into())
            .spawn(move || write_loop(file, path, dir, &rx))
            .map_err(io("starting the held-bindings journal's thread".into()))?;
        Ok((Journal { ops }, records))
    }

    /// Queues an encoded record ([`encode`]); the receiver says when it is on disk.
    pub fn append(&self, record: Vec<u8>) -> oneshot::Receiver<std::io::Result<()>> {
        let (done, synced) = oneshot::channel();
        if let Err(mpsc::SendError(Op::Append(_, done))) = self.ops.send(Op::Append(record, done)) {
            let _ = done.send(Err(std::io::Error::other(
                "the held-bindings journal has stopped",
            )));
        }
        synced
    }

    /// Queues a rewrite of the file with exactly these encoded records, after every append
    /// queued before it.
    pub fn rewrite(&self, records: Vec<Vec<u8>>) {
        let _ = self.ops.send(Op::Rewrite(records));
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The writer thread: appends in groups, one sync per group, and rewrites in order.
///
/// After a failed write or sync the file cannot be trusted past the last group known
/// synced (the kernel may drop the pages of a failed sync), so it is cut back to that
/// length and every append is refused until a rewrite from the overlay's memory succeeds;
/// the overlay asks for one when a hold fails.
fn write_loop(file: File, path: PathBuf, dir: PathBuf, ops: &mpsc::Receiver<Op>) {
    let mut file = file;
    let mut good = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut broken = false;
    let mut pending = ops.recv().ok();
    while let Some(op) = pending.take() {
        match op {
            Op::Append(record, done) => {
                let mut group = vec![(record, done)];
                loop {
                    match ops.try_recv() {
                        Ok(Op::Append(r, d)) => group.push((r, d)),
                        Ok(other) => {
                            pending = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                let bytes: Vec<u8> = group.iter().flat_map(|(r, _)| r.iter().copied()).collect();
                let written = if broken {
                    Err(std::io::Error::other(
                        "an earlier write failed; waiting for the journal to be rewritten",
                    ))
                } else {
                    file.write_all(&bytes).and_then(|()| file.sync_data())
                };
                match &written {
                    Ok(()) => good += bytes.len() as u64,
                    Err(e) if !broken => {
                        tracing::error!(file = %path.display(), error = %e, "cannot write the held-bindings journal; refusing held registrations until it is rewritten");
                        broken = true;
                        let _ = file.set_len(good).and_then(|()| file.sync_all());
                    }
                    Err(_) => {}
                }
                for (_, done) in group {
                    let _ = done.send(match &written {
                        Ok(()) => Ok(()),
                        Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
                    });
                }
            }
            Op::Rewrite(records) => match rewrite(&path, &dir, &records) {
                Ok((new, len)) => {
                    file = new;
                    good = len;
                    if broken {
                        tracing::info!(file = %path.display(), "the held-bindings journal is rewritten; holding registrations again");
                    }
                    broken = false;
                }
                Err((renamed, e)) => {
                    tracing::error!(file = %path.display(), error = %e, "cannot rewrite the held-bindings journal");
                    // Once the new file has the name, appends must go to it; but until its
                    // directory entry is known synced, nothing more is acknowledged.
                    if let Some((new, len)) = renamed {
                        file = new;
                        good = len;
                        broken = true;
                    }
                }
            },
        }
        if pending.is_none() {
            pending = ops.recv().ok();
        }
    }
}

/// A rewrite that failed after its rename: the new file, which has the name now, and its
/// length; and the error.
type RewriteFailure = (Option<(File, u64)>, std::io::Error);

/// Writes `records` to a new file, syncs it, renames it over `path` and syncs the
/// directory: the new file, positioned for appending, and its length.
fn rewrite(path: &Path, dir: &Path, records: &[Vec<u8>]) -> Result<(File, u64), RewriteFailure> {
    let fresh = path.with_extension("new");
    let written = (|| {
        let mut file = File::create(&fresh)?;
        file.write_all(HEADER)?;
        for r in records {
            file.write_all(r)?;
        }
        file.sync_all()?;
        let len = file.metadata()?.len();
        Ok((file, len))
    })();
    let (file, len) = written.map_err(|e| (None, e))?;
    std::fs::rename(&fresh, path).map_err(|e| (None, e))?;
    match sync_dir(dir) {
        Ok(()) => Ok((file, len)),
        Err(e) => Err((Some((file, len)), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Appends a, b and c, held at 0, 1 and 2.
    async fn append_three(journal: &Journal) {
        for (i, c) in ["<sip:a>", "<sip:b>", "<sip:c>"].iter().enumerate() {
            journal
                .append(encode(&held(c, i as u64)))
                .await
                .unwrap()
                .unwrap();
        }
    }

    fn held(contact: &str, at: u64) -> HeldBinding {
        HeldBinding {
            user: "alice".into(),
            domain: "example.com".into(),
            aor: "sip:alice@example.com".into(),
            contact: contact.into(),
            held_at_ms: at,
            binding: None,
        }
    }

    #[tokio::test]
    async fn records_survive_reopening_and_a_torn_tail_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, none) = Journal::open(dir.path()).unwrap();
        assert!(none.is_empty());
        append_three(&journal).await;
        drop(journal);
        // A crash in the middle of the next append leaves part of a record.
        let path = dir.path().join("held-bindings");
        let whole = std::fs::read(&path).unwrap();
        let torn = encode(&held("<sip:d>", 9));
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&torn[..torn.len() - 3]).unwrap();
        drop(f);
        let (journal, back) = Journal::open(dir.path()).unwrap();
        assert_eq!(
            back,
            vec![held("<sip:a>", 0), held("<sip:b>", 1), held("<sip:c>", 2)]
        );
        assert_eq!(
            std::fs::read(&path).unwrap(),
            whole,
            "the torn tail is cut off"
        );
        // A rewrite keeps exactly what it is given, and appends go on after it.
        journal.rewrite(vec![encode(&held("<sip:b>", 1))]);
        journal
            .append(encode(&held("<sip:e>", 5)))
            .await
            .unwrap()
            .unwrap();
        drop(journal);
        let (_journal, back) = Journal::open(dir.path()).unwrap();
        assert_eq!(back, vec![held("<sip:b>", 1), held("<sip:e>", 5)]);
    }

    #[tokio::test]
    async fn damage_in_the_middle_keeps_what_precedes_it_and_the_file_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = Journal::open(dir.path()).unwrap();
        append_three(&journal).await;
        drop(journal);
        let path = dir.path().join("held-bindings");
        let mut bytes = std::fs::read(&path).unwrap();
        let second = HEADER.len() + encode(&held("<sip:a>", 0)).len() + RECORD_HEAD + 2;
        bytes[second] ^= 0x55;
        std::fs::write(&path, &bytes).unwrap();
        let (_journal, back) = Journal::open(dir.path()).unwrap();
        assert_eq!(back, vec![held("<sip:a>", 0)]);
        assert_eq!(
            std::fs::read(path.with_extension("damaged")).unwrap(),
            bytes
        );
    }

    /// After a failed write nothing more is acknowledged until a rewrite from memory has
    /// replaced the file: what a later sync covered could sit behind a torn record.
    #[tokio::test]
    async fn after_a_failed_write_appends_wait_for_a_rewrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("held-bindings");
        std::fs::write(&path, HEADER).unwrap();
        // A handle that cannot write stands in for a disk that fails.
        let file = File::open(&path).unwrap();
        let (ops, rx) = mpsc::channel();
        let (p, d) = (path.clone(), dir.path().to_path_buf());
        std::thread::spawn(move || write_loop(file, p, d, &rx));
        let journal = Journal { ops };
        let first = journal.append(encode(&held("<sip:a>", 1))).await.unwrap();
        assert!(first.is_err());
        let second = journal.append(encode(&held("<sip:b>", 2))).await.unwrap();
        assert!(second.is_err(), "acknowledged while the journal is broken");
        journal.rewrite(vec![encode(&held("<sip:a>", 1))]);
        journal
            .append(encode(&held("<sip:c>", 3)))
            .await
            .unwrap()
            .unwrap();
        drop(journal);
        let (_journal, back) = Journal::open(dir.path()).unwrap();
        assert_eq!(back, vec![held("<sip:a>", 1), held("<sip:c>", 3)]);
    }

    #[test]
    fn a_file_of_another_layout_is_refused_with_its_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("held-bindings"), b"something else\n").unwrap();
        let Err(e) = Journal::open(dir.path()) else {
            panic!("opened a file of another layout");
        };
        assert!(e.to_string().contains("held-bindings"), "{e}");
    }
}
