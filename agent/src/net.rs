//! The guest's network, configured from the pod's network namespace on the
//! host ([`rtv_protocol::RequestBody::ConfigureNetwork`]): each NIC found by
//! the MAC the VMM gave it, renamed, given the host interface's MAC, MTU
//! and addresses and brought up; then routes (in the order given: the host
//! sends routes without a gateway first) and neighbour entries.
//!
//! rtnetlink is spoken directly over a `NETLINK_ROUTE` socket: five
//! request kinds, a few hundred lines, where a netlink crate would add its
//! weight to an agent whose every byte is unpacked by emulated guest
//! kernel code on PVM hosts.

use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use rtv_protocol::{
    parse_mac, ErrorKind, IpNet, NetInterface, NetNeighbour, NetRoute, NetworkConfig,
};

use crate::process::Failure;

const RTM_NEWLINK: u16 = 16;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;
const RTM_NEWNEIGH: u16 = 28;
const NLMSG_ERROR: u16 = 2;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_CREATE: u16 = 0x400;

const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_FLAGS: u16 = 8;
const IFA_F_NODAD: u32 = 0x02;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTA_PRIORITY: u16 = 6;
const RTA_PREFSRC: u16 = 7;
const NDA_DST: u16 = 1;
const NDA_LLADDR: u16 = 2;

const RT_TABLE_MAIN: u8 = 254;
const RTPROT_BOOT: u8 = 3;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RT_SCOPE_LINK: u8 = 253;
const RTN_UNICAST: u8 = 1;
const NUD_PERMANENT: u16 = 0x80;
const IFF_UP: u32 = 0x1;

/// Longest interface name the kernel takes (IFNAMSIZ - 1).
const MAX_IFNAME: usize = 15;

fn invalid(message: impl Into<String>) -> Failure {
    Failure::new(ErrorKind::InvalidRequest, message)
}

/// Configures the guest's network; only as PID 1 (an agent on the host
/// must not change the host's network).
pub fn configure(config: &NetworkConfig) -> Result<(), Failure> {
    if std::process::id() != 1 {
        return Err(invalid(
            "not PID 1: an agent on the host does not change the host's network",
        ));
    }
    apply(config)
}

/// Checks the request before anything is changed.
pub fn check(config: &NetworkConfig) -> Result<(), Failure> {
    let names: Vec<&str> = config.interfaces.iter().map(|i| i.name.as_str()).collect();
    for (n, i) in config.interfaces.iter().enumerate() {
        let at = format!("interfaces[{n}]");
        if i.name.is_empty()
            || i.name.len() > MAX_IFNAME
            || i.name
                .bytes()
                .any(|b| b == b'/' || b == 0 || b.is_ascii_whitespace())
        {
            return Err(invalid(format!(
                "{at}.name {:?}: not an interface name",
                i.name
            )));
        }
        for (field, mac) in [("device_mac", &i.device_mac), ("mac", &i.mac)] {
            if parse_mac(mac).is_none() {
                return Err(invalid(format!("{at}.{field} {mac:?}: not a MAC")));
            }
        }
        if !(68..=65535).contains(&i.mtu) {
            return Err(invalid(format!("{at}.mtu {}: must be 68 to 65535", i.mtu)));
        }
        for a in &i.addresses {
            check_prefix(&format!("{at}.addresses"), a)?;
        }
    }
    let known = |field: &str, name: &str| {
        if names.contains(&name) {
            Ok(())
        } else {
            Err(invalid(format!(
                "{field}: no interface {name:?} in the request"
            )))
        }
    };
    for (n, r) in config.routes.iter().enumerate() {
        let at = format!("routes[{n}]");
        known(&format!("{at}.interface"), &r.interface)?;
        if let Some(d) = &r.dest {
            check_prefix(&format!("{at}.dest"), d)?;
        }
        let family = |a: &IpAddr| a.is_ipv4();
        let families: Vec<bool> = r
            .dest
            .iter()
            .map(|d| family(&d.addr))
            .chain(r.gateway.iter().map(family))
            .chain(r.source.iter().map(family))
            .collect();
        if families.is_empty() {
            return Err(invalid(format!("{at}: a default route needs a gateway")));
        }
        if families.iter().any(|f| *f != families[0]) {
            return Err(invalid(format!("{at}: mixes IPv4 and IPv6")));
        }
    }
    for (n, nb) in config.neighbours.iter().enumerate() {
        let at = format!("neighbours[{n}]");
        known(&format!("{at}.interface"), &nb.interface)?;
        if parse_mac(&nb.mac).is_none() {
            return Err(invalid(format!("{at}.mac {:?}: not a MAC", nb.mac)));
        }
    }
    Ok(())
}

