//! Shared-memory lanes: how a rank hands its frames to a right neighbour on the
//! same host without the kernel copying them twice.
//!
//! Over TCP loopback every byte is copied into the kernel by the sender and out
//! of it by the receiver. A lane is a file in a tmpfs both ranks map (by default
//! `/dev/shm`): the sender copies each frame's values once into one of the lane's
//! slots, and the receiver adds (or copies) them straight out of it. The TCP link
//! stays, and carries the frames' headers (so steps, lengths and operations are
//! checked as before) and, back the other way, one credit byte per slot the
//! receiver has finished with; every wait keeps the link's I/O timeout, and a
//! peer that dies still shows as a closed connection.
//!
//! ```text
//!  sender                                   receiver
//!  wait for a free slot (credit) ◄─ 1 B ──── slot read: credit back
//!  copy values into slot s
//!  header ─────────── 32 B ────────────────► add or copy slot s into place
//! ```
//!
//! Setup, after both ends proved the ring key: the sender creates the file
//! (`kiln-lane-<random>`, mode 0600, its memory reserved with `posix_fallocate`
//! so that a full tmpfs is an error now rather than a `SIGBUS` later), writes a
//! header with a random token, and offers its name, geometry and token; the
//! receiver opens it without following links, checks its size, magic and token
//! (which tells a file of the same name on another host apart), maps it and
//! answers. Then the sender unlinks it: the mappings live on until both ranks
//! drop them. A sender that cannot create the file offers none, and a receiver
//! that cannot map the offered one declines: either way the link carries its
//! frames over TCP, as between hosts.
//!
//! Nothing but the two ranks touches a slot, and never both at once: the sender
//! writes slot `s` only after the receiver's credit for its previous frame there,
//! and the receiver reads it only after its header has arrived. The raw memory
//! accesses below rely on that protocol, which is why this module allows unsafe
//! code.

#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, Ordering};

use memmap2::{MmapOptions, MmapRaw};

/// Default directory of lanes: the tmpfs that processes on one host share.
pub const DEFAULT_DIR: &str = "/dev/shm";
/// Default slots per lane: enough for the sender to run ahead while the receiver
/// adds.
pub const DEFAULT_SLOTS: usize = 8;
/// Default slot size; a frame on a lane carries at most this many bytes.
pub const DEFAULT_SLOT_BYTES: usize = 1024 * 1024;
/// Bounds on what a lane offer may ask for.
pub const MAX_SLOTS: usize = 64;
pub const MAX_SLOT_BYTES: usize = 16 * 1024 * 1024;
/// Slots start on page boundaries, after a page of header.
const PAGE: usize = 4096;

const MAGIC: [u8; 8] = *b"KILNLANE";
/// Bytes of an offer on the wire.
pub(crate) const OFFER_BYTES: usize = 72;
/// Bytes of the answer to an offer.
pub(crate) const ANSWER_BYTES: usize = 4;
/// The byte a receiver sends back for each slot it has finished with.
pub(crate) const CREDIT: u8 = 0xC5;
/// Lane files start with this; the rest of the name is random.
const PREFIX: &str = "kiln-lane-";
/// A lane file this old is left by a process that died before its neighbour
/// answered (a live one is unlinked within the handshake's 5 s).
const STALE_AFTER: std::time::Duration = std::time::Duration::from_secs(600);

/// Where lanes are made and how large.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaneConfig {
    /// A tmpfs directory the ranks of one host share.
    pub dir: PathBuf,
    pub slots: usize,
    /// A multiple of 4096, from 4096 to [`MAX_SLOT_BYTES`].
    pub slot_bytes: usize,
}

impl Default for LaneConfig {
    fn default() -> LaneConfig {
        LaneConfig {
            dir: PathBuf::from(DEFAULT_DIR),
            slots: DEFAULT_SLOTS,
            slot_bytes: DEFAULT_SLOT_BYTES,
        }
    }
}

