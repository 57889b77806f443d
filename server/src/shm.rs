//! Triton's system shared memory extension: a client on the same host (a sidecar in the pod, a
//! benchmark) puts tensors in POSIX shared memory objects, registers them as named regions, and
//! names a region, offset and size in place of an input's data or to receive an output. The
//! tensors then never cross the socket. As in Triton (`--allow-client-shm`), it is off unless the
//! server is started with `--allow-client-shm`: a registered region lets clients make the server
//! read and write that object.
//!
//! Regions are read and written with positioned file I/O on the object's file under `/dev/shm`
//! (one copy each way, like the copy out of a socket buffer), not mapped: mapping memory that
//! another process may shrink needs `unsafe`, which this workspace forbids.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;

use crate::protocol::error::ApiError;

/// Where Linux keeps POSIX shared memory objects (`shm_open` names).
pub const SHM_DIR: &str = "/dev/shm";

/// Most regions registered at once: each holds an open file (and the object's memory).
pub const MAX_REGIONS: usize = 1024;

/// Why a shared memory operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    /// The server was not started with `--allow-client-shm`.
    #[error("system shared memory is off on this server; start it with --allow-client-shm to use it")]
    Disabled,
    /// The key is not one POSIX shared memory name.
    #[error(
        "shared memory key {0:?} is not a POSIX shared memory name: use one name such as \"/input0\" (no '/' after the first, at most 255 bytes)"
    )]
    BadKey(String),
    /// The key names something other than a regular file (a link, a directory).
    #[error("shared memory key {0:?} is not a shared memory object (a link or a directory)")]
    NotObject(String),
    /// The object became shorter than the region after registration.
    #[error(
        "shared memory region {0:?} is past the end of its object now: the client shrank it after registering"
    )]
    Shrunk(String),
    /// The object could not be opened or measured.
    #[error("cannot open shared memory key {key:?}: {source}")]
    Open {
        /// The key asked for.
        key: String,
        /// What the system said.
        source: std::io::Error,
    },
    /// A region of that name exists.
    #[error("shared memory region {0:?} is already registered; unregister it first")]
    Exists(String),
    /// No region of that name.
    #[error("no system shared memory region {0:?} is registered")]
    Unknown(String),
    /// A size or offset out of bounds.
    #[error("{0}")]
    Bounds(String),
    /// Inputs larger together than a request may be.
    #[error(
        "{what} brings the request's inputs in shared memory to {size} bytes, over --max-request-bytes ({limit})"
    )]
    TooLarge {
        /// The input.
        what: String,
        /// The inputs' bytes with it.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// Reading or writing the object failed.
    #[error("shared memory region {region:?}: {source}")]
    Io {
        /// The region.
        region: String,
        /// What the system said.
        source: std::io::Error,
    },
}

impl From<ShmError> for crate::protocol::error::ApiError {
    fn from(e: ShmError) -> Self {
        use crate::protocol::error::ApiError;
        match e {
            ShmError::TooLarge { .. } => ApiError::PayloadTooLarge(e.to_string()),
            ShmError::Io { .. } => ApiError::Internal(e.to_string()),
            ShmError::Exists(_) => ApiError::AlreadyExists(e.to_string()),
            _ => ApiError::BadRequest(e.to_string()),
        }
    }
}

/// An error of the registry calls (status, register, unregister): a region that is not registered
/// is not found (404, NOT_FOUND), where an inference naming it is a bad request.
pub fn registry_error(e: ShmError) -> crate::protocol::error::ApiError {
    match e {
        ShmError::Unknown(_) => crate::protocol::error::ApiError::NotFound(e.to_string()),
        e => e.into(),
    }
}

/// One registered region, as the status calls report it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RegionStatus {
    /// The name clients use in `shared_memory_region`.
    pub name: String,
    /// The shared memory object's key.
    pub key: String,
    /// Where the region starts in the object, in bytes.
    pub offset: u64,
    /// The region's size in bytes.
    pub byte_size: u64,
}

struct Region {
    status: RegionStatus,
    // Held open: a client that unlinks the object after registering still has its region, as
    // with Triton's mapping.
    file: Arc<File>,
}

