//! The rendezvous folder of a communicator: how its ranks, threads of one process or processes
//! of one machine, find each other and exchange data without a network.
//!
//! The 128-byte `ncclUniqueId` names the folder: a magic, 16 random bytes (the folder's name)
//! and the base folder it lies in (`SIMCLR_GPU_EMU_NCCL_DIR`, else `/dev/shm` where writable,
//! else the temporary folder), so that every rank finds the same folder whatever its own
//! environment. Every file is written under a temporary name and renamed into place, so a file
//! present is complete. The files:
//!
//! - `join.R`: rank R joined (`ncclCommInitRank`): the number of ranks, its process id and its
//!   device, for the checks NCCL makes at initialisation and to tell a peer's process has died.
//! - `cK.R`: rank R's contribution to the communicator's collective number K (a header naming
//!   the operation, then the bytes it sends).
//! - `abort.R`: rank R aborted, or failed its initialisation (peers waiting on it stop).
//! - `gone.R`: rank R has left (destroyed or aborted); the last rank to leave removes the
//!   folder (a rank whose process was killed leaves it behind: a few small files).

use std::path::{Path, PathBuf};

/// The first bytes of every unique id the emulator makes.
const MAGIC: &[u8; 8] = b"SGEMNCCL";

/// The size of `ncclUniqueId` (`NCCL_UNIQUE_ID_BYTES`).
pub const ID_BYTES: usize = 128;

/// A new unique id: the magic, 16 random bytes and the base folder (NUL-terminated).
pub fn new_id() -> Result<[u8; ID_BYTES], String> {
    let mut id = [0u8; ID_BYTES];
    id[..8].copy_from_slice(MAGIC);
    random(&mut id[8..24])?;
    let base = base_dir();
    let b = base.as_os_str().as_encoded_bytes();
    if b.len() > ID_BYTES - 25 {
        return Err(format!(
            "the rendezvous folder {} is too long for a unique id (at most {} bytes)",
            base.display(),
            ID_BYTES - 25
        ));
    }
    id[24..24 + b.len()].copy_from_slice(b);
    Ok(id)
}

/// The rendezvous folder a unique id names, or why it names none.
pub fn folder(id: &[u8; ID_BYTES]) -> Result<PathBuf, String> {
    if &id[..8] != MAGIC {
        return Err("the unique id was not made by ncclGetUniqueId".into());
    }
    let end = id[24..].iter().position(|&b| b == 0).map(|p| p + 24);
    let base = match end {
        Some(e) if e > 24 => std::str::from_utf8(&id[24..e]).map_err(|e| e.to_string())?,
        _ => return Err("the unique id names no rendezvous folder".into()),
    };
    let token: String = id[8..24].iter().map(|b| format!("{b:02x}")).collect();
    Ok(Path::new(base).join(format!("simclr-gpu-emu-nccl-{token}")))
}

fn base_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SIMCLR_GPU_EMU_NCCL_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let shm = Path::new("/dev/shm");
    let c = c"/dev/shm";
    // SAFETY: a NUL-terminated path.
    if shm.is_dir() && unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) } == 0 {
        return shm.to_path_buf();
    }
    std::env::temp_dir()
}

fn random(out: &mut [u8]) -> Result<(), String> {
    let mut at = 0;
    while at < out.len() {
        // SAFETY: writes at most `out.len() - at` bytes into `out[at..]`.
        let n = unsafe {
            libc::getrandom(
                out[at..].as_mut_ptr() as *mut libc::c_void,
                out.len() - at,
                0,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("getrandom: {e}"));
        }
        at += n as usize;
    }
    Ok(())
}

/// Writes `data` to `dir/name` so that the file appears complete or not at all.
pub fn publish(dir: &Path, name: &str, data: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, dir.join(name))
}

/// Whether `dir/name` exists.
pub fn exists(dir: &Path, name: &str) -> bool {
    dir.join(name).exists()
}

/// Whether process `pid` is gone (not merely someone else's).
pub fn process_gone(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    let r = unsafe { libc::kill(pid, 0) };
    r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

/// Rank `rank` leaves the folder (`gone.R`); the last to leave removes it: when every rank
/// that joined has left or its process is dead, so nothing a live peer may still read is
/// deleted. (A rank that joins later, after every other has left, waits until its own abort,
/// as a NCCL rank whose peers are gone does.)
pub fn leave(dir: &Path, rank: usize, nranks: usize, pids: &[i32]) {
    let _ = publish(dir, &format!("gone.{rank}"), b"");
    let all_gone = (0..nranks).all(|r| {
        exists(dir, &format!("gone.{r}"))
            || !exists(dir, &format!("join.{r}"))
            || pids.get(r).is_some_and(|&p| p != 0 && process_gone(p))
    });
    if all_gone {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// A polling wait's pause: yields first, then sleeps, growing to a millisecond (collectives of
/// ranks that are all present finish in microseconds; a rank waiting on a slow peer costs
/// little).
#[derive(Default)]
pub struct Backoff(u32);

impl Backoff {
    /// A new wait.
    pub fn new() -> Backoff {
        Backoff(0)
    }

    /// Pauses once.
    pub fn pause(&mut self) {
        self.0 += 1;
        if self.0 < 10 {
            std::thread::yield_now();
        } else {
            let us = (self.0 as u64 - 9).saturating_mul(20).min(1000);
            std::thread::sleep(std::time::Duration::from_micros(us));
        }
    }
}