fn check_prefix(at: &str, a: &IpNet) -> Result<(), Failure> {
    let max = if a.addr.is_ipv4() { 32 } else { 128 };
    if a.prefix_len > max {
        return Err(invalid(format!("{at}: {a}: prefix longer than {max}")));
    }
    Ok(())
}

/// Applies `config` in the calling thread's network namespace.
pub fn apply(config: &NetworkConfig) -> Result<(), Failure> {
    check(config)?;
    let nl = Netlink::open()?;
    let mut index = Vec::with_capacity(config.interfaces.len());
    for i in &config.interfaces {
        let ifindex = configure_link(&nl, i)?;
        index.push((i.name.as_str(), ifindex));
    }
    let index_of = |name: &str| {
        index
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, i)| *i)
            .ok_or_else(|| invalid(format!("no interface {name:?}")))
    };
    for r in &config.routes {
        add_route(&nl, r, index_of(&r.interface)?)?;
    }
    for nb in &config.neighbours {
        add_neighbour(&nl, nb, index_of(&nb.interface)?)?;
    }
    Ok(())
}

/// The interface whose MAC is `mac`: its name and index, in the calling
/// thread's network namespace (`if_nameindex`, then `SIOCGIFHWADDR` on
/// each).
fn find_by_mac(mac: &[u8; 6]) -> Result<Option<(String, u32)>, Failure> {
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(Failure::io("socket", &std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a socket we just made and own.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: if_nameindex returns a list it allocated (or NULL), freed
    // below with if_freenameindex.
    let list = unsafe { libc::if_nameindex() };
    if list.is_null() {
        return Err(Failure::io(
            "if_nameindex",
            &std::io::Error::last_os_error(),
        ));
    }
    let mut found = None;
    let mut at = list;
    loop {
        // SAFETY: `at` walks the array if_nameindex returned, which ends
        // with an entry whose index is 0 and name NULL.
        let entry = unsafe { &*at };
        if entry.if_index == 0 || entry.if_name.is_null() {
            break;
        }
        // SAFETY: a NUL-terminated name of at most IFNAMSIZ bytes.
        let name = unsafe { std::ffi::CStr::from_ptr(entry.if_name) };
        // SAFETY: an all-zero ifreq is valid.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(name.to_bytes()) {
            *dst = *src as libc::c_char;
        }
        // SAFETY: SIOCGIFHWADDR fills the ifreq we pass, on our socket.
        let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) };
        if rc == 0 {
            // SAFETY: SIOCGIFHWADDR set the hwaddr member of the union.
            let hw = unsafe { req.ifr_ifru.ifru_hwaddr.sa_data };
            if hw.iter().take(6).zip(mac).all(|(a, b)| *a as u8 == *b) {
                found = Some((name.to_string_lossy().into_owned(), entry.if_index));
                break;
            }
        }
        // SAFETY: still within the array (this entry was not the last).
        at = unsafe { at.add(1) };
    }
    // SAFETY: the list if_nameindex returned, freed once.
    unsafe { libc::if_freenameindex(list) };
    Ok(found)
}

