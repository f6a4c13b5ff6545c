//! The capture spool: an append-only file of the writes forwarded by the old InfluxDB,
//! in arrival order. One record = one forwarded write request:
//!
//! ```text
//! u8 magic 0xC6 | u16 db_len | db | u16 rp_len | rp | u8 prec_len | precision | u32 body_len | body | u32 crc32
//! ```
//!
//! (all little-endian; the CRC-32 covers every byte before it. Records without the
//! checksum, magic 0xC5, are still read.)
//!
//! The writer publishes the length of complete records through a `watch` channel; a
//! reader follows the file while it grows and never reads past that length, so it never
//! sees half a record. The spool lives on disk: the delta is never held in memory.
//!
//! **Durability contract.** The capture receiver appends with
//! [`SpoolWriter::append_durable`]: a record is on disk (`fdatasync`, shared by the
//! appends that wait together) before the receiver answers 204 to InfluxDB. So after a
//! power loss every acknowledged write is in the spool, and what follows the last complete
//! record (a record cut short, or the zeros a file system may leave past the last sync)
//! was never acknowledged: [`repair_torn_tail`] cuts it off and the resume goes on. The
//! write it held is on the source, whose subscriber counted it as a failed forward, and
//! the resume's counter check names it. Anything else that does not decode is corruption
//! of acknowledged data, and stops the resume with the offset.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tokio::sync::watch;

/// A record with a CRC-32 of everything before it at its end.
const MAGIC: u8 = 0xC6;
/// A record without a checksum (written by earlier builds; still read, so a migration
/// interrupted before an upgrade can resume).
const MAGIC_V1: u8 = 0xC5;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool {path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("spool {path}: corrupt record at byte {offset}: {what}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        what: String,
    },
    #[error("spool {path}: field too long for a record: {what}")]
    TooLong { path: PathBuf, what: &'static str },
}

/// One captured write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub db: String,
    pub rp: String,
    pub precision: String,
    pub body: Vec<u8>,
}

/// The appending side.
pub struct SpoolWriter {
    path: PathBuf,
    file: Mutex<(File, u64)>,
    committed: watch::Sender<u64>,
    /// A second handle for `fdatasync`, and the length known to be on disk: syncing
    /// never holds up appends, and one sync serves every append it covers.
    synced: Mutex<(File, u64)>,
}

impl SpoolWriter {
    /// Create a new, empty spool (an existing file is an error: a spool is never reused).
    pub fn create(path: &Path) -> Result<SpoolWriter, SpoolError> {
        let file = File::options()
            .create_new(true)
            .append(true)
            .open(path)
            .map_err(|source| SpoolError::Io {
                path: path.into(),
                what: "create",
                source,
            })?;
        let io = |what, source| SpoolError::Io {
            path: path.into(),
            what,
            source,
        };
        let for_sync = file.try_clone().map_err(|e| io("clone the handle", e))?;
        // The new file's name must survive a power loss too.
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
        File::open(dir.unwrap_or(Path::new(".")))
            .and_then(|d| d.sync_all())
            .map_err(|e| io("fsync the directory", e))?;
        let (tx, _) = watch::channel(0);
        Ok(SpoolWriter {
            path: path.into(),
            file: Mutex::new((file, 0)),
            committed: tx,
            synced: Mutex::new((for_sync, 0)),
        })
    }

    /// [`SpoolWriter::append`], then wait until the record is on disk. What the capture
    /// receiver acknowledges must survive a power loss (the module's contract).
    pub fn append_durable(
        &self,
        db: &str,
        rp: &str,
        precision: &str,
        body: &[u8],
    ) -> Result<u64, SpoolError> {
        let end = self.append(db, rp, precision, body)?;
        self.sync_through(end)?;
        Ok(end)
    }

