//! The wire protocol between agentvm on the host and `agentvm-guest`, the agent inside every
//! guest, over one virtio-serial port ([`PORT_NAME`]).
//!
//! # Framing
//! A connection starts with a sync exchange: the host writes [`HOST_SYNC`] and an 8-byte
//! nonce; the agent, which scans its input for that pattern, drops everything it had of
//! an earlier connection (a reset VM may hold a half-read frame from its golden moment),
//! and answers [`GUEST_SYNC`] with the same nonce. The host scans for that answer and
//! ignores anything before it (bytes a guest wrote while nobody listened). From there on
//! both sides send frames: a 4-byte little-endian length, then a postcard-encoded
//! [`Frame`] of that length. A length above [`MAX_FRAME`] or a body that does not decode
//! ends the connection; nothing is resynchronised inside one.
//!
//! # Streams and flow control
//! Every frame names a stream (chosen by the host; 0 is for one-shot calls). An exec, a file
//! upload and a file download each have their own stream. Data flows under credit: the
//! agent may have at most [`WINDOW`] cost units ([`cost`]) of output frames of one stream
//! that the host has not acknowledged with [`ToGuest::Credit`]; the host likewise for stdin
//! and file data ([`ToHost::Credit`]). A slow reader therefore stops the writer (a program's
//! pipe fills and it blocks) instead of growing a buffer, and a peer that ignores its
//! window is a protocol violation the other side detects.

use std::io::{self, Read, Write};

pub mod tree;

use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// The name of the virtio-serial port (`<target type='virtio' name=...>`).
pub const PORT_NAME: &str = "org.agentvm.agent.0";
/// Protocol version, reported in [`ToHost::Pong`]. 2 added [`ToGuest::Stat`],
/// [`ToGuest::WriteTree`] and [`ToGuest::ReadTree`] (an agent of version 1 drops the
/// connection on them: ask its version first).
pub const VERSION: u32 = 2;
/// The first [`VERSION`] that copies directories.
pub const TREE_VERSION: u32 = 2;
/// Largest encoded frame body either side accepts.
pub const MAX_FRAME: usize = 128 * 1024;
/// Largest data payload a sender puts into one frame.
pub const MAX_CHUNK: usize = 64 * 1024;
/// Cost units of unacknowledged data a sender may have in flight on one stream.
pub const WINDOW: u64 = 1024 * 1024;
/// Fixed cost charged per data frame on top of its bytes, so that a flood of tiny frames is
/// bounded as well as a flood of bytes.
pub const FRAME_COST: u64 = 64;
/// What the host writes to open a connection, followed by an 8-byte nonce.
pub const HOST_SYNC: [u8; 8] = *b"\0AVHOST\x01";
/// What the agent answers, followed by the host's nonce.
pub const GUEST_SYNC: [u8; 8] = *b"\0AVGUES\x01";

/// The cost of a data frame carrying `len` bytes, for flow control.
pub fn cost(len: usize) -> u64 {
    len as u64 + FRAME_COST
}

/// A terminal size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WinSize {
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

/// A program to start in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecSpec {
    /// Program and arguments; the program is looked up in the given `PATH` when it has no `/`.
    pub argv: Vec<String>,
    /// The whole environment of the process.
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub cwd: Option<String>,
    /// Run as this user id (and group id).
    pub uid: Option<u32>,
    /// Run with this group id.
    pub gid: Option<u32>,
    /// A cgroup v2 directory to start it in (created when missing; ignored when cgroup2 is
    /// not mounted).
    pub cgroup: Option<String>,
    /// Give the process a stdin pipe fed by [`ToGuest::Stdin`]; else it reads `/dev/null`.
    pub stdin: bool,
    /// Run it on a new pseudo-terminal of this size (stdin, stdout and stderr all on it; its
    /// output arrives as [`ToHost::Stdout`]).
    pub pty: Option<WinSize>,
}

