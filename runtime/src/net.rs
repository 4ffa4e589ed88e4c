//! A pod's network: its network namespace on the host, wired to the VM's
//! NIC with a tap and tc redirects (Kata's "tcfilter" model), and the
//! configuration the guest's agent gives the NIC.
//!
//! The pod's namespace is the one its spec names (containerd's CRI plugin
//! made it and ran CNI in it), or one rtv makes when the spec asks for a
//! new namespace without a path (a client such as Docker then configures
//! it from a prestart hook, through a process rtv keeps in it). In it rtv
//! finds the interface that has addresses (CNI's `eth0`), makes a tap
//! (opened from inside the namespace: a tap belongs to its opener's),
//! gives the tap the interface's MTU, and redirects every frame arriving on
//! either one out of the other (an ingress qdisc on each, a u32 filter
//! matching everything with a mirred egress redirect). The VMM gets the
//! tap's file descriptor; the guest's NIC gets the interface's MAC,
//! addresses and routes. The host's own network namespace is refused.
//!
//! Netlink work runs on a short-lived thread that has joined the namespace
//! (`setns` changes only the calling thread's), with rtnetlink on a
//! current-thread runtime of its own: a netlink socket stays in the
//! namespace it was created in.

use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::stream::TryStreamExt;
use oci_spec::runtime::{LinuxNamespaceType, Spec};
use rtnetlink::packet_route::address::{AddressAttribute, AddressScope};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkLayerType};
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteProtocol};
use rtnetlink::packet_route::tc::TcHandle;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use rtv_protocol::{format_mac, IpNet, NetInterface, NetNeighbour, NetRoute, NetworkConfig};

/// The tap's name in the pod's namespace.
pub const TAP_NAME: &str = "rtv-tap0";

/// `TUNSETIFF`: `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
/// `NS_GET_NSTYPE`: `_IO(0xb7, 0x3)`.
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
/// `ETH_P_ALL`, which tc wants in network byte order.
const ETH_P_ALL: u16 = 0x0003;
/// How often adding a qdisc is tried while the kernel answers EBUSY.
const QDISC_TRIES: u32 = 10;

/// Errors setting up or removing a pod's network; each names the
/// namespace, interface or step.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The spec's namespace path cannot be used.
    #[error("linux.namespaces: network namespace {path}: {problem}")]
    Namespace {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// A step in the namespace failed.
    #[error("pod network ({netns}): {what}: {source}")]
    Io {
        /// The namespace.
        netns: String,
        /// The step.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// A netlink request failed.
    #[error("pod network ({netns}): {what}: {message}")]
    Netlink {
        /// The namespace.
        netns: String,
        /// The step.
        what: String,
        /// The kernel's (or rtnetlink's) answer.
        message: String,
    },
    /// The namespace holds what rtv cannot give one VM.
    #[error("pod network ({netns}): {why}")]
    Unsupported {
        /// The namespace.
        netns: String,
        /// Why.
        #[source]
        why: Unsupported,
    },
}

/// What a namespace holds that rtv cannot give a VM.
#[derive(Debug, thiserror::Error)]
pub enum Unsupported {
    /// More than one interface has addresses.
    #[error("{0} interfaces have addresses ({1}); rtv gives a pod's VM one NIC")]
    ManyInterfaces(usize, String),
    /// The addressed interface is not Ethernet.
    #[error("interface {0} is not an Ethernet interface (a tap can mirror only Ethernet frames)")]
    NotEthernet(String),
}

/// What a spec asks of the pod's network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkMode {
    /// No network namespace in the spec: the host's network for runc. A
    /// VM cannot share the host's network: the guest has loopback only.
    Loopback,
    /// The namespace at this path (made and configured by the client).
    Path(PathBuf),
    /// A new namespace, which rtv makes for the pod (and which goes with
    /// it); the client may configure it from a prestart hook.
    New,
}

impl NetworkMode {
    /// The mode `spec` asks for.
    pub fn of(spec: &Spec) -> NetworkMode {
        let ns = spec
            .linux()
            .as_ref()
            .and_then(|l| l.namespaces().as_ref())
            .and_then(|nss| nss.iter().find(|n| n.typ() == LinuxNamespaceType::Network));
        match ns {
            None => NetworkMode::Loopback,
            Some(n) => match n.path() {
                Some(p) if !p.as_os_str().is_empty() => NetworkMode::Path(p.clone()),
                _ => NetworkMode::New,
            },
        }
    }
}

/// A network namespace, held open.
#[derive(Debug)]
pub struct Netns {
    fd: OwnedFd,
    /// Its path, or a description of it for messages.
    name: String,
}

fn ns_id(meta: &std::fs::Metadata) -> (u64, u64) {
    (meta.dev(), meta.ino())
}

