//! [`TcpComm`]: one process per replica, over TCP, star-shaped through rank 0.
//!
//! Rank 0 listens at the rendezvous address; the other ranks connect and say who they are. In a
//! collective every rank sends its blob to rank 0, which answers each with all the blobs in rank
//! order. Every frame carries the collective's sequence number, so ranks that call collectives
//! in different orders fail with [`CommError::Mismatch`] instead of mixing data.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{default_timeout, CommError, Communicator};

const MAGIC: &[u8; 8] = b"SIMCLR01";

/// Where and how the ranks meet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RendezvousConfig {
    /// This process's rank.
    pub rank: usize,
    /// The number of processes.
    pub world_size: usize,
    /// Host of rank 0 (`MASTER_ADDR`).
    pub host: String,
    /// Port rank 0 listens on (see [`rendezvous_port`]).
    pub port: u16,
    /// How long the rendezvous may take before every rank gives up.
    pub rendezvous_timeout: Duration,
    /// How long a collective waits for the other ranks.
    pub timeout: Duration,
}

impl RendezvousConfig {
    /// From the environment, as `torchrun` sets it (`RANK`, `WORLD_SIZE`, `MASTER_ADDR`,
    /// `MASTER_PORT`) or as SLURM does (`SLURM_PROCID`, `SLURM_NTASKS`, and `MASTER_ADDR` or the
    /// first host of `SLURM_JOB_NODELIST`; `MASTER_PORT` or 29500). The port is chosen by
    /// [`rendezvous_port`] (`SIMCLR_RENDEZVOUS_PORT` overrides it; under torchrun it is
    /// `MASTER_PORT + 1`). `None` when neither is set (a single-process run).
    pub fn from_env() -> Result<Option<RendezvousConfig>, CommError> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// [`RendezvousConfig::from_env`] over any variable lookup.
    pub fn from_vars(
        var: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<RendezvousConfig>, CommError> {
        let num = |k: &str| -> Result<Option<usize>, CommError> {
            match var(k) {
                None => Ok(None),
                Some(v) => v.trim().parse().map(Some).map_err(|_| {
                    CommError::Rendezvous(format!("{k}={v:?} is not a non-negative integer"))
                }),
            }
        };
        let (rank, world) = match (num("RANK")?, num("WORLD_SIZE")?) {
            (Some(r), Some(w)) => (r, w),
            (None, None) => match (num("SLURM_PROCID")?, num("SLURM_NTASKS")?) {
                (Some(r), Some(w)) => (r, w),
                (None, None) => return Ok(None),
                _ => {
                    return Err(CommError::Rendezvous(
                        "SLURM_PROCID and SLURM_NTASKS must be set together".into(),
                    ))
                }
            },
            _ => {
                return Err(CommError::Rendezvous(
                    "RANK and WORLD_SIZE must be set together".into(),
                ))
            }
        };
        if world == 0 || rank >= world {
            return Err(CommError::Rendezvous(format!(
                "rank {rank} outside a world of {world}"
            )));
        }
        let host = match var("MASTER_ADDR") {
            Some(h) if !h.trim().is_empty() => h.trim().to_string(),
            _ => match var("SLURM_JOB_NODELIST").or_else(|| var("SLURM_NODELIST")) {
                Some(list) => first_host(&list)?,
                None if world == 1 => "127.0.0.1".into(),
                None => {
                    return Err(CommError::Rendezvous(
                        "MASTER_ADDR is not set (nor SLURM_JOB_NODELIST)".into(),
                    ))
                }
            },
        };
        let port = rendezvous_port(&var)?;
        let timeout = default_timeout();
        Ok(Some(RendezvousConfig {
            rank,
            world_size: world,
            host,
            port,
            rendezvous_timeout: timeout,
            timeout,
        }))
    }
}

/// The variable that overrides the port rank 0 listens on for the rendezvous; every rank must
/// see the same value.
pub const RENDEZVOUS_PORT_VAR: &str = "SIMCLR_RENDEZVOUS_PORT";

/// The port of the rendezvous, from the environment variables that `var` looks up:
///
/// - `SIMCLR_RENDEZVOUS_PORT` when set;
/// - else `MASTER_PORT + 1` when `TORCHELASTIC_USE_AGENT_STORE` is true: torchrun's elastic agent
///   on the master node already listens on `MASTER_PORT` with its own TCPStore (the static
///   rendezvous creates it there, the c10d one shares its store and names its port as
///   `MASTER_PORT`), and tells its workers so through that variable, so rank 0 cannot bind
///   `MASTER_PORT`; the next port is free unless something else holds it;
/// - else `MASTER_PORT` (set by `simclr launch`, or by hand under SLURM), or 29500.
pub fn rendezvous_port(var: impl Fn(&str) -> Option<String>) -> Result<u16, CommError> {
    let parse = |k: &str, v: &str| -> Result<u16, CommError> {
        v.trim()
            .parse()
            .map_err(|_| CommError::Rendezvous(format!("{k}={v:?} is not a port number")))
    };
    if let Some(v) = var(RENDEZVOUS_PORT_VAR).filter(|v| !v.trim().is_empty()) {
        return parse(RENDEZVOUS_PORT_VAR, &v);
    }
    let master = match var("MASTER_PORT") {
        Some(v) => parse("MASTER_PORT", &v)?,
        None => 29500,
    };
    let agent_store = var("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "true" | "1" | "yes" | "on"
        )
    });
    if !agent_store {
        return Ok(master);
    }
    master.checked_add(1).ok_or_else(|| {
        CommError::Rendezvous(format!(
            "torchrun's agent holds MASTER_PORT={master} and the next port does not exist: set \
             {RENDEZVOUS_PORT_VAR} to a free port (the same for every rank)"
        ))
    })
}

