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
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;

/// Where Linux keeps POSIX shared memory objects (`shm_open` names).
pub const SHM_DIR: &str = "/dev/shm";

/// Why a shared memory operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    /// The server was not started with `--allow-client-shm`.
    #[error("system shared memory is off on this server; start it with --allow-client-shm to use it")]
    Disabled,
    /// The key is not one POSIX shared memory name.
    #[error(
        "shared memory key {0:?} is not a POSIX shared memory name: use one name such as \"/input0\" (letters, digits, '.', '_', '-')"
    )]
    BadKey(String),
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
    /// An input larger than a request may be.
    #[error("{what} is {size} bytes in shared memory, over --max-request-bytes ({limit})")]
    TooLarge {
        /// The input.
        what: String,
        /// Its size.
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
            ShmError::Unknown(_) => ApiError::NotFound(e.to_string()),
            ShmError::TooLarge { .. } => ApiError::PayloadTooLarge(e.to_string()),
            ShmError::Io { .. } => ApiError::Internal(e.to_string()),
            _ => ApiError::BadRequest(e.to_string()),
        }
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
    regions: Mutex<BTreeMap<String, Region>>,
}

impl SharedMemory {
    /// A registry; `allowed` false refuses every registration and use (`--allow-client-shm`).
    /// Inputs larger than `max_input` bytes (`--max-request-bytes`) are refused.
    pub fn new(allowed: bool, max_input: usize) -> SharedMemory {
        SharedMemory {
            allowed,
            max_input: max_input as u64,
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
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|source| ShmError::Open {
                key: key.into(),
                source,
            })?;
        let len = file
            .metadata()
            .map_err(|source| ShmError::Open {
                key: key.into(),
                source,
            })?
            .len();
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

    /// Reads the `at.byte_size` bytes of an input.
    pub fn read(&self, at: &ShmRef, what: &str) -> Result<Bytes, ShmError> {
        if self.allowed && at.byte_size > self.max_input {
            return Err(ShmError::TooLarge {
                what: what.into(),
                size: at.byte_size,
                limit: self.max_input,
            });
        }
        let (file, pos) = self.locate(at, at.byte_size, what)?;
        let len = usize::try_from(at.byte_size)
            .map_err(|_| ShmError::Bounds(format!("{what}: {} bytes is too large", at.byte_size)))?;
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, pos).map_err(|source| ShmError::Io {
            region: at.region.clone(),
            source,
        })?;
        Ok(Bytes::from(buf))
    }

    /// Writes an output's bytes, which must fit `at.byte_size`.
    pub fn write(&self, at: &ShmRef, data: &[u8], what: &str) -> Result<(), ShmError> {
        if data.len() as u64 > at.byte_size {
            return Err(ShmError::Bounds(format!(
                "{what} has {} bytes but shared_memory_byte_size is {}",
                data.len(),
                at.byte_size
            )));
        }
        let (file, pos) = self.locate(at, data.len() as u64, what)?;
        file.write_all_at(data, pos).map_err(|source| ShmError::Io {
            region: at.region.clone(),
            source,
        })
    }
}

/// The file of POSIX shared memory object `key` ("/name" or "name", as `shm_open` takes it).
fn key_path(key: &str) -> Result<PathBuf, ShmError> {
    let name = key.strip_prefix('/').unwrap_or(key);
    let ok = !name.is_empty()
        && name != "."
        && name != ".."
        && name.len() <= 255
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
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

    #[test]
    fn keys_are_one_posix_name() {
        assert_eq!(key_path("/in0").ok(), Some(PathBuf::from("/dev/shm/in0")));
        assert_eq!(
            key_path("in_0.x-y").ok(),
            Some(PathBuf::from("/dev/shm/in_0.x-y"))
        );
        for bad in ["", "/", "..", "/../etc/passwd", "a/b", "/a b", "/.."] {
            assert!(matches!(key_path(bad), Err(ShmError::BadKey(_))), "{bad:?}");
        }
    }

    #[test]
    fn off_unless_allowed() {
        let shm = SharedMemory::new(false, 1 << 20);
        assert!(matches!(shm.register("r", "/x", 0, 1), Err(ShmError::Disabled)));
        assert!(matches!(shm.status(None), Err(ShmError::Disabled)));
        assert!(matches!(
            shm.read(&at("r", 0, 1), "input"),
            Err(ShmError::Disabled)
        ));
    }

    #[test]
    fn a_region_is_read_and_written_within_its_bounds_only() {
        let name = format!("kubemaas-unit-{}", std::process::id());
        let _obj = object(&name, 64);
        let shm = SharedMemory::new(true, 1 << 20);
        // Bytes 16..48 of the object.
        shm.register("r", &format!("/{name}"), 16, 32).expect("register");
        assert!(matches!(
            shm.register("r", &format!("/{name}"), 0, 8),
            Err(ShmError::Exists(_))
        ));
        assert!(matches!(
            shm.register("s", &format!("/{name}"), 60, 8),
            Err(ShmError::Bounds(_))
        ));
        assert!(matches!(
            shm.register("s", "/kubemaas-no-such-object", 0, 8),
            Err(ShmError::Open { .. })
        ));

        shm.write(&at("r", 4, 8), &[1, 2, 3, 4, 5, 6, 7, 8], "output")
            .expect("write");
        assert_eq!(
            &shm.read(&at("r", 4, 8), "input").expect("read")[..],
            &[1, 2, 3, 4, 5, 6, 7, 8]
        );
        // Region offset 4 is object offset 20.
        let raw = std::fs::read(PathBuf::from(SHM_DIR).join(&name)).expect("read the object");
        assert_eq!(&raw[20..28], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(raw[19], 7);

        assert!(matches!(
            shm.read(&at("r", 30, 4), "input"),
            Err(ShmError::Bounds(_))
        ));
        assert!(matches!(
            shm.write(&at("r", 0, 2), &[0; 4], "output"),
            Err(ShmError::Bounds(_))
        ));
        assert!(matches!(
            shm.read(&at("q", 0, 1), "input"),
            Err(ShmError::Unknown(_))
        ));
        assert!(matches!(
            shm.read(&at("r", u64::MAX, 2), "input"),
            Err(ShmError::Bounds(_))
        ));
        let small = SharedMemory::new(true, 8);
        small.register("r", &format!("/{name}"), 0, 64).expect("register");
        assert!(matches!(
            small.read(&at("r", 0, 16), "input"),
            Err(ShmError::TooLarge { .. })
        ));
        assert_eq!(small.read(&at("r", 0, 8), "input").expect("read").len(), 8);

        assert_eq!(shm.status(None).expect("status").len(), 1);
        shm.unregister(Some("r")).expect("unregister");
        assert!(matches!(shm.status(Some("r")), Err(ShmError::Unknown(_))));
    }
}