impl Netns {
    /// Opens the namespace at `path`: it must be a network namespace, and
    /// not the host's (ours or PID 1's), which rtv must never rewire.
    pub fn open(path: &Path) -> Result<Netns, NetError> {
        let bad = |problem: String| NetError::Namespace {
            path: path.to_path_buf(),
            problem,
        };
        let file = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
        // SAFETY: NS_GET_NSTYPE on a descriptor we own; no memory passed.
        let kind = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE) };
        if kind < 0 {
            return Err(bad("not a namespace file".into()));
        }
        if kind != libc::CLONE_NEWNET {
            return Err(bad("not a network namespace".into()));
        }
        let meta = file.metadata().map_err(|e| bad(e.to_string()))?;
        for host in ["/proc/self/ns/net", "/proc/1/ns/net"] {
            if std::fs::metadata(host).is_ok_and(|h| ns_id(&h) == ns_id(&meta)) {
                return Err(bad(format!(
                    "is the host's network namespace (the same as {host}): a VM cannot share it, \
                     and rtv does not rewire the host; give the pod a namespace of its own"
                )));
            }
        }
        Ok(Netns {
            fd: file.into(),
            name: path.display().to_string(),
        })
    }

    /// Makes a new network namespace (loopback up), held by the returned
    /// handle (and whatever else then holds it: a process in it, a tap).
    pub fn create(pod: &str) -> Result<Netns, NetError> {
        let name = format!("new namespace of pod {pod}");
        let io = |what: &str| {
            let what = what.to_owned();
            let netns = name.clone();
            move |source| NetError::Io {
                netns,
                what,
                source,
            }
        };
        let fd = std::thread::Builder::new()
            .name("rtv-netns".into())
            .spawn(|| -> std::io::Result<OwnedFd> {
                // SAFETY: unshare(2) of this thread's network namespace
                // only; the thread ends right after.
                if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let ns = std::fs::File::open("/proc/thread-self/ns/net")?;
                Ok(ns.into())
            })
            .map_err(io("starting a thread"))?
            .join()
            .map_err(|_| NetError::Netlink {
                netns: name.clone(),
                what: "making it".into(),
                message: "the thread panicked".into(),
            })?
            .map_err(io("making it"))?;
        let ns = Netns { fd, name };
        ns.run("bringing lo up", |h| async move {
            set_up_by_name(&h, "lo", None).await
        })?;
        Ok(ns)
    }

    /// Its descriptor (to join it: `setns(fd, CLONE_NEWNET)`).
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// Its name in messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn io(&self, what: &str, source: std::io::Error) -> NetError {
        NetError::Io {
            netns: self.name.clone(),
            what: what.to_owned(),
            source,
        }
    }

    /// Runs `f` on a thread in the namespace, with an rtnetlink handle made
    /// there. Blocks until it is done (call it from a blocking thread in
    /// async code).
    fn run<T, F, Fut>(&self, what: &str, f: F) -> Result<T, NetError>
    where
        T: Send + 'static,
        F: FnOnce(Handle) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<T, NetError>>,
    {
        let fd = self.fd.try_clone().map_err(|e| self.io(what, e))?;
        let name = self.name.clone();
        let what_owned = what.to_owned();
        let thread = std::thread::Builder::new()
            .name("rtv-netns".into())
            .spawn(move || -> Result<T, NetError> {
                let io = |source| NetError::Io {
                    netns: name.clone(),
                    what: what_owned.clone(),
                    source,
                };
                // SAFETY: setns(2) of this thread into the namespace we
                // hold open; the thread ends when `f` is done.
                if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io(std::io::Error::last_os_error()));
                }
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(io)?;
                rt.block_on(async {
                    let (conn, handle, _) = rtnetlink::new_connection().map_err(io)?;
                    let conn = tokio::spawn(conn);
                    let r = f(handle).await;
                    conn.abort();
                    r
                })
                .map_err(|e| e.in_netns(&name))
            })
            .map_err(|e| self.io("starting a thread", e))?;
        thread.join().map_err(|_| NetError::Netlink {
            netns: self.name.clone(),
            what: what.to_owned(),
            message: "the thread panicked".into(),
        })?
    }
}

impl NetError {
    /// Names `netns` in an error made where it was not known.
    fn in_netns(self, netns: &str) -> NetError {
        match self {
            NetError::Netlink {
                netns: n,
                what,
                message,
            } if n.is_empty() => NetError::Netlink {
                netns: netns.to_owned(),
                what,
                message,
            },
            NetError::Io {
                netns: n,
                what,
                source,
            } if n.is_empty() => NetError::Io {
                netns: netns.to_owned(),
                what,
                source,
            },
            other => other,
        }
    }
}

/// A netlink error, its namespace named by [`Netns::run`].
fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetError {
    let what = what.into();
    move |e| NetError::Netlink {
        netns: String::new(),
        what,
        message: match &e {
            rtnetlink::Error::NetlinkError(m) => m.to_io().to_string(),
            other => other.to_string(),
        },
    }
}