    /// Make the first `end` bytes durable. Appends that finish while one sync runs wait
    /// for it and are then served by the next one (group commit).
    fn sync_through(&self, end: u64) -> Result<(), SpoolError> {
        let mut g = self.synced.lock().unwrap_or_else(|p| p.into_inner());
        if g.1 >= end {
            return Ok(());
        }
        let upto = self.len();
        g.0.sync_data().map_err(|source| SpoolError::Io {
            path: self.path.clone(),
            what: "fsync",
            source,
        })?;
        g.1 = upto;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Append one record; readers see it once this returns.
    pub fn append(
        &self,
        db: &str,
        rp: &str,
        precision: &str,
        body: &[u8],
    ) -> Result<u64, SpoolError> {
        let too_long = |what| SpoolError::TooLong {
            path: self.path.clone(),
            what,
        };
        let dbl = u16::try_from(db.len()).map_err(|_| too_long("database name"))?;
        let rpl = u16::try_from(rp.len()).map_err(|_| too_long("retention policy"))?;
        let pl = u8::try_from(precision.len()).map_err(|_| too_long("precision"))?;
        let bl = u32::try_from(body.len()).map_err(|_| too_long("body"))?;
        let mut rec = Vec::with_capacity(14 + db.len() + rp.len() + precision.len() + body.len());
        rec.push(MAGIC);
        rec.extend_from_slice(&dbl.to_le_bytes());
        rec.extend_from_slice(db.as_bytes());
        rec.extend_from_slice(&rpl.to_le_bytes());
        rec.extend_from_slice(rp.as_bytes());
        rec.push(pl);
        rec.extend_from_slice(precision.as_bytes());
        rec.extend_from_slice(&bl.to_le_bytes());
        rec.extend_from_slice(body);
        let sum = crc32fast::hash(&rec);
        rec.extend_from_slice(&sum.to_le_bytes());
        let mut g = self.file.lock().unwrap_or_else(|p| p.into_inner());
        g.0.write_all(&rec).map_err(|source| SpoolError::Io {
            path: self.path.clone(),
            what: "append",
            source,
        })?;
        g.1 += rec.len() as u64;
        let end = g.1;
        self.committed.send_replace(end);
        Ok(end)
    }

    /// Bytes of complete records so far.
    pub fn len(&self) -> u64 {
        *self.committed.borrow()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// fsync the spool (at phase boundaries).
    pub fn sync(&self) -> Result<(), SpoolError> {
        let g = self.file.lock().unwrap_or_else(|p| p.into_inner());
        g.0.sync_data().map_err(|source| SpoolError::Io {
            path: self.path.clone(),
            what: "fsync",
            source,
        })
    }

    /// A reader from the start of the spool.
    pub fn reader(&self) -> Result<SpoolReader, SpoolError> {
        SpoolReader::open(&self.path, self.committed.subscribe())
    }
}

/// The reading side: follows the spool as it grows.
pub struct SpoolReader {
    path: PathBuf,
    /// `None` while [`SpoolReader::next_batch`] reads on a blocking thread, and after an
    /// error.
    file: Option<BufReader<File>>,
    offset: u64,
    committed: watch::Receiver<u64>,
    /// An error met after the complete records a batch returned: the next batch's answer.
    pending: Option<SpoolError>,
}

impl SpoolReader {
    fn open(path: &Path, committed: watch::Receiver<u64>) -> Result<SpoolReader, SpoolError> {
        let file = File::open(path).map_err(|source| SpoolError::Io {
            path: path.into(),
            what: "open for reading",
            source,
        })?;
        Ok(SpoolReader {
            path: path.into(),
            file: Some(BufReader::with_capacity(1 << 20, file)),
            offset: 0,
            committed,
            pending: None,
        })
    }

    /// Open a finished spool file on its own (no writer): everything in it is committed.
    pub fn open_finished(path: &Path) -> Result<SpoolReader, SpoolError> {
        let len = std::fs::metadata(path)
            .map_err(|source| SpoolError::Io {
                path: path.into(),
                what: "stat",
                source,
            })?
            .len();
        let (_tx, rx) = watch::channel(len);
        SpoolReader::open(path, rx)
    }

    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Bytes committed by the writer but not read yet.
    pub fn lag(&self) -> u64 {
        self.committed.borrow().saturating_sub(self.offset)
    }

    /// The next complete record, or `None` if the reader has caught up with the writer.
    pub fn next_ready(&mut self) -> Result<Option<Record>, SpoolError> {
        if *self.committed.borrow() <= self.offset {
            return Ok(None);
        }
        self.read_record().map(Some)
    }

    /// Wait until the writer commits more than has been read (or it is dropped).
    pub async fn wait_for_more(&mut self) -> bool {
        let off = self.offset;
        self.committed.wait_for(|&c| c > off).await.is_ok()
    }

    /// Complete records from the current offset, about `max_bytes` of bodies at most (at
    /// least one record when one is ready), read on a blocking thread: the disk is never
    /// read on the async workers that serve the capture receiver. Empty when the reader
    /// has caught up. After an error the reader is unusable: the caller stops (a corrupt
    /// spool is fatal to the replay).
    pub async fn next_batch(&mut self, max_bytes: usize) -> Result<Vec<Record>, SpoolError> {
        if let Some(e) = self.pending.take() {
            return Err(e);
        }
        let end = *self.committed.borrow();
        if end <= self.offset {
            return Ok(Vec::new());
        }
        let mut file = self.file.take().ok_or_else(|| self.unusable())?;
        let (path, start) = (self.path.clone(), self.offset);
        let read = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            let (mut off, mut bytes) = (start, 0usize);
            let failed = loop {
                if off >= end || bytes >= max_bytes {
                    break None;
                }
                match decode_record(&mut file, &path, off, end) {
                    Ok((rec, len)) => {
                        off += len;
                        bytes += rec.body.len();
                        out.push(rec);
                    }
                    Err(e) => break Some(e),
                }
            };
            (file, out, off, failed)
        })
        .await;
        let (file, out, off, failed) = read.map_err(|e| SpoolError::Io {
            path: self.path.clone(),
            what: "read on a blocking thread",
            source: std::io::Error::other(e.to_string()),
        })?;
        self.offset = off;
        match failed {
            None => self.file = Some(file),
            // The complete records before it first, as one at a time would; then the error.
            Some(e) if !out.is_empty() => self.pending = Some(e),
            Some(e) => return Err(e),
        }
        Ok(out)
    }

