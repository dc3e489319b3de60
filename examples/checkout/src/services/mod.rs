//! The event-driven services. Each can run alone (`checkout <service>`) or with the
//! others in one process (`checkout demo`, `checkout load`, the tests); either way it
//! owns its tables and talks to the others only through HTTP (the reservation) and
//! topics.

pub mod inventory;
pub mod notification;
pub mod order;
pub mod payment;
pub mod revenue;

use std::time::Duration;

use tokio::task::JoinHandle;

use crate::http::Server;

/// How long stopping a service waits for HTTP requests in progress.
const HTTP_GRACE: Duration = Duration::from_secs(2);

/// A started service: its HTTP server, if it has one, and its background tasks
/// (consumers, the outbox relay). They stop when the shutdown token given at start is
/// cancelled; [`Running::join`] waits for that.
#[derive(Debug)]
pub struct Running {
    /// The service's name.
    pub name: &'static str,
    server: Option<Server>,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    fn new(name: &'static str, server: Option<Server>, tasks: Vec<JoinHandle<()>>) -> Running {
        Running {
            name,
            server,
            tasks,
        }
    }

    /// `http://<addr>` of its HTTP server.
    pub fn url(&self) -> Option<String> {
        self.server.as_ref().map(Server::url)
    }

    /// Waits for the service to stop after its shutdown token was cancelled.
    pub async fn join(self) {
        if let Some(server) = self.server {
            server.join(HTTP_GRACE).await;
        }
        for task in self.tasks {
            if let Err(e) = task.await {
                tracing::warn!(service = self.name, error = %e, "a task panicked");
            }
        }
    }
}