/// Where a tensor lives in a region: the `shared_memory_*` parameters of one input or output.
#[derive(Debug, Clone, PartialEq)]
pub struct ShmRef {
    /// The region's registered name.
    pub region: String,
    /// Offset into the region.
    pub offset: u64,
    /// Bytes of the tensor (for an output: the most it may take).
    pub byte_size: u64,
}

/// The registered regions of a server.
pub struct SharedMemory {
    allowed: bool,
    // An input read from a region is held in memory like a request body, so the same bound holds.
    max_input: u64,
    max_regions: usize,
    regions: Mutex<BTreeMap<String, Region>>,
}

impl SharedMemory {
    /// A registry; `allowed` false refuses every registration and use (`--allow-client-shm`).
    /// Inputs larger than `max_input` bytes (`--max-request-bytes`) are refused.
    pub fn new(allowed: bool, max_input: usize) -> SharedMemory {
        SharedMemory {
            allowed,
            max_input: max_input as u64,
            max_regions: MAX_REGIONS,
            regions: Mutex::new(BTreeMap::new()),
        }
    }

    /// Whether clients may use shared memory.
    pub fn allowed(&self) -> bool {
        self.allowed
    }

    fn regions(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Region>> {
        // The map is never left half-changed, so a panic elsewhere leaves it usable.
        self.regions.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers `byte_size` bytes at `offset` of the object `key` as region `name`.
    pub fn register(&self, name: &str, key: &str, offset: u64, byte_size: u64) -> Result<(), ShmError> {
        if !self.allowed {
            return Err(ShmError::Disabled);
        }
        if name.is_empty() {
            return Err(ShmError::Bounds("a shared memory region needs a name".into()));
        }
        let path = key_path(key)?;
        let open_error = |source| ShmError::Open {
            key: key.into(),
            source,
        };
        // As shm_open does: a link is not followed, so a key cannot point the server at its own
        // files (its keys, its models) through a link another process put in /dev/shm.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| {
                if e.raw_os_error() == Some(libc::ELOOP) {
                    ShmError::NotObject(key.into())
                } else {
                    open_error(e)
                }
            })?;
        let meta = file.metadata().map_err(open_error)?;
        if !meta.is_file() {
            return Err(ShmError::NotObject(key.into()));
        }
        let len = meta.len();
        if offset.checked_add(byte_size).is_none_or(|end| end > len) {
            return Err(ShmError::Bounds(format!(
                "region {name:?} would be bytes {offset}..{} of shared memory key {key:?}, which has {len} bytes",
                offset.saturating_add(byte_size)
            )));
        }
        let mut regions = self.regions();
        if regions.contains_key(name) {
            return Err(ShmError::Exists(name.into()));
        }
        if regions.len() >= self.max_regions {
            return Err(ShmError::Bounds(format!(
                "{} shared memory regions are registered, the most this server holds; unregister some first",
                self.max_regions
            )));
        }
        regions.insert(
            name.into(),
            Region {
                status: RegionStatus {
                    name: name.into(),
                    key: key.into(),
                    offset,
                    byte_size,
                },
                file: Arc::new(file),
            },
        );
        Ok(())
    }

    /// Unregisters region `name`, or every region when `None`.
    pub fn unregister(&self, name: Option<&str>) -> Result<(), ShmError> {
        if !self.allowed {
            return Err(ShmError::Disabled);
        }
        let mut regions = self.regions();
        match name {
            None => regions.clear(),
            // Triton answers success for a name it does not hold; so does this.
            Some(n) => {
                regions.remove(n);
            }
        }
        Ok(())
    }

    /// The status of region `name`, or of every region when `None`.
    pub fn status(&self, name: Option<&str>) -> Result<Vec<RegionStatus>, ShmError> {
        if !self.allowed {
            return Err(ShmError::Disabled);
        }
        let regions = self.regions();
        match name {
            None => Ok(regions.values().map(|r| r.status.clone()).collect()),
            Some(n) => regions
                .get(n)
                .map(|r| vec![r.status.clone()])
                .ok_or_else(|| ShmError::Unknown(n.into())),
        }
    }

