//! forage-cluster: a cloudlet of many hosts. Nodes (`forage serve --cluster URLS`)
//! register in etcd under a lease, publish their capacity, what they hold and their
//! instances as Kubernetes-shaped objects ([`resources`]), read the others', and place a
//! device's request on the best live node ([`placement`]). See `docs/cluster.md` for the
//! key layout and the message sequence ([`member`]).
//!
//! Why etcd's JSON gateway over HTTP ([`etcd`]) and not the `etcd-client` crate: the
//! crate brings tonic, prost and a protoc step at build time (a new toolchain dependency
//! and two more minutes of compile on this project's 2-core machines) for the six unary
//! calls this crate makes; the gateway serves those calls as JSON, etcd 3.4 ships it on
//! every client URL, and hyper is already in the build. What is given up: watches are
//! streams on the gateway, so views are re-read on each heartbeat (a third of the lease)
//! rather than pushed.

pub mod etcd;
pub mod member;
pub mod placement;
pub mod reservation;
pub mod resources;

pub use etcd::{Etcd, EtcdError, EtcdTls};
pub use member::{
    chain, ClusterConfig, ClusterStatus, DrainError, JoinError, LocalInstance, LocalView, Member, PlacementError,
    RESERVE_TRIES,
};
pub use placement::{HoldsThenLeastLoaded, PlaceError, Placement, PlacementRequest, Utility};
pub use reservation::{Reservation, RESERVATION_TTL_MS, RESERVED_MIB};
pub use resources::{ClusterInstance, InstancePhase, Node, NodeSpec, NodeStatus};