/// Finds the NIC by its device MAC, sets it down, renames it, gives it its
/// MAC and MTU, adds its addresses and brings it up; returns its index.
fn configure_link(nl: &Netlink, i: &NetInterface) -> Result<u32, Failure> {
    let device_mac = parse_mac(&i.device_mac).unwrap_or_default();
    let mac = parse_mac(&i.mac).unwrap_or_default();
    let found = match find_by_mac(&device_mac)? {
        Some(f) => f,
        // Configured before (an agent asked twice): it has its MAC now.
        None => find_by_mac(&mac)?.ok_or_else(|| {
            Failure::new(
                ErrorKind::NotFound,
                format!(
                    "interfaces: no NIC with MAC {} (or {}) in the guest",
                    i.device_mac, i.mac
                ),
            )
        })?,
    };
    let (old_name, index) = found;
    let what = |step: &str| format!("interface {old_name} ({}): {step}", i.name);
    // Down first: the kernel renames and re-addresses only a link that is
    // down.
    let mut m = Msg::new(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK);
    m.ifinfo(index, 0, IFF_UP);
    nl.call(&m, &what("setting it down"))?;
    let mut m = Msg::new(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK);
    m.ifinfo(index, 0, 0);
    if old_name != i.name {
        m.attr_str(IFLA_IFNAME, &i.name);
    }
    m.attr(IFLA_ADDRESS, &mac);
    m.attr(IFLA_MTU, &i.mtu.to_ne_bytes());
    nl.call(&m, &what("setting its name, MAC and MTU"))?;
    for a in &i.addresses {
        let mut m = Msg::new(
            RTM_NEWADDR,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
        );
        m.ifaddr(family(&a.addr), a.prefix_len, index);
        let bytes = ip_bytes(&a.addr);
        m.attr(IFA_LOCAL, &bytes);
        m.attr(IFA_ADDRESS, &bytes);
        // Unique by construction (the pod's network gave it): no duplicate
        // address detection, so an IPv6 address is usable at once.
        m.attr(IFA_FLAGS, &IFA_F_NODAD.to_ne_bytes());
        nl.call(&m, &what(&format!("adding address {a}")))?;
    }
    let mut m = Msg::new(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK);
    m.ifinfo(index, IFF_UP, IFF_UP);
    nl.call(&m, &what("setting it up"))?;
    Ok(index)
}

fn add_route(nl: &Netlink, r: &NetRoute, index: u32) -> Result<(), Failure> {
    let v4 = r
        .dest
        .map(|d| d.addr.is_ipv4())
        .or(r.gateway.map(|g| g.is_ipv4()))
        .or(r.source.map(|s| s.is_ipv4()))
        .unwrap_or(true);
    let fam = if v4 { libc::AF_INET } else { libc::AF_INET6 } as u8;
    let dst_len = r.dest.map_or(0, |d| d.prefix_len);
    let scope = if r.gateway.is_some() {
        RT_SCOPE_UNIVERSE
    } else {
        RT_SCOPE_LINK
    };
    let mut m = Msg::new(
        RTM_NEWROUTE,
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
    );
    m.rtmsg(fam, dst_len, scope);
    if let Some(d) = &r.dest {
        m.attr(RTA_DST, &ip_bytes(&d.addr));
    }
    if let Some(g) = &r.gateway {
        m.attr(RTA_GATEWAY, &ip_bytes(g));
    }
    if let Some(s) = &r.source {
        m.attr(RTA_PREFSRC, &ip_bytes(s));
    }
    if let Some(p) = r.metric {
        m.attr(RTA_PRIORITY, &p.to_ne_bytes());
    }
    m.attr(RTA_OIF, &index.to_ne_bytes());
    let dest = r.dest.map_or("default".to_owned(), |d| d.to_string());
    let via = r.gateway.map_or(String::new(), |g| format!(" via {g}"));
    nl.call(&m, &format!("adding route {dest}{via} dev {}", r.interface))
}