    fn unusable(&self) -> SpoolError {
        SpoolError::Io {
            path: self.path.clone(),
            what: "read",
            source: std::io::Error::other("the reader failed before and cannot go on"),
        }
    }

    /// The record at the current offset. After an error the reader's file position is
    /// undefined: the caller stops (a corrupt spool is fatal to the replay).
    fn read_record(&mut self) -> Result<Record, SpoolError> {
        let end = *self.committed.borrow();
        let unusable = self.unusable();
        let file = self.file.as_mut().ok_or(unusable)?;
        let (record, len) = decode_record(file, &self.path, self.offset, end)?;
        self.offset += len;
        Ok(record)
    }

    /// Skip to a byte offset previously returned by [`SpoolReader::offset`].
    pub fn seek(&mut self, offset: u64) -> Result<(), SpoolError> {
        let unusable = self.unusable();
        self.file
            .as_mut()
            .ok_or(unusable)?
            .seek(SeekFrom::Start(offset))
            .map_err(|source| SpoolError::Io {
                path: self.path.clone(),
                what: "seek",
                source,
            })?;
        self.offset = offset;
        Ok(())
    }
}

/// Why the bytes at an offset are not a record.
enum Bad {
    Io(SpoolError),
    /// A field runs past the end: a record cut short (or a length field gone wrong).
    CutShort(String),
    /// The first byte is not a record's magic byte.
    Magic(u8),
    /// A whole record of `len` bytes whose checksum does not match its content.
    Checksum {
        len: u64,
    },
    /// A checksummed record whose names are not UTF-8 (never written by us).
    NotUtf8,
}

impl Bad {
    fn into_error(self, path: &Path, offset: u64) -> SpoolError {
        let what = match self {
            Bad::Io(e) => return e,
            Bad::CutShort(what) => what,
            Bad::Magic(m) => format!("bad magic byte {m:#x}"),
            Bad::Checksum { len } => {
                format!("the checksum of the {len}-byte record does not match its content")
            }
            Bad::NotUtf8 => "a name is not UTF-8".into(),
        };
        SpoolError::Corrupt {
            path: path.into(),
            offset,
            what,
        }
    }
}

