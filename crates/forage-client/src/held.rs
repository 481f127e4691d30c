//! How an instance a device holds ends: moved to another cloudlet, or stopped.

use crate::error::ClientError;

/// How a held instance ended.
#[derive(Debug)]
pub enum Ended {
    /// The cloudlet handed it off: the service now answers at `service`, on the cloudlet
    /// at `cloudlet`.
    Moved { cloudlet: String, service: forage_proto::ServiceEndpoint },
    /// It stopped (idle timeout, operator, error).
    Stopped(ClientError),
}

/// What a device prints when its held instance moved (`--hold --json`): one shape for
/// every command that holds one.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MovedNotice {
    /// The cloudlet it went to.
    pub moved_to: String,
    /// Where its service answers now.
    pub endpoint: String,
    pub service: forage_proto::ServiceEndpoint,
}

impl Ended {
    /// The notice of a move, if it was one.
    pub fn moved(&self) -> Option<MovedNotice> {
        match self {
            Ended::Moved { cloudlet, service } => Some(MovedNotice {
                moved_to: cloudlet.clone(),
                endpoint: service.addr.clone(),
                service: service.clone(),
            }),
            Ended::Stopped(_) => None,
        }
    }
}

/// While an instance is held, lines `follow HOST:PORT` read from `input` (a device's
/// stdin) ask it to follow the device to that cloudlet; other lines are refused on stderr.
pub fn follow_requests(input: impl std::io::BufRead + Send + 'static) -> tokio::sync::mpsc::UnboundedReceiver<String> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in input.lines() {
            let Ok(line) = line else { break };
            match line.split_whitespace().collect::<Vec<_>>()[..] {
                ["follow", to] => {
                    if tx.send(to.to_string()).is_err() {
                        break;
                    }
                }
                [] => {}
                _ => eprintln!("unknown command {line:?}: say `follow HOST:PORT`"),
            }
        }
    });
    rx
}