fn add_neighbour(nl: &Netlink, nb: &NetNeighbour, index: u32) -> Result<(), Failure> {
    let mac = parse_mac(&nb.mac).unwrap_or_default();
    let mut m = Msg::new(
        RTM_NEWNEIGH,
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
    );
    m.ndmsg(family(&nb.ip), index, NUD_PERMANENT);
    m.attr(NDA_DST, &ip_bytes(&nb.ip));
    m.attr(NDA_LLADDR, &mac);
    nl.call(
        &m,
        &format!(
            "adding neighbour {} lladdr {} dev {}",
            nb.ip, nb.mac, nb.interface
        ),
    )
}

fn family(a: &IpAddr) -> u8 {
    (if a.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    }) as u8
}

fn ip_bytes(a: &IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(v) => v.octets().to_vec(),
        IpAddr::V6(v) => v.octets().to_vec(),
    }
}

/// One rtnetlink request being built: the header, the family header and
/// the attributes, each padded to 4 bytes.
struct Msg(Vec<u8>);

impl Msg {
    fn new(kind: u16, flags: u16) -> Self {
        let mut b = Vec::with_capacity(128);
        b.extend_from_slice(&0u32.to_ne_bytes()); // length, set by `bytes`
        b.extend_from_slice(&kind.to_ne_bytes());
        b.extend_from_slice(&flags.to_ne_bytes());
        b.extend_from_slice(&1u32.to_ne_bytes()); // sequence
        b.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
        Msg(b)
    }

    /// `struct ifinfomsg`: AF_UNSPEC, the link, flags and the change mask.
    fn ifinfo(&mut self, index: u32, flags: u32, change: u32) {
        self.0.extend_from_slice(&[0, 0]);
        self.0.extend_from_slice(&0u16.to_ne_bytes());
        self.0.extend_from_slice(&index.to_ne_bytes());
        self.0.extend_from_slice(&flags.to_ne_bytes());
        self.0.extend_from_slice(&change.to_ne_bytes());
    }

    /// `struct ifaddrmsg`: family, prefix length, flags, scope, the link.
    fn ifaddr(&mut self, family: u8, prefix_len: u8, index: u32) {
        self.0.extend_from_slice(&[family, prefix_len, 0, 0]);
        self.0.extend_from_slice(&index.to_ne_bytes());
    }

    /// `struct rtmsg` of a unicast route in the main table.
    fn rtmsg(&mut self, family: u8, dst_len: u8, scope: u8) {
        self.0.extend_from_slice(&[
            family,
            dst_len,
            0,
            0,
            RT_TABLE_MAIN,
            RTPROT_BOOT,
            scope,
            RTN_UNICAST,
        ]);
        self.0.extend_from_slice(&0u32.to_ne_bytes());
    }

    /// `struct ndmsg`: family, the link, the state.
    fn ndmsg(&mut self, family: u8, index: u32, state: u16) {
        self.0.extend_from_slice(&[family, 0]);
        self.0.extend_from_slice(&0u16.to_ne_bytes());
        self.0.extend_from_slice(&index.to_ne_bytes());
        self.0.extend_from_slice(&state.to_ne_bytes());
        self.0.extend_from_slice(&[0, 0]);
    }

    fn attr(&mut self, kind: u16, data: &[u8]) {
        let len = 4 + data.len();
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(data);
        self.0.resize(self.0.len().next_multiple_of(4), 0);
    }

    fn attr_str(&mut self, kind: u16, s: &str) {
        let mut data = s.as_bytes().to_vec();
        data.push(0);
        self.attr(kind, &data);
    }

    fn bytes(&self) -> Vec<u8> {
        let mut b = self.0.clone();
        let len = (b.len() as u32).to_ne_bytes();
        b[..4].copy_from_slice(&len);
        b
    }
}

/// A `NETLINK_ROUTE` socket in the calling thread's network namespace.
struct Netlink(OwnedFd);