impl LaneConfig {
    /// Why these bounds cannot make a lane, if they cannot.
    pub fn invalid(&self) -> Option<String> {
        geometry_problem(self.slots, self.slot_bytes)
    }
}

fn geometry_problem(slots: usize, slot_bytes: usize) -> Option<String> {
    if !(1..=MAX_SLOTS).contains(&slots) {
        return Some(format!("{slots} lane slots; 1 to {MAX_SLOTS} are allowed"));
    }
    if !(PAGE..=MAX_SLOT_BYTES).contains(&slot_bytes) || !slot_bytes.is_multiple_of(PAGE) {
        return Some(format!(
            "lane slots of {slot_bytes} bytes; a multiple of {PAGE} up to {MAX_SLOT_BYTES}"
        ));
    }
    None
}

/// A lane's file name, geometry and token, as the sender offers them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Offer {
    pub name: [u8; 16],
    pub slots: u32,
    pub slot_bytes: u32,
    pub token: [u8; 32],
}

impl Offer {
    /// Encodes this offer, or the absence of one (`None`: frames go over TCP).
    pub(crate) fn encode(offer: Option<&Offer>) -> [u8; OFFER_BYTES] {
        let mut out = [0u8; OFFER_BYTES];
        out[0..8].copy_from_slice(&MAGIC);
        if let Some(offer) = offer {
            out[8..12].copy_from_slice(&1u32.to_le_bytes());
            out[12..16].copy_from_slice(&offer.slots.to_le_bytes());
            out[16..20].copy_from_slice(&offer.slot_bytes.to_le_bytes());
            out[24..40].copy_from_slice(&offer.name);
            out[40..72].copy_from_slice(&offer.token);
        }
        out
    }

    /// Decodes an offer: `Ok(None)` when the sender offers no lane, an error for
    /// bytes that are not an offer.
    pub(crate) fn decode(bytes: &[u8; OFFER_BYTES]) -> Result<Option<Offer>, String> {
        if bytes[0..8] != MAGIC {
            return Err("not a lane offer".into());
        }
        if bytes[20..24] != [0; 4] {
            return Err("a lane offer with its reserved bytes set".into());
        }
        let word =
            |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("four bytes"));
        match word(8) {
            0 => Ok(None),
            1 => Ok(Some(Offer {
                slots: word(12),
                slot_bytes: word(16),
                name: bytes[24..40].try_into().expect("16 bytes"),
                token: bytes[40..72].try_into().expect("32 bytes"),
            })),
            other => Err(format!("unknown lane kind {other}")),
        }
    }

    fn file_name(&self) -> String {
        format!("{PREFIX}{}", hex::encode(self.name))
    }
}

/// A mapped lane: a header page, then `slots` slots of `slot_bytes`.
pub(crate) struct Lane {
    map: MmapRaw,
    slots: usize,
    slot_bytes: usize,
}

impl std::fmt::Debug for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lane")
            .field("slots", &self.slots)
            .field("slot_bytes", &self.slot_bytes)
            .finish()
    }
}

/// A lane file that is unlinked when dropped: the sender keeps it only until
/// the receiver has answered.
#[derive(Debug)]
pub(crate) struct Unlink(PathBuf);

impl Drop for Unlink {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(path = %self.0.display(), error = %e, "remove a lane file");
            }
        }
    }
}

fn file_bytes(slots: usize, slot_bytes: usize) -> usize {
    PAGE + slots * slot_bytes
}