/// Decode the record that starts at byte `start` of the spool from `r`, reading nothing
/// at or past byte `end` (the committed length): a length field that points past `end` is
/// a corrupt record, never an allocation of up to 4 GiB or a read into a record the writer
/// has not finished. Returns the record and its length in bytes.
fn decode_record(
    r: &mut impl Read,
    path: &Path,
    start: u64,
    end: u64,
) -> Result<(Record, u64), SpoolError> {
    decode(r, path, start, end).map_err(|b| b.into_error(path, start))
}

fn decode(r: &mut impl Read, path: &Path, start: u64, end: u64) -> Result<(Record, u64), Bad> {
    let mut pos = start;
    let mut crc = crc32fast::Hasher::new();
    // Read `n` bytes of `field`, within `end`.
    let mut take = |n: usize, field: &str, crc: &mut crc32fast::Hasher| -> Result<Vec<u8>, Bad> {
        let left = end.saturating_sub(pos);
        if n as u64 > left {
            return Err(Bad::CutShort(format!(
                "{field} of {n} bytes runs past the end of the spool ({left} bytes left)"
            )));
        }
        let mut v = vec![0u8; n];
        r.read_exact(&mut v).map_err(|source| {
            Bad::Io(SpoolError::Io {
                path: path.into(),
                what: "read",
                source,
            })
        })?;
        crc.update(&v);
        pos += n as u64;
        Ok(v)
    };
    let magic = take(1, "magic byte", &mut crc)?[0];
    if magic != MAGIC && magic != MAGIC_V1 {
        return Err(Bad::Magic(magic));
    }
    let le = |b: Vec<u8>| {
        b.iter()
            .rev()
            .fold(0usize, |n, &x| (n << 8) | usize::from(x))
    };
    let n = le(take(2, "database name length", &mut crc)?);
    let db = take(n, "database name", &mut crc)?;
    let n = le(take(2, "retention policy length", &mut crc)?);
    let rp = take(n, "retention policy", &mut crc)?;
    let n = le(take(1, "precision length", &mut crc)?);
    let precision = take(n, "precision", &mut crc)?;
    let n = le(take(4, "body length", &mut crc)?);
    let body = take(n, "body", &mut crc)?;
    if magic == MAGIC {
        let sum = crc.clone().finalize();
        let stored = le(take(4, "checksum", &mut crc)?) as u32;
        if stored != sum {
            return Err(Bad::Checksum { len: pos - start });
        }
    }
    let (Ok(db), Ok(rp), Ok(precision)) = (
        String::from_utf8(db),
        String::from_utf8(rp),
        String::from_utf8(precision),
    ) else {
        return Err(Bad::NotUtf8);
    };
    let record = Record {
        db,
        rp,
        precision,
        body,
    };
    Ok((record, pos - start))
}

/// What [`repair_torn_tail`] found past the last complete record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TornTail {
    /// Where the spool now ends (the end of its last complete record).
    pub offset: u64,
    /// The bytes cut off there.
    pub bytes: u64,
}

/// After a crash: cut off a torn tail of the finished spool at `path`, that is a last
/// record cut short or zero bytes to the end of the file (see the module's contract: it
/// was never acknowledged). `None` when the spool ends on a complete record. A record
/// that does not decode and is not such a tail is corruption: an error naming its offset,
/// and the file is left as it is.
pub fn repair_torn_tail(path: &Path) -> Result<Option<TornTail>, SpoolError> {
    let io = |what, source| SpoolError::Io {
        path: path.into(),
        what,
        source,
    };
    let file = File::options()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| io("open for repair", e))?;
    let end = file.metadata().map_err(|e| io("stat", e))?.len();
    let mut r = BufReader::with_capacity(1 << 20, &file);
    let mut offset = 0u64;
    let bad = loop {
        if offset >= end {
            return Ok(None);
        }
        match decode(&mut r, path, offset, end) {
            Ok((_, len)) => offset += len,
            Err(Bad::Io(e)) => return Err(e),
            Err(bad) => break bad,
        }
    };
    // Torn: a record cut short by the end of the file; or, followed by nothing but zeros
    // to the end, zeros where a record should start or a whole record that fails its
    // checksum (a power loss can leave either past the last sync).
    let zeros_from = |from: u64| -> Result<bool, SpoolError> {
        let mut rest = Vec::new();
        let mut f = &file;
        f.seek(SeekFrom::Start(from))
            .and_then(|_| f.take(end.saturating_sub(from)).read_to_end(&mut rest))
            .map_err(|e| io("read the tail", e))?;
        Ok(rest.iter().all(|&b| b == 0))
    };
    let torn = match &bad {
        Bad::CutShort(_) => true,
        Bad::Magic(0) => zeros_from(offset)?,
        Bad::Checksum { len } => zeros_from(offset + len)?,
        Bad::Magic(_) | Bad::NotUtf8 | Bad::Io(_) => false,
    };
    if !torn {
        let e = bad.into_error(path, offset);
        return Err(match e {
            SpoolError::Corrupt { path, offset, what } => SpoolError::Corrupt {
                what: format!("{what}, with data after it: not a torn tail"),
                path,
                offset,
            },
            e => e,
        });
    }
    file.set_len(offset)
        .and_then(|()| file.sync_all())
        .map_err(|e| io("cut off the torn tail", e))?;
    Ok(Some(TornTail {
        offset,
        bytes: end - offset,
    }))
}