/// Host → agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToGuest {
    /// Answered with [`ToHost::Pong`].
    Ping,
    /// Set the guest's real-time clock; answered with [`ToHost::Done`].
    SetClock {
        /// Nanoseconds since the Unix epoch.
        unix_nanos: u64,
    },
    /// Mix these bytes into the kernel's entropy pool (credited) and reseed its CRNG at once;
    /// answered with [`ToHost::Done`].
    Reseed {
        /// Host randomness, at most 256 bytes.
        #[serde(with = "serde_bytes")]
        entropy: Vec<u8>,
    },
    /// Start a program on this stream: [`ToHost::Started`], output, then [`ToHost::Exited`].
    Exec(ExecSpec),
    /// Bytes for the program's stdin (or terminal).
    Stdin(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Close the program's stdin (on a terminal: send end-of-file).
    StdinClose,
    /// Send a signal to the program's whole process group.
    Signal(i32),
    /// Resize the program's terminal.
    Resize(WinSize),
    /// The host consumed this many cost units of the stream's output.
    Credit(u64),
    /// Create or truncate `path` with `mode` and fill it with the [`ToGuest::FileData`] that
    /// follow; [`ToGuest::FileEnd`] finishes it ([`ToHost::Done`]).
    WriteFile {
        /// Absolute path in the guest.
        path: String,
        /// Permission bits for a new file.
        mode: u32,
    },
    /// Data of the file being written.
    FileData(#[serde(with = "serde_bytes")] Vec<u8>),
    /// End of the file being written.
    FileEnd,
    /// Send the file at `path`, at most `max` bytes: [`ToHost::FileData`] then
    /// [`ToHost::FileEnd`].
    ReadFile {
        /// Absolute path in the guest.
        path: String,
        /// Stop after this many bytes.
        max: u64,
    },
    /// Abandon the stream: kill its program's process group, stop its transfer.
    Close,
    /// Open a TCP connection to `127.0.0.1:port` in the guest on this stream
    /// ([`ToHost::Done`] or [`ToHost::Error`]); then [`ToGuest::Stdin`] carries bytes to it,
    /// [`ToGuest::StdinClose`] shuts its write half, and its bytes come back as
    /// [`ToHost::Stdout`] until [`ToHost::Eof`]; [`ToHost::Exited`] (no code) ends the
    /// stream once both directions are done.
    Connect {
        /// Guest port.
        port: u16,
    },
    /// What is at `path` (links followed): answered with [`ToHost::Stat`].
    Stat {
        /// Absolute path in the guest.
        path: String,
    },
    /// Make the new directory `path` (it must not exist; its parent must) from the tar
    /// archive that follows as [`ToGuest::FileData`] and [`ToGuest::FileEnd`], its entries
    /// under `name` (see [`tree`]); answered like [`ToGuest::WriteFile`].
    WriteTree {
        /// Absolute path in the guest.
        path: String,
        /// The top-level name in the archive.
        name: String,
    },
    /// Send the directory at `path` as a tar archive (see [`tree`]), its entries under the
    /// path's last component, at most `max` bytes: [`ToHost::FileData`] then
    /// [`ToHost::FileEnd`], or [`ToHost::Error`].
    ReadTree {
        /// Absolute path in the guest.
        path: String,
        /// Stop with an error after this many bytes.
        max: u64,
    },
}

/// What a path is, in [`PathStat`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PathKind {
    /// Nothing is there.
    Missing,
    /// A regular file.
    File,
    /// A directory.
    Directory,
    /// Anything else (socket, FIFO, device).
    Other,
}

/// Answer to [`ToGuest::Stat`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathStat {
    /// What is there.
    pub kind: PathKind,
    /// Its size, bytes.
    pub size: u64,
    /// Its permission bits.
    pub mode: u32,
}

