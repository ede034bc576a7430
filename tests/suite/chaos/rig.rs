//! The system under test: a throwaway PostgreSQL cluster, and several idemd replicas, each
//! reaching the database through its own fault proxy. Faults are injected through the rig, which
//! records when each began and ended and how long every replica took to serve again.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use idemd::proto::idempotency::v1 as pb;
use idemd::proto::idempotency::v1::idempotency_service_client::IdempotencyServiceClient;
use tonic::transport::{Channel, Endpoint};

use crate::faults::{Fault, FaultProxy};
use crate::processes::{free_port, Cluster, Formation, IdemdProcess, Replication};

/// How long a replica may take to serve again after a fault heals before the run fails.
const RECOVERY_LIMIT: Duration = Duration::from_secs(30);

/// A fault, from injection to heal, and the slowest replica's recovery after it.
#[derive(Debug, Clone)]
pub struct FaultRecord {
    pub what: String,
    pub injected: Instant,
    pub healed: Option<Instant>,
    pub recovery: Option<Duration>,
}

pub struct Replica {
    pub listen: SocketAddr,
    env: Vec<(String, String)>,
    process: Mutex<Option<IdemdProcess>>,
}

pub struct Rig {
    /// The database server (with `start_pair`, the primary the run starts on); `None` with
    /// `start_formation` (see `cluster()`).
    cluster: Option<Cluster>,
    /// With `start_formation`: the pg_auto_failover formation whose nodes the replicas reach
    /// through one multi-host URL, without fault proxies.
    pub formation: Option<Formation>,
    /// With `start_pair`: the streaming standby that failover scenarios promote. The replicas
    /// then reach both servers directly through one multi-host URL, without fault proxies.
    pub standby: Option<Cluster>,
    /// Whether the standby has been promoted.
    promoted: AtomicBool,
    /// When `promote` returned (the standby took writes).
    pub promoted_at: Mutex<Option<std::time::SystemTime>>,
    pub proxies: Vec<FaultProxy>,
    pub replicas: Vec<Replica>,
    pub faults: Mutex<Vec<FaultRecord>>,
    /// Per replica: when a probe last succeeded.
    probes: Vec<Arc<Mutex<Option<Instant>>>>,
}

impl Rig {
    /// A cluster and one replica per entry of `envs` (extra environment for that replica).
    pub async fn start(envs: Vec<Vec<(String, String)>>) -> Arc<Self> {
        let cluster = tokio::task::spawn_blocking(Cluster::start)
            .await
            .expect("start cluster");
        let mut proxies = Vec::new();
        for _ in &envs {
            proxies.push(FaultProxy::start(cluster.addr()).await);
        }
        Self::build(Some(cluster), None, None, proxies, envs).await
    }

    /// A pg_auto_failover formation (a monitor, a primary and its synchronous standby), and the
    /// replicas on a multi-host URL of both data nodes with `target_session_attrs=read-write`;
    /// returns once the monitor reports `primary` and `secondary`.
    pub async fn start_formation(envs: Vec<Vec<(String, String)>>) -> Arc<Self> {
        let formation = tokio::task::spawn_blocking(Formation::start)
            .await
            .expect("start the pg_auto_failover formation");
        Self::build(None, None, Some(formation), Vec::new(), envs).await
    }

    /// The database server of a rig started with `start` or `start_pair`.
    pub fn cluster(&self) -> &Cluster {
        self.cluster
            .as_ref()
            .expect("a rig with a cluster of its own (not a pg_auto_failover formation)")
    }