impl Lane {
    /// Creates, reserves and maps a new lane file under `config.dir`, with a
    /// fresh name and token. The returned guard unlinks the file. Stale lane
    /// files of this user there go first.
    pub(crate) fn create(config: &LaneConfig) -> io::Result<(Lane, Offer, Unlink)> {
        if let Some(problem) = config.invalid() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, problem));
        }
        sweep_stale(&config.dir, STALE_AFTER);
        let offer = Offer {
            name: rand::random(),
            slots: u32::try_from(config.slots).expect("bounded by MAX_SLOTS"),
            slot_bytes: u32::try_from(config.slot_bytes).expect("bounded by MAX_SLOT_BYTES"),
            token: rand::random(),
        };
        let path = config.dir.join(offer.file_name());
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        let unlink = Unlink(path);
        let len = file_bytes(config.slots, config.slot_bytes);
        reserve(&file, len)?;
        let map = MmapOptions::new().len(len).map_raw(&file)?;
        let lane = Lane {
            map,
            slots: config.slots,
            slot_bytes: config.slot_bytes,
        };
        lane.write_header(&offer.token);
        Ok((lane, offer, unlink))
    }

    /// Opens and maps the lane `offer` names under `dir`, checking that it is the
    /// very file the sender made: a regular file of this user, of the offered
    /// size, with the offered token.
    pub(crate) fn open(dir: &Path, offer: &Offer) -> Result<Lane, String> {
        let (slots, slot_bytes) = (offer.slots as usize, offer.slot_bytes as usize);
        if let Some(problem) = geometry_problem(slots, slot_bytes) {
            return Err(problem);
        }
        let path = dir.join(offer.file_name());
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| format!("open {}: {e}", path.display()))?;
        let meta = file
            .metadata()
            .map_err(|e| format!("stat {}: {e}", path.display()))?;
        let len = file_bytes(slots, slot_bytes);
        if !meta.is_file() {
            return Err(format!("{} is not a regular file", path.display()));
        }
        // SAFETY: geteuid has no preconditions.
        if meta.uid() != unsafe { libc::geteuid() } {
            return Err(format!("{} belongs to another user", path.display()));
        }
        if meta.len() != len as u64 {
            return Err(format!(
                "{} holds {} bytes, not the {len} offered",
                path.display(),
                meta.len()
            ));
        }
        let map = MmapOptions::new()
            .len(len)
            .map_raw(&file)
            .map_err(|e| format!("map {}: {e}", path.display()))?;
        let lane = Lane {
            map,
            slots,
            slot_bytes,
        };
        if !lane.header_is(&offer.token) {
            return Err(format!(
                "{} is not the lane offered (its token differs)",
                path.display()
            ));
        }
        Ok(lane)
    }

    /// Slots in this lane.
    pub(crate) fn slots(&self) -> usize {
        self.slots
    }

    /// Largest frame, in f32 values.
    pub(crate) fn slot_elems(&self) -> usize {
        self.slot_bytes / std::mem::size_of::<f32>()
    }

    fn write_header(&self, token: &[u8; 32]) {
        let mut head = [0u8; 40];
        head[..8].copy_from_slice(&MAGIC);
        head[8..].copy_from_slice(token);
        // SAFETY: the map is at least a page long and no one else has it yet.
        unsafe {
            std::ptr::copy_nonoverlapping(head.as_ptr(), self.map.as_mut_ptr(), head.len());
        }
    }

    fn header_is(&self, token: &[u8; 32]) -> bool {
        let mut head = [0u8; 40];
        // SAFETY: the map is at least a page long; the sender wrote the header
        // before it offered the lane and does not write it again.
        unsafe {
            std::ptr::copy_nonoverlapping(self.map.as_ptr(), head.as_mut_ptr(), head.len());
        }
        head[..8] == MAGIC && head[8..] == token[..]
    }

    fn slot_ptr(&self, slot: usize, len: usize) -> *mut f32 {
        assert!(slot < self.slots, "slot {slot} of {}", self.slots);
        assert!(
            len <= self.slot_elems(),
            "{len} values in a slot of {}",
            self.slot_elems()
        );
        // In bounds by the asserts; page aligned, so aligned for f32.
        self.map
            .as_mut_ptr()
            .wrapping_add(PAGE + slot * self.slot_bytes)
            .cast::<f32>()
    }

    /// Copies `values` into `slot` (the sender's side).
    ///
    /// # Safety
    ///
    /// Nothing may read or write the slot meanwhile: the caller is the lane's
    /// one sender, and the receiver has given the slot back (its credit for the
    /// slot's previous frame has arrived) and will not read it before the header
    /// the caller sends after this returns.
    pub(crate) unsafe fn put(&self, slot: usize, values: &[f32]) {
        let to = self.slot_ptr(slot, values.len());
        // SAFETY: `to` has room for `values.len()` values (slot_ptr's asserts);
        // nothing else touches the slot (this function's contract).
        unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), to, values.len()) };
        // The writes are published by the header that follows through the
        // socket (a syscall, which orders them); this fence only keeps the
        // compiler from moving them past it.
        fence(Ordering::Release);
    }

    /// Adds the first `into.len()` values of `slot` into `into`, or copies them
    /// over it (the receiver's side). No reference to the shared memory is
    /// made: the values are read through the raw pointer.
    ///
    /// # Safety
    ///
    /// Nothing may write the slot meanwhile: the caller is the lane's one
    /// receiver, has received the header of the frame in the slot, and has not
    /// yet sent the credit that gives it back.
    pub(crate) unsafe fn take(&self, slot: usize, into: &mut [f32], add: bool) {
        fence(Ordering::Acquire);
        let from = self.slot_ptr(slot, into.len()).cast_const();
        if add {
            for (i, x) in into.iter_mut().enumerate() {
                // SAFETY: `i < into.len()`, which the slot holds (slot_ptr's
                // asserts); nothing writes it meanwhile (this function's contract).
                *x += unsafe { from.add(i).read() };
            }
        } else {
            // SAFETY: as above, for the whole run of `into.len()` values.
            unsafe { std::ptr::copy_nonoverlapping(from, into.as_mut_ptr(), into.len()) };
        }
    }
}