    /// The file and the absolute position of `at` within it, checked against the region.
    fn locate(&self, at: &ShmRef, len: u64, what: &str) -> Result<(Arc<File>, u64), ShmError> {
        if !self.allowed {
            return Err(ShmError::Disabled);
        }
        let regions = self.regions();
        let r = regions
            .get(&at.region)
            .ok_or_else(|| ShmError::Unknown(at.region.clone()))?;
        if at
            .offset
            .checked_add(len)
            .is_none_or(|end| end > r.status.byte_size)
        {
            return Err(ShmError::Bounds(format!(
                "{what} needs bytes {}..{} of shared memory region {:?}, which has {} bytes",
                at.offset,
                at.offset.saturating_add(len),
                at.region,
                r.status.byte_size
            )));
        }
        Ok((r.file.clone(), r.status.offset + at.offset))
    }

    /// Reads the `at.byte_size` bytes of an input. `used` counts the bytes this request has read
    /// from shared memory so far: together they may not pass `--max-request-bytes`.
    pub fn read(&self, at: &ShmRef, what: &str, used: &mut u64) -> Result<Bytes, ShmError> {
        let total = self.within_limit(at, what, *used)?;
        let (file, pos) = self.locate(at, at.byte_size, what)?;
        let len = usize::try_from(at.byte_size)
            .map_err(|_| ShmError::Bounds(format!("{what}: {} bytes is too large", at.byte_size)))?;
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, pos).map_err(|source| {
            if source.kind() == std::io::ErrorKind::UnexpectedEof {
                ShmError::Shrunk(at.region.clone())
            } else {
                ShmError::Io {
                    region: at.region.clone(),
                    source,
                }
            }
        })?;
        *used = total;
        Ok(Bytes::from(buf))
    }

    /// The bytes this request will have read with `at`, refused past `--max-request-bytes`.
    fn within_limit(&self, at: &ShmRef, what: &str, used: u64) -> Result<u64, ShmError> {
        let total = used.saturating_add(at.byte_size);
        if self.allowed && total > self.max_input {
            return Err(ShmError::TooLarge {
                what: what.into(),
                size: total,
                limit: self.max_input,
            });
        }
        Ok(total)
    }

    /// Resolves where an output goes (see [`ShmTarget`]).
    pub fn target(&self, at: ShmRef, what: &str) -> Result<ShmTarget, ShmError> {
        let (file, pos) = self.locate(&at, at.byte_size, what)?;
        Ok(ShmTarget { at, file, pos })
    }
}

/// Where an output goes in shared memory, resolved when its request is decoded, before the model
/// runs: the region exists and holds `shared_memory_byte_size` bytes at the offset. The request
/// holds the region's file, so unregistering the region meanwhile neither fails the answer nor
/// sends it into another object registered under the name (Triton holds a region the same way).
#[derive(Debug, Clone)]
pub struct ShmTarget {
    at: ShmRef,
    file: Arc<File>,
    pos: u64,
}

impl ShmTarget {
    /// Writes an output's bytes; more than the request set aside is refused.
    pub fn write(&self, data: &[u8], what: &str) -> Result<(), ShmError> {
        if data.len() as u64 > self.at.byte_size {
            return Err(ShmError::Bounds(format!(
                "{what} has {} bytes but shared_memory_byte_size is {}",
                data.len(),
                self.at.byte_size
            )));
        }
        self.file
            .write_all_at(data, self.pos)
            .map_err(|source| ShmError::Io {
                region: self.at.region.clone(),
                source,
            })
    }
}

/// The registry a request may use: none without one (`None`, as in the fuzz targets) or when the
/// server was started without `--allow-client-shm`.
pub fn usable(shm: Option<&SharedMemory>) -> Result<&SharedMemory, ShmError> {
    match shm {
        Some(s) if s.allowed => Ok(s),
        _ => Err(ShmError::Disabled),
    }
}

/// What a request passes before it touches shared memory: called with 0 before a region is
/// looked up for an output, and with an input's size before its region is looked up and read.
/// [`gate`] makes the server's.
pub type Gate<'a> = &'a mut dyn FnMut(u64) -> Result<(), ApiError>;