fn errno(e: &rtnetlink::Error) -> i32 {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.raw_code().abs(),
        _ => 0,
    }
}

/// The pod's interface as the namespace has it: what the guest's NIC
/// takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInterface {
    /// Its name (`eth0`).
    pub name: String,
    /// Its index in the namespace.
    pub index: u32,
    /// Its MAC.
    pub mac: [u8; 6],
    /// Its MTU.
    pub mtu: u32,
    /// Its global addresses.
    pub addresses: Vec<IpNet>,
    /// Its routes (not the kernel's own), those without a gateway first.
    pub routes: Vec<NetRoute>,
    /// The neighbour entries of its routes' gateways, where the namespace
    /// has them.
    pub neighbours: Vec<NetNeighbour>,
}

impl PodInterface {
    /// The agent's request for a NIC that the VMM gave `device_mac`.
    pub fn guest_config(&self, device_mac: &str) -> NetworkConfig {
        NetworkConfig {
            interfaces: vec![NetInterface {
                device_mac: device_mac.to_owned(),
                name: self.name.clone(),
                mac: format_mac(&self.mac),
                mtu: self.mtu,
                addresses: self.addresses.clone(),
            }],
            routes: self.routes.clone(),
            neighbours: self.neighbours.clone(),
        }
    }
}

/// Finds the interface in `ns` that has global addresses (none: the pod
/// has loopback only); more than one is refused.
pub fn find_interface(ns: &Netns) -> Result<Option<PodInterface>, NetError> {
    let netns = ns.name.clone();
    ns.run("reading its interfaces", move |h| async move {
        let mut links = Vec::new();
        let mut stream = h.link().get().execute();
        while let Some(m) = stream.try_next().await.map_err(nl("listing links"))? {
            links.push(m);
        }
        let mut addrs: Vec<(u32, IpNet)> = Vec::new();
        let mut stream = h.address().get().execute();
        while let Some(m) = stream.try_next().await.map_err(nl("listing addresses"))? {
            if m.header.scope != AddressScope::Universe {
                continue;
            }
            let local = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let addr = local.or_else(|| {
                m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })
            });
            if let Some(addr) = addr {
                addrs.push((
                    m.header.index,
                    IpNet {
                        addr,
                        prefix_len: m.header.prefix_len,
                    },
                ));
            }
        }
        let name_of = |index: u32| {
            links
                .iter()
                .find(|l| l.header.index == index)
                .and_then(|l| {
                    l.attributes.iter().find_map(|a| match a {
                        LinkAttribute::IfName(n) => Some(n.clone()),
                        _ => None,
                    })
                })
                .unwrap_or_else(|| format!("#{index}"))
        };
        let mut indexes: Vec<u32> = addrs
            .iter()
            .map(|(i, _)| *i)
            .filter(|i| {
                links
                    .iter()
                    .any(|l| l.header.index == *i && !l.header.flags.contains(LinkFlags::Loopback))
                    && name_of(*i) != TAP_NAME
            })
            .collect();
        indexes.sort_unstable();
        indexes.dedup();
        let index = match indexes.as_slice() {
            [] => return Ok(None),
            [one] => *one,
            many => {
                let names: Vec<String> = many.iter().map(|i| name_of(*i)).collect();
                return Err(NetError::Unsupported {
                    netns,
                    why: Unsupported::ManyInterfaces(many.len(), names.join(", ")),
                });
            }
        };
        let name = name_of(index);
        let Some(link) = links.iter().find(|l| l.header.index == index) else {
            return Ok(None);
        };
        if link.header.link_layer_type != LinkLayerType::Ether {
            return Err(NetError::Unsupported {
                netns,
                why: Unsupported::NotEthernet(name),
            });
        }
        let mut mac = [0u8; 6];
        let mut mtu = 1500;
        for a in &link.attributes {
            match a {
                LinkAttribute::Address(m) if m.len() == 6 => mac.copy_from_slice(m),
                LinkAttribute::Mtu(m) => mtu = *m,
                _ => {}
            }
        }
        let addresses: Vec<IpNet> = addrs
            .iter()
            .filter(|(i, _)| *i == index)
            .map(|(_, a)| *a)
            .collect();
        let mut routes = Vec::new();
        for family in [
            RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
            RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
        ] {
            let mut stream = h.route().get(family).execute();
            while let Some(m) = stream.try_next().await.map_err(nl("listing routes"))? {
                if let Some(r) = route_of(&m, index, &name) {
                    routes.push(r);
                }
            }
        }
        // Routes to a link first: a route through a gateway needs the
        // gateway reachable.
        routes.sort_by_key(|r| r.gateway.is_some());
        let gateways: Vec<IpAddr> = routes.iter().filter_map(|r| r.gateway).collect();
        let mut neighbours = Vec::new();
        let mut stream = h.neighbours().get().execute();
        while let Some(m) = stream.try_next().await.map_err(nl("listing neighbours"))? {
            if m.header.ifindex != index
                || !matches!(
                    m.header.state,
                    NeighbourState::Permanent | NeighbourState::Reachable | NeighbourState::Stale
                )
            {
                continue;
            }
            let mut ip = None;
            let mut lladdr = None;
            for a in &m.attributes {
                match a {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                        ip = Some(IpAddr::V4(*v4))
                    }
                    NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                        ip = Some(IpAddr::V6(*v6))
                    }
                    NeighbourAttribute::LinkLayerAddress(l) if l.len() == 6 => {
                        let mut m = [0u8; 6];
                        m.copy_from_slice(l);
                        lladdr = Some(m);
                    }
                    _ => {}
                }
            }
            if let (Some(ip), Some(lladdr)) = (ip, lladdr) {
                if gateways.contains(&ip) {
                    neighbours.push(NetNeighbour {
                        ip,
                        mac: format_mac(&lladdr),
                        interface: name.clone(),
                    });
                }
            }
        }
        Ok(Some(PodInterface {
            name,
            index,
            mac,
            mtu,
            addresses,
            routes,
            neighbours,
        }))
    })
}