/// Removes this user's lane files under `dir` last changed more than `age`
/// ago: a process killed between making one and its neighbour's answer leaves
/// it behind. Best effort: what cannot be read or removed stays.
fn sweep_stale(dir: &Path, age: std::time::Duration) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().starts_with(PREFIX) {
            continue;
        }
        let Ok(meta) = entry.metadata() else {
            continue;
        };
        let old = meta
            .modified()
            .ok()
            .and_then(|at| at.elapsed().ok())
            .is_some_and(|elapsed| elapsed > age);
        if meta.is_file() && meta.uid() == me && old {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => {
                    tracing::info!(path = %entry.path().display(), "removed a stale lane file")
                }
                Err(e) => {
                    tracing::debug!(path = %entry.path().display(), error = %e, "stale lane file stays")
                }
            }
        }
    }
}

/// Reserves `len` bytes of memory for `file` now, so that a tmpfs without room
/// fails here with ENOSPC rather than with a SIGBUS at the first write.
fn reserve(file: &File, len: usize) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let len = libc::off_t::try_from(len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "lane too large"))?;
    // SAFETY: a valid open descriptor and a non-negative range.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path) -> LaneConfig {
        LaneConfig {
            dir: dir.to_path_buf(),
            slots: 2,
            slot_bytes: PAGE,
        }
    }

    #[test]
    fn values_put_in_a_slot_are_taken_by_the_other_mapping() {
        let dir = tempfile::tempdir().expect("dir");
        let (sender, offer, unlink) = Lane::create(&config(dir.path())).expect("create");
        let receiver = Lane::open(dir.path(), &offer).expect("open");
        drop(unlink);
        assert_eq!(
            std::fs::read_dir(dir.path()).expect("list").count(),
            0,
            "the file is gone once offered"
        );
        let mut into = [10.0, 20.0, 30.0];
        // SAFETY: one thread, each slot written then read.
        unsafe {
            sender.put(1, &[1.0, 2.0, 3.0]);
            receiver.take(1, &mut into, true);
        }
        assert_eq!(into, [11.0, 22.0, 33.0]);
        let full: Vec<f32> = (0..receiver.slot_elems()).map(|i| i as f32).collect();
        let mut copy = vec![0.0; full.len()];
        // SAFETY: as above.
        unsafe {
            sender.put(0, &full);
            receiver.take(0, &mut copy, false);
        }
        assert_eq!(copy, full);
    }

    #[test]
    fn offers_round_trip_and_garbage_is_refused() {
        let offer = Offer {
            name: [7; 16],
            slots: 8,
            slot_bytes: 1 << 20,
            token: [9; 32],
        };
        assert_eq!(
            Offer::decode(&Offer::encode(Some(&offer))),
            Ok(Some(offer.clone()))
        );
        assert_eq!(Offer::decode(&Offer::encode(None)), Ok(None));
        let mut bad = Offer::encode(None);
        bad[8] = 5;
        assert_eq!(Offer::decode(&bad), Err("unknown lane kind 5".into()));
        let mut reserved = Offer::encode(Some(&offer));
        reserved[21] = 1;
        assert!(Offer::decode(&reserved).is_err());
        assert_eq!(
            Offer::decode(&[0; OFFER_BYTES]),
            Err("not a lane offer".into())
        );
    }

    #[test]
    fn a_file_that_is_not_the_offered_lane_is_refused_naming_why() {
        let dir = tempfile::tempdir().expect("dir");
        let (_lane, offer, _unlink) = Lane::create(&config(dir.path())).expect("create");

        let elsewhere = tempfile::tempdir().expect("dir");
        let missing = Lane::open(elsewhere.path(), &offer).expect_err("another host");
        assert!(missing.contains("No such file"), "{missing}");

        let forged = Offer {
            token: [0; 32],
            ..offer.clone()
        };
        let wrong = Lane::open(dir.path(), &forged).expect_err("wrong token");
        assert!(wrong.contains("token differs"), "{wrong}");

        let bigger = Offer {
            slots: 3,
            ..offer.clone()
        };
        let size = Lane::open(dir.path(), &bigger).expect_err("wrong size");
        assert!(size.contains("not the"), "{size}");

        let absurd = Offer {
            slot_bytes: 100,
            ..offer.clone()
        };
        let geometry = Lane::open(dir.path(), &absurd).expect_err("bad geometry");
        assert!(geometry.contains("a multiple of 4096"), "{geometry}");

        // A link planted under the name is not followed.
        let planted = Offer {
            name: [1; 16],
            ..offer.clone()
        };
        std::os::unix::fs::symlink(
            dir.path().join(offer.file_name()),
            dir.path().join(planted.file_name()),
        )
        .expect("symlink");
        let link = Lane::open(dir.path(), &planted).expect_err("a symlink");
        assert!(link.contains("open"), "{link}");
    }

    #[test]
    fn stale_lane_files_of_this_user_are_swept_and_nothing_else() {
        let dir = tempfile::tempdir().expect("dir");
        let (_lane, offer, _unlink) = Lane::create(&config(dir.path())).expect("create");
        let other = dir.path().join("kiln-notes");
        std::fs::write(&other, b"keep").expect("write");
        sweep_stale(dir.path(), std::time::Duration::from_secs(600));
        assert!(
            dir.path().join(offer.file_name()).exists(),
            "a fresh lane stays"
        );
        sweep_stale(dir.path(), std::time::Duration::ZERO);
        assert!(
            !dir.path().join(offer.file_name()).exists(),
            "a stale lane goes"
        );
        assert!(other.exists(), "only lane files are swept");
    }

    #[test]
    fn a_lane_cannot_be_made_where_there_is_no_directory_or_bad_bounds() {
        let dir = tempfile::tempdir().expect("dir");
        let gone = LaneConfig {
            dir: dir.path().join("absent"),
            ..config(dir.path())
        };
        assert!(Lane::create(&gone).is_err());
        let zero = LaneConfig {
            slots: 0,
            ..config(dir.path())
        };
        let err = Lane::create(&zero).expect_err("no slots");
        assert!(err.to_string().contains("0 lane slots"), "{err}");
    }
}
