//! For tests of sidecast and of what is built on it: a real `redis-server` on a free
//! loopback port, or a Redis Cluster of several, without persistence, stopped when dropped.
//! Not part of the API.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A redis-server process of this test.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts one and waits until it answers (at most 10 s).
    pub fn start() -> RedisServer {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut server = RedisServer { port, child: None };
        server.restart();
        server
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Stops the process (SIGKILL: Redis loses everything, as after a crash).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port (empty), and waits until it answers.
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let child = Command::new("redis-server")
                .args(["--port", &self.port.to_string()])
                .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server is installed (scripts/test installs it)");
            self.child = Some(child);
            if self.wait_answering(deadline) {
                return;
            }
            // The port may still be held by the previous process: try again.
            self.stop();
            assert!(
                Instant::now() < deadline,
                "redis-server did not start on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts one that is a node of a Redis Cluster to be, keeping its cluster state in `dir`.
    fn start_cluster_node(dir: &std::path::Path) -> RedisServer {
        let free = || {
            TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port()
        };
        // The cluster bus gets a free port of its own (by default it is the port + 10000,
        // which may be taken or out of range).
        let (port, bus) = (free(), free());
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string()])
            .args(["--cluster-port", &bus.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"])
            .args(["--cluster-config-file", &format!("nodes-{port}.conf")])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/test installs it)");
        let mut server = RedisServer {
            port,
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        assert!(
            server.wait_answering(deadline),
            "redis-server (cluster node) did not start on {port}"
        );
        server
    }

    fn wait_answering(&mut self, deadline: Instant) -> bool {
        let client = redis::Client::open(self.url()).expect("a url");
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(_)) = child.try_wait() {
                    return false;
                }
            }
            if let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_millis(200)) {
                if redis::cmd("PING").query::<String>(&mut conn).is_ok() {
                    return true;
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A Redis Cluster of primaries (the slots split evenly) and their replicas, made with
/// `redis-cli --cluster create`; its processes stop when it is dropped.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
    /// Where the nodes keep their cluster state (removed on drop).
    dir: std::path::PathBuf,
}

impl RedisCluster {
    /// `n` primaries without replicas; waits until every node reports the cluster ok (at
    /// most 30 s).
    pub fn start(n: usize) -> RedisCluster {
        RedisCluster::start_with_replicas(n, 0)
    }

    /// `n` primaries with `replicas` replicas each.
    pub fn start_with_replicas(n: usize, replicas: usize) -> RedisCluster {
        let n = n * (1 + replicas);
        let dir = std::env::temp_dir().join(format!(
            "sidecast-redis-cluster-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        let nodes: Vec<RedisServer> = (0..n)
            .map(|_| RedisServer::start_cluster_node(&dir))
            .collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)))
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .expect("redis-cli is installed with redis-server");
        assert!(
            created.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&created.stderr)
        );
        let cluster = RedisCluster { nodes, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !cluster.is_ok(n - n / (1 + replicas)) {
            assert!(
                Instant::now() < deadline,
                "the Redis Cluster never became ok"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        cluster
    }

    /// The seed addresses, as `broker` takes them.
    pub fn urls(&self) -> String {
        let urls: Vec<String> = self.nodes.iter().map(RedisServer::url).collect();
        urls.join(",")
    }

    /// The node serving `key`'s slot as primary, and its replicas.
    pub fn serving(&self, key: &str) -> (&RedisServer, Vec<&RedisServer>) {
        let mut conn = redis::Client::open(self.nodes[0].url())
            .and_then(|c| c.get_connection())
            .expect("a cluster node answers");
        let slot: i64 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut conn)
            .expect("CLUSTER KEYSLOT");
        // Each entry: start, end, then [ip, port, id] of the primary and of each replica.
        let slots: Vec<Vec<redis::Value>> = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query(&mut conn)
            .expect("CLUSTER SLOTS");
        let int = |v: &redis::Value| redis::from_redis_value_ref::<i64>(v).expect("a number");
        let range = slots
            .iter()
            .find(|r| int(&r[0]) <= slot && slot <= int(&r[1]))
            .expect("every slot is served");
        let node = |v: &redis::Value| {
            let port = match v {
                redis::Value::Array(fields) => int(&fields[1]),
                _ => panic!("a node of CLUSTER SLOTS: {v:?}"),
            };
            self.nodes
                .iter()
                .find(|n| i64::from(n.port) == port)
                .expect("a node of this cluster")
        };
        (node(&range[2]), range[3..].iter().map(node).collect())
    }

    /// Whether every node says `cluster_state:ok` and knows every other, and `replicas`
    /// of them are replicas in sync with their primary.
    fn is_ok(&self, replicas: usize) -> bool {
        let mut synced = 0;
        for node in &self.nodes {
            let Ok(client) = redis::Client::open(node.url()) else {
                return false;
            };
            let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_millis(500))
            else {
                return false;
            };
            let info: String = redis::cmd("CLUSTER")
                .arg("INFO")
                .query(&mut conn)
                .unwrap_or_default();
            if !info.contains("cluster_state:ok")
                || !info.contains(&format!("cluster_known_nodes:{}", self.nodes.len()))
            {
                return false;
            }
            let replication: String = redis::cmd("INFO")
                .arg("replication")
                .query(&mut conn)
                .unwrap_or_default();
            if replication.contains("master_link_status:up") {
                synced += 1;
            }
        }
        synced == replicas
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.stop();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