/// The route `m` if it is one of interface `index`'s in the main table,
/// and not one the kernel made for an address.
fn route_of(
    m: &rtnetlink::packet_route::route::RouteMessage,
    index: u32,
    name: &str,
) -> Option<NetRoute> {
    if m.header.table != rtnetlink::packet_route::route::RouteHeader::RT_TABLE_MAIN
        || m.header.protocol == RouteProtocol::Kernel
        || m.header.kind != rtnetlink::packet_route::route::RouteType::Unicast
    {
        return None;
    }
    let ip = |a: &RouteAddress| match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    };
    let mut oif = None;
    let mut dest = None;
    let mut gateway = None;
    let mut source = None;
    let mut metric = None;
    for a in &m.attributes {
        match a {
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Destination(d) => dest = ip(d),
            RouteAttribute::Gateway(g) => gateway = ip(g),
            RouteAttribute::PrefSource(s) => source = ip(s),
            RouteAttribute::Priority(p) => metric = Some(*p),
            _ => {}
        }
    }
    if oif != Some(index) {
        return None;
    }
    // IPv6 routes carry the kernel's default metric; others are the
    // client's.
    let metric = metric.filter(|p| !(dest.is_none_or(|d: IpAddr| d.is_ipv6()) && *p == 1024));
    Some(NetRoute {
        dest: dest.map(|addr| IpNet {
            addr,
            prefix_len: m.header.destination_prefix_length,
        }),
        gateway,
        interface: name.to_owned(),
        source,
        metric,
    })
}

async fn link_index(h: &Handle, name: &str) -> Result<Option<u32>, NetError> {
    let mut stream = h.link().get().match_name(name.to_owned()).execute();
    match stream.try_next().await {
        Ok(Some(m)) => Ok(Some(m.header.index)),
        Ok(None) => Ok(None),
        Err(e) if errno(&e) == libc::ENODEV => Ok(None),
        Err(e) => Err(nl(format!("finding {name}"))(e)),
    }
}

async fn set_up_by_name(h: &Handle, name: &str, mtu: Option<u32>) -> Result<(), NetError> {
    let index = link_index(h, name)
        .await?
        .ok_or_else(|| NetError::Netlink {
            netns: String::new(),
            what: format!("setting {name} up"),
            message: "no such interface".into(),
        })?;
    let mut b = LinkUnspec::new_with_index(index).up();
    if let Some(mtu) = mtu {
        b = b.mtu(mtu);
    }
    h.link()
        .set(b.build())
        .execute()
        .await
        .map_err(nl(format!("setting {name} up")))
}

/// Makes the pod's tap in `ns` (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, not
/// persistent: it goes when its last descriptor closes) and returns its
/// descriptor, for the VMM.
pub fn create_tap(ns: &Netns) -> Result<OwnedFd, NetError> {
    ns.run("creating its tap", |h| async move {
        let io = |source| NetError::Io {
            netns: String::new(),
            what: format!("creating tap {TAP_NAME}"),
            source,
        };
        let tun = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .map_err(|e| NetError::Io {
                netns: String::new(),
                what: "opening /dev/net/tun".into(),
                source: e,
            })?;
        // SAFETY: an all-zero ifreq is valid.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(TAP_NAME.as_bytes()) {
            *dst = *src as libc::c_char;
        }
        req.ifr_ifru.ifru_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        // SAFETY: TUNSETIFF reads the ifreq we pass, on our descriptor.
        if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &req) } != 0 {
            return Err(io(std::io::Error::last_os_error()));
        }
        set_up_by_name(&h, TAP_NAME, None).await?;
        Ok(OwnedFd::from(tun))
    })
}

