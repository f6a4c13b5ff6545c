//! InfluxDB 1.x's snapshotter protocol on the RPC port (8088): the one `influxd backup`
//! and `influxd restore -portable` speak, spoken here directly so that a shard goes from
//! the source's server into the target's in one pass, with no archive on any disk and no
//! gzip around files that are already compressed.
//!
//! A connection starts with the TCP mux byte (3) and a request type byte. Then:
//! - *metastore backup* (1) and *shard backup* (0): a JSON request, answered with the
//!   metadata blob (magic, length, protobuf, then the node) or an uncompressed tar of the
//!   shard's files, named `db/rp/<shard id>/…` (the server flushes its cache first);
//! - *metastore update* (6): a JSON request, a newline (the Go encoder's), the blob; the
//!   server imports the one database named into its metadata, creates its shards and
//!   answers old → new shard ids. An error answers an empty map (and is only logged);
//! - *shard update* (7): the new shard id (8 bytes, big-endian), then a tar whose names
//!   start with the target's `db/rp/<new id>/`; the server writes the files into the
//!   disabled shard, loads them, and closes the connection. It never says whether that
//!   worked: the migration's verification does.
//!
//! Blocking I/O on std sockets: a shard copy runs on a blocking thread, and [`Cancel`]
//! shuts its sockets to stop it from outside.

use std::collections::BTreeMap;
use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Component, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MUX_HEADER: u8 = 3;
const MAGIC: u64 = 0x5959_0101;
const SHARD_BACKUP: u8 = 0;
const METASTORE_BACKUP: u8 = 1;
const METASTORE_UPDATE: u8 = 6;
const SHARD_UPDATE: u8 = 7;

/// Longest silence accepted from a server: a shard backup first flushes the shard's cache
/// to disk, which takes seconds for a large one.
const IDLE: Duration = Duration::from_secs(600);
/// Bounds on what a server may announce, so a wrong peer cannot make us allocate wildly.
const MAX_META: u64 = 256 << 20;
const MAX_NODE: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("the InfluxDB RPC port {addr}: {what}: {source}")]
    Io {
        addr: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the InfluxDB RPC port {addr}: {msg}")]
    Protocol { addr: String, msg: String },
    #[error("stopped")]
    Cancelled,
    /// The server closed a shard backup without a byte: it failed before it began (1.6
    /// logs why and closes; an empty shard still sends an archive's end). A cache
    /// snapshot of the shard already in progress does that, and passes.
    #[error("the InfluxDB RPC port {addr} answered nothing for shard {shard} ({tries} tries): its InfluxDB log says why (no such shard, or a snapshot of its cache already in progress)")]
    NothingSent {
        addr: String,
        shard: u64,
        tries: u32,
    },
    /// The shard holds deletions its server has not yet compacted into its data files.
    /// InfluxDB's restore keeps only a shard's `.tsm` files (1.6's `Engine.Restore`), so
    /// the deleted points would come back on the target, and no count could tell: a
    /// target may hold more points than the source (writes after the repoint).
    #[error("the InfluxDB RPC port {addr}: shard {shard} holds deletions its server has not applied to its files yet ({file}); InfluxDB's restore ignores such a file, so the deleted points would come back on the target. The source applies them at its next compaction of the shard, usually within seconds to minutes: migrate again then")]
    Deletions {
        addr: String,
        shard: u64,
        file: String,
    },
}

/// An RPC port as this process reaches it: directly over TCP, or a unix socket that an
/// SSH forward listens on. `name` says which port it is, for errors.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub at: At,
    pub name: String,
}

#[derive(Debug, Clone)]
pub enum At {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// One connection to an [`Endpoint`].
enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Conn {
    fn connect(e: &Endpoint) -> std::io::Result<Conn> {
        Ok(match &e.at {
            At::Tcp(a) => {
                let s = TcpStream::connect_timeout(a, Duration::from_secs(10))?;
                s.set_nodelay(true)?;
                Conn::Tcp(s)
            }
            At::Unix(p) => Conn::Unix(UnixStream::connect(p)?),
        })
    }
    fn try_clone(&self) -> std::io::Result<Conn> {
        Ok(match self {
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
        })
    }
    fn shutdown(&self, how: Shutdown) -> std::io::Result<()> {
        match self {
            Conn::Tcp(s) => s.shutdown(how),
            Conn::Unix(s) => s.shutdown(how),
        }
    }
    fn set_timeouts(&self, t: Duration) -> std::io::Result<()> {
        match self {
            Conn::Tcp(s) => {
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))
            }
            Conn::Unix(s) => {
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))
            }
        }
    }
}

impl Read for &Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match *self {
            Conn::Tcp(s) => (&*s).read(buf),
            Conn::Unix(s) => (&*s).read(buf),
        }
    }
}

impl Write for &Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match *self {
            Conn::Tcp(s) => (&*s).write(buf),
            Conn::Unix(s) => (&*s).write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Stops the copies it was handed: their sockets are shut down, so a blocked read or
/// write returns at once. Shared by clones. A connection is watched only while it is
/// open (see [`Watched`]): a source with thousands of shards must not pile up
/// descriptors.
#[derive(Clone, Default)]
pub struct Cancel(Arc<Mutex<Watching>>);

#[derive(Default)]
struct Watching {
    cancelled: bool,
    next: u64,
    conns: std::collections::HashMap<u64, Conn>,
}

/// A connection [`Cancel`] can shut down, until dropped.
struct Watched<'a> {
    conn: Conn,
    cancel: &'a Cancel,
    id: u64,
}

impl std::ops::Deref for Watched<'_> {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        &self.conn
    }
}

impl Drop for Watched<'_> {
    fn drop(&mut self) {
        let mut g = self.cancel.0.lock().unwrap_or_else(|p| p.into_inner());
        g.conns.remove(&self.id);
    }
}

impl Cancel {
    pub fn cancel(&self) {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        g.cancelled = true;
        for (_, s) in g.conns.drain() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    fn watch(&self, conn: Conn) -> Result<Watched<'_>, SnapshotError> {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if g.cancelled {
            let _ = conn.shutdown(Shutdown::Both);
            return Err(SnapshotError::Cancelled);
        }
        g.next += 1;
        let id = g.next;
        if let Ok(c) = conn.try_clone() {
            g.conns.insert(id, c);
        }
        Ok(Watched {
            conn,
            cancel: self,
            id,
        })
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).cancelled
    }

    /// Connections watched now (for tests).
    #[cfg(test)]
    fn watched(&self) -> usize {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).conns.len()
    }
}

/// A budget of bytes per second that the copies share: it bounds what the stream takes
/// from the source's disk and CPU (the source's InfluxDB reads and sends each shard inside
/// the process that serves the writers, so no `nice` can lower it) and from the link.
pub struct Pace {
    /// Bytes per second, all copies together; 0: no limit. A guard may change it while
    /// the copies run (`migration.write_time_guard`).
    per_second: AtomicU64,
    /// Bytes taken so far, all copies together: what a guard measures the stream by.
    taken: AtomicU64,
    /// When the bytes taken so far are due: the next read waits until then.
    due: Mutex<Option<Instant>>,
}

impl Pace {
    /// A pace of `per_second` bytes per second (0: none, until [`Pace::set_rate`]).
    pub fn new(per_second: u64) -> Arc<Pace> {
        Arc::new(Pace {
            per_second: AtomicU64::new(per_second),
            taken: AtomicU64::new(0),
            due: Mutex::new(None),
        })
    }

    /// The rate from the next read on (0: none).
    pub fn set_rate(&self, per_second: u64) {
        self.per_second.store(per_second, Ordering::Relaxed);
    }

    /// The rate now (0: none).
    pub fn rate(&self) -> u64 {
        self.per_second.load(Ordering::Relaxed)
    }

    /// Bytes read through this pace so far.
    pub fn taken(&self) -> u64 {
        self.taken.load(Ordering::Relaxed)
    }