impl Netlink {
    fn open() -> Result<Self, Failure> {
        // SAFETY: socket(2) with constant arguments.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(Failure::io(
                "netlink socket",
                &std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: `fd` is a socket we just made and own.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Sends `m` and waits for the kernel's acknowledgement; an error
    /// names `what`.
    fn call(&self, m: &Msg, what: &str) -> Result<(), Failure> {
        let req = m.bytes();
        // SAFETY: a send(2) of our buffer on our socket; the kernel is the
        // default destination of a netlink socket.
        let sent = unsafe { libc::send(self.0.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) };
        if sent < 0 {
            return Err(Failure::io(what, &std::io::Error::last_os_error()));
        }
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: recv(2) into our buffer, within its length.
            let n =
                unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Failure::io(what, &e));
            }
            let got = &buf[..n as usize];
            // The answer to a request with NLM_F_ACK: NLMSG_ERROR with
            // the error code (0 for success) after the 16-byte header.
            if got.len() >= 20 && u16::from_ne_bytes([got[4], got[5]]) == NLMSG_ERROR {
                let code = i32::from_ne_bytes([got[16], got[17], got[18], got[19]]);
                if code == 0 {
                    return Ok(());
                }
                let e = std::io::Error::from_raw_os_error(-code);
                let kind = match -code {
                    libc::EPERM | libc::EACCES => ErrorKind::PermissionDenied,
                    libc::ENODEV | libc::ENOENT => ErrorKind::NotFound,
                    libc::EINVAL | libc::ERANGE => ErrorKind::InvalidRequest,
                    _ => ErrorKind::Other,
                };
                return Err(Failure::new(kind, format!("{what}: {e}")));
            }
            // Anything else (a notification) is not our answer.
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn sample() -> NetworkConfig {
        NetworkConfig {
            interfaces: vec![NetInterface {
                device_mac: rtv_protocol::PLACEHOLDER_MAC.into(),
                name: "eth0".into(),
                mac: "0a:58:0a:58:00:05".into(),
                mtu: 1400,
                addresses: vec![
                    IpNet {
                        addr: "10.88.0.5".parse().unwrap(),
                        prefix_len: 16,
                    },
                    IpNet {
                        addr: "fd00:88::5".parse().unwrap(),
                        prefix_len: 64,
                    },
                ],
            }],
            routes: vec![
                NetRoute {
                    dest: Some(IpNet {
                        addr: "10.99.0.0".parse().unwrap(),
                        prefix_len: 24,
                    }),
                    gateway: None,
                    interface: "eth0".into(),
                    source: None,
                    metric: None,
                },
                NetRoute {
                    dest: None,
                    gateway: Some("10.88.0.1".parse().unwrap()),
                    interface: "eth0".into(),
                    source: None,
                    metric: Some(100),
                },
                NetRoute {
                    dest: None,
                    gateway: Some("fd00:88::1".parse().unwrap()),
                    interface: "eth0".into(),
                    source: None,
                    metric: None,
                },
            ],
            neighbours: vec![NetNeighbour {
                ip: "10.88.0.1".parse().unwrap(),
                mac: "0a:58:0a:58:00:01".into(),
                interface: "eth0".into(),
            }],
        }
    }

    #[test]
    fn bad_requests_name_the_field() {
        assert!(check(&sample()).is_ok());
        type Mangle = fn(&mut NetworkConfig);
        let cases: Vec<(Mangle, &str)> = vec![
            (
                |c| c.interfaces[0].name = "a/b".into(),
                "interfaces[0].name",
            ),
            (
                |c| c.interfaces[0].name = "x".repeat(16),
                "interfaces[0].name",
            ),
            (
                |c| c.interfaces[0].mac = "0a:58".into(),
                "interfaces[0].mac",
            ),
            (
                |c| c.interfaces[0].device_mac = "".into(),
                "interfaces[0].device_mac",
            ),
            (|c| c.interfaces[0].mtu = 67, "interfaces[0].mtu"),
            (
                |c| c.interfaces[0].addresses[0].prefix_len = 33,
                "interfaces[0].addresses",
            ),
            (
                |c| c.routes[0].interface = "eth1".into(),
                "routes[0].interface",
            ),
            (
                |c| {
                    c.routes[1].gateway = None;
                },
                "routes[1]: a default route needs a gateway",
            ),
            (
                |c| c.routes[1].source = Some("fd00::1".parse().unwrap()),
                "routes[1]: mixes",
            ),
            (|c| c.neighbours[0].mac = "x".into(), "neighbours[0].mac"),
        ];
        for (mangle, want) in cases {
            let mut c = sample();
            mangle(&mut c);
            let e = check(&c).unwrap_err();
            assert_eq!(e.kind, ErrorKind::InvalidRequest);
            assert!(e.message.contains(want), "{want}: {}", e.message);
        }
    }

