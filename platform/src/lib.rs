//! OS specifics for QuantumGate, kept behind a small interface: the TUN
//! device and the privilege check. Linux only for now.

use std::io;
use std::net::Ipv6Addr;

pub mod privilege;

pub use tun_rs::{GROTable, SyncDevice, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

/// Errors from platform set-up.
#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    /// The TUN device could not be created or configured.
    #[error("TUN interface {name}: {what}: {source}")]
    Tun {
        /// Interface name.
        name: String,
        /// The step that failed.
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

/// A configured TUN interface carrying the overlay.
pub struct Tun {
    /// The device (non-blocking reads and writes of whole IP packets).
    pub device: SyncDevice,
    /// The device's further queues, when it was made with more than one
    /// (each as the device, with the same offloads).
    pub queues: Vec<SyncDevice>,
    /// Interface name.
    pub name: String,
}

/// The TUN control device.
pub const TUN_DEVICE: &str = "/dev/net/tun";

/// Checks that this process can open [`TUN_DEVICE`] before it tries to
/// create an interface, so that the commonest failure gets a message that
/// says what to do instead of "create: Permission denied".
pub fn check_tun_device() -> Result<(), String> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(TUN_DEVICE)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(format!(
            "{TUN_DEVICE} does not exist: load the tun module (`modprobe tun`) or create it (`mkdir -p /dev/net && mknod {TUN_DEVICE} c 10 200 && chmod 0666 {TUN_DEVICE}`)"
        )),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            let (mode, owner) = std::fs::metadata(TUN_DEVICE)
                .map(|m| (m.permissions().mode() & 0o777, m.uid()))
                .unwrap_or((0, 0));
            // SAFETY: geteuid has no preconditions and cannot fail.
            let uid = unsafe { libc::geteuid() };
            if mode & 0o006 == 0o006 {
                // The mode allows it: something else says no.
                return Err(format!(
                    "cannot open {TUN_DEVICE} as uid {uid} although it is mode {mode:04o}: a device policy forbids it (under systemd, the unit needs `DeviceAllow=/dev/net/tun rw`; in a container, the device must be passed in; or an LSM such as AppArmor or SELinux denies it)"
                ));
            }
            Err(format!(
                "cannot open {TUN_DEVICE} as uid {uid}: it is mode {mode:04o} owned by uid {owner}; make it 0666 as udev does on standard systems (`chmod 0666 {TUN_DEVICE}`; opening it grants nothing without CAP_NET_ADMIN), or start qgate as root with `user = ...` in the config"
            ))
        }
        Err(e) => Err(format!("cannot open {TUN_DEVICE}: {e}")),
    }
}

/// Creates the TUN interface `name`, sets its MTU, gives it `address` with
/// prefix length `prefix` (which makes the kernel route that prefix to it)
/// and brings it up. Duplicate address detection is switched off on the
/// interface first: the address is derived from our key, nobody else on a
/// point-to-point TUN can hold it, and DAD would keep programs from binding
/// to it for a second or two after start.
///
/// With `offload`, the device speaks virtio-net headers: the kernel hands
/// over TCP segments of up to 64 KiB (TSO), split with
/// `SyncDevice::recv_multiple`, and takes coalesced ones (GRO) from
/// `SyncDevice::send_multiple`; every write then needs a virtio-net header.
///
/// With `queues` above 1 the device is multi-queue (`IFF_MULTI_QUEUE`),
/// and [`Tun::queues`] holds the queues after the first, one for each data
/// worker. The kernel gives a flow's outgoing packets to the queue that
/// last wrote that flow's incoming ones (the TUN driver's automatic
/// steering, by a symmetric flow hash), so a flow's packets in both
/// directions meet the worker that holds its link once it has written one.
///
/// Needs CAP_NET_ADMIN.
pub fn create_tun(
    name: &str,
    mtu: u16,
    address: Ipv6Addr,
    prefix: u8,
    offload: bool,
    queues: usize,
) -> Result<Tun, PlatformError> {
    let err = |what, source| PlatformError::Tun {
        name: name.to_string(),
        what,
        source,
    };
    let device = tun_rs::DeviceBuilder::new()
        .name(name)
        .mtu(mtu)
        .offload(offload)
        .multi_queue(queues > 1)
        .build_sync()
        .map_err(|e| err("create", e))?;
    let name = device.name().map_err(|e| err("read name", e))?;
    // Best effort: a kernel without IPv6 sysctls still works, with DAD.
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/accept_dad"), "0");
    device
        .add_address_v6(address, prefix)
        .map_err(|e| err("add address", e))?;
    device.enabled(true).map_err(|e| err("bring up", e))?;
    // The data plane polls the TUN together with its socket.
    device
        .set_nonblocking(true)
        .map_err(|e| err("set non-blocking", e))?;
    let mut more = Vec::new();
    for _ in 1..queues {
        let q = device.try_clone().map_err(|e| err("open a queue", e))?;
        q.set_nonblocking(true)
            .map_err(|e| err("set non-blocking", e))?;
        more.push(q);
    }
    Ok(Tun {
        device,
        queues: more,
        name,
    })
}