    /// Account for `n` bytes just read; wait (on this blocking thread, in steps short
    /// enough that a cancel is not kept waiting) until the budget allows them.
    fn take(&self, n: usize, cancel: &Cancel) -> Result<(), SnapshotError> {
        self.taken.fetch_add(n as u64, Ordering::Relaxed);
        let per_second = self.rate();
        let until = {
            let mut due = self.due.lock().unwrap_or_else(|p| p.into_inner());
            if per_second == 0 {
                *due = None;
                return Ok(());
            }
            let cost = Duration::from_secs_f64(n as f64 / per_second as f64);
            // Time not used (the copy waited on a server) is not saved up as a burst.
            let start = due.map_or_else(Instant::now, |d| d.max(Instant::now()));
            let until = start + cost;
            *due = Some(until);
            until
        };
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            if cancel.is_cancelled() {
                return Err(SnapshotError::Cancelled);
            }
            std::thread::sleep(left.min(Duration::from_millis(50)));
        }
    }
}

/// The source's side of a copy, read within a [`Pace`].
struct Paced<'a, R> {
    inner: R,
    pace: Option<&'a Pace>,
    cancel: &'a Cancel,
    /// Bytes read so far.
    seen: &'a std::cell::Cell<u64>,
}

impl<R: Read> Read for Paced<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.seen.set(self.seen.get() + n as u64);
        if let Some(p) = self.pace {
            p.take(n, self.cancel)
                .map_err(|_| std::io::Error::other("stopped"))?;
        }
        Ok(n)
    }
}

fn io<'a>(e: &'a Endpoint, what: &'static str) -> impl Fn(std::io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io {
        addr: e.name.clone(),
        what,
        source,
    }
}

fn protocol(e: &Endpoint, msg: String) -> SnapshotError {
    SnapshotError::Protocol {
        addr: e.name.clone(),
        msg,
    }
}

/// Open a request of `typ`, with its JSON body (none for a shard update).
fn open<'a>(
    at: &Endpoint,
    typ: u8,
    body: &[u8],
    cancel: &'a Cancel,
) -> Result<Watched<'a>, SnapshotError> {
    let s = cancel.watch(Conn::connect(at).map_err(io(at, "connect"))?)?;
    s.set_timeouts(IDLE).map_err(io(at, "set a timeout"))?;
    let mut head = vec![MUX_HEADER, typ];
    head.extend_from_slice(body);
    (&*s).write_all(&head).map_err(io(at, "send the request"))?;
    Ok(s)
}

fn read_u64(mut s: &Conn, at: &Endpoint, what: &'static str) -> Result<u64, SnapshotError> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b).map_err(io(at, what))?;
    Ok(u64::from_be_bytes(b))
}

/// The server's whole metadata (databases, retention policies, shard groups, users), as
/// the opaque blob a metastore update takes back.
pub fn metastore(at: &Endpoint, cancel: &Cancel) -> Result<Vec<u8>, SnapshotError> {
    let body = serde_json::json!({ "Type": METASTORE_BACKUP }).to_string() + "\n";
    let s = open(at, METASTORE_BACKUP, body.as_bytes(), cancel)?;
    let magic = read_u64(&s, at, "read the metadata header")?;
    if magic != MAGIC {
        return Err(protocol(at, format!("the metadata starts with {magic:#x}, not {MAGIC:#x}: is this InfluxDB 1.x's RPC port?")));
    }
    let len = read_u64(&s, at, "read the metadata length")?;
    if len > MAX_META {
        return Err(protocol(
            at,
            format!("announces {len} bytes of metadata (more than {MAX_META})"),
        ));
    }
    let mut blob = vec![0u8; len as usize];
    (&*s)
        .read_exact(&mut blob)
        .map_err(io(at, "read the metadata"))?;
    let node = read_u64(&s, at, "read the node length")?;
    if node > MAX_NODE {
        return Err(protocol(at, format!("announces a node of {node} bytes")));
    }
    std::io::copy(&mut (&*s).take(node), &mut std::io::sink()).map_err(io(at, "read the node"))?;
    Ok(blob)
}

/// Import database `db` of `meta` (a [`metastore`] blob) into the server at `at`: the
/// database, its retention policies and its shards (empty) appear there. Answers each
/// source shard id with its new id. The server answers an empty map for any error
/// (among them: `db` exists already, a blob it could not read).
pub fn import_database(
    at: &Endpoint,
    db: &str,
    meta: &[u8],
    cancel: &Cancel,
) -> Result<BTreeMap<u64, u64>, SnapshotError> {
    let req = serde_json::json!({
        "Type": METASTORE_UPDATE,
        "BackupDatabase": db,
        "RestoreDatabase": db,
        "UploadSize": meta.len(),
    });
    // One write: the server reads the blob with one read after its JSON decoder's buffer.
    let mut body = req.to_string().into_bytes();
    body.push(b'\n');
    body.extend_from_slice(meta);
    let s = open(at, METASTORE_UPDATE, &body, cancel)?;
    let magic = read_u64(&s, at, "read the shard map header")?;
    if magic != MAGIC {
        return Err(protocol(
            at,
            format!("the shard map starts with {magic:#x}, not {MAGIC:#x}"),
        ));
    }
    let n = read_u64(&s, at, "read the shard map length")?;
    if n > 1 << 24 {
        return Err(protocol(at, format!("announces {n} shards")));
    }
    let mut map = BTreeMap::new();
    for _ in 0..n {
        let old = read_u64(&s, at, "read the shard map")?;
        let new = read_u64(&s, at, "read the shard map")?;
        map.insert(old, new);
    }
    Ok(map)
}

/// What one shard copy moved.
#[derive(Debug, Default, Clone)]
pub struct Copied {
    pub files: u64,
    pub bytes: u64,
    /// Every file sent, with its digest: what [`shard_files`] on the target must find.
    pub sent: Vec<ShardFile>,
}

/// One file of a shard's archive: its path inside the shard's directory (a TSM file is
/// `<generation>-<sequence>.tsm`), its size and the SHA-256 of its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardFile {
    pub name: String,
    pub size: u64,
    pub sha256: [u8; 32],
}

impl ShardFile {
    fn is_data(&self) -> bool {
        is_tsm_name(&self.name)
    }
    fn is_tombstone(&self) -> bool {
        is_tombstone(std::path::Path::new(&self.name))
    }
}

/// A reader of an archive entry's data that digests what passes through it, and fails
/// when the data ends before the `expected` size its header announced: `tar` then only
/// reads less (and its builder would pad the shorter data as if it were whole).
struct Digesting<R> {
    inner: R,
    sha: ring::digest::Context,
    size: u64,
    expected: u64,
}

impl<R> Digesting<R> {
    fn new(inner: R, expected: u64) -> Self {
        Digesting {
            inner,
            sha: ring::digest::Context::new(&ring::digest::SHA256),
            size: 0,
            expected,
        }
    }
    fn finish(self, name: String) -> ShardFile {
        let mut sha256 = [0u8; 32];
        sha256.copy_from_slice(self.sha.finish().as_ref());
        ShardFile {
            name,
            size: self.size,
            sha256,
        }
    }
}

impl<R: Read> Read for Digesting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() && self.size < self.expected {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "the archive stopped inside an entry, {} of its {} bytes read",
                    self.size, self.expected
                ),
            ));
        }
        self.sha.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
}