/// The first host of a SLURM node list: `node[03-05,07],gpu1` gives `node03`.
pub fn first_host(list: &str) -> Result<String, CommError> {
    let list = list.trim();
    let bad = || CommError::Rendezvous(format!("cannot read the SLURM node list {list:?}"));
    let first = match (list.find(','), list.find('[')) {
        (Some(c), Some(b)) if c < b => &list[..c],
        (Some(c), None) => &list[..c],
        _ => list,
    };
    match first.find('[') {
        None if !first.is_empty() => Ok(first.to_string()),
        None => Err(bad()),
        Some(b) => {
            let inner = first[b + 1..].split(']').next().ok_or_else(bad)?;
            let range = inner.split(',').next().ok_or_else(bad)?;
            let lo = range.split('-').next().ok_or_else(bad)?;
            if lo.is_empty() || !lo.chars().all(|c| c.is_ascii_digit()) {
                return Err(bad());
            }
            Ok(format!("{}{lo}", &first[..b]))
        }
    }
}

#[derive(Debug)]
enum Links {
    /// Rank 0: the stream of rank `i + 1` at index `i`.
    Root(Vec<TcpStream>),
    /// Another rank: its stream to rank 0.
    Leaf(TcpStream),
}

#[derive(Debug)]
struct Inner {
    links: Links,
    seq: u64,
}

/// One rank of a group of processes connected over TCP.
#[derive(Debug)]
pub struct TcpComm {
    rank: usize,
    world: usize,
    timeout: Duration,
    inner: Mutex<Inner>,
}

