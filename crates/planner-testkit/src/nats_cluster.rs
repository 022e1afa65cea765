//! A real three-node (or n-node) nats-server cluster on loopback ports, for one test.

use crate::nats_server::{free_port, NatsServer, NatsServerError};

/// `n` nats-servers with JetStream, routed to each other as the cluster `planner`, each with
/// its own client port and store directory; all killed on drop. JetStream elects its meta
/// leader a moment after they start: wait for `$JS.API.INFO` to answer before creating streams.
#[derive(Debug)]
pub struct NatsCluster {
    servers: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `n` nodes (at least 1), `node-0` .. `node-<n-1>`.
    pub fn start(n: usize) -> Result<Self, NatsServerError> {
        let n = n.max(1);
        let client_ports: Vec<u16> = (0..n).map(|_| free_port()).collect::<Result<_, _>>()?;
        let cluster_ports: Vec<u16> = (0..n).map(|_| free_port()).collect::<Result<_, _>>()?;
        let routes = cluster_ports
            .iter()
            .map(|p| format!("nats-route://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut servers = Vec::new();
        for (i, (client, cluster)) in client_ports.iter().zip(&cluster_ports).enumerate() {
            let name = format!("node-{i}");
            let listen = format!("nats://127.0.0.1:{cluster}");
            let args = [
                "-n",
                name.as_str(),
                "--cluster_name",
                "planner",
                "--cluster",
                listen.as_str(),
                "--routes",
                routes.as_str(),
            ];
            servers.push(NatsServer::start_on(*client, &args)?);
        }
        Ok(NatsCluster { servers })
    }

    /// Every node's client URL, comma-separated (what `nats.url` takes).
    pub fn url(&self) -> String {
        self.servers
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The nodes.
    pub fn nodes(&self) -> &[NatsServer] {
        &self.servers
    }

    /// Node `i`, to kill or restart.
    pub fn node_mut(&mut self, i: usize) -> Option<&mut NatsServer> {
        self.servers.get_mut(i)
    }
}