/// A TSM file's name: `<generation>-<sequence>.tsm`, both decimal.
fn is_tsm_name(name: &str) -> bool {
    name.strip_suffix(".tsm")
        .and_then(|stem| stem.split_once('-'))
        .is_some_and(|(g, q)| {
            [g, q]
                .iter()
                .all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
}

/// The path of an archive entry `db/rp/<shard>/rest…` inside its shard's directory.
fn in_shard(name: &std::path::Path) -> Option<String> {
    let parts: Vec<_> = name.components().collect();
    if parts.len() < 4 || !parts.iter().all(|c| matches!(c, Component::Normal(_))) {
        return None;
    }
    let rest: PathBuf = parts[3..].iter().collect();
    Some(rest.to_string_lossy().into_owned())
}

/// Copy shard `old` of the server at `from` into shard `new` of the server at `to` (made
/// by [`import_database`]), streaming: the source's tar, renamed entry by entry into the
/// target's shard directory, never held whole. Returns once the target closed the
/// import, i.e. once it has loaded the files.
///
/// A backup that sent nothing is tried again, a few times (see
/// [`SnapshotError::NothingSent`]).
pub fn copy_shard(
    from: &Endpoint,
    old: u64,
    to: &Endpoint,
    new: u64,
    pace: Option<&Pace>,
    cancel: &Cancel,
) -> Result<Copied, SnapshotError> {
    until_something_sent(from, old, cancel, || {
        copy_shard_once(from, old, to, new, pace, cancel)
    })
}

/// Tries of a shard backup that sends nothing. InfluxDB 1.6 sends nothing while a
/// snapshot of the shard's cache is in progress, and on a server at the idle nice value
/// with both cores busy one outlasted 5 tries 300 ms apart (100M points, stop 27): the
/// pauses grow from 300 ms to 2 s, 12.1 s in all ([`nothing_sent_pause`]; the script
/// read on the host waits the same).
pub const NOTHING_SENT_TRIES: u32 = 9;

/// The pause after the `failed`-th backup that sent nothing.
fn nothing_sent_pause(failed: u32) -> Duration {
    Duration::from_millis((300u64 << failed.saturating_sub(1).min(8)).min(2000))
}

/// Run `once` until it returns anything but [`SnapshotError::NothingSent`], at most
/// [`NOTHING_SENT_TRIES`] times.
fn until_something_sent<T>(
    at: &Endpoint,
    shard: u64,
    cancel: &Cancel,
    mut once: impl FnMut() -> Result<T, SnapshotError>,
) -> Result<T, SnapshotError> {
    for failed in 1..NOTHING_SENT_TRIES {
        match once() {
            Err(SnapshotError::NothingSent { .. }) => {
                std::thread::sleep(nothing_sent_pause(failed));
                if cancel.is_cancelled() {
                    return Err(SnapshotError::Cancelled);
                }
            }
            r => return r,
        }
    }
    once().map_err(|e| match e {
        SnapshotError::NothingSent { .. } => SnapshotError::NothingSent {
            addr: at.name.clone(),
            shard,
            tries: NOTHING_SENT_TRIES,
        },
        e => e,
    })
}

fn copy_shard_once(
    from: &Endpoint,
    old: u64,
    to: &Endpoint,
    new: u64,
    pace: Option<&Pace>,
    cancel: &Cancel,
) -> Result<Copied, SnapshotError> {
    let body = serde_json::json!({ "Type": SHARD_BACKUP, "ShardID": old }).to_string() + "\n";
    let src = open(from, SHARD_BACKUP, body.as_bytes(), cancel)?;
    let mut head = Vec::with_capacity(8);
    head.extend_from_slice(&new.to_be_bytes());
    let dst = open(to, SHARD_UPDATE, &head, cancel)?;
    let mut copied = Copied::default();
    let seen = std::cell::Cell::new(0u64);
    let paced = Paced {
        inner: &*src,
        pace,
        cancel,
        seen: &seen,
    };
    let mut archive = tar::Archive::new(BufReader::with_capacity(256 << 10, paced));
    let mut out = tar::Builder::new(BufWriter::with_capacity(256 << 10, &*dst));
    // Whether the upload stopped inside an entry (its header sent, not all its data).
    let mid_entry = std::cell::Cell::new(false);
    let mut entries = || -> Result<(), SnapshotError> {
        let entries = archive
            .entries()
            .map_err(io(from, "read the shard's archive"))?;
        for entry in entries {
            let mut entry = entry.map_err(io(from, "read the shard's archive"))?;
            let name = entry
                .path()
                .map_err(io(from, "read an entry's name"))?
                .into_owned();
            if is_tombstone(&name) {
                return Err(SnapshotError::Deletions {
                    addr: from.name.clone(),
                    shard: old,
                    file: name.display().to_string(),
                });
            }
            let renamed = rename(&name, new).ok_or_else(|| {
                protocol(
                    from,
                    format!("shard {old}'s archive holds {name:?}, not db/rp/{old}/file"),
                )
            })?;
            // `rename` accepted the name, so it has a path inside the shard.
            let file = in_shard(&name).unwrap_or_default();
            if !is_tsm_name(&file) {
                // 1.6 links a shard's files by the name each has as it links them: a
                // compaction that replaces a file in that instant renames it to
                // `….tsm.tmp`, which InfluxDB's restore skips, points and all.
                return Err(protocol(
                    from,
                    format!("shard {old}'s archive holds {file:?}, not a TSM file: InfluxDB's restore would skip it and the points in it (a file a compaction was replacing as the backup linked it); migrate again"),
                ));
            }
            let mut header = entry.header().clone();
            let size = entry.size();
            copied.bytes += size;
            copied.files += 1;
            let mut digesting = Digesting::new(&mut entry, size);
            mid_entry.set(true);
            out.append_data(&mut header, &renamed, &mut digesting)
                .map_err(|e| {
                    if cancel.is_cancelled() {
                        SnapshotError::Cancelled
                    } else if e.kind() == std::io::ErrorKind::UnexpectedEof {
                        io(from, "read the shard's archive")(e)
                    } else {
                        io(to, "send the shard")(e)
                    }
                })?;
            mid_entry.set(false);
            copied.sent.push(digesting.finish(file));
        }
        if seen.get() == 0 {
            return Err(SnapshotError::NothingSent {
                addr: from.name.clone(),
                shard: old,
                tries: 1,
            });
        }
        Ok(())
    };
    if let Err(e) = entries().and_then(|()| archive_ended(archive.into_inner(), from, old)) {
        // The target's restore must fail and load none of it (tsm1 `overlay` replaces
        // files only once the whole archive was read), not the entries sent so far. Go's
        // tar reader takes an upload that ends where a header would start, or inside an
        // entry's padding, for the archive's end; one that ends inside an entry's data or
        // a header is an error. So: send what is buffered; stopped between entries, add
        // half a header; and cut the upload off before the builder, dropped, would end
        // the archive.
        let w = out.get_mut();
        let _ = w.flush();
        if !mid_entry.get() {
            let _ = w.write_all(&[0xff; 256]).and_then(|()| w.flush());
        }
        let _ = dst.shutdown(Shutdown::Both);
        return Err(e);
    }
    let mut w = out
        .into_inner()
        .map_err(io(to, "end the shard's archive"))?;
    w.flush().map_err(io(to, "send the shard"))?;
    drop(w);
    dst.shutdown(Shutdown::Write)
        .map_err(io(to, "end the shard's upload"))?;
    // The server closes the connection once its import returned; anything else it sends
    // is not part of the protocol.
    let mut rest = Vec::new();
    (&*dst)
        .take(1 << 16)
        .read_to_end(&mut rest)
        .map_err(io(to, "wait for the shard's import"))?;
    Ok(copied)
}

/// The files shard `shard` of the server at `at` holds now, each with its digest, read
/// through the server's own shard backup: the server first writes its cache out to a new
/// file, then sends the files its engine has open (hard links of them, tombstones
/// included). A backup the server could not make (no such shard, among others) answers
/// nothing, which is an error, after a few tries.
pub fn shard_files(
    at: &Endpoint,
    shard: u64,
    cancel: &Cancel,
) -> Result<Vec<ShardFile>, SnapshotError> {
    until_something_sent(at, shard, cancel, || shard_files_once(at, shard, cancel))
}

fn shard_files_once(
    at: &Endpoint,
    shard: u64,
    cancel: &Cancel,
) -> Result<Vec<ShardFile>, SnapshotError> {
    let body = serde_json::json!({ "Type": SHARD_BACKUP, "ShardID": shard }).to_string() + "\n";
    let s = open(at, SHARD_BACKUP, body.as_bytes(), cancel)?;
    let seen = std::cell::Cell::new(0u64);
    let counted = Paced {
        inner: &*s,
        pace: None,
        cancel,
        seen: &seen,
    };
    let mut archive = tar::Archive::new(BufReader::with_capacity(256 << 10, counted));
    let mut files = Vec::new();
    let entries = archive
        .entries()
        .map_err(io(at, "read the shard's archive"))?;
    for entry in entries {
        let mut entry = entry.map_err(io(at, "read the shard's archive"))?;
        let name = entry
            .path()
            .map_err(io(at, "read an entry's name"))?
            .into_owned();
        let file = in_shard(&name).ok_or_else(|| {
            protocol(
                at,
                format!("shard {shard}'s archive holds {name:?}, not db/rp/{shard}/file"),
            )
        })?;
        let size = entry.size();
        let mut digesting = Digesting::new(&mut entry, size);
        std::io::copy(&mut digesting, &mut std::io::sink()).map_err(|e| {
            if cancel.is_cancelled() {
                SnapshotError::Cancelled
            } else {
                io(at, "read the shard's archive")(e)
            }
        })?;
        files.push(digesting.finish(file));
    }
    if seen.get() == 0 {
        return Err(SnapshotError::NothingSent {
            addr: at.name.clone(),
            shard,
            tries: 1,
        });
    }
    archive_ended(archive.into_inner(), at, shard)?;
    Ok(files)
}

/// The most zeros accepted after an archive's first end block (Go's writer sends 512).
const TRAILER_MAX: u64 = 64 << 10;

/// Check what is left of a shard's archive once `tar` has read its entries: InfluxDB's
/// tar writer ends every archive with two zero blocks, and `tar` stops reading at the
/// first. Nothing left means the stream stopped on an entry's boundary (the server
/// died, the connection was closed), which `tar` takes for the end: every file after
/// it would be missing from a shard that looks whole. (A stream cut inside a header is
/// already an error to `tar`, and one inside an entry's data is one to [`Digesting`].)
fn archive_ended(rest: impl Read, at: &Endpoint, shard: u64) -> Result<(), SnapshotError> {
    let mut tail = Vec::new();
    rest.take(TRAILER_MAX + 1)
        .read_to_end(&mut tail)
        .map_err(io(at, "read the end of the shard's archive"))?;
    if (512..=TRAILER_MAX as usize).contains(&tail.len()) && tail.iter().all(|b| *b == 0) {
        return Ok(());
    }
    Err(protocol(
        at,
        format!(
            "shard {shard}'s archive stopped before its end, or went on after it ({} bytes after its last entry, where InfluxDB sends its end's zero blocks and nothing more): the server or the connection stopped short",
            tail.len()
        ),
    ))
}

/// What [`shard_files_on_host_cmd`] runs on the server's own host, with `python3`: the
/// same shard backup as [`shard_files`], read from the RPC port as that host reaches it
/// and digested there, several shards at once, so that one line per shard crosses SSH
/// instead of the shard's bytes. Reads the shard ids from the first line of its stdin
/// ([`shard_files_on_host_input`]: no argument limit on how many) and stops at once when
/// its stdin ends after that (the read was given up: a dropped SSH channel kills nothing
/// on the remote end by itself). Prints one JSON object per shard, in the order asked:
/// its `files` (`name`, `size`, `sha256` in hex), or `nothing_sent` (the server answered
/// nothing that many times, the pauses growing as [`nothing_sent_pause`]'s), or the
/// `error` that stopped its reading.
const ON_HOST_SCRIPT: &str = r#"import concurrent.futures, hashlib, json, os, socket, sys, threading, time
host, port, tries, at_once = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
# The raw descriptor: a thread blocked in sys.stdin's buffer aborts the interpreter's exit.
line = b""
while not line.endswith(b"\n"):
    more = os.read(0, 1 << 16)
    if not more:
        break
    line += more
shards = [int(a) for a in line.split()]

def given_up():
    while os.read(0, 1 << 16):
        pass
    os._exit(3)

threading.Thread(target=given_up, daemon=True).start()

BLOCK, TRAILER_MAX = 512, 1 << 16
ZEROS = bytes(BLOCK)

def fill(s, view):
    # As many bytes as `view` holds, unless the stream ends first: how many came.
    got = 0
    while got < len(view):
        k = s.recv_into(view[got:])
        if not k:
            break
        got += k
    return got

def octal(field, what, at):
    # Octal digits only, as tar's reader takes them (int() would also take "1_0", "0o7").
    digits = bytes(field).split(b"\0", 1)[0].strip(b" ")
    if not digits or digits.strip(b"01234567"):
        raise ValueError("a bad header at %d: its %s is not an octal number" % (at, what))
    return int(digits, 8)

def pax_records(b, at):
    # A PAX extended header's "<length> <key>=<value>\n" records.
    out, i = {}, 0
    try:
        while i < len(b):
            sp = b.index(b" ", i)
            if not b[i:sp].isdigit():
                raise ValueError
            n = int(b[i:sp])
            key, eq, value = b[sp + 1:i + n - 1].partition(b"=")
            if n <= sp - i or not eq or b[i + n - 1:i + n] != b"\n" or key in out:
                raise ValueError
            out[key] = value
            i += n
    except ValueError:
        raise ValueError("a bad PAX header at %d" % at)
    return out

def files(shard):
    # The archive is parsed here, 512-byte headers and all, rather than by tarfile, which
    # copies each byte three or four times: the data goes from the socket into one
    # buffer and from there into the digest. Go's writer (InfluxDB's) sends each file as
    # one ustar entry, after a PAX header when its path needs one (non-ASCII, or too long
    # for ustar), and ends with two zero blocks; anything else is an error, never a
    # shorter archive.
    req = bytes([3, 0]) + (json.dumps({"Type": 0, "ShardID": shard}) + "\n").encode()
    head, data = memoryview(bytearray(BLOCK)), memoryview(bytearray(1 << 20))
    for attempt in range(tries):
        if attempt:
            time.sleep(min(0.3 * 2 ** (attempt - 1), 2.0))
        with socket.create_connection((host, port), timeout=600) as s:
            s.sendall(req)
            got, at, out, pax, pax_at = fill(s, head), 0, [], None, 0
            if not got:
                continue
            while True:
                if got < BLOCK:
                    raise EOFError("the archive stopped before its end (in a header at %d)" % at)
                if head == ZEROS:
                    if pax is not None:
                        raise ValueError("a PAX header at %d describes no entry" % pax_at)
                    # Its end: the rest must be zeros, at least one more block of them.
                    rest = 0
                    while rest <= TRAILER_MAX:
                        k = s.recv_into(data)
                        if not k:
                            break
                        if data[:k] != bytes(k):
                            raise EOFError("the archive went on after its end (at %d)" % (at + BLOCK + rest))
                        rest += k
                    if not BLOCK <= rest <= TRAILER_MAX:
                        raise EOFError("the archive stopped before its end (%d bytes of zeros after its last entry at %d)" % (BLOCK + rest, at))
                    return {"files": out}
                if octal(head[148:156], "checksum", at) != sum(head[:148]) + 8 * 32 + sum(head[156:]):
                    raise ValueError("a bad header at %d: its checksum does not match" % at)
                if head[124] & 0x80:
                    raise ValueError("a header at %d gives its size in base 256" % at)
                size = octal(head[124:136], "size", at)
                if head[156] == ord("x") and head[257:263] == b"ustar\0" and pax is None and size <= 1 << 20:
                    body = memoryview(bytearray(size + -size % BLOCK))
                    if fill(s, body) < len(body):
                        raise EOFError("the archive stopped inside a PAX header at %d" % at)
                    pax, pax_at = pax_records(bytes(body[:size]), at), at
                    at += BLOCK + len(body)
                    got = fill(s, head)
                    continue
                if head[156] not in b"0\0":
                    raise ValueError("a header at %d is not a plain file's (type %r)" % (at, bytes(head[156:157])))
                name = bytes(head[:100]).split(b"\0", 1)[0]
                prefix = bytes(head[345:500]).split(b"\0", 1)[0] if head[257:263] == b"ustar\0" else b""
                if prefix:
                    name = prefix + b"/" + name
                if pax is not None:
                    name = pax.get(b"path", name)
                    if not pax.get(b"size", b"0").isdigit():
                        raise ValueError("a bad PAX header at %d: its size is not a number" % at)
                    size = int(pax.get(b"size", size))
                    pax = None
                h, left = hashlib.sha256(), size
                while left:
                    k = s.recv_into(data, min(left, len(data)))
                    if not k:
                        raise EOFError("the archive stopped inside an entry at %d (%d of its %d bytes)" % (at, size - left, size))
                    h.update(data[:k])
                    left -= k
                pad = -size % BLOCK
                if fill(s, data[:pad]) < pad:
                    raise EOFError("the archive stopped inside an entry's padding at %d" % at)
                out.append({"name": name.decode("utf-8", "surrogateescape"), "size": size, "sha256": h.hexdigest()})
                at += BLOCK + size + pad
                got = fill(s, head)
    return {"nothing_sent": tries}

def read(shard):
    try:
        r = files(shard)
    except Exception as e:
        r = {"error": "%s: %s" % (type(e).__name__, e)}
    r["shard"] = shard
    return r

with concurrent.futures.ThreadPoolExecutor(at_once) as pool:
    for r in pool.map(read, shards):
        print(json.dumps(r), flush=True)
"#;

/// Exit code of a shell whose command is not there: no `python3` on the host.
pub const NO_INTERPRETER: i32 = 127;

/// The shell command that reads shards back on the host of the server whose RPC port
/// that host reaches at `rpc_host`:`rpc_port` ([`ON_HOST_SCRIPT`]), `at_once` at a time,
/// at nice value `nice`, with Debian's `/usr/bin/python3` (else the first `python3` on
/// the path; `-I -S`: nothing from the user's environment or site packages). Which
/// shards: [`shard_files_on_host_input`] on its stdin, held open until its output ends.
/// Exits [`NO_INTERPRETER`] when the host has no `python3`.
pub fn shard_files_on_host_cmd(nice: u8, rpc_host: &str, rpc_port: u16, at_once: usize) -> String {
    on_host_cmd(
        &["/usr/bin/python3", "python3"],
        nice,
        rpc_host,
        rpc_port,
        at_once,
    )
}

/// What [`shard_files_on_host_cmd`] reads on its stdin: the ids of the shards to read.
pub fn shard_files_on_host_input(shards: &[u64]) -> Vec<u8> {
    let ids: Vec<String> = shards.iter().map(u64::to_string).collect();
    format!("{}\n", ids.join(" ")).into_bytes()
}

/// [`shard_files_on_host_cmd`] with the first of `pythons` the host has.
fn on_host_cmd(
    pythons: &[&str],
    nice: u8,
    rpc_host: &str,
    rpc_port: u16,
    at_once: usize,
) -> String {
    let find: Vec<String> = pythons
        .iter()
        .map(|p| format!("command -v {}", crate::util::shell_quote(p)))
        .collect();
    format!(
        "p=$({}) || exit {NO_INTERPRETER}; exec nice -n {nice} \"$p\" -I -S -c {} {} {rpc_port} {NOTHING_SENT_TRIES} {}",
        find.join(" || "),
        crate::util::shell_quote(ON_HOST_SCRIPT),
        crate::util::shell_quote(rpc_host),
        at_once.max(1),
    )
}

/// Each shard's files as [`shard_files_on_host_cmd`] printed them in `out`, or why they
/// could not be read; `Err` when `out` is not that command's answer. `at` names the RPC
/// port, for errors.
#[allow(clippy::type_complexity)]
pub fn shard_files_on_host(
    at: &str,
    out: &str,
) -> Result<Vec<(u64, Result<Vec<ShardFile>, SnapshotError>)>, SnapshotError> {
    #[derive(serde::Deserialize)]
    struct Shard {
        shard: u64,
        files: Option<Vec<File>>,
        nothing_sent: Option<u32>,
        error: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct File {
        name: String,
        size: u64,
        sha256: String,
    }
    let protocol = |msg: String| SnapshotError::Protocol {
        addr: at.to_string(),
        msg,
    };
    let file = |shard: u64, f: File| {
        let name = in_shard(std::path::Path::new(&f.name)).ok_or_else(|| {
            protocol(format!(
                "shard {shard}'s archive holds {:?}, not db/rp/{shard}/file",
                f.name
            ))
        })?;
        let sha256 = sha256_from_hex(&f.sha256).ok_or_else(|| {
            protocol(format!(
                "shard {shard} read back on its host: {:?} is not a SHA-256",
                f.sha256
            ))
        })?;
        Ok(ShardFile {
            name,
            size: f.size,
            sha256,
        })
    };
    out.lines()
        .map(|l| {
            let s: Shard = serde_json::from_str(l)
                .map_err(|e| protocol(format!("reading shards back on its host: {e} in {l:?}")))?;
            let got = match (s.files, s.nothing_sent, s.error) {
                (Some(files), None, None) => {
                    files.into_iter().map(|f| file(s.shard, f)).collect()
                }
                (None, Some(tries), None) => Err(SnapshotError::NothingSent {
                    addr: at.to_string(),
                    shard: s.shard,
                    tries,
                }),
                (None, None, Some(e)) => Err(protocol(format!(
                    "reading shard {} back on its host: {e}",
                    s.shard
                ))),
                _ => {
                    return Err(protocol(format!(
                        "reading shards back on its host: {l:?} is not one shard's files, nothing sent, or error"
                    )))
                }
            };
            Ok((s.shard, got))
        })
        .collect()
}

fn sha256_from_hex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 32];
    for (o, pair) in out.iter_mut().zip(s.as_bytes().chunks(2)) {
        *o = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(out)
}

/// Why a shard whose files read back as `now` ([`shard_files`]) may not serve every point
/// of the data files `sent` into it, unchanged; `None` when every data file sent is there
/// with the same bytes and no deletion is pending, and at least one was sent. Files added
/// since (the target's cache written out: replays) are allowed: they can only add points
/// or newer values.
pub fn files_differ(sent: &[ShardFile], now: &[ShardFile]) -> Option<String> {
    if !sent.iter().any(ShardFile::is_data) {
        // InfluxDB 1.6 ends a shard's archive as if whole when it cannot list the
        // shard's directory (`pkg/tar.Stream` closes its writer on any error): an empty
        // archive does not show that the shard was empty.
        return Some(
            "its backup sent no TSM file (an empty shard, or one the source could not list)".into(),
        );
    }
    if let Some(t) = now.iter().find(|f| f.is_tombstone()) {
        return Some(format!("it holds deletions ({})", t.name));
    }
    if let Some(f) = sent.iter().find(|f| !f.is_data()) {
        return Some(format!("{} was sent, not a TSM file", f.name));
    }
    for f in sent {
        match now.iter().find(|n| n.name == f.name) {
            None => {
                return Some(format!(
                    "{} is no longer there (compacted or removed)",
                    f.name
                ))
            }
            Some(n) if n != f => {
                return Some(format!(
                    "{} differs ({} bytes sent, {} there)",
                    f.name, f.size, n.size
                ))
            }
            Some(_) => {}
        }
    }
    None
}

/// A TSM tombstone file (`<generation>-<sequence>.tombstone`): deletions not yet
/// compacted into the data files.
pub fn is_tombstone(name: &std::path::Path) -> bool {
    name.extension().is_some_and(|e| e == "tombstone")
}

/// A shell command that prints the first tombstone file of each shard archive
/// (`*.tar.gz`, as `influxd backup -portable` writes them) in directory `dir`, nothing
/// when none holds one (see [`SnapshotError::Deletions`]), and fails naming an archive
/// it cannot list.
pub fn tombstones_in_archives_cmd(dir: &str) -> String {
    format!(
        "for f in {}/*.tar.gz; do [ -e \"$f\" ] || continue; l=$(tar -tzf \"$f\") || {{ echo \"cannot list $f\" >&2; exit 2; }}; printf '%s\\n' \"$l\" | grep -m1 '\\.tombstone$'; done; exit 0",
        crate::util::shell_quote(dir)
    )
}

/// `db/rp/<old>/rest…` → `db/rp/<new>/rest…`.
fn rename(name: &std::path::Path, new: u64) -> Option<PathBuf> {
    let parts: Vec<_> = name.components().collect();
    if parts.len() < 4 || !parts.iter().all(|c| matches!(c, Component::Normal(_))) {
        return None;
    }
    let mut p = PathBuf::new();
    p.push(parts[0]);
    p.push(parts[1]);
    p.push(new.to_string());
    for c in &parts[3..] {
        p.push(c);
    }
    Some(p)
}

#[cfg(test)]
mod tests {
    /// Run `tombstones_in_archives_cmd` on `dir` with the system's `sh`: (exit code,
    /// stdout, stderr).
    fn list_tombstones(dir: &std::path::Path) -> (Option<i32>, String, String) {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(super::tombstones_in_archives_cmd(
                &dir.display().to_string(),
            ))
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        )
    }

    /// Make `<dir>/<archive>` holding `files` under `db/rp/1/`, with the system's tar.
    fn archive(dir: &std::path::Path, name: &str, files: &[&str]) {
        let tree = tempfile::tempdir().unwrap();
        let shard = tree.path().join("db/rp/1");
        std::fs::create_dir_all(&shard).unwrap();
        for f in files {
            std::fs::write(shard.join(f), b"data").unwrap();
        }
        let ok = std::process::Command::new("tar")
            .arg("-czf")
            .arg(dir.join(name))
            .arg("-C")
            .arg(tree.path())
            .arg("db")
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }

    #[test]
    fn the_dump_check_names_a_tombstone_and_fails_on_an_archive_it_cannot_read() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("a dump dir");
        std::fs::create_dir(&dir).unwrap();
        assert_eq!(
            list_tombstones(&dir),
            (Some(0), String::new(), String::new())
        );
        archive(&dir, "x.s1.tar.gz", &["000000001-000000002.tsm"]);
        assert_eq!(
            list_tombstones(&dir),
            (Some(0), String::new(), String::new())
        );
        archive(
            &dir,
            "x.s2.tar.gz",
            &[
                "000000001-000000001.tsm",
                "000000002-000000001.tombstone",
                "000000002-000000001.tsm",
            ],
        );
        assert_eq!(
            list_tombstones(&dir),
            (
                Some(0),
                "db/rp/1/000000002-000000001.tombstone".to_string(),
                String::new()
            )
        );
        std::fs::write(dir.join("x.s3.tar.gz"), b"not gzip").unwrap();
        let (code, _, err) = list_tombstones(&dir);
        assert_eq!(code, Some(2), "{err}");
        assert!(
            err.contains("cannot list") && err.contains("x.s3.tar.gz"),
            "{err}"
        );
    }

    use super::*;
    use std::path::Path;

    #[test]
    fn a_pace_spreads_what_was_read_over_its_rate_and_stops_when_cancelled() {
        let cancel = Cancel::default();
        // 0 is no limit: 10 MB pass at once, and are counted.
        let free = Pace::new(0);
        let t = Instant::now();
        for _ in 0..10 {
            free.take(1_000_000, &cancel).unwrap();
        }
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(free.taken(), 10_000_000);
        let pace = Pace::new(100_000);
        let t = Instant::now();
        for _ in 0..5 {
            pace.take(10_000, &cancel).unwrap();
        }
        // 50 KB at 100 KB/s: never sooner than half a second.
        assert!(
            t.elapsed() >= Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
        // A rate changed while copies run holds from the next read on: 50 KB more at
        // 50 KB/s take a second more, and lifting the limit lets the rest through.
        pace.set_rate(50_000);
        let t = Instant::now();
        for _ in 0..5 {
            pace.take(10_000, &cancel).unwrap();
        }
        assert!(
            t.elapsed() >= Duration::from_millis(900),
            "{:?}",
            t.elapsed()
        );
        pace.set_rate(0);
        let t = Instant::now();
        pace.take(10_000_000, &cancel).unwrap();
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(pace.rate(), 0);
        assert_eq!(pace.taken(), 10_100_000);
        // A cancel ends a wait long before its budget would have.
        let slow = Pace::new(1);
        let c = cancel.clone();
        let stopper = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            c.cancel();
        });
        assert!(matches!(
            slow.take(3_600, &cancel),
            Err(SnapshotError::Cancelled)
        ));
        stopper.join().unwrap();
    }

    #[test]
    fn an_entry_moves_to_the_new_shard_and_keeps_its_path_below_it() {
        assert_eq!(
            rename(Path::new("cyclops/autogen/6/000000001-000000001.tsm"), 18),
            Some(PathBuf::from("cyclops/autogen/18/000000001-000000001.tsm"))
        );
        assert_eq!(
            rename(Path::new("db/rp/6/index/L0-00000001.tsl"), 7),
            Some(PathBuf::from("db/rp/7/index/L0-00000001.tsl"))
        );
    }

    /// Found on a last read: every connection stayed watched (a descriptor each) until
    /// the end of the dump, two per shard; with a service's usual 1,024 descriptors a
    /// source of 500 shards would have failed with "too many open files".
    #[test]
    fn a_closed_connection_is_no_longer_held_for_cancelling() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let at = Endpoint {
            at: At::Tcp(l.local_addr().unwrap()),
            name: "test".into(),
        };
        let cancel = Cancel::default();
        for _ in 0..3 {
            let c = open(&at, SHARD_BACKUP, b"{}\n", &cancel).unwrap();
            let _peer = l.accept().unwrap();
            assert_eq!(cancel.watched(), 1);
            drop(c);
            assert_eq!(cancel.watched(), 0);
        }
        // While open, a cancel shuts it: a blocked read returns at once.
        let c = open(&at, SHARD_BACKUP, b"{}\n", &cancel).unwrap();
        let _peer = l.accept().unwrap();
        cancel.cancel();
        let mut b = [0u8; 1];
        assert_eq!((&*c).read(&mut b).unwrap_or(0), 0);
        assert!(matches!(
            open(&at, SHARD_BACKUP, b"{}\n", &cancel),
            Err(SnapshotError::Cancelled)
        ));
    }

    #[test]
    fn an_entry_outside_a_shard_directory_is_refused() {
        assert_eq!(rename(Path::new("000000001-000000001.tsm"), 1), None);
        assert_eq!(rename(Path::new("db/rp/6"), 1), None);
        assert_eq!(rename(Path::new("db/../6/x.tsm"), 1), None);
        assert_eq!(rename(Path::new("/db/rp/6/x.tsm"), 1), None);
    }

    #[test]
    fn a_read_back_on_the_host_is_parsed_shard_by_shard_and_refuses_what_it_cannot_trust() {
        let sha = "ab".repeat(32);
        let out = format!(
            "{{\"files\": [{{\"name\": \"db/rp/7/000000001-000000002.tsm\", \"size\": 12, \"sha256\": \"{sha}\"}}], \"shard\": 7}}\n\
             {{\"nothing_sent\": 5, \"shard\": 8}}\n\
             {{\"error\": \"ConnectionRefusedError: [Errno 111] Connection refused\", \"shard\": 9}}\n\
             {{\"files\": [], \"shard\": 10}}\n"
        );
        let got = shard_files_on_host("rpc", &out).unwrap();
        assert_eq!(got.len(), 4);
        let (7, Ok(files)) = &got[0] else {
            panic!("{:?}", got[0])
        };
        assert_eq!(
            files,
            &vec![ShardFile {
                name: "000000001-000000002.tsm".into(),
                size: 12,
                sha256: [0xab; 32],
            }]
        );
        assert!(
            matches!(
                &got[1],
                (
                    8,
                    Err(SnapshotError::NothingSent {
                        shard: 8,
                        tries: 5,
                        ..
                    })
                )
            ),
            "{:?}",
            got[1]
        );
        assert!(
            matches!(&got[2], (9, Err(SnapshotError::Protocol { msg, .. })) if msg.contains("shard 9") && msg.contains("Connection refused")),
            "{:?}",
            got[2]
        );
        assert!(matches!(&got[3], (10, Ok(f)) if f.is_empty()));

        // Whatever cannot be trusted is an error naming it, never a file.
        for (bad, says) in [
            (format!("{{\"files\": [{{\"name\": \"../7/x.tsm\", \"size\": 1, \"sha256\": \"{sha}\"}}], \"shard\": 7}}"), "not db/rp/7/file"),
            (format!("{{\"files\": [{{\"name\": \"db/rp/7/x.tsm\", \"size\": 1, \"sha256\": \"{}\"}}], \"shard\": 7}}", &sha[1..]), "is not a SHA-256"),
            (format!("{{\"files\": [{{\"name\": \"db/rp/7/x.tsm\", \"size\": 1, \"sha256\": \"+{}\"}}], \"shard\": 7}}", &sha[1..]), "is not a SHA-256"),
            ("{\"files\": [], \"error\": \"x\", \"shard\": 7}".into(), "is not one shard's files"),
            ("{\"shard\": 7}".into(), "is not one shard's files"),
            ("Traceback (most recent call last):".into(), "reading shards back on its host"),
        ] {
            let e = match shard_files_on_host("rpc", &bad) {
                Ok(v) => match v.into_iter().next() {
                    Some((_, Err(e))) => e,
                    other => panic!("{bad}: {other:?}"),
                },
                Err(e) => e,
            };
            assert!(e.to_string().contains(says), "{bad}: {e}");
        }
    }

    /// A stand-in for a server that stops (dies, or its connection is closed) on an
    /// archive entry's boundary, which no real server can be made to do on cue: on
    /// 127.0.0.1, it answers each shard backup with `archive` and keeps what each shard
    /// update sent, whole, in `uploads`.
    fn serving(archive: Vec<u8>) -> (Endpoint, Arc<Mutex<Vec<Vec<u8>>>>) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let uploads = Arc::new(Mutex::new(Vec::new()));
        let kept = uploads.clone();
        std::thread::spawn(move || {
            // A shard read here, a copy (backup and update), a read on the host.
            for conn in l.incoming().take(4) {
                let Ok(mut c) = conn else { return };
                let mut head = [0u8; 2];
                if c.read_exact(&mut head).is_err() {
                    return; // the test is over
                }
                if head[1] == SHARD_BACKUP {
                    let mut line = Vec::new();
                    let mut b = [0u8; 1];
                    while c.read_exact(&mut b).is_ok() && b[0] != b'\n' {
                        line.push(b[0]);
                    }
                    let _ = c.write_all(&archive);
                } else {
                    let mut up = Vec::new();
                    let _ = c.read_to_end(&mut up);
                    kept.lock().unwrap().push(up);
                }
            }
        });
        let e = Endpoint {
            at: At::Tcp(addr),
            name: "stand-in".into(),
        };
        (e, uploads)
    }

    /// How a tar reader that, like Go's, takes an end where a header would start for
    /// the archive's end, reads `upload` (after the shard id): its entries' sizes, or
    /// the error that stops it.
    fn as_target_reads(upload: &[u8]) -> Result<Vec<u64>, std::io::Error> {
        let mut a = tar::Archive::new(&upload[8..]);
        let mut sizes = Vec::new();
        for e in a.entries()? {
            let mut e = e?;
            let want = e.size();
            let got = std::io::copy(&mut e, &mut std::io::sink())?;
            if got != want {
                return Err(std::io::Error::other(format!("{got} of {want} bytes")));
            }
            sizes.push(got);
        }
        Ok(sizes)
    }

    #[test]
    fn an_archive_cut_on_an_entry_boundary_is_an_error_not_a_shorter_shard() {
        let mut b = tar::Builder::new(Vec::new());
        for name in [
            "db/rp/3/000000001-000000001.tsm",
            "db/rp/3/000000002-000000001.tsm",
        ] {
            let mut h = tar::Header::new_gnu();
            h.set_size(600);
            h.set_mode(0o644);
            b.append_data(&mut h, name, &[7u8; 600][..]).unwrap();
        }
        let whole = b.into_inner().unwrap();
        // Cut after the first entry: its header and its data padded to 1024 bytes.
        let cut = whole[..512 + 1024].to_vec();
        // The second entry's header damaged (its checksum no longer matches).
        let mut damaged = whole.clone();
        damaged[512 + 1024 + 10] ^= 0x55;
        // Data after the end's zero blocks.
        let mut trailing = whole.clone();
        trailing.extend_from_slice(&[1u8; 512]);
        // Cut inside the second entry's data, and 60 bytes before its end: what the
        // copy sent of it, padded, would have looked whole to the target.
        let inside = whole[..512 + 1024 + 512 + 540].to_vec();
        // A size that Python's int() reads as 600 (0o1130) and tar's reader does not.
        let mut loose = whole.clone();
        loose[124..136].copy_from_slice(b"0000001_130\0");
        loose[148..156].fill(b' ');
        let sum: u32 = loose[..512].iter().map(|b| u32::from(*b)).sum();
        loose[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        // A PAX header that describes no entry: the end follows it.
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_size(600);
        h.set_mode(0o644);
        b.append_data(&mut h, "db/rp/3/000000001-000000001.tsm", &[7u8; 600][..])
            .unwrap();
        let mut x = tar::Header::new_ustar();
        x.set_entry_type(tar::EntryType::XHeader);
        x.set_size(48);
        x.set_path("PaxHeaders.0/2").unwrap();
        x.set_cksum();
        b.append(
            &x,
            &b"48 path=db/rp/3/000000002-000000001.tsm.xxxxxxx\n"[..],
        )
        .unwrap();
        let pax_at_end = b.into_inner().unwrap();
        let cancel = Cancel::default();
        for (archive, ends) in [
            (whole.clone(), Ok(())),
            (
                cut,
                Err(("stopped before its end", "stopped before its end")),
            ),
            (damaged, Err(("", ""))),
            (
                trailing,
                Err(("stopped before its end", "went on after its end")),
            ),
            (
                inside,
                Err((
                    "stopped inside an entry, 540 of its 600 bytes",
                    "stopped inside an entry at 1536 (540 of its 600 bytes)",
                )),
            ),
            (loose, Err(("", "its size is not an octal number"))),
            (
                pax_at_end,
                Err(("", "a PAX header at 1536 describes no entry")),
            ),
        ] {
            let (at, uploads) = serving(archive.clone());
            let read = shard_files(&at, 3, &cancel);
            let copied = copy_shard(&at, 3, &at, 9, None, &cancel);
            let on_host = {
                let At::Tcp(a) = at.at else { unreachable!() };
                let cmd = on_host_cmd(&["python3"], 0, "127.0.0.1", a.port(), 1);
                let out = run_with_ids(&cmd, &[3]);
                assert!(out.status.success(), "{out:?}");
                shard_files_on_host("stand-in", &String::from_utf8_lossy(&out.stdout)).unwrap()
            };
            let upload = uploads
                .lock()
                .unwrap()
                .pop()
                .expect("the copy sent an upload");
            let target_read = as_target_reads(&upload);
            match ends {
                Ok(()) => {
                    assert_eq!(target_read.unwrap(), vec![600, 600]);
                    assert_eq!(read.unwrap().len(), 2);
                    assert_eq!(copied.unwrap().sent.len(), 2);
                    assert!(
                        matches!(&on_host[..], [(3, Ok(f))] if f.len() == 2),
                        "{on_host:?}"
                    );
                }
                Err((says, python_says)) => {
                    // The target's restore fails: it loads none of the shard.
                    assert!(target_read.is_err(), "the target read {target_read:?}");
                    for e in [read.unwrap_err(), copied.unwrap_err()] {
                        assert!(e.to_string().contains(says), "{e}");
                    }
                    assert!(
                        matches!(&on_host[..], [(3, Err(SnapshotError::Protocol { msg, .. }))] if msg.contains(python_says)),
                        "{on_host:?}"
                    );
                }
            }
        }
    }

    /// The paths Go's writer does not put whole in a ustar header's name field: one long
    /// enough that its start goes in the prefix field, and one with a non-ASCII database
    /// name, which goes in a PAX header before its entry (with its size, as Go may). The
    /// read on the host takes both as `tar` does, and odd byte counts pad their entries:
    /// each reader gives the same names, sizes and digests.
    #[test]
    fn paths_in_the_ustar_prefix_or_a_pax_header_read_the_same_on_the_host() {
        let db = "d".repeat(90);
        let mut b = tar::Builder::new(Vec::new());
        for (i, name) in [
            format!("{db}/rp/3/000000001-000000001.tsm"),
            format!("{db}/rp/3/fields.idx"),
        ]
        .iter()
        .enumerate()
        {
            let mut h = tar::Header::new_ustar();
            h.set_mode(0o644);
            h.set_size(1001 + i as u64);
            h.set_path(name).unwrap();
            h.set_cksum();
            b.append(&h, &vec![i as u8 + 1; 1001 + i][..]).unwrap();
        }
        let record = |key: &str, value: &str| {
            // "<length> key=value\n", the length counting its own digits.
            let rest = format!(" {key}={value}\n");
            let mut n = rest.len() + 1;
            while format!("{n}").len() + rest.len() != n {
                n += 1;
            }
            format!("{n}{rest}")
        };
        let pax = record("path", "données/rp/3/000000002-000000001.tsm") + &record("size", "777");
        let mut x = tar::Header::new_ustar();
        x.set_entry_type(tar::EntryType::XHeader);
        x.set_size(pax.len() as u64);
        x.set_path("PaxHeaders.0/000000002-000000001.tsm").unwrap();
        x.set_cksum();
        b.append(&x, pax.as_bytes()).unwrap();
        // Its own header says neither: a name outside any shard, and no size.
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_size(0);
        h.set_path("000000002-000000001.tsm").unwrap();
        h.set_cksum();
        b.append(&h, &[9u8; 777][..]).unwrap();
        let archive = b.into_inner().unwrap();
        assert_ne!(
            archive[345], 0,
            "the first path's start is in the prefix field"
        );
        let (at, _) = serving(archive);
        let read = shard_files(&at, 3, &Cancel::default()).unwrap();
        let At::Tcp(a) = at.at else { unreachable!() };
        let out = run_with_ids(
            &on_host_cmd(&["python3"], 0, "127.0.0.1", a.port(), 1),
            &[3],
        );
        assert!(out.status.success(), "{out:?}");
        let on_host =
            shard_files_on_host("stand-in", &String::from_utf8_lossy(&out.stdout)).unwrap();
        let sizes: Vec<_> = read.iter().map(|f| (f.name.as_str(), f.size)).collect();
        assert_eq!(
            sizes,
            [
                ("000000001-000000001.tsm", 1001),
                ("fields.idx", 1002),
                ("000000002-000000001.tsm", 777)
            ]
        );
        assert!(
            matches!(&on_host[..], [(3, Ok(files))] if *files == read),
            "on the host: {on_host:?}; here: {read:?}"
        );
    }

    #[test]
    fn a_backup_that_sends_nothing_is_tried_for_12_s_with_growing_pauses() {
        let pauses: Vec<u64> = (1..NOTHING_SENT_TRIES)
            .map(|n| nothing_sent_pause(n).as_millis() as u64)
            .collect();
        assert_eq!(pauses, [300, 600, 1200, 2000, 2000, 2000, 2000, 2000]);
        // The script on the host pauses the same.
        let script: Vec<u64> = (1..NOTHING_SENT_TRIES)
            .map(|a| (0.3f64 * 2f64.powi(a as i32 - 1)).min(2.0))
            .map(|s| (s * 1000.0).round() as u64)
            .collect();
        assert_eq!(script, pauses);
        assert!(ON_HOST_SCRIPT.contains("time.sleep(min(0.3 * 2 ** (attempt - 1), 2.0))"));
    }

    /// Run an on-host read here as the target's host would: `sh -c cmd`, the ids on its
    /// stdin, held open until its output ends.
    fn run_with_ids(cmd: &str, ids: &[u64]) -> std::process::Output {
        use std::io::Write;
        let mut child = std::process::Command::new("sh")
            .args(["-c", cmd])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        // A shell that found no python3 exits without reading it.
        let _ = stdin.write_all(&shard_files_on_host_input(ids));
        let mut stdout = Vec::new();
        std::io::Read::read_to_end(child.stdout.as_mut().unwrap(), &mut stdout).unwrap();
        drop(stdin);
        let mut out = child.wait_with_output().unwrap();
        out.stdout = stdout;
        out
    }

    #[test]
    fn a_host_without_python_says_so_by_its_exit_code() {
        let cmd = on_host_cmd(&["/nonexistent/python3"], 19, "127.0.0.1", 1, 2);
        let out = run_with_ids(&cmd, &[1, 2]);
        assert_eq!(out.status.code(), Some(NO_INTERPRETER));
        // With one there, the shard whose server does not answer is an error of its own.
        let cmd = on_host_cmd(&["/nonexistent/python3", "python3"], 19, "127.0.0.1", 1, 2);
        let out = run_with_ids(&cmd, &[4]);
        assert!(out.status.success(), "{out:?}");
        let got = shard_files_on_host("rpc", &String::from_utf8_lossy(&out.stdout)).unwrap();
        assert!(
            matches!(&got[..], [(4, Err(SnapshotError::Protocol { msg, .. }))] if msg.contains("Connection refused")),
            "{got:?}"
        );
    }

    #[test]
    fn an_on_host_read_takes_any_number_of_ids_and_stops_when_its_stdin_ends() {
        // More ids than one argument of a command line may hold (128 KiB): each refused
        // at once by a port nothing listens on, in the order given.
        let ids: Vec<u64> = (1_000_000_000..1_000_000_000 + 20_000).collect();
        assert!(shard_files_on_host_input(&ids).len() > 128 << 10);
        let cmd = on_host_cmd(&["python3"], 0, "127.0.0.1", 1, 2);
        let out = run_with_ids(&cmd, &ids);
        assert!(out.status.success(), "{out:?}");
        let got = shard_files_on_host("rpc", &String::from_utf8_lossy(&out.stdout)).unwrap();
        assert_eq!(got.iter().map(|(id, _)| *id).collect::<Vec<_>>(), ids);
        // A server that takes the request and never answers holds a read for up to its
        // 600 s socket timeout; the end of its stdin (the orchestrator gave up: its SSH
        // channel went) stops it at once.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = silent.local_addr().unwrap().port();
        let mut child = std::process::Command::new("sh")
            .args(["-c", &on_host_cmd(&["python3"], 0, "127.0.0.1", port, 1)])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        std::io::Write::write_all(&mut stdin, &shard_files_on_host_input(&[7])).unwrap();
        silent.set_nonblocking(true).unwrap();
        let started = std::time::Instant::now();
        let _held = loop {
            match silent.accept() {
                Ok((c, _)) => break c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(
                        started.elapsed() < std::time::Duration::from_secs(30),
                        "the read never connected"
                    );
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => panic!("{e}"),
            }
        };
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(
            child.try_wait().unwrap().is_none(),
            "it waits for the server"
        );
        drop(stdin);
        let given_up = std::time::Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            assert!(
                given_up.elapsed() < std::time::Duration::from_secs(10),
                "still reading 10 s after its stdin ended"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        assert_eq!(status.code(), Some(3), "{status:?}");
    }

    fn file(name: &str, byte: u8) -> ShardFile {
        ShardFile {
            name: name.into(),
            size: 10,
            sha256: [byte; 32],
        }
    }

    #[test]
    fn a_shard_read_back_proves_the_copy_only_with_every_data_file_sent_unchanged() {
        let sent = vec![file("000000001-000000002.tsm", 1)];
        // Exactly what was sent, or more files (the cache written out): proven.
        assert_eq!(files_differ(&sent, &sent), None);
        let more = vec![sent[0].clone(), file("000000003-000000001.tsm", 3)];
        assert_eq!(files_differ(&sent, &more), None);
        // A file sent under another name (a compaction's `.tsm.tmp`): the target's
        // restore skipped it, whatever it holds now.
        let renamed = vec![sent[0].clone(), file("000000002-000000001.tsm.tmp", 5)];
        let why = files_differ(&renamed, &renamed).unwrap();
        assert!(
            why.contains("000000002-000000001.tsm.tmp was sent, not a TSM file"),
            "{why}"
        );
        // A data file with other bytes, or gone.
        let why = files_differ(&sent, &[file("000000001-000000002.tsm", 2)]).unwrap();
        assert!(why.contains("000000001-000000002.tsm differs"), "{why}");
        let mut longer = file("000000001-000000002.tsm", 1);
        longer.size = 11;
        assert!(files_differ(&sent, &[longer]).is_some());
        let why = files_differ(&sent, &[]).unwrap();
        assert!(why.contains("no longer there"), "{why}");
        // Nothing sent proves nothing: the source may have failed to list the shard.
        let why = files_differ(&[], &[]).unwrap();
        assert!(why.contains("sent no TSM file"), "{why}");
        // A deletion pending, whatever else holds.
        let why = files_differ(
            &sent,
            &[sent[0].clone(), file("000000001-000000002.tombstone", 4)],
        )
        .unwrap();
        assert!(
            why.contains("deletions (000000001-000000002.tombstone)"),
            "{why}"
        );
        assert_eq!(
            in_shard(Path::new("db/rp/6/000000001-000000002.tsm")).as_deref(),
            Some("000000001-000000002.tsm")
        );
        assert_eq!(in_shard(Path::new("db/rp/6")), None);
        for good in ["000000001-000000002.tsm", "12-1.tsm"] {
            assert!(is_tsm_name(good), "{good}");
        }
        for bad in [
            "000000001-000000002.tsm.tmp",
            "1-2.tombstone",
            "fields.idx",
            "-1.tsm",
            "1-.tsm",
            "a-1.tsm",
            "1-2-3.tsm",
            "x/1-2.tsm",
        ] {
            assert!(!is_tsm_name(bad), "{bad}");
        }
    }
}