    /// A primary and a streaming standby (synchronous or not), and the replicas on a multi-host
    /// URL of both with `target_session_attrs=read-write`; returns once the standby streams (and,
    /// when synchronous, is the primary's synchronous standby).
    pub async fn start_pair(
        envs: Vec<Vec<(String, String)>>,
        replication: Replication,
    ) -> Arc<Self> {
        let (cluster, standby) = tokio::task::spawn_blocking(move || {
            let primary = Cluster::primary(replication);
            let standby = primary.standby();
            (primary, standby)
        })
        .await
        .expect("start primary and standby");
        let (admin, connection) =
            tokio_postgres::connect(&cluster.admin_url(), tokio_postgres::NoTls)
                .await
                .expect("connect to primary");
        tokio::spawn(connection);
        let wanted = match replication {
            Replication::Synchronous => "sync",
            Replication::Asynchronous => "async",
        };
        let started = Instant::now();
        loop {
            let state: Option<String> = admin
                .query_opt(
                    "SELECT sync_state FROM pg_stat_replication WHERE state = 'streaming'",
                    &[],
                )
                .await
                .expect("replication state")
                .map(|row| row.get(0));
            if state.as_deref() == Some(wanted) {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the standby is not a streaming {wanted} standby: {state:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self::build(Some(cluster), Some(standby), None, Vec::new(), envs).await
    }

    async fn build(
        cluster: Option<Cluster>,
        standby: Option<Cluster>,
        formation: Option<Formation>,
        proxies: Vec<FaultProxy>,
        envs: Vec<Vec<(String, String)>>,
    ) -> Arc<Self> {
        let replicas = envs
            .into_iter()
            .map(|env| Replica {
                listen: SocketAddr::from(([127, 0, 0, 1], free_port())),
                env,
                process: Mutex::new(None),
            })
            .collect::<Vec<_>>();
        let probes = replicas
            .iter()
            .map(|_| Arc::new(Mutex::new(None)))
            .collect();
        let rig = Arc::new(Self {
            cluster,
            formation,
            standby,
            promoted: AtomicBool::new(false),
            promoted_at: Mutex::new(None),
            proxies,
            replicas,
            faults: Mutex::new(Vec::new()),
            probes,
        });
        for index in 0..rig.replicas.len() {
            rig.start_replica(index).await;
        }
        for index in 0..rig.replicas.len() {
            let probe = rig.probes[index].clone();
            let mut client = IdempotencyServiceClient::new(rig.channel(index));
            tokio::spawn(async move {
                loop {
                    let mut request = tonic::Request::new(pb::GetRequest {
                        namespace: "probe".into(),
                        key: "probe".into(),
                    });
                    request.set_timeout(Duration::from_millis(500));
                    let asked = Instant::now();
                    // NOT_FOUND is an answer from the store: the replica serves.
                    let served = match client.get(request).await {
                        Ok(_) => true,
                        Err(status) => status.code() == tonic::Code::NotFound,
                    };
                    if served {
                        *probe.lock().unwrap_or_else(|p| p.into_inner()) = Some(asked);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            });
        }
        rig
    }

    fn database_url(&self, index: usize) -> String {
        if let Some(formation) = &self.formation {
            return formation_url(formation);
        }
        match &self.standby {
            Some(standby) => format!(
                "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/postgres\
                 ?target_session_attrs=read-write",
                self.cluster().port(),
                standby.port()
            ),
            None => format!("postgres://postgres@{}/postgres", self.proxies[index].addr),
        }
    }

    /// The admin URL of the server that is the primary now.
    pub fn primary_admin_url(&self) -> String {
        if let Some(formation) = &self.formation {
            // Whichever node is the primary now: the URL finds it.
            return formation_url(formation);
        }
        match &self.standby {
            Some(standby) if self.promoted.load(Ordering::SeqCst) => standby.admin_url(),
            _ => self.cluster().admin_url(),
        }
    }

    /// Notes that the standby has been promoted (by pg_auto_failover), now.
    pub fn note_promoted(&self) {
        self.promoted.store(true, Ordering::SeqCst);
        *self.promoted_at.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(std::time::SystemTime::now());
    }

    /// Promotes the standby (`pg_ctl promote`, waiting until it takes writes).
    pub async fn promote(self: &Arc<Self>) {
        self.blocking(|rig| {
            rig.standby
                .as_ref()
                .expect("a rig started with start_pair")
                .promote();
            rig.promoted.store(true, Ordering::SeqCst);
            *rig.promoted_at.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(std::time::SystemTime::now());
        })
        .await;
    }

    /// Starts (or restarts) replica `index` on its address, waiting until it announces itself.
    pub async fn start_replica(self: &Arc<Self>, index: usize) {
        let rig = self.clone();
        tokio::task::spawn_blocking(move || {
            let replica = &rig.replicas[index];
            let url = rig.database_url(index);
            let listen = replica.listen.to_string();
            let env: Vec<(&str, &str)> = replica
                .env
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let process = IdemdProcess::spawn(
                &listen,
                &[
                    "--database-url",
                    &url,
                    "--pool-size",
                    "4",
                    "--db-connect-timeout",
                    "1s",
                    "--db-query-timeout",
                    "1s",
                    "--shutdown-grace",
                    "3s",
                    "--reaper-interval",
                    "1s",
                ],
                &env,
            );
            *replica.process.lock().unwrap_or_else(|p| p.into_inner()) = Some(process);
        })
        .await
        .expect("start replica");
    }

    /// SIGKILL: in-flight RPCs die with the process.
    pub async fn kill_replica(self: &Arc<Self>, index: usize) {
        let process = self.replicas[index]
            .process
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(process) = process {
            tokio::task::spawn_blocking(move || process.kill())
                .await
                .expect("kill replica");
        }
    }

    /// SIGTERM and wait for the drain to finish; returns the exit code.
    pub async fn terminate_replica(self: &Arc<Self>, index: usize) -> Option<i32> {
        let process = self.replicas[index]
            .process
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let mut process = process?;
        tokio::task::spawn_blocking(move || {
            process.terminate();
            process.wait_exit(Duration::from_secs(30))
        })
        .await
        .expect("terminate replica")
    }

    /// First log lines of replica `index`.
    pub fn replica_logs(&self, index: usize) -> Vec<String> {
        self.replicas[index]
            .process
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(IdemdProcess::logs)
            .unwrap_or_default()
    }

    /// A lazily connecting channel to replica `index`, which reconnects after restarts.
    pub fn channel(&self, index: usize) -> Channel {
        Endpoint::from_shared(format!("http://{}", self.replicas[index].listen))
            .expect("endpoint")
            .connect_timeout(Duration::from_millis(500))
            .connect_lazy()
    }

    /// A client per replica, in replica order.
    pub fn clients(&self) -> Vec<IdempotencyServiceClient<Channel>> {
        (0..self.replicas.len())
            .map(|index| IdempotencyServiceClient::new(self.channel(index)))
            .collect()
    }

    pub fn set_network(&self, fault: Fault) {
        for proxy in &self.proxies {
            proxy.set(fault);
        }
    }

    /// Runs blocking work (pg_ctl and friends) off the async workers.
    pub async fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        work: impl FnOnce(&Rig) -> T + Send + 'static,
    ) -> T {
        let rig = self.clone();
        tokio::task::spawn_blocking(move || work(&rig))
            .await
            .expect("blocking work")
    }

    /// Notes that a fault begins now.
    pub fn inject(&self, what: impl Into<String>) -> usize {
        let mut faults = self.faults.lock().unwrap_or_else(|p| p.into_inner());
        faults.push(FaultRecord {
            what: what.into(),
            injected: Instant::now(),
            healed: None,
            recovery: None,
        });
        faults.len() - 1
    }

    /// Notes that fault `id` is healed now, and waits until every replica has served a probe
    /// sent after this moment; records the slowest replica's recovery time.
    pub async fn heal(&self, id: usize) -> Duration {
        let healed = Instant::now();
        self.faults.lock().unwrap_or_else(|p| p.into_inner())[id].healed = Some(healed);
        let recovery = self.await_serving(healed).await;
        self.faults.lock().unwrap_or_else(|p| p.into_inner())[id].recovery = Some(recovery);
        recovery
    }

    /// Waits until every replica has answered a probe sent at or after `since`.
    pub async fn await_serving(&self, since: Instant) -> Duration {
        loop {
            let served: Vec<Option<Instant>> = self
                .probes
                .iter()
                .map(|probe| *probe.lock().unwrap_or_else(|p| p.into_inner()))
                .collect();
            if let Some(recovery) = served_since(&served, since) {
                return recovery;
            }
            assert!(
                since.elapsed() < RECOVERY_LIMIT,
                "a replica did not serve again within {RECOVERY_LIMIT:?} after a fault healed: \
                 last probe answers {served:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A direct connection to the cluster, around the proxies.
    pub async fn admin(&self) -> tokio_postgres::Client {
        let (client, connection) =
            tokio_postgres::connect(&self.primary_admin_url(), tokio_postgres::NoTls)
                .await
                .expect("connect to cluster");
        tokio::spawn(connection);
        client
    }

    pub fn fault_records(&self) -> Vec<FaultRecord> {
        self.faults
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Both data nodes of a formation, as the replicas reach them.
fn formation_url(formation: &Formation) -> String {
    let [first, second] = formation.node_ports();
    format!(
        "postgres://postgres@127.0.0.1:{first},127.0.0.1:{second}/postgres\
         ?target_session_attrs=read-write"
    )
}

/// Given when each replica last answered a probe (`None`: never), whether all of them have
/// answered one sent at or after `since`, and if so how long the slowest took.
pub fn served_since(served: &[Option<Instant>], since: Instant) -> Option<Duration> {
    served
        .iter()
        .map(|at| {
            at.filter(|at| *at >= since)
                .map(|at| at.duration_since(since))
        })
        .try_fold(Duration::ZERO, |slowest, at| Some(slowest.max(at?)))
}

/// `pg_terminate_backend` on every idemd connection; returns how many were terminated.
pub async fn terminate_backends(admin: &tokio_postgres::Client) -> i64 {
    admin
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE application_name = 'idemd' AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .expect("terminate backends")
        .get(0)
}

impl Drop for Rig {
    fn drop(&mut self) {
        for replica in &self.replicas {
            replica
                .process
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
        }
    }
}