/// Wires the tap to `iface`: the tap takes its MTU; an ingress qdisc on
/// each; every frame arriving on one is redirected out of the other. A
/// qdisc that exists already (EEXIST) is refused: rtv does not take over
/// another program's tc setup. On failure what this call added to `iface`
/// is removed again (and only that: another program's qdisc stays); the
/// tap's own qdisc and filters go with the tap when its descriptor closes.
pub fn wire(ns: &Netns, iface: &PodInterface) -> Result<(), NetError> {
    let (name, index, mtu) = (iface.name.clone(), iface.index, iface.mtu);
    ns.run("wiring its tap", move |h| async move {
        let mut added = false;
        let r = wire_in(&h, &name, index, mtu, &mut added).await;
        if r.is_err() && added {
            if let Err(e) = del_ingress(&h, index, &name).await {
                tracing::warn!("undoing a failed wiring: {e}");
            }
        }
        r
    })
}

/// The steps of [`wire`]; `added` is set once `name`'s qdisc is ours.
async fn wire_in(
    h: &Handle,
    name: &str,
    index: u32,
    mtu: u32,
    added: &mut bool,
) -> Result<(), NetError> {
    let tap = link_index(h, TAP_NAME)
        .await?
        .ok_or_else(|| NetError::Netlink {
            netns: String::new(),
            what: format!("wiring {TAP_NAME} to {name}"),
            message: "the tap is gone".into(),
        })?;
    h.link()
        .set(LinkUnspec::new_with_index(tap).mtu(mtu).up().build())
        .execute()
        .await
        .map_err(nl(format!("giving {TAP_NAME} the MTU {mtu} of {name}")))?;
    add_ingress(h, index, name).await?;
    *added = true;
    add_ingress(h, tap, TAP_NAME).await?;
    for (from, from_name, to, to_name) in
        [(index, name, tap, TAP_NAME), (tap, TAP_NAME, index, name)]
    {
        h.traffic_filter(from as i32)
            .add()
            .parent(0xffff_0000)
            .protocol(ETH_P_ALL.to_be())
            .redirect(to)
            .map_err(nl(format!(
                "building the redirect {from_name} -> {to_name}"
            )))?
            .execute()
            .await
            .map_err(nl(format!(
                "adding the redirect {from_name} -> {to_name} (tc u32 + mirred)"
            )))?;
    }
    Ok(())
}

/// Removes the ingress qdisc (and with it its filters) of link `index`;
/// one that is gone, or a link that is gone, is fine.
async fn del_ingress(h: &Handle, index: u32, name: &str) -> Result<(), NetError> {
    let mut del = h.qdisc().del(index as i32);
    del.message_mut().header.parent = TcHandle::INGRESS;
    del.message_mut().header.handle = TcHandle::from(0xffff_0000);
    match del.execute().await {
        Ok(()) => Ok(()),
        Err(e) if matches!(errno(&e), libc::ENOENT | libc::EINVAL | libc::ENODEV) => Ok(()),
        Err(e) => Err(nl(format!("removing the ingress qdisc of {name}"))(e)),
    }
}

async fn add_ingress(h: &Handle, dev: u32, name: &str) -> Result<(), NetError> {
    let mut tries = 0;
    loop {
        tries += 1;
        match h.qdisc().add(dev as i32).ingress().execute().await {
            Ok(()) => return Ok(()),
            Err(e) if errno(&e) == libc::EBUSY && tries < QDISC_TRIES => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) if errno(&e) == libc::EEXIST => {
                return Err(NetError::Netlink {
                    netns: String::new(),
                    what: format!("adding an ingress qdisc to {name}"),
                    message: "it has one already: rtv does not take over another program's tc \
                              setup of the pod's interface"
                        .into(),
                })
            }
            Err(e) => return Err(nl(format!("adding an ingress qdisc to {name}"))(e)),
        }
    }
}

/// Undoes [`wire`] and [`create_tap`] in the namespace at `path` (what is
/// already gone is fine; a namespace that is gone is fine).
pub fn unwire(path: &Path, iface: &str) -> Result<(), NetError> {
    let ns = match Netns::open(path) {
        Ok(ns) => ns,
        Err(NetError::Namespace { problem, .. })
            if problem.contains("No such file") || problem.contains("not a namespace") =>
        {
            return Ok(())
        }
        Err(e) => return Err(e),
    };
    let iface = iface.to_owned();
    ns.run("unwiring its tap", move |h| async move {
        for name in [iface.as_str(), TAP_NAME] {
            if let Some(index) = link_index(&h, name).await? {
                del_ingress(&h, index, name).await?;
            }
        }
        if let Some(tap) = link_index(&h, TAP_NAME).await? {
            match h.link().del(tap).execute().await {
                Ok(()) => {}
                Err(e) if errno(&e) == libc::ENODEV => {}
                Err(e) => return Err(nl(format!("removing {TAP_NAME}"))(e)),
            }
        }
        Ok(())
    })
}