/// Steers the datagrams of a group of UDP sockets bound to one port with
/// `SO_REUSEPORT` (the group's sockets in the order they were bound) to
/// socket `link % workers`, where `link` is the low byte of the link index
/// in a WireGuard message's receiver index (boringtun's receiver index is
/// the link's 24-bit index shifted left by 8 over an 8-bit session count).
/// That is bytes 5 (data and cookie replies) or 9 (handshake responses) of
/// the UDP payload; initiations carry no receiver index and land on the
/// worker their sender's index byte picks, which hands them to the node.
/// A datagram too short for the byte goes to socket 0.
///
/// A classic BPF program the kernel runs before it picks the socket; any
/// socket of the group may attach it (nix and socket2 do not wrap
/// `SO_ATTACH_REUSEPORT_CBPF`, hence the raw call).
pub fn steer_by_link(fd: std::os::fd::BorrowedFd<'_>, workers: u32) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    if workers == 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "no workers"));
    }
    // Classic BPF opcodes (linux/bpf_common.h; they fit in 16 bits).
    const LD_B_ABS: u16 = (libc::BPF_LD | libc::BPF_B | libc::BPF_ABS) as u16;
    const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const JA: u16 = (libc::BPF_JMP | libc::BPF_JA) as u16;
    const MOD_K: u16 = (libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K) as u16;
    const RET_A: u16 = (libc::BPF_RET | libc::BPF_A) as u16;
    let op = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    let mut prog = [
        op(LD_B_ABS, 0, 0, 0),    // A = message type
        op(JEQ_K, 0, 2, 2),       // a handshake response?
        op(LD_B_ABS, 0, 0, 9),    //   A = receiver index, link's low byte
        op(JA, 0, 0, 1),          //
        op(LD_B_ABS, 0, 0, 5),    // else the same byte at its place in data
        op(MOD_K, 0, 0, workers), // A %= workers
        op(RET_A, 0, 0, 0),       // the socket's place in the group
    ];
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_mut_ptr(),
    };
    // SAFETY: `fprog` and the program it points to outlive the call, and
    // the size passed is `fprog`'s; the kernel copies the program.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            &fprog as *const libc::sock_fprog as *const libc::c_void,
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether this process may administer network interfaces (CAP_NET_ADMIN in
/// its effective set), read from /proc/self/status.
pub fn has_cap_net_admin() -> bool {
    const CAP_NET_ADMIN: u32 = 12;
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_NET_ADMIN) != 0)
}

/// Asks the kernel to set don't-fragment on every datagram the socket sends
/// and to report EMSGSIZE when one exceeds the known path MTU, for IPv4 and
/// IPv6 (both options, so a dual-stack socket's mapped IPv4 traffic gets it
/// too). Neither nix nor socket2 wraps these options, hence the raw calls.
pub fn set_dont_fragment(fd: std::os::fd::BorrowedFd<'_>, ipv6_socket: bool) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    setsockopt_int(
        fd.as_raw_fd(),
        libc::IPPROTO_IP,
        libc::IP_MTU_DISCOVER,
        libc::IP_PMTUDISC_DO,
    )
    .or_else(|e| if ipv6_socket { Ok(()) } else { Err(e) })?;
    if ipv6_socket {
        setsockopt_int(
            fd.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_MTU_DISCOVER,
            libc::IPV6_PMTUDISC_DO,
        )?;
    }
    Ok(())
}