fn io_err(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

impl TcpComm {
    /// Joins the group: rank 0 listens and waits for the others, the others connect (retrying
    /// until the rendezvous timeout).
    pub fn connect(cfg: &RendezvousConfig) -> Result<TcpComm, CommError> {
        if cfg.world_size == 0 || cfg.rank >= cfg.world_size {
            return Err(CommError::Rendezvous(format!(
                "rank {} outside a world of {}",
                cfg.rank, cfg.world_size
            )));
        }
        let addr = resolve(&cfg.host, cfg.port)?;
        let deadline = Instant::now() + cfg.rendezvous_timeout;
        let links = if cfg.rank == 0 {
            Links::Root(accept_all(addr, cfg, deadline)?)
        } else {
            Links::Leaf(join(addr, cfg, deadline)?)
        };
        Ok(TcpComm {
            rank: cfg.rank,
            world: cfg.world_size,
            timeout: cfg.timeout,
            inner: Mutex::new(Inner { links, seq: 0 }),
        })
    }
}

fn resolve(host: &str, port: u16) -> Result<SocketAddr, CommError> {
    (host, port)
        .to_socket_addrs()
        .map_err(|e| CommError::Rendezvous(format!("cannot resolve {host}:{port}: {e}")))?
        .next()
        .ok_or_else(|| CommError::Rendezvous(format!("{host}:{port} resolves to no address")))
}

/// Rank 0's listener at `addr`'s port on every interface (the address names this host to the
/// others); port 0 picks a free one.
fn listen(addr: SocketAddr) -> Result<TcpListener, CommError> {
    let bind: SocketAddr = if addr.is_ipv4() {
        ([0, 0, 0, 0], addr.port()).into()
    } else {
        addr
    };
    let listener = TcpListener::bind(bind).map_err(|e| bind_error(addr.port(), &e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| CommError::Rendezvous(e.to_string()))?;
    Ok(listener)
}

/// Why rank 0 cannot listen on `port`; a port in use names the way out.
fn bind_error(port: u16, e: &std::io::Error) -> CommError {
    if e.kind() == ErrorKind::AddrInUse {
        CommError::Rendezvous(format!(
            "rank 0 cannot listen on port {port}: it is in use by another process (under \
             torchrun, its agent's store holds MASTER_PORT); set {RENDEZVOUS_PORT_VAR} to a free \
             port, the same for every rank"
        ))
    } else {
        CommError::Rendezvous(format!("rank 0 cannot listen on port {port}: {e}"))
    }
}

fn accept_all(
    addr: SocketAddr,
    cfg: &RendezvousConfig,
    deadline: Instant,
) -> Result<Vec<TcpStream>, CommError> {
    accept_on(&listen(addr)?, addr, cfg, deadline)
}

fn accept_on(
    listener: &TcpListener,
    addr: SocketAddr,
    cfg: &RendezvousConfig,
    deadline: Instant,
) -> Result<Vec<TcpStream>, CommError> {
    let mut peers: Vec<Option<TcpStream>> = (1..cfg.world_size).map(|_| None).collect();
    while peers.iter().any(Option::is_none) {
        match listener.accept() {
            Ok((mut s, from)) => {
                s.set_nonblocking(false)
                    .map_err(|e| CommError::Rendezvous(e.to_string()))?;
                s.set_nodelay(true).ok();
                s.set_read_timeout(Some(cfg.rendezvous_timeout)).ok();
                let mut hello = [0u8; 16];
                if s.read_exact(&mut hello).is_err() || &hello[..8] != MAGIC {
                    // Not one of ours (a port scanner, a stale process): ignore it.
                    continue;
                }
                let rank = u32::from_le_bytes(hello[8..12].try_into().unwrap_or([0; 4])) as usize;
                let world = u32::from_le_bytes(hello[12..16].try_into().unwrap_or([0; 4])) as usize;
                if world != cfg.world_size || rank == 0 || rank >= cfg.world_size {
                    let _ = s.write_all(&[1]);
                    return Err(CommError::Rendezvous(format!(
                        "{from} says it is rank {rank} of {world}, this group has {} ranks",
                        cfg.world_size
                    )));
                }
                if peers[rank - 1].is_some() {
                    let _ = s.write_all(&[1]);
                    return Err(CommError::Rendezvous(format!(
                        "two processes claim rank {rank}"
                    )));
                }
                s.write_all(&[0])
                    .map_err(|e| CommError::Rendezvous(e.to_string()))?;
                s.set_read_timeout(Some(cfg.timeout)).ok();
                s.set_write_timeout(Some(cfg.timeout)).ok();
                peers[rank - 1] = Some(s);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<usize> = peers
                        .iter()
                        .enumerate()
                        .filter(|(_, p)| p.is_none())
                        .map(|(i, _)| i + 1)
                        .collect();
                    return Err(CommError::Rendezvous(format!(
                        "ranks {missing:?} of {} did not join rank 0 at port {} within {:?}",
                        cfg.world_size,
                        addr.port(),
                        cfg.rendezvous_timeout
                    )));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(CommError::Rendezvous(format!("accept: {e}"))),
        }
    }
    Ok(peers.into_iter().flatten().collect())
}

fn join(
    addr: SocketAddr,
    cfg: &RendezvousConfig,
    deadline: Instant,
) -> Result<TcpStream, CommError> {
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Ok(mut s) => {
                s.set_nodelay(true).ok();
                s.set_read_timeout(Some(cfg.rendezvous_timeout)).ok();
                let mut hello = [0u8; 16];
                hello[..8].copy_from_slice(MAGIC);
                hello[8..12].copy_from_slice(&(cfg.rank as u32).to_le_bytes());
                hello[12..16].copy_from_slice(&(cfg.world_size as u32).to_le_bytes());
                s.write_all(&hello)
                    .map_err(|e| CommError::Rendezvous(e.to_string()))?;
                let mut ok = [1u8];
                s.read_exact(&mut ok).map_err(|e| {
                    CommError::Rendezvous(format!("rank 0 at {addr} did not answer: {e}"))
                })?;
                if ok[0] != 0 {
                    return Err(CommError::Rendezvous(format!(
                        "rank 0 at {addr} refused rank {} of {}",
                        cfg.rank, cfg.world_size
                    )));
                }
                s.set_read_timeout(Some(cfg.timeout)).ok();
                s.set_write_timeout(Some(cfg.timeout)).ok();
                return Ok(s);
            }
            Err(e) => {
                if Instant::now() >= deadline {
                    return Err(CommError::Rendezvous(format!(
                        "rank {} could not reach rank 0 at {addr} within {:?}: {e}",
                        cfg.rank, cfg.rendezvous_timeout
                    )));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn write_frame(s: &mut TcpStream, seq: u64, blob: &[u8]) -> std::io::Result<()> {
    let mut head = [0u8; 16];
    head[..8].copy_from_slice(&seq.to_le_bytes());
    head[8..].copy_from_slice(&(blob.len() as u64).to_le_bytes());
    s.write_all(&head)?;
    s.write_all(blob)
}

fn read_frame(s: &mut TcpStream) -> std::io::Result<(u64, Vec<u8>)> {
    let mut head = [0u8; 16];
    s.read_exact(&mut head)?;
    let seq = u64::from_le_bytes(head[..8].try_into().unwrap_or([0; 8]));
    let len = u64::from_le_bytes(head[8..].try_into().unwrap_or([0; 8]));
    let len = usize::try_from(len)
        .map_err(|_| std::io::Error::new(ErrorKind::InvalidData, "frame too large"))?;
    let mut blob = vec![0u8; len];
    s.read_exact(&mut blob)?;
    Ok((seq, blob))
}

impl TcpComm {
    fn fail(&self, rank: usize, op: &str, e: &std::io::Error) -> CommError {
        if io_err(e) {
            CommError::Timeout {
                rank,
                world: self.world,
                op: op.into(),
                timeout: self.timeout,
            }
        } else {
            CommError::RankLost {
                rank,
                world: self.world,
                op: op.into(),
                why: format!("connection: {e}"),
            }
        }
    }
}

impl TcpComm {
    /// Element-wise sum through rank 0: the others send their buffers, rank 0 adds them in rank
    /// order and sends the sum back (half the traffic of an all-gather through rank 0, and the
    /// same bits on every rank).
    fn reduce_at_root<T>(&self, buf: &mut [T], op: &str) -> Result<(), CommError>
    where
        T: bytemuck::Pod + std::ops::AddAssign,
    {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.seq += 1;
        let seq = inner.seq;
        let bytes = std::mem::size_of_val(buf);
        let check = |r: usize, got: u64, len: usize| -> Result<(), CommError> {
            if got != seq {
                return Err(CommError::Mismatch {
                    op: op.into(),
                    msg: format!("rank {r} is at collective {got}, this rank at {seq}"),
                });
            }
            if len != bytes {
                return Err(CommError::Mismatch {
                    op: op.into(),
                    msg: format!("rank {r} sent {len} bytes, this rank {bytes}"),
                });
            }
            Ok(())
        };
        match &mut inner.links {
            Links::Root(peers) => {
                for (i, s) in peers.iter_mut().enumerate() {
                    let (got, b) = read_frame(s).map_err(|e| self.fail(i + 1, op, &e))?;
                    check(i + 1, got, b.len())?;
                    for (o, chunk) in buf.iter_mut().zip(b.chunks_exact(std::mem::size_of::<T>())) {
                        *o += bytemuck::pod_read_unaligned::<T>(chunk);
                    }
                }
                let sum: &[u8] = bytemuck::cast_slice(buf);
                for (i, s) in peers.iter_mut().enumerate() {
                    write_frame(s, seq, sum).map_err(|e| self.fail(i + 1, op, &e))?;
                }
            }
            Links::Leaf(s) => {
                write_frame(s, seq, bytemuck::cast_slice(buf)).map_err(|e| self.fail(0, op, &e))?;
                let (got, b) = read_frame(s).map_err(|e| self.fail(0, op, &e))?;
                check(0, got, b.len())?;
                for (o, chunk) in buf.iter_mut().zip(b.chunks_exact(std::mem::size_of::<T>())) {
                    *o = bytemuck::pod_read_unaligned::<T>(chunk);
                }
            }
        }
        Ok(())
    }
}

impl Communicator for TcpComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_f32(&self, buf: &mut [f32]) -> Result<(), CommError> {
        self.reduce_at_root(buf, "all_reduce_f32")
    }

    fn all_reduce_f64(&self, buf: &mut [f64]) -> Result<(), CommError> {
        self.reduce_at_root(buf, "all_reduce_f64")
    }

    fn all_gather_bytes(&self, blob: &[u8], op: &str) -> Result<Vec<Vec<u8>>, CommError> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.seq += 1;
        let seq = inner.seq;
        let mismatch = |r: usize, got: u64| CommError::Mismatch {
            op: op.into(),
            msg: format!("rank {r} is at collective {got}, this rank at {seq}"),
        };
        match &mut inner.links {
            Links::Root(peers) => {
                let mut blobs = Vec::with_capacity(self.world);
                blobs.push(blob.to_vec());
                for (i, s) in peers.iter_mut().enumerate() {
                    let (got, b) = read_frame(s).map_err(|e| self.fail(i + 1, op, &e))?;
                    if got != seq {
                        return Err(mismatch(i + 1, got));
                    }
                    blobs.push(b);
                }
                let mut all = Vec::with_capacity(blobs.iter().map(|b| b.len() + 8).sum());
                for b in &blobs {
                    all.extend_from_slice(&(b.len() as u64).to_le_bytes());
                    all.extend_from_slice(b);
                }
                for (i, s) in peers.iter_mut().enumerate() {
                    write_frame(s, seq, &all).map_err(|e| self.fail(i + 1, op, &e))?;
                }
                Ok(blobs)
            }
            Links::Leaf(s) => {
                write_frame(s, seq, blob).map_err(|e| self.fail(0, op, &e))?;
                let (got, all) = read_frame(s).map_err(|e| self.fail(0, op, &e))?;
                if got != seq {
                    return Err(mismatch(0, got));
                }
                let mut blobs = Vec::with_capacity(self.world);
                let mut rest = &all[..];
                while rest.len() >= 8 {
                    let n = u64::from_le_bytes(rest[..8].try_into().unwrap_or([0; 8])) as usize;
                    if rest.len() < 8 + n {
                        break;
                    }
                    blobs.push(rest[8..8 + n].to_vec());
                    rest = &rest[8 + n..];
                }
                if blobs.len() != self.world || !rest.is_empty() {
                    return Err(CommError::Mismatch {
                        op: op.into(),
                        msg: format!(
                            "rank 0 sent {} blobs for a world of {}",
                            blobs.len(),
                            self.world
                        ),
                    });
                }
                Ok(blobs)
            }
        }
    }

    /// New connections: rank 0 listens on a free port, which it sends over this group; the
    /// others connect to it at the address they reach rank 0 at.
    fn duplicate(&self) -> Result<std::sync::Arc<dyn Communicator>, CommError> {
        let op = "duplicate";
        let mut cfg = RendezvousConfig {
            rank: self.rank,
            world_size: self.world,
            host: String::new(),
            port: 0,
            rendezvous_timeout: self.timeout,
            timeout: self.timeout,
        };
        let mut v6 = false;
        let root_ip = {
            let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            match &inner.links {
                Links::Root(peers) => {
                    // Listen on the address family the others reached rank 0 by.
                    v6 = peers
                        .first()
                        .and_then(|s| s.local_addr().ok())
                        .is_some_and(|a| a.is_ipv6());
                    None
                }
                Links::Leaf(s) => Some(
                    s.peer_addr()
                        .map_err(|e| CommError::Rendezvous(format!("{op}: {e}")))?
                        .ip(),
                ),
            }
        };
        let links = match root_ip {
            None => {
                let any: SocketAddr = if v6 {
                    (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
                } else {
                    ([0, 0, 0, 0], 0).into()
                };
                let listener = listen(any)?;
                let at = listener
                    .local_addr()
                    .map_err(|e| CommError::Rendezvous(format!("{op}: {e}")))?;
                self.all_gather_bytes(&at.port().to_le_bytes(), op)?;
                Links::Root(accept_on(
                    &listener,
                    at,
                    &cfg,
                    Instant::now() + self.timeout,
                )?)
            }
            Some(ip) => {
                let parts = self.all_gather_bytes(&[], op)?;
                let port = parts[0]
                    .get(..2)
                    .map(|b| u16::from_le_bytes([b[0], b[1]]))
                    .ok_or_else(|| CommError::Mismatch {
                        op: op.into(),
                        msg: format!("rank 0 sent {} bytes for a port", parts[0].len()),
                    })?;
                cfg.host = ip.to_string();
                cfg.port = port;
                Links::Leaf(join(
                    SocketAddr::new(ip, port),
                    &cfg,
                    Instant::now() + self.timeout,
                )?)
            }
        };
        Ok(std::sync::Arc::new(TcpComm {
            rank: self.rank,
            world: self.world,
            timeout: self.timeout,
            inner: Mutex::new(Inner { links, seq: 0 }),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    fn cfg(rank: usize, world: usize, port: u16, t: Duration) -> RendezvousConfig {
        RendezvousConfig {
            rank,
            world_size: world,
            host: "127.0.0.1".into(),
            port,
            rendezvous_timeout: t,
            timeout: t,
        }
    }

    #[test]
    fn collectives_over_loopback() {
        let port = free_port();
        let out: Vec<Vec<f64>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..3)
                .map(|r| {
                    s.spawn(move || {
                        let c =
                            TcpComm::connect(&cfg(r, 3, port, Duration::from_secs(20))).unwrap();
                        let mut v = vec![r as f64 + 0.5, 2.0];
                        c.all_reduce_f64(&mut v).unwrap();
                        let mut b = vec![r as f32; 3];
                        c.broadcast_f32(&mut b, 2).unwrap();
                        c.barrier().unwrap();
                        v.extend(b.iter().map(|&x| x as f64));
                        v
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for o in &out {
            assert_eq!(o, &vec![4.5, 6.0, 2.0, 2.0, 2.0]);
        }
    }

    #[test]
    fn a_duplicate_has_its_own_connections() {
        let port = free_port();
        let out: Vec<(f64, f64)> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..3)
                .map(|r| {
                    s.spawn(move || {
                        let c =
                            TcpComm::connect(&cfg(r, 3, port, Duration::from_secs(20))).unwrap();
                        let d = c.duplicate().unwrap();
                        assert_eq!((d.rank(), d.world_size()), (r, 3));
                        std::thread::scope(|s2| {
                            // Collectives on both at once, from two threads of each rank.
                            let h = s2.spawn(|| {
                                let mut v = [10.0 * r as f64];
                                for _ in 0..3 {
                                    d.all_reduce_f64(&mut v).unwrap();
                                }
                                v[0]
                            });
                            let mut v = [r as f64];
                            for _ in 0..2 {
                                c.all_reduce_f64(&mut v).unwrap();
                            }
                            (v[0], h.join().unwrap())
                        })
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for o in &out {
            assert_eq!(*o, (9.0, 270.0));
        }
    }

    #[test]
    fn a_rendezvous_that_never_completes_fails_within_its_timeout() {
        let port = free_port();
        let t = Instant::now();
        let e = TcpComm::connect(&cfg(0, 2, port, Duration::from_millis(300))).unwrap_err();
        assert!(e.to_string().contains("ranks [1] of 2 did not join"), "{e}");
        let e = TcpComm::connect(&cfg(1, 2, free_port(), Duration::from_millis(300))).unwrap_err();
        assert!(e.to_string().contains("could not reach rank 0"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_lost_peer_fails_rank_0_at_once() {
        let port = free_port();
        let h = std::thread::spawn(move || {
            let c = TcpComm::connect(&cfg(1, 2, port, Duration::from_secs(20))).unwrap();
            c.barrier().unwrap();
            // The process "dies": its connection closes.
        });
        let c = TcpComm::connect(&cfg(0, 2, port, Duration::from_secs(20))).unwrap();
        c.barrier().unwrap();
        h.join().unwrap();
        let t = Instant::now();
        let e = c.barrier().unwrap_err();
        assert!(matches!(e, CommError::RankLost { rank: 1, .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn environment_of_torchrun_and_slurm() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(RendezvousConfig::from_vars(env(&[])).unwrap(), None);
        let c = RendezvousConfig::from_vars(env(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "1234"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            (c.rank, c.world_size, c.host.as_str(), c.port),
            (3, 4, "10.0.0.1", 1234)
        );
        let c = RendezvousConfig::from_vars(env(&[
            ("SLURM_PROCID", "1"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_JOB_NODELIST", "gpu[07-08,11],cpu1"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            (c.rank, c.world_size, c.host.as_str(), c.port),
            (1, 8, "gpu07", 29500)
        );
        let e = RendezvousConfig::from_vars(env(&[
            ("RANK", "4"),
            ("WORLD_SIZE", "4"),
            ("MASTER_ADDR", "h"),
        ]))
        .unwrap_err();
        assert!(e.to_string().contains("rank 4 outside a world of 4"), "{e}");
        let e =
            RendezvousConfig::from_vars(env(&[("RANK", "x"), ("WORLD_SIZE", "4")])).unwrap_err();
        assert!(e.to_string().contains("RANK=\"x\""), "{e}");
        assert_eq!(first_host("a1,b2").unwrap(), "a1");
        assert!(first_host("n[x-1]").is_err());
    }

    fn vars<'a>(pairs: &'a [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k: &str| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn the_rendezvous_port_steps_aside_from_torchruns_agent_store() {
        let port = |pairs: &[(&'static str, &'static str)]| rendezvous_port(vars(pairs));
        assert_eq!(port(&[]).unwrap(), 29500);
        assert_eq!(port(&[("MASTER_PORT", "1234")]).unwrap(), 1234);
        // torchrun: its agent's store is on MASTER_PORT.
        for yes in ["True", "true", "1"] {
            let p = port(&[
                ("MASTER_PORT", "1234"),
                ("TORCHELASTIC_USE_AGENT_STORE", yes),
            ]);
            assert_eq!(p.unwrap(), 1235, "{yes}");
        }
        let p = port(&[
            ("MASTER_PORT", "1234"),
            ("TORCHELASTIC_USE_AGENT_STORE", "False"),
        ]);
        assert_eq!(p.unwrap(), 1234);
        // The override wins, under torchrun or not.
        let p = port(&[
            ("MASTER_PORT", "1234"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
            ("SIMCLR_RENDEZVOUS_PORT", "4000"),
        ]);
        assert_eq!(p.unwrap(), 4000);
        assert_eq!(port(&[("SIMCLR_RENDEZVOUS_PORT", "4000")]).unwrap(), 4000);
        let e = port(&[("SIMCLR_RENDEZVOUS_PORT", "x")]).unwrap_err();
        assert!(
            e.to_string().contains("SIMCLR_RENDEZVOUS_PORT=\"x\""),
            "{e}"
        );
        let e = port(&[
            ("MASTER_PORT", "65535"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        ])
        .unwrap_err();
        assert!(e.to_string().contains("SIMCLR_RENDEZVOUS_PORT"), "{e}");
        // The whole configuration under torchrun.
        let c = RendezvousConfig::from_vars(vars(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29500"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(c.port, 29501);
    }

    #[test]
    fn a_port_in_use_is_named_with_the_way_out() {
        let held = TcpListener::bind("0.0.0.0:0").unwrap();
        let port = held.local_addr().unwrap().port();
        let e = TcpComm::connect(&cfg(0, 2, port, Duration::from_secs(1))).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains(&format!("port {port}")), "{msg}");
        assert!(msg.contains("SIMCLR_RENDEZVOUS_PORT"), "{msg}");
    }
}