    fn ip(args: &[&str]) -> String {
        let out = Command::new("ip").args(args).output().expect("ip");
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The real kernel, in a network namespace of the test's own: one end
    /// of a veth pair with the placeholder MAC stands for the guest's NIC.
    #[test]
    fn configures_a_link_in_a_private_namespace() {
        std::thread::spawn(|| {
            // SAFETY: unshare(2) of this thread's network namespace only.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
            // Children of this thread start in its namespace.
            ip(&[
                "link", "add", "nic9", "type", "veth", "peer", "name", "peer9",
            ]);
            ip(&["link", "set", "peer9", "up"]);
            ip(&[
                "link",
                "set",
                "nic9",
                "address",
                rtv_protocol::PLACEHOLDER_MAC,
            ]);
            ip(&["link", "set", "lo", "up"]);
            let config = sample();
            apply(&config).expect("apply");
            let link = ip(&["-o", "link", "show", "eth0"]);
            assert!(link.contains("mtu 1400"), "{link}");
            assert!(link.contains("0a:58:0a:58:00:05"), "{link}");
            assert!(link.contains("UP"), "{link}");
            let addrs = ip(&["-o", "addr", "show", "eth0"]);
            assert!(addrs.contains("10.88.0.5/16"), "{addrs}");
            assert!(addrs.contains("fd00:88::5/64"), "{addrs}");
            let global6 = addrs
                .lines()
                .find(|l| l.contains("fd00:88::5"))
                .unwrap_or("");
            assert!(!global6.contains("tentative"), "{addrs}");
            let routes = ip(&["route", "show"]);
            assert!(routes.contains("10.99.0.0/24 dev eth0"), "{routes}");
            assert!(
                routes.contains("default via 10.88.0.1 dev eth0") && routes.contains("metric 100"),
                "{routes}"
            );
            let routes6 = ip(&["-6", "route", "show"]);
            assert!(
                routes6.contains("default via fd00:88::1 dev eth0"),
                "{routes6}"
            );
            let neigh = ip(&["neigh", "show", "dev", "eth0"]);
            assert!(
                neigh.contains("10.88.0.1 lladdr 0a:58:0a:58:00:01 PERMANENT"),
                "{neigh}"
            );
            // Asked again (the NIC now has the pod's MAC): the same result.
            apply(&config).expect("apply twice");
            // A NIC that is not there is named.
            let mut missing = sample();
            missing.interfaces[0].device_mac = "02:00:00:00:00:99".into();
            missing.interfaces[0].mac = "02:00:00:00:00:98".into();
            let e = apply(&missing).unwrap_err();
            assert_eq!(e.kind, ErrorKind::NotFound);
            assert!(e.message.contains("02:00:00:00:00:99"), "{}", e.message);
            // A route the kernel refuses (its gateway is unreachable) is
            // named too.
            let mut unreachable = sample();
            unreachable.routes = vec![NetRoute {
                dest: None,
                gateway: Some("192.0.2.1".parse().unwrap()),
                interface: "eth0".into(),
                source: None,
                metric: Some(7),
            }];
            let e = apply(&unreachable).unwrap_err();
            assert!(
                e.message.contains("default via 192.0.2.1 dev eth0"),
                "{}",
                e.message
            );
        })
        .join()
        .expect("the namespace thread");
    }
}