/// Agent → host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToHost {
    /// Answer to [`ToGuest::Ping`].
    Pong {
        /// The guest's clock, nanoseconds since the Unix epoch.
        unix_nanos: u64,
        /// [`VERSION`] of the agent.
        version: u32,
    },
    /// The request of this stream succeeded.
    Done,
    /// The request of this stream failed.
    Error {
        /// What went wrong, for a person.
        message: String,
    },
    /// The program started with this process id (also its process group).
    Started {
        /// Process id in the guest.
        pid: u32,
    },
    /// Output on stdout (or the terminal).
    Stdout(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Output on stderr.
    Stderr(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The program ended; all its output has been sent before this.
    Exited {
        /// Exit code, when it exited.
        code: Option<i32>,
        /// Signal number, when a signal ended it.
        signal: Option<i32>,
    },
    /// The agent consumed this many cost units of the stream's stdin or file data.
    Credit(u64),
    /// Data of the file being read.
    FileData(#[serde(with = "serde_bytes")] Vec<u8>),
    /// End of the file being read.
    FileEnd {
        /// Bytes sent.
        size: u64,
    },
    /// The guest side of a forwarded connection will send nothing more.
    Eof,
    /// Answer to [`ToGuest::Stat`].
    Stat(PathStat),
}

impl ToHost {
    /// Flow-control cost of this message: data frames cost their bytes plus [`FRAME_COST`],
    /// every other message [`FRAME_COST`].
    pub fn cost(&self) -> u64 {
        match self {
            ToHost::Stdout(d) | ToHost::Stderr(d) | ToHost::FileData(d) => cost(d.len()),
            _ => FRAME_COST,
        }
    }
}

/// One message on one stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Frame<M> {
    /// Stream id.
    pub stream: u32,
    /// The message.
    pub msg: M,
}

/// Why a frame could not be read.
#[derive(Debug)]
pub enum FrameError {
    /// The transport failed or ended.
    Io(io::Error),
    /// The length prefix exceeds [`MAX_FRAME`].
    TooLong(u32),
    /// The body is not a valid frame.
    Decode(String),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::Io(e) => write!(f, "{e}"),
            FrameError::TooLong(n) => {
                write!(f, "frame of {n} bytes announced (at most {MAX_FRAME})")
            }
            FrameError::Decode(e) => write!(f, "undecodable frame: {e}"),
        }
    }
}

impl std::error::Error for FrameError {}

impl From<io::Error> for FrameError {
    fn from(e: io::Error) -> Self {
        FrameError::Io(e)
    }
}

/// Encode one frame (length prefix included).
pub fn encode<M: Serialize>(stream: u32, msg: &M) -> Vec<u8> {
    let frame = Frame { stream, msg };
    let mut out = vec![0u8; 4];
    // A Vec writer cannot fail, and every message type serialises.
    let body = postcard::to_stdvec(&frame).unwrap_or_default();
    out.extend_from_slice(&body);
    let len = (out.len() - 4) as u32;
    out[..4].copy_from_slice(&len.to_le_bytes());
    out
}

/// Write one frame.
pub fn write_frame<M: Serialize>(w: &mut impl Write, stream: u32, msg: &M) -> io::Result<()> {
    w.write_all(&encode(stream, msg))?;
    w.flush()
}

/// Read one frame. The length is checked against [`MAX_FRAME`] before anything is
/// allocated, and `buf` is reused between calls.
pub fn read_frame<M: DeserializeOwned>(
    r: &mut impl Read,
    buf: &mut Vec<u8>,
) -> Result<Frame<M>, FrameError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len);
    if len as usize > MAX_FRAME {
        return Err(FrameError::TooLong(len));
    }
    buf.clear();
    buf.resize(len as usize, 0);
    r.read_exact(buf)?;
    match postcard::take_from_bytes::<Frame<M>>(buf) {
        Ok((frame, [])) => Ok(frame),
        Ok((_, rest)) => Err(FrameError::Decode(format!(
            "{} bytes after the frame's end",
            rest.len()
        ))),
        Err(e) => Err(FrameError::Decode(e.to_string())),
    }
}

/// Read from `r` until `magic` followed by `nonce` has gone by, looking at no more than
/// `limit` bytes. Returns false when `limit` bytes went by without it.
pub fn scan_for(r: &mut impl Read, magic: &[u8; 8], nonce: u64, limit: usize) -> io::Result<bool> {
    let mut want = [0u8; 16];
    want[..8].copy_from_slice(magic);
    want[8..].copy_from_slice(&nonce.to_le_bytes());
    scan_pattern(r, &want, limit)
}

/// Read from `r` until `magic` has gone by; then return the 8-byte nonce after it.
pub fn scan_for_magic(r: &mut impl Read, magic: &[u8; 8]) -> io::Result<u64> {
    let mut window = [0u8; 8];
    let mut seen = 0usize;
    let mut byte = [0u8; 1];
    loop {
        r.read_exact(&mut byte)?;
        window.copy_within(1.., 0);
        window[7] = byte[0];
        seen += 1;
        if seen >= 8 && &window == magic {
            let mut nonce = [0u8; 8];
            r.read_exact(&mut nonce)?;
            return Ok(u64::from_le_bytes(nonce));
        }
    }
}