/// The server's [`Gate`]: the caller's key must allow shared memory ([`crate::auth::SHARED_MEMORY`])
/// before anything about a region is looked up, so a key without the right cannot learn which
/// regions exist; and an input's bytes are reserved in the body budget (into `ticket`) before
/// they are read, as a body's are before they are buffered.
pub fn gate<'a>(
    keys: Option<&'a crate::auth::ApiKeys>,
    authorization: Option<&'a [u8]>,
    admission: &'a crate::admission::Admission,
    ticket: &'a mut crate::admission::Ticket,
) -> impl FnMut(u64) -> Result<(), ApiError> + 'a {
    move |n| {
        crate::auth::check_shared_memory(keys, authorization)?;
        admission.reserve(ticket, usize::try_from(n).unwrap_or(usize::MAX))
    }
}

/// Reads input `at` (named `what`) from `shm` through `gate`; `used` as in [`SharedMemory::read`].
pub fn read_input(
    shm: Option<&SharedMemory>,
    at: &ShmRef,
    what: &str,
    used: &mut u64,
    gate: Gate<'_>,
) -> Result<Bytes, ApiError> {
    let shm = usable(shm)?;
    gate(0)?;
    shm.within_limit(at, what, *used)?;
    gate(at.byte_size)?;
    Ok(shm.read(at, what, used)?)
}

/// Where an output goes: shared memory must be allowed and the caller pass `gate` before the region
/// is looked up, then the region is resolved and checked ([`ShmTarget`]).
pub fn output_target(
    shm: Option<&SharedMemory>,
    gate: Gate<'_>,
    at: ShmRef,
    what: &str,
) -> Result<ShmTarget, ApiError> {
    let shm = usable(shm)?;
    gate(0)?;
    Ok(shm.target(at, what)?)
}