/// Whether `path` can be re-opened later to unwire it (a namespace named
/// by a path that outlives the process, not `/proc/<pid>/...` of a
/// process that may be gone or reused).
pub fn lasting_path(path: &Path) -> bool {
    !path.starts_with("/proc")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn ip(netns: &str, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["-n", netns])
            .args(args)
            .output()
            .expect("ip");
        assert!(
            out.status.success(),
            "ip -n {netns} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn tc(netns: &str, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", netns, "tc"])
            .args(args)
            .output()
            .expect("tc");
        assert!(out.status.success(), "tc {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A namespace of the test's own (`ip netns add`), removed on drop.
    struct TestNs(String);

    impl TestNs {
        fn new(tag: &str) -> TestNs {
            let name = format!("rtv-nt-{tag}-{}", std::process::id());
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
            let st = Command::new("ip")
                .args(["netns", "add", &name])
                .status()
                .expect("ip netns add");
            assert!(st.success());
            TestNs(name)
        }
        fn path(&self) -> PathBuf {
            PathBuf::from("/var/run/netns").join(&self.0)
        }
    }

    impl Drop for TestNs {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }

    #[test]
    fn the_spec_names_the_mode() {
        let spec = |ns: &str| -> Spec {
            serde_json::from_str(&format!(
                r#"{{"ociVersion":"1.0.2","linux":{{"namespaces":[{ns}]}}}}"#
            ))
            .unwrap()
        };
        assert_eq!(
            NetworkMode::of(&spec(r#"{"type":"pid"}"#)),
            NetworkMode::Loopback
        );
        assert_eq!(
            NetworkMode::of(&spec(r#"{"type":"network"}"#)),
            NetworkMode::New
        );
        assert_eq!(
            NetworkMode::of(&spec(r#"{"type":"network","path":"/var/run/netns/x"}"#)),
            NetworkMode::Path("/var/run/netns/x".into())
        );
    }

    #[test]
    fn bad_namespaces_are_refused_by_name() {
        // PID 1's (root may not even open it without CAP_SYS_PTRACE here).
        assert!(Netns::open(Path::new("/proc/1/ns/net")).is_err());
        for (path, want) in [
            ("/proc/self/ns/net", "is the host's network namespace"),
            ("/proc/self/ns/uts", "not a network namespace"),
            ("/etc/hostname", "not a namespace file"),
            ("/var/run/netns/rtv-no-such-ns", "No such file"),
        ] {
            let e = Netns::open(Path::new(path)).unwrap_err().to_string();
            assert!(
                e.contains(path) && e.contains(want) && e.starts_with("linux.namespaces"),
                "{path}: {e}"
            );
        }
    }

    /// In namespaces of the test's own: a CNI-like veth `eth0` with
    /// addresses and routes in the pod's, its peer in another; the pod
    /// network is found, wired and unwired, and the tap carries frames
    /// both ways.
    #[test]
    fn finds_wires_and_unwires_a_pod_interface() {
        let pod = TestNs::new("pod");
        let peer = TestNs::new("peer");
        let ns = Netns::open(&pod.path()).expect("open");
        assert_eq!(find_interface(&ns).expect("scan an empty ns"), None);
        ip(
            &pod.0,
            &[
                "link", "add", "eth0", "mtu", "1400", "type", "veth", "peer", "name", "p0",
                "netns", &peer.0,
            ],
        );
        ip(
            &pod.0,
            &["link", "set", "eth0", "address", "0a:58:0a:58:00:05", "up"],
        );
        ip(&pod.0, &["addr", "add", "10.88.0.5/16", "dev", "eth0"]);
        ip(
            &pod.0,
            &["-6", "addr", "add", "fd00:88::5/64", "dev", "eth0", "nodad"],
        );
        ip(
            &pod.0,
            &["route", "add", "default", "via", "10.88.0.1", "dev", "eth0"],
        );
        ip(&pod.0, &["route", "add", "10.99.0.0/24", "dev", "eth0"]);
        ip(
            &pod.0,
            &[
                "neigh",
                "add",
                "10.88.0.1",
                "lladdr",
                "0a:58:0a:58:00:01",
                "dev",
                "eth0",
                "nud",
                "permanent",
            ],
        );
        ip(&peer.0, &["link", "set", "p0", "up"]);
        ip(&peer.0, &["addr", "add", "10.88.0.1/16", "dev", "p0"]);
        let iface = find_interface(&ns).expect("scan").expect("eth0 found");
        assert_eq!(iface.name, "eth0");
        assert_eq!(iface.mac, [0x0a, 0x58, 0x0a, 0x58, 0, 5]);
        assert_eq!(iface.mtu, 1400);
        let addrs: Vec<String> = iface.addresses.iter().map(|a| a.to_string()).collect();
        assert!(addrs.contains(&"10.88.0.5/16".to_owned()), "{addrs:?}");
        assert!(addrs.contains(&"fd00:88::5/64".to_owned()), "{addrs:?}");
        // Routes to a link come first; the kernel's own are left out.
        let first_gw = iface
            .routes
            .iter()
            .position(|r| r.gateway.is_some())
            .expect("gw");
        assert!(iface.routes[..first_gw].iter().all(|r| r.gateway.is_none()));
        assert!(iface
            .routes
            .iter()
            .any(|r| r.dest.is_some_and(|d| d.to_string() == "10.99.0.0/24")));
        assert!(!iface
            .routes
            .iter()
            .any(|r| r.dest.is_some_and(|d| d.to_string() == "10.88.0.0/16")));
        assert_eq!(iface.neighbours.len(), 1, "{:?}", iface.neighbours);
        assert_eq!(iface.neighbours[0].mac, "0a:58:0a:58:00:01");
        let cfg = iface.guest_config(rtv_protocol::PLACEHOLDER_MAC);
        assert_eq!(cfg.interfaces[0].mac, "0a:58:0a:58:00:05");

        let tap = create_tap(&ns).expect("tap");
        // The tap is in the pod's namespace, not ours.
        assert!(ip(&pod.0, &["-o", "link", "show", TAP_NAME]).contains(TAP_NAME));
        assert!(
            !std::path::Path::new(&format!("/sys/class/net/{TAP_NAME}")).exists()
                || std::fs::read_link(format!("/sys/class/net/{TAP_NAME}")).is_err()
        );
        // The tap is not an addressed interface.
        assert_eq!(
            find_interface(&ns).unwrap().map(|i| i.name),
            Some("eth0".into())
        );
        wire(&ns, &iface).expect("wire");
        assert!(ip(&pod.0, &["-o", "link", "show", TAP_NAME]).contains("mtu 1400"));
        for dev in ["eth0", TAP_NAME] {
            let f = tc(&pod.0, &["filter", "show", "dev", dev, "ingress"]);
            assert!(f.contains("mirred") && f.contains("Redirect"), "{dev}: {f}");
        }
        // Wiring twice is refused: the qdisc exists.
        let e = wire(&ns, &iface).unwrap_err().to_string();
        assert!(e.contains("has one already"), "{e}");

        // A frame written into the tap (with its 12-byte vnet header)
        // leaves through eth0 and reaches the peer: a UDP datagram to the
        // peer's address, received on a socket there.
        let peer_ns = Netns::open(&peer.path()).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let peer_fd = peer_ns.fd.try_clone().unwrap();
        let receiver = std::thread::spawn(move || {
            // SAFETY: setns of this thread only.
            let rc = unsafe { libc::setns(peer_fd.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0);
            let sock = std::net::UdpSocket::bind("10.88.0.1:5555").unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            tx.send(()).unwrap();
            let mut buf = [0u8; 64];
            let (n, from) = sock
                .recv_from(&mut buf)
                .expect("the datagram through the tap");
            (buf[..n].to_vec(), from)
        });
        rx.recv().unwrap();
        let frame = udp_frame(
            [0x0a, 0x58, 0x0a, 0x58, 0, 5],
            [10, 88, 0, 5],
            [10, 88, 0, 1],
            b"hi",
        );
        // The peer's MAC: a broadcast frame would do for UDP to its IP too,
        // but the destination must be p0's; read it.
        let p0_mac = ip(&peer.0, &["-o", "link", "show", "p0"]);
        let mac_str = p0_mac
            .split("link/ether ")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap();
        let dst = rtv_protocol::parse_mac(mac_str).unwrap();
        let mut with_dst = frame.clone();
        with_dst[12..18].copy_from_slice(&dst);
        // The tap's vnet header is 10 bytes until someone sets another
        // size (the VMM sets 12, virtio 1's).
        let mut out = vec![0u8; 10];
        out.extend_from_slice(&with_dst[12..]);
        // SAFETY: write(2) of our buffer on the tap's descriptor.
        let n = unsafe { libc::write(tap.as_raw_fd(), out.as_ptr().cast(), out.len()) };
        assert_eq!(n as usize, out.len(), "{}", std::io::Error::last_os_error());
        let (data, from) = receiver.join().unwrap();
        assert_eq!(data, b"hi");
        assert_eq!(from.ip().to_string(), "10.88.0.5");

        drop(tap);
        unwire(&pod.path(), "eth0").expect("unwire");
        assert!(tc(&pod.0, &["qdisc", "show", "dev", "eth0", "ingress"])
            .trim()
            .is_empty());
        assert!(!ip(&pod.0, &["-o", "link"]).contains(TAP_NAME));
        // Twice, and for a namespace that is gone: nothing to do.
        unwire(&pod.path(), "eth0").expect("unwire twice");
        unwire(Path::new("/var/run/netns/rtv-no-such-ns"), "eth0").expect("no namespace");
    }

    /// A 12-byte placeholder (vnet header slot) + Ethernet + IPv4 + UDP
    /// frame from `src_ip` port 4444 to `dst_ip` port 5555.
    fn udp_frame(src_mac: [u8; 6], src_ip: [u8; 4], dst_ip: [u8; 4], payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&[0xff; 6]);
        f.extend_from_slice(&src_mac);
        f.extend_from_slice(&[0x08, 0x00]);
        let total = 20 + 8 + payload.len();
        let mut iph = vec![
            0x45,
            0,
            (total >> 8) as u8,
            total as u8,
            0,
            0,
            0x40,
            0,
            64,
            17,
            0,
            0,
        ];
        iph.extend_from_slice(&src_ip);
        iph.extend_from_slice(&dst_ip);
        let sum = checksum(&iph);
        iph[10..12].copy_from_slice(&sum.to_be_bytes());
        f.extend_from_slice(&iph);
        let ulen = 8 + payload.len();
        f.extend_from_slice(&[0x11, 0x5c, 0x15, 0xb3, (ulen >> 8) as u8, ulen as u8, 0, 0]);
        f.extend_from_slice(payload);
        f
    }

    fn checksum(b: &[u8]) -> u16 {
        let mut sum: u32 = 0;
        for c in b.chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    #[test]
    fn a_new_namespace_has_loopback_up_and_no_interface() {
        let ns = Netns::create("test").expect("create");
        assert_eq!(find_interface(&ns).unwrap(), None);
        let tap = create_tap(&ns).expect("tap");
        assert_eq!(find_interface(&ns).unwrap(), None);
        drop(tap);
    }

    /// An addressed veth `eth0` in `pod`, its peer in `peer`.
    fn veth_pair(pod: &TestNs, peer: &TestNs) {
        ip(
            &pod.0,
            &[
                "link", "add", "eth0", "type", "veth", "peer", "name", "p0", "netns", &peer.0,
            ],
        );
        ip(&pod.0, &["addr", "add", "10.77.0.2/24", "dev", "eth0"]);
        ip(&pod.0, &["link", "set", "eth0", "up"]);
    }

    #[test]
    fn another_programs_qdisc_is_refused_and_left_alone() {
        let pod = TestNs::new("busy");
        let peer = TestNs::new("busy-peer");
        veth_pair(&pod, &peer);
        tc(&pod.0, &["qdisc", "add", "dev", "eth0", "ingress"]);
        tc(
            &pod.0,
            &[
                "filter", "add", "dev", "eth0", "parent", "ffff:", "protocol", "ip", "u32",
                "match", "u32", "0", "0", "flowid", "ffff:7",
            ],
        );
        let ns = Netns::open(&pod.path()).expect("open");
        let iface = find_interface(&ns).unwrap().expect("eth0");
        let tap = create_tap(&ns).expect("tap");
        let e = wire(&ns, &iface).unwrap_err().to_string();
        assert!(e.contains("eth0") && e.contains("has one already"), "{e}");
        drop(tap);
        // The other program's qdisc and filter are as they were; no tap.
        let f = tc(&pod.0, &["filter", "show", "dev", "eth0", "ingress"]);
        assert!(f.contains("flowid ffff:7"), "{f}");
        assert!(!ip(&pod.0, &["-o", "link"]).contains(TAP_NAME));
    }

    #[test]
    fn a_tap_that_cannot_be_created_is_named_and_the_namespace_is_unchanged() {
        let pod = TestNs::new("notap");
        let peer = TestNs::new("notap-peer");
        veth_pair(&pod, &peer);
        // Another program's interface holds the tap's name.
        ip(
            &pod.0,
            &[
                "link", "add", TAP_NAME, "type", "veth", "peer", "name", "other1",
            ],
        );
        let before = ip(&pod.0, &["-o", "link"]);
        let ns = Netns::open(&pod.path()).expect("open");
        let e = create_tap(&ns).unwrap_err().to_string();
        assert!(e.contains(&format!("creating tap {TAP_NAME}")), "{e}");
        assert_eq!(ip(&pod.0, &["-o", "link"]), before);
        assert!(tc(&pod.0, &["qdisc", "show", "ingress"]).trim().is_empty());
    }

    #[test]
    fn an_interface_gone_before_wiring_is_named_and_nothing_is_left() {
        let pod = TestNs::new("gone");
        let peer = TestNs::new("gone-peer");
        veth_pair(&pod, &peer);
        let ns = Netns::open(&pod.path()).expect("open");
        let iface = find_interface(&ns).unwrap().expect("eth0");
        let tap = create_tap(&ns).expect("tap");
        ip(&pod.0, &["link", "del", "eth0"]);
        let e = wire(&ns, &iface).unwrap_err().to_string();
        assert!(e.contains("eth0"), "{e}");
        drop(tap);
        assert_eq!(
            ip(&pod.0, &["-o", "link"]).lines().count(),
            1,
            "only lo is left"
        );
        assert!(tc(&pod.0, &["qdisc", "show", "ingress"]).trim().is_empty());
    }
}