fn scan_pattern(r: &mut impl Read, want: &[u8; 16], limit: usize) -> io::Result<bool> {
    let mut window = [0u8; 16];
    let mut byte = [0u8; 1];
    for seen in 1..=limit {
        r.read_exact(&mut byte)?;
        window.copy_within(1.., 0);
        window[15] = byte[0];
        if seen >= 16 && &window == want {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The sync preamble a side writes: `magic` then `nonce`.
pub fn sync_bytes(magic: &[u8; 8], nonce: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(magic);
    out[8..].copy_from_slice(&nonce.to_le_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn frames_round_trip() {
        let msgs = [
            ToGuest::Ping,
            ToGuest::Exec(ExecSpec {
                argv: vec!["/bin/echo".into(), "hi".into()],
                env: vec![("PATH".into(), "/bin".into())],
                cwd: Some("/tmp".into()),
                uid: Some(1000),
                gid: None,
                cgroup: None,
                stdin: true,
                pty: Some(WinSize { rows: 24, cols: 80 }),
            }),
            ToGuest::Stdin(vec![0, 1, 2, 255]),
            ToGuest::Credit(u64::MAX),
        ];
        let mut wire = Vec::new();
        for (i, m) in msgs.iter().enumerate() {
            write_frame(&mut wire, i as u32, m).unwrap();
        }
        let mut r = Cursor::new(wire);
        let mut buf = Vec::new();
        for (i, m) in msgs.iter().enumerate() {
            let f: Frame<ToGuest> = read_frame(&mut r, &mut buf).unwrap();
            assert_eq!(f.stream, i as u32);
            assert_eq!(&f.msg, m);
        }
        assert!(matches!(
            read_frame::<ToGuest>(&mut r, &mut buf),
            Err(FrameError::Io(_))
        ));
    }

    #[test]
    fn data_is_carried_raw() {
        let data = vec![7u8; MAX_CHUNK];
        let f = encode(3, &ToHost::Stdout(data));
        // Length prefix, stream id, variant, length varint: a few bytes of overhead.
        assert!(f.len() < MAX_CHUNK + 16, "{}", f.len());
        assert!(f.len() - 4 <= MAX_FRAME);
    }

    #[test]
    fn overlong_and_garbage_frames_are_refused() {
        let mut buf = Vec::new();
        let mut r = Cursor::new(u32::MAX.to_le_bytes().to_vec());
        assert!(matches!(
            read_frame::<ToHost>(&mut r, &mut buf),
            Err(FrameError::TooLong(u32::MAX))
        ));
        assert!(
            buf.capacity() < 1024,
            "nothing was allocated for the claimed length"
        );
        let mut wire = 5u32.to_le_bytes().to_vec();
        wire.extend_from_slice(&[0, 200, 200, 200, 200]);
        assert!(matches!(
            read_frame::<ToHost>(&mut Cursor::new(wire), &mut buf),
            Err(FrameError::Decode(_))
        ));
        // Trailing bytes inside a frame are refused too.
        let mut f = encode(1, &ToHost::Done);
        f.push(0);
        let len = (f.len() - 4) as u32;
        f[..4].copy_from_slice(&len.to_le_bytes());
        assert!(matches!(
            read_frame::<ToHost>(&mut Cursor::new(f), &mut buf),
            Err(FrameError::Decode(_))
        ));
    }

    #[test]
    fn sync_is_found_after_garbage() {
        let mut wire = b"stale half frame \0AVGUES".to_vec();
        wire.extend_from_slice(&sync_bytes(&GUEST_SYNC, 42));
        wire.extend_from_slice(&encode(0, &ToHost::Done));
        let mut r = Cursor::new(wire);
        assert!(scan_for(&mut r, &GUEST_SYNC, 42, 4096).unwrap());
        let f: Frame<ToHost> = read_frame(&mut r, &mut Vec::new()).unwrap();
        assert_eq!(f.msg, ToHost::Done);
        // A different nonce is not the answer to this connection.
        let mut r = Cursor::new(sync_bytes(&GUEST_SYNC, 41).to_vec());
        assert!(scan_for(&mut r, &GUEST_SYNC, 42, 4096).is_err());
        // The limit bounds how much is read.
        let mut r = Cursor::new(vec![0u8; 10_000]);
        assert!(!scan_for(&mut r, &GUEST_SYNC, 42, 100).unwrap());
        let mut wire = b"xx".to_vec();
        wire.extend_from_slice(&sync_bytes(&HOST_SYNC, 7));
        assert_eq!(
            scan_for_magic(&mut Cursor::new(wire), &HOST_SYNC).unwrap(),
            7
        );
    }
}
