//! forage-client: the device's side of VM synthesis (protocol in `forage-proto`).
//!
//! [`synthesize`] offers the overlay's base and digest; unless the cloudlet has the launch
//! VM cached it sends the manifest and then every segment in the overlay's order, except
//! that segments the cloudlet asks for (Fetch, early start) go out before the next bulk
//! one. As soon as Ready comes it sends the service's request to the endpoint (with early
//! start, while segments are still streaming), asks the cloudlet what the VM used of the
//! overlay until then (Checkpoint/Usage), waits for Complete and reports the breakdown.
//! The session (and the VM on the cloudlet) lives until [`Session::close`] or drop.

mod apps;
mod connect;
mod error;
mod held;
mod pairing;
mod provision;
mod sender;
pub mod service;
mod synthesis;

pub use apps::{ask_after, get_app, list_apps, where_is};
pub use connect::{connect, CloudletStream};
pub use error::ClientError;
pub use forage_proto::ServiceEndpoint;
pub use held::{follow_requests, Ended, MovedNotice};
pub use pairing::pair;
pub use provision::{provision, Ask, ProvisionReport, Provisioned};
pub(crate) use synthesis::first_response;
pub use synthesis::{
    synthesize, synthesize_url, OverlayFile, OverlayUsage, Session, SynthesisOptions, SynthesisReport,
};