/// The file of POSIX shared memory object `key` ("/name" or "name", as `shm_open` takes it): one
/// file name under [`SHM_DIR`], whatever its characters (perf_analyzer derives keys from tensor
/// names such as `input_1:0`).
fn key_path(key: &str) -> Result<PathBuf, ShmError> {
    let name = key.strip_prefix('/').unwrap_or(key);
    let ok = !name.is_empty()
        && name != "."
        && name != ".."
        && name.len() <= 255
        && !name.bytes().any(|b| b == b'/' || b == 0);
    if !ok {
        return Err(ShmError::BadKey(key.into()));
    }
    Ok(PathBuf::from(SHM_DIR).join(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Object(PathBuf);
    impl Drop for Object {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn object(name: &str, len: usize) -> Object {
        let path = PathBuf::from(SHM_DIR).join(name);
        std::fs::write(&path, vec![7u8; len]).expect("create a shared memory object");
        Object(path)
    }

    fn at(region: &str, offset: u64, byte_size: u64) -> ShmRef {
        ShmRef {
            region: region.into(),
            offset,
            byte_size,
        }
    }

    fn read(shm: &SharedMemory, at: &ShmRef) -> Result<Bytes, ShmError> {
        shm.read(at, "input", &mut 0)
    }

    #[test]
    fn keys_are_one_posix_name() {
        for (key, path) in [
            ("/in0", "/dev/shm/in0"),
            ("in_0.x-y", "/dev/shm/in_0.x-y"),
            ("/input_1:0_0", "/dev/shm/input_1:0_0"),
            ("/a b", "/dev/shm/a b"),
        ] {
            assert_eq!(key_path(key).ok(), Some(PathBuf::from(path)), "{key:?}");
        }
        for bad in ["", "/", "..", "/../etc/passwd", "a/b", "/..", "a\0b"] {
            assert!(matches!(key_path(bad), Err(ShmError::BadKey(_))), "{bad:?}");
        }
    }

    #[test]
    fn off_unless_allowed() {
        let shm = SharedMemory::new(false, 1 << 20);
        assert!(matches!(shm.register("r", "/x", 0, 1), Err(ShmError::Disabled)));
        assert!(matches!(shm.status(None), Err(ShmError::Disabled)));
        assert!(matches!(read(&shm, &at("r", 0, 1)), Err(ShmError::Disabled)));
    }

    #[test]
    fn a_link_in_the_shm_directory_is_not_followed() {
        let name = format!("kubemaas-unit-link-{}", std::process::id());
        let target = object(&format!("{name}-target"), 16);
        let link = PathBuf::from(SHM_DIR).join(&name);
        std::os::unix::fs::symlink(&target.0, &link).expect("make a link");
        let _link = Object(link);
        let shm = SharedMemory::new(true, 1 << 20);
        let got = shm.register("r", &format!("/{name}"), 0, 8);
        assert!(matches!(got, Err(ShmError::NotObject(_))), "{got:?}");
    }

    #[test]
    fn a_region_is_read_and_written_within_its_bounds_only() {
        let name = format!("kubemaas-unit-{}", std::process::id());
        let obj = object(&name, 64);
        let key = format!("/{name}");
        let shm = SharedMemory::new(true, 1 << 20);
        // Bytes 16..48 of the object.
        shm.register("r", &key, 16, 32).expect("register");
        assert!(matches!(shm.register("r", &key, 0, 8), Err(ShmError::Exists(_))));
        assert!(matches!(shm.register("s", &key, 60, 8), Err(ShmError::Bounds(_))));
        let missing = shm.register("s", "/kubemaas-no-such-object", 0, 8);
        assert!(matches!(missing, Err(ShmError::Open { .. })));

        shm.target(at("r", 4, 8), "output")
            .and_then(|t| t.write(&[1, 2, 3, 4, 5, 6, 7, 8], "output"))
            .expect("write");
        assert_eq!(
            &read(&shm, &at("r", 4, 8)).expect("read")[..],
            &[1, 2, 3, 4, 5, 6, 7, 8]
        );
        // Region offset 4 is object offset 20.
        let raw = std::fs::read(&obj.0).expect("read the object");
        assert_eq!(&raw[20..28], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(raw[19], 7);

        assert!(matches!(read(&shm, &at("r", 30, 4)), Err(ShmError::Bounds(_))));
        let too_big = shm
            .target(at("r", 0, 2), "output")
            .and_then(|t| t.write(&[0; 4], "output"));
        assert!(matches!(too_big, Err(ShmError::Bounds(_))));
        // An output region past the region's end is refused when it is resolved, before any write.
        assert!(matches!(
            shm.target(at("r", 30, 4), "output"),
            Err(ShmError::Bounds(_))
        ));
        // A resolved output outlives its region's registration.
        let held = shm.target(at("r", 0, 2), "output").expect("resolve");
        shm.unregister(Some("r")).expect("unregister");
        held.write(&[9, 9], "output").expect("write after unregister");
        assert_eq!(&std::fs::read(&obj.0).expect("read the object")[16..18], &[9, 9]);
        shm.register("r", &key, 16, 32).expect("register again");
        assert!(matches!(read(&shm, &at("q", 0, 1)), Err(ShmError::Unknown(_))));
        assert!(matches!(
            read(&shm, &at("r", u64::MAX, 2)),
            Err(ShmError::Bounds(_))
        ));

        // The inputs of one request share one bound.
        let small = SharedMemory::new(true, 12);
        small.register("r", &key, 0, 64).expect("register");
        let mut used = 0;
        assert_eq!(small.read(&at("r", 0, 8), "a", &mut used).expect("read").len(), 8);
        let over = small.read(&at("r", 0, 8), "b", &mut used);
        assert!(
            matches!(over, Err(ShmError::TooLarge { size: 16, .. })),
            "{over:?}"
        );

        // A client that shrinks its object after registering gets a 400, not a server error.
        std::fs::write(&obj.0, [0u8; 4]).expect("shrink");
        let shrunk = read(&shm, &at("r", 0, 8));
        assert!(matches!(shrunk, Err(ShmError::Shrunk(_))), "{shrunk:?}");

        assert_eq!(shm.status(None).expect("status").len(), 1);
        // Each region holds an open file: their number is bounded (MAX_REGIONS; 2 here).
        let few = SharedMemory {
            max_regions: 2,
            ..SharedMemory::new(true, 1 << 20)
        };
        few.register("a", &key, 0, 4).expect("register");
        few.register("b", &key, 0, 4).expect("register");
        let third = few.register("c", &key, 0, 4);
        assert!(
            matches!(third, Err(ShmError::Bounds(ref m)) if m.contains("2 shared memory regions")),
            "{third:?}"
        );
        few.unregister(Some("a")).expect("unregister");
        few.register("c", &key, 0, 4)
            .expect("room again after unregistering");
        shm.unregister(Some("r")).expect("unregister");
        assert!(matches!(shm.status(Some("r")), Err(ShmError::Unknown(_))));
    }
}