/// Every record of a whole spool held in memory, through the same decoder the reader
/// uses: a corrupt or truncated spool is a [`SpoolError`] naming the offset, never a panic
/// (tools, tests and the fuzzer). `path` only names the spool in errors.
pub fn decode_all(path: &Path, bytes: &[u8]) -> Result<Vec<Record>, SpoolError> {
    let end = bytes.len() as u64;
    let mut r = bytes;
    let mut offset = 0;
    let mut out = Vec::new();
    while offset < end {
        let (record, len) = decode_record(&mut r, path, offset, end)?;
        out.push(record);
        offset += len;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn record() -> impl Strategy<Value = Record> {
        (
            ".{0,6}",
            ".{0,6}",
            "(ns|s|ms)?",
            prop::collection::vec(any::<u8>(), 0..64),
        )
            .prop_map(|(db, rp, precision, body)| Record {
                db,
                rp,
                precision,
                body,
            })
    }

    proptest! {
        #[test]
        fn any_bytes_decode_to_records_or_a_corrupt_offset_inside_the_file(
            bytes in prop::collection::vec(any::<u8>(), 0..256),
        ) {
            match decode_all(Path::new("s"), &bytes) {
                Ok(_) => {}
                Err(SpoolError::Corrupt { offset, .. }) => prop_assert!(offset < bytes.len() as u64),
                Err(e) => prop_assert!(false, "unexpected {e}"),
            }
        }

        #[test]
        fn written_records_read_back_and_a_cut_spool_keeps_its_complete_prefix(
            records in prop::collection::vec(record(), 0..6),
            cut in any::<prop::sample::Index>(),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("s");
            let w = SpoolWriter::create(&p).unwrap();
            let mut ends = vec![0u64];
            for r in &records {
                ends.push(w.append(&r.db, &r.rp, &r.precision, &r.body).unwrap());
            }
            let mut reader = w.reader().unwrap();
            for r in &records {
                prop_assert_eq!(reader.next_ready().unwrap(), Some(r.clone()));
            }
            prop_assert_eq!(reader.next_ready().unwrap(), None);
            let bytes = std::fs::read(&p).unwrap();
            prop_assert_eq!(&decode_all(&p, &bytes).unwrap(), &records);
            if !bytes.is_empty() {
                let cut = cut.index(bytes.len());
                // The last record boundary at or before the cut.
                let whole = ends.iter().rposition(|&e| e <= cut as u64).unwrap();
                match decode_all(&p, &bytes[..cut]) {
                    Ok(got) => {
                        prop_assert_eq!(ends[whole], cut as u64);
                        prop_assert_eq!(&got[..], &records[..whole]);
                    }
                    Err(SpoolError::Corrupt { offset, .. }) => prop_assert_eq!(offset, ends[whole]),
                    Err(e) => prop_assert!(false, "unexpected {e}"),
                }
            }
        }
    }

    proptest! {
        /// A power loss leaves the spool cut anywhere, maybe with zeros after the cut
        /// (a file system's unwritten blocks): the repair keeps exactly the complete
        /// records before the cut and says what it removed.
        #[test]
        fn a_torn_tail_is_cut_back_to_the_last_complete_record(
            records in prop::collection::vec(record(), 1..6),
            cut in any::<prop::sample::Index>(),
            zeros in 0usize..48,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("s");
            let w = SpoolWriter::create(&p).unwrap();
            let mut ends = vec![0u64];
            for r in &records {
                ends.push(w.append_durable(&r.db, &r.rp, &r.precision, &r.body).unwrap());
            }
            drop(w);
            let mut bytes = std::fs::read(&p).unwrap();
            let intact = bytes.clone();
            let cut = cut.index(bytes.len() + 1);
            bytes.truncate(cut);
            bytes.extend(std::iter::repeat_n(0u8, zeros));
            std::fs::write(&p, &bytes).unwrap();
            // The zeros may put back what the cut took (a checksum whose last bytes are
            // zeros): a record whose bytes are all there, as written, is complete.
            let same = bytes.iter().zip(&intact).take_while(|(a, b)| a == b).count();
            let whole = ends.iter().rposition(|&e| e <= same as u64).unwrap();
            let got = repair_torn_tail(&p).unwrap();
            if ends[whole] == bytes.len() as u64 {
                prop_assert_eq!(got, None);
            } else {
                prop_assert_eq!(
                    got,
                    Some(TornTail { offset: ends[whole], bytes: bytes.len() as u64 - ends[whole] })
                );
            }
            let after = std::fs::read(&p).unwrap();
            prop_assert_eq!(after.len() as u64, ends[whole]);
            prop_assert_eq!(&decode_all(&p, &after).unwrap(), &records[..whole]);
        }
    }

    #[test]
    fn damage_inside_acknowledged_records_is_corruption_and_the_spool_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        let w = SpoolWriter::create(&p).unwrap();
        w.append_durable("db", "autogen", "ns", b"m v=1 1\n")
            .unwrap();
        w.append_durable("db", "autogen", "ns", b"m v=2 2\n")
            .unwrap();
        drop(w);
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[12] ^= 0x01; // in the first record's body
        std::fs::write(&p, &bytes).unwrap();
        match repair_torn_tail(&p) {
            Err(SpoolError::Corrupt {
                offset: 0, what, ..
            }) => {
                assert!(what.contains("checksum"), "{what}");
                assert!(what.contains("not a torn tail"), "{what}");
            }
            other => panic!("expected corruption at 0, got {other:?}"),
        }
        assert_eq!(std::fs::read(&p).unwrap(), bytes, "nothing is cut");
        // The reader refuses the damaged record too, where it would have replayed it.
        let mut r = SpoolReader::open_finished(&p).unwrap();
        assert!(matches!(
            r.next_ready(),
            Err(SpoolError::Corrupt { offset: 0, .. })
        ));
    }

    #[test]
    fn records_without_a_checksum_from_earlier_builds_still_read() {
        // magic 0xC5, db "d", rp "r", precision "ns", body "x": the first format.
        let v1 = [
            0xC5, 1, 0, b'd', 1, 0, b'r', 2, b'n', b's', 1, 0, 0, 0, b'x',
        ];
        let got = decode_all(Path::new("s"), &v1).unwrap();
        assert_eq!(
            got,
            vec![Record {
                db: "d".into(),
                rp: "r".into(),
                precision: "ns".into(),
                body: b"x".to_vec(),
            }]
        );
    }

    #[test]
    fn a_length_field_past_the_end_is_corrupt_not_a_4_gib_allocation() {
        // magic, empty db, rp and precision, then a body length of 0xFFFF_FFFF.
        let bytes = [0xC5, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, b'x'];
        match decode_all(Path::new("s"), &bytes) {
            Err(SpoolError::Corrupt {
                offset: 0, what, ..
            }) => {
                assert!(
                    what.contains("body of 4294967295 bytes runs past the end"),
                    "{what}"
                )
            }
            other => panic!("expected corrupt, got {other:?}"),
        }
        // The reader on a finished file says the same.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        std::fs::write(&p, bytes).unwrap();
        let mut r = SpoolReader::open_finished(&p).unwrap();
        assert!(matches!(
            r.next_ready(),
            Err(SpoolError::Corrupt { offset: 0, .. })
        ));
    }

    #[tokio::test]
    async fn batches_read_off_the_async_threads_come_in_order_within_their_size() {
        let dir = tempfile::tempdir().unwrap();
        let w = SpoolWriter::create(&dir.path().join("s")).unwrap();
        let mut r = w.reader().unwrap();
        assert!(r.next_batch(100).await.unwrap().is_empty(), "nothing yet");
        for i in 0..10u8 {
            w.append("db", "rp", "ns", &[b'a' + i; 40]).unwrap();
        }
        let mut seen = Vec::new();
        loop {
            let b = r.next_batch(100).await.unwrap();
            if b.is_empty() {
                break;
            }
            assert!(b.len() <= 3, "about 100 bytes of bodies: {}", b.len());
            seen.extend(b.into_iter().map(|rec| rec.body[0]));
        }
        assert_eq!(seen, (0..10u8).map(|i| b'a' + i).collect::<Vec<_>>());
        // Caught up: the offset is the writer's committed end, and new records follow.
        let end = w.append("db", "rp", "ns", b"late").unwrap();
        let b = r.next_batch(1).await.unwrap();
        assert_eq!(b.len(), 1, "at least one record even over the size");
        assert_eq!(r.offset(), end);
    }

    #[tokio::test]
    async fn a_corrupt_record_in_a_batch_is_named_and_the_reader_stops() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        let w = SpoolWriter::create(&p).unwrap();
        w.append("db", "rp", "ns", b"good").unwrap();
        drop(w);
        let good = std::fs::metadata(&p).unwrap().len();
        let mut bytes = std::fs::read(&p).unwrap();
        bytes.extend_from_slice(&[0x00, 1, 2, 3]);
        std::fs::write(&p, &bytes).unwrap();
        let mut r = SpoolReader::open_finished(&p).unwrap();
        let first = r.next_batch(1 << 20).await.unwrap();
        assert_eq!(first.len(), 1, "the complete record before it comes first");
        assert_eq!(first[0].body, b"good");
        match r.next_batch(1 << 20).await {
            Err(SpoolError::Corrupt { offset, .. }) => assert_eq!(offset, good),
            other => panic!("expected corrupt at {good}, got {other:?}"),
        }
        assert!(
            r.next_batch(1 << 20).await.is_err(),
            "no reading past a corrupt record"
        );
    }

    #[test]
    fn records_come_back_in_order_and_only_when_complete() {
        let dir = tempfile::tempdir().unwrap();
        let w = SpoolWriter::create(&dir.path().join("s")).unwrap();
        let mut r = w.reader().unwrap();
        assert_eq!(r.next_ready().unwrap(), None);
        w.append("db 1", "autogen", "ns", b"m v=1 1\n").unwrap();
        w.append("db2", "", "s", b"m v=2 2").unwrap();
        let a = r.next_ready().unwrap().unwrap();
        assert_eq!(
            (a.db.as_str(), a.rp.as_str(), a.precision.as_str()),
            ("db 1", "autogen", "ns")
        );
        assert_eq!(a.body, b"m v=1 1\n");
        let b = r.next_ready().unwrap().unwrap();
        assert_eq!((b.db.as_str(), b.body.as_slice()), ("db2", &b"m v=2 2"[..]));
        assert_eq!(r.next_ready().unwrap(), None);
        assert_eq!(r.lag(), 0);
    }

    #[test]
    fn an_existing_spool_is_never_reused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        let _w = SpoolWriter::create(&p).unwrap();
        assert!(matches!(
            SpoolWriter::create(&p),
            Err(SpoolError::Io { what: "create", .. })
        ));
    }

    #[test]
    fn a_corrupt_spool_names_the_offset() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        {
            let w = SpoolWriter::create(&p).unwrap();
            w.append("d", "r", "ns", b"x").unwrap();
        }
        let mut bytes = std::fs::read(&p).unwrap();
        let first_len = bytes.len() as u64;
        bytes.push(0x00);
        bytes.extend_from_slice(&[0; 16]);
        std::fs::write(&p, &bytes).unwrap();
        let mut r = SpoolReader::open_finished(&p).unwrap();
        r.next_ready().unwrap().unwrap();
        match r.next_ready() {
            Err(SpoolError::Corrupt { offset, .. }) => assert_eq!(offset, first_len),
            other => panic!("expected corrupt, got {other:?}"),
        }
    }
}