fn setsockopt_int(fd: i32, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: `value` outlives the call and its size is passed along.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            &value as *const i32 as *const libc::c_void,
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The kernel's current path MTU towards `dst` (learnt from ICMP
/// "fragmentation needed" / "packet too big"), read through a connected
/// throw-away UDP socket.
pub fn path_mtu(dst: std::net::SocketAddr) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    let bind: std::net::SocketAddr = if dst.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let s = std::net::UdpSocket::bind(bind)?;
    s.connect(dst)?;
    let (level, name) = if dst.is_ipv4() {
        (libc::IPPROTO_IP, libc::IP_MTU)
    } else {
        (libc::IPPROTO_IPV6, libc::IPV6_MTU)
    };
    let mut value: i32 = 0;
    let mut len = std::mem::size_of::<i32>() as libc::socklen_t;
    // SAFETY: `value` and `len` are valid for writes and `len` holds the size.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            level,
            name,
            &mut value as *mut i32 as *mut libc::c_void,
            &mut len,
        )
    };
    if rc == 0 && value > 0 {
        Ok(value as usize)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `SCHED_FLAG_RESET_ON_FORK` (linux/sched.h; the libc crate has no name
/// for it).
const SCHED_FLAG_RESET_ON_FORK: u64 = 0x01;

/// Asks the kernel's fair scheduler for a time slice of `slice` (clamped by
/// the kernel to 0.1–100 ms) for the calling thread, keeping its policy and
/// nice value. Under EEVDF (Linux 6.12 and later) a shorter slice gives the
/// thread an earlier deadline each time it wakes, so it runs sooner when the
/// cores are busy with other work; it does not raise its share of CPU time,
/// and needs no privilege. Older kernels accept and ignore the request.
/// Threads not under a fair policy (`SCHED_FIFO`, `SCHED_RR`, ...) are left
/// as they are.
pub fn request_time_slice(slice: std::time::Duration) -> io::Result<()> {
    // SAFETY: `sched_attr` is plain data; all zero is a valid value.
    let mut attr: libc::sched_attr = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::sched_attr>() as u32;
    // SAFETY: pid 0 is the calling thread; `attr` is valid for `size`
    // bytes of writes, and the kernel writes at most that many.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            0,
            &mut attr as *mut libc::sched_attr,
            size,
            0,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let fair = matches!(
        attr.sched_policy as i32,
        libc::SCHED_OTHER | libc::SCHED_BATCH
    );
    if !fair {
        return Ok(());
    }
    attr.size = size;
    // Keep reset-on-fork as it is (clearing it needs privilege); leave
    // out the other flags, which would ask for other changes.
    attr.sched_flags &= SCHED_FLAG_RESET_ON_FORK;
    attr.sched_runtime = slice.as_nanos().min(u64::MAX as u128) as u64;
    // SAFETY: pid 0 is the calling thread; `attr` is initialised and its
    // `size` field says how much of it the kernel may read.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_sched_setattr,
            0,
            &attr as *const libc::sched_attr,
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_can_ask_for_a_short_time_slice() {
        // Runs in a thread of its own: the setting stays with the thread.
        std::thread::spawn(|| {
            let nice_before = nice();
            let policy_before = policy();
            request_time_slice(std::time::Duration::from_micros(100)).expect("sched_setattr");
            // SAFETY: as in `request_time_slice`.
            let mut attr: libc::sched_attr = unsafe { std::mem::zeroed() };
            let size = std::mem::size_of::<libc::sched_attr>() as u32;
            // SAFETY: as in `request_time_slice`.
            let rc =
                unsafe { libc::syscall(libc::SYS_sched_getattr, 0, &mut attr as *mut _, size, 0) };
            assert_eq!(rc, 0);
            assert_eq!(nice(), nice_before, "the nice value is kept");
            assert_eq!(policy(), policy_before, "the policy is kept");
            if !matches!(policy_before, libc::SCHED_OTHER | libc::SCHED_BATCH) {
                return; // not a fair policy: left alone
            }
            // Kernels before 6.12 have no custom slice and report 0.
            assert!(
                attr.sched_runtime == 0 || attr.sched_runtime == 100_000,
                "slice {}",
                attr.sched_runtime
            );
        })
        .join()
        .expect("thread");
    }

    /// A UDP socket on 127.0.0.1:`port` (0: any) with `SO_REUSEPORT`.
    fn reuseport_socket(port: u16) -> std::net::UdpSocket {
        use std::os::fd::FromRawFd;
        // SAFETY: plain socket calls; the descriptor is owned by the
        // returned socket, and `addr` outlives `bind`.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
            assert!(fd >= 0);
            setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1).expect("SO_REUSEPORT");
            let mut addr: libc::sockaddr_in = std::mem::zeroed();
            addr.sin_family = libc::AF_INET as libc::sa_family_t;
            addr.sin_port = port.to_be();
            addr.sin_addr.s_addr = u32::from(std::net::Ipv4Addr::LOCALHOST).to_be();
            let rc = libc::bind(
                fd,
                &addr as *const libc::sockaddr_in as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            );
            assert_eq!(rc, 0, "bind: {}", io::Error::last_os_error());
            std::net::UdpSocket::from_raw_fd(fd)
        }
    }

    #[test]
    fn datagrams_reach_the_worker_that_holds_their_link() {
        use std::os::fd::AsFd;
        const WORKERS: usize = 3;
        let first = reuseport_socket(0);
        let port = first.local_addr().expect("address").port();
        let mut group = vec![first];
        for _ in 1..WORKERS {
            group.push(reuseport_socket(port));
        }
        steer_by_link(group[1].as_fd(), WORKERS as u32).expect("attach");
        for s in &group {
            s.set_read_timeout(Some(std::time::Duration::from_secs(2)))
                .expect("timeout");
            s.set_nonblocking(false).expect("blocking");
        }
        // From several source ports, so the kernel's own hash would spread them.
        let senders: Vec<_> = (0..4)
            .map(|_| std::net::UdpSocket::bind("127.0.0.1:0").expect("bind"))
            .collect();
        let mut sent = 0;
        for link in [0u32, 1, 2, 5, 255, 256, 257, 0x00ab_cdef] {
            for (kind, at) in [(4u8, 4usize), (3, 4), (2, 8)] {
                let receiver = (link << 8) | 0x5a;
                let mut msg = [0u8; 32];
                msg[0] = kind;
                msg[at..at + 4].copy_from_slice(&receiver.to_le_bytes());
                let from = &senders[sent % senders.len()];
                from.send_to(&msg, ("127.0.0.1", port)).expect("send");
                sent += 1;
                let want = (link as usize & 0xff) % WORKERS;
                let mut buf = [0u8; 64];
                let (n, _) = group[want].recv_from(&mut buf).expect("steered datagram");
                assert_eq!(&buf[..n], &msg[..], "link {link} kind {kind}");
            }
        }
        // Nothing went elsewhere.
        for s in &group {
            s.set_nonblocking(true).expect("non-blocking");
            assert!(s.recv_from(&mut [0u8; 64]).is_err());
        }
        // Too short for the byte: the first socket.
        senders[0]
            .send_to(&[4, 0, 0], ("127.0.0.1", port))
            .expect("send");
        group[0].set_nonblocking(false).expect("blocking");
        group[0]
            .recv_from(&mut [0u8; 64])
            .expect("short datagram on socket 0");
    }

    fn policy() -> i32 {
        // SAFETY: pid 0 is the calling thread.
        unsafe { libc::sched_getscheduler(0) }
    }

    fn nice() -> i32 {
        // SAFETY: getpriority has no memory arguments.
        unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }
    }
}
