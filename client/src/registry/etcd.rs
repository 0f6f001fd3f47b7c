//! [`EtcdKv`]: the [`KvStore`] over a real etcd (v3 API, tested against 3.4).
//!
//! Every conditional write is one etcd `Txn` comparing the key's
//! `mod_revision` (`Expect::Absent` compares `create_revision == 0`), with a
//! `get` of the key on the failure branch so a [`RegistryError::Conflict`]
//! reports the revision that won. Every call is bounded by
//! [`EtcdOptions::op_timeout`]; transport failures map to
//! [`RegistryError::Unavailable`] naming the endpoints. The underlying
//! `etcd_client::Client` reconnects by itself, so an `EtcdKv` keeps working
//! across an etcd restart (calls made while it is down fail, later ones succeed).

use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, CompactionOptions, Compare, CompareOp, ConnectOptions, EventType, GetOptions,
    PutOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use futures::StreamExt;

use super::kv::{
    Expect, Guard, KvEntry, KvStore, LeaseId, RegistryError, Revision, WatchBatch, WatchEvent,
    WatchStream,
};

/// Connection settings of [`EtcdKv`].
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// How long [`EtcdKv::connect`] waits for etcd to answer before failing
    /// with [`RegistryError::Unavailable`]; also the TCP connect timeout.
    pub connect_timeout: Duration,
    /// Bound on every single operation.
    pub op_timeout: Duration,
    /// HTTP/2 keep-alive interval, to notice a dead connection (and end its watches) promptly.
    pub keep_alive_interval: Duration,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        EtcdOptions {
            connect_timeout: Duration::from_secs(3),
            op_timeout: Duration::from_secs(5),
            keep_alive_interval: Duration::from_secs(2),
        }
    }
}

/// A [`KvStore`] backed by etcd; cheap to clone (clones share the connection).
#[derive(Clone)]
pub struct EtcdKv {
    client: Client,
    endpoints: Vec<String>,
    opts: EtcdOptions,
}

impl std::fmt::Debug for EtcdKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdKv")
            .field("endpoints", &self.endpoints)
            .finish()
    }
}

impl EtcdKv {
    /// Connects to etcd at `endpoints` (e.g. `http://127.0.0.1:2379`) and checks
    /// that it answers within [`EtcdOptions::connect_timeout`]; otherwise
    /// [`RegistryError::Unavailable`] naming the endpoints.
    pub async fn connect<S: AsRef<str>>(
        endpoints: &[S],
        opts: EtcdOptions,
    ) -> Result<EtcdKv, RegistryError> {
        let kv = Self::connect_lazy(endpoints, opts).await?;
        let timeout = kv.opts.connect_timeout;
        match tokio::time::timeout(timeout, kv.probe()).await {
            Ok(Ok(_)) => Ok(kv),
            Ok(Err(e)) => Err(kv.unavailable(e.to_string())),
            Err(_) => Err(kv.unavailable(format!("no answer within {timeout:?}"))),
        }
    }

    /// Builds the client without contacting etcd: the first operation does.
    /// Use when the caller tolerates etcd being down at start.
    pub async fn connect_lazy<S: AsRef<str>>(
        endpoints: &[S],
        opts: EtcdOptions,
    ) -> Result<EtcdKv, RegistryError> {
        let endpoints: Vec<String> = endpoints.iter().map(|e| e.as_ref().to_string()).collect();
        if endpoints.is_empty() {
            return Err(RegistryError::Other("no etcd endpoint given".into()));
        }
        let options = ConnectOptions::new()
            .with_connect_timeout(opts.connect_timeout)
            .with_timeout(opts.op_timeout)
            .with_keep_alive(opts.keep_alive_interval, opts.keep_alive_interval)
            .with_keep_alive_while_idle(true);
        let client = Client::connect(&endpoints, Some(options))
            .await
            .map_err(|e| RegistryError::Unavailable {
                endpoints: endpoints.clone(),
                message: e.to_string(),
            })?;
        Ok(EtcdKv {
            client,
            endpoints,
            opts,
        })
    }

    /// The underlying etcd client (e.g. for maintenance calls in tests).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    async fn probe(&self) -> Result<Revision, RegistryError> {
        let mut c = self.client.clone();
        let resp = c
            .get("/flotilla-probe", Some(GetOptions::new().with_count_only()))
            .await
            .map_err(|e| self.map_err(e))?;
        Ok(header_revision(resp.header()))
    }

    fn unavailable(&self, message: String) -> RegistryError {
        RegistryError::Unavailable {
            endpoints: self.endpoints.clone(),
            message,
        }
    }

    /// Maps an etcd-client error to the registry's.
    fn map_err(&self, e: etcd_client::Error) -> RegistryError {
        use etcd_client::Error as E;
        if e.to_string().contains("lease not found") {
            // The caller knows which lease; see `with_lease`.
            return RegistryError::LeaseExpired { lease: 0 };
        }
        match e {
            E::GRpcStatus(status) => {
                let msg = status.message();
                // tonic::Code: Cancelled = 1, Unknown = 2, DeadlineExceeded = 4, Unavailable = 14.
                let code = status.code() as i32;
                let text = format!("{:?}: {msg}", status.code());
                if msg.contains("has been compacted") {
                    RegistryError::Compacted {
                        compact_revision: 0,
                        requested: 0,
                    }
                } else if code == 14
                    || code == 1
                    || code == 4
                    || (code == 2 && (msg.contains("transport") || msg.contains("connect")))
                {
                    self.unavailable(text)
                } else {
                    RegistryError::Other(format!("etcd: {text}"))
                }
            }
            E::TransportError(t) => self.unavailable(format!("transport error: {t}")),
            E::IoError(io) => self.unavailable(format!("io error: {io}")),
            other => RegistryError::Other(format!("etcd: {other}")),
        }
    }

    /// Runs `fut` under the operation timeout.
    async fn timed<T>(
        &self,
        op: &str,
        fut: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, RegistryError> {
        match tokio::time::timeout(self.opts.op_timeout, fut).await {
            Ok(r) => r.map_err(|e| self.map_err(e)),
            Err(_) => Err(RegistryError::Timeout {
                op: op.to_string(),
                after: self.opts.op_timeout,
            }),
        }
    }
}

fn header_revision(h: Option<&etcd_client::ResponseHeader>) -> Revision {
    h.map_or(0, |h| h.revision())
}

fn to_entry(kv: &etcd_client::KeyValue) -> KvEntry {
    KvEntry {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        value: kv.value().to_vec(),
        mod_revision: kv.mod_revision(),
        create_revision: kv.create_revision(),
        lease: (kv.lease() != 0).then_some(kv.lease()),
    }
}

fn compare(key: &str, expect: Expect) -> Vec<Compare> {
    match expect {
        Expect::Absent => vec![Compare::create_revision(key, CompareOp::Equal, 0)],
        Expect::ModRevision(r) => vec![Compare::mod_revision(key, CompareOp::Equal, r)],
        Expect::Any => vec![],
    }
}

impl EtcdKv {
    /// One txn: `ops` if `key` matches `expect` and `guard` holds; otherwise
    /// gets both keys to tell [`RegistryError::GuardFailed`] (checked first)
    /// from [`RegistryError::Conflict`].
    async fn guarded_txn(
        &self,
        op: &str,
        key: &str,
        expect: Expect,
        guard: &Guard,
        ops: Vec<TxnOp>,
    ) -> Result<etcd_client::TxnResponse, RegistryError> {
        let mut when = compare(key, expect);
        when.extend(compare(&guard.key, guard.expect));
        let txn = Txn::new()
            .when(when)
            .and_then(ops)
            .or_else(vec![TxnOp::get(key, None), TxnOp::get(&*guard.key, None)]);
        let mut c = self.client.clone();
        let resp = self.timed(op, c.txn(txn)).await?;
        if resp.succeeded() {
            return Ok(resp);
        }
        let revisions: Vec<Option<Revision>> = resp
            .op_responses()
            .into_iter()
            .map(|op| match op {
                TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.mod_revision()),
                _ => None,
            })
            .collect();
        let (actual, guard_actual) = (
            revisions.first().copied().flatten(),
            revisions.get(1).copied().flatten(),
        );
        if !guard.expect.matches(guard_actual) {
            return Err(RegistryError::GuardFailed {
                key: guard.key.clone(),
                expected: guard.expect,
                actual: guard_actual,
            });
        }
        Err(RegistryError::Conflict {
            key: key.to_string(),
            expected: expect,
            actual,
        })
    }
}

/// The current mod_revision of the key, from the `get` on a txn's failure branch.
fn failed_get_revision(resp: &etcd_client::TxnResponse) -> Option<Revision> {
    resp.op_responses().into_iter().find_map(|op| match op {
        TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.mod_revision()),
        _ => None,
    })
}

#[async_trait]
impl KvStore for EtcdKv {
    async fn get(&self, key: &str) -> Result<Option<KvEntry>, RegistryError> {
        let mut c = self.client.clone();
        let resp = self.timed("get", c.get(key, None)).await?;
        Ok(resp.kvs().first().map(to_entry))
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KvEntry>, Revision), RegistryError> {
        let mut c = self.client.clone();
        let resp = self
            .timed("list", c.get(prefix, Some(GetOptions::new().with_prefix())))
            .await?;
        let mut entries: Vec<KvEntry> = resp.kvs().iter().map(to_entry).collect();
        entries.sort_by(|a, b| a.key.cmp(&b.key));
        Ok((entries, header_revision(resp.header())))
    }

    async fn put_if(
        &self,
        key: &str,
        value: Vec<u8>,
        expect: Expect,
        lease: Option<LeaseId>,
    ) -> Result<Revision, RegistryError> {
        let opts = PutOptions::new().with_lease(lease.unwrap_or(0));
        let txn = Txn::new()
            .when(compare(key, expect))
            .and_then(vec![TxnOp::put(key, value, Some(opts))])
            .or_else(vec![TxnOp::get(key, None)]);
        let mut c = self.client.clone();
        let resp = match self.timed("put", c.txn(txn)).await {
            Err(RegistryError::LeaseExpired { .. }) => {
                return Err(RegistryError::LeaseExpired {
                    lease: lease.unwrap_or(0),
                })
            }
            r => r?,
        };
        if resp.succeeded() {
            Ok(header_revision(resp.header()))
        } else {
            Err(RegistryError::Conflict {
                key: key.to_string(),
                expected: expect,
                actual: failed_get_revision(&resp),
            })
        }
    }

    async fn delete_if(&self, key: &str, expect: Expect) -> Result<Revision, RegistryError> {
        let mut c = self.client.clone();
        let then = match expect {
            Expect::Absent => vec![],
            _ => vec![TxnOp::delete(key, None)],
        };
        let txn = Txn::new()
            .when(compare(key, expect))
            .and_then(then)
            .or_else(vec![TxnOp::get(key, None)]);
        let resp = self.timed("delete", c.txn(txn)).await?;
        if resp.succeeded() {
            Ok(header_revision(resp.header()))
        } else {
            Err(RegistryError::Conflict {
                key: key.to_string(),
                expected: expect,
                actual: failed_get_revision(&resp),
            })
        }
    }

    async fn put_if_guarded(
        &self,
        key: &str,
        value: Vec<u8>,
        expect: Expect,
        lease: Option<LeaseId>,
        guard: &Guard,
    ) -> Result<Revision, RegistryError> {
        let opts = PutOptions::new().with_lease(lease.unwrap_or(0));
        let ops = vec![TxnOp::put(key, value, Some(opts))];
        let resp = match self.guarded_txn("put", key, expect, guard, ops).await {
            Err(RegistryError::LeaseExpired { .. }) => {
                return Err(RegistryError::LeaseExpired {
                    lease: lease.unwrap_or(0),
                })
            }
            r => r?,
        };
        Ok(header_revision(resp.header()))
    }

    async fn delete_if_guarded(
        &self,
        key: &str,
        expect: Expect,
        guard: &Guard,
    ) -> Result<Revision, RegistryError> {
        let ops = match expect {
            Expect::Absent => vec![],
            _ => vec![TxnOp::delete(key, None)],
        };
        let resp = self.guarded_txn("delete", key, expect, guard, ops).await?;
        Ok(header_revision(resp.header()))
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, RegistryError> {
        let secs = ttl.as_secs_f64().ceil().max(1.0) as i64;
        let mut c = self.client.clone();
        let resp = self.timed("lease grant", c.lease_grant(secs, None)).await?;
        if !resp.error().is_empty() {
            return Err(RegistryError::Other(format!(
                "etcd lease grant: {}",
                resp.error()
            )));
        }
        Ok(resp.id())
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, RegistryError> {
        let mut c = self.client.clone();
        let fut = async move {
            // Opening the keep-alive stream renews once and fails when the lease is gone;
            // a second renewal on the stream reports the TTL.
            let (mut keeper, mut stream) = c.lease_keep_alive(lease).await?;
            keeper.keep_alive().await?;
            let ttl = stream.message().await?.map_or(0, |r| r.ttl());
            Ok::<_, etcd_client::Error>(ttl)
        };
        match self.timed("lease keep-alive", fut).await {
            Ok(ttl) if ttl > 0 => Ok(Duration::from_secs(ttl as u64)),
            Ok(_) => Err(RegistryError::LeaseExpired { lease }),
            Err(RegistryError::LeaseExpired { .. }) => Err(RegistryError::LeaseExpired { lease }),
            Err(e) => Err(e),
        }
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), RegistryError> {
        let mut c = self.client.clone();
        match self.timed("lease revoke", c.lease_revoke(lease)).await {
            Ok(_) => Ok(()),
            Err(RegistryError::LeaseExpired { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn watch(
        &self,
        prefix: &str,
        from_revision: Revision,
    ) -> Result<WatchStream, RegistryError> {
        let mut opts = WatchOptions::new().with_prefix();
        if from_revision > 0 {
            opts = opts.with_start_revision(from_revision);
        }
        let mut c = self.client.clone();
        let stream = self.timed("watch", c.watch(prefix, Some(opts))).await?;
        let this = self.clone();
        let requested = from_revision;
        // State: the etcd stream (None once it has ended or failed).
        let out = futures::stream::unfold(Some(stream), move |state| {
            let this = this.clone();
            async move {
                let mut stream = state?;
                loop {
                    let resp = match stream.message().await {
                        Ok(Some(resp)) => resp,
                        Ok(None) => return None,
                        Err(e) => return Some((Err(this.map_err(e)), None)),
                    };
                    if resp.compact_revision() > 0 {
                        let err = RegistryError::Compacted {
                            compact_revision: resp.compact_revision(),
                            requested,
                        };
                        return Some((Err(err), None));
                    }
                    if resp.canceled() {
                        let err = RegistryError::Other(format!(
                            "etcd canceled the watch: {}",
                            resp.cancel_reason()
                        ));
                        return Some((Err(err), None));
                    }
                    if resp.events().is_empty() {
                        // `created` and progress responses: their header revision may run
                        // ahead of events still to come, so they are not reported.
                        continue;
                    }
                    let events: Vec<WatchEvent> = resp
                        .events()
                        .iter()
                        .filter_map(|ev| {
                            let kv = ev.kv()?;
                            let key = String::from_utf8_lossy(kv.key()).into_owned();
                            Some(match ev.event_type() {
                                EventType::Put => WatchEvent::Put {
                                    key,
                                    value: kv.value().to_vec(),
                                    mod_revision: kv.mod_revision(),
                                },
                                EventType::Delete => WatchEvent::Delete {
                                    key,
                                    mod_revision: kv.mod_revision(),
                                },
                            })
                        })
                        .collect();
                    let revision = events.iter().map(|e| e.mod_revision()).max().unwrap_or(0);
                    return Some((Ok(WatchBatch { events, revision }), Some(stream)));
                }
            }
        });
        Ok(out.boxed())
    }

    async fn compact(&self, revision: Revision) -> Result<(), RegistryError> {
        let mut c = self.client.clone();
        match self
            .timed(
                "compact",
                c.compact(revision, Some(CompactionOptions::new().with_physical())),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(RegistryError::Compacted { .. }) => Err(RegistryError::Compacted {
                compact_revision: 0,
                requested: revision,
            }),
            Err(e) => Err(e),
        }
    }

    async fn current_revision(&self) -> Result<Revision, RegistryError> {
        match tokio::time::timeout(self.opts.op_timeout, self.probe()).await {
            Ok(r) => r,
            Err(_) => Err(RegistryError::Timeout {
                op: "current revision".into(),
                after: self.opts.op_timeout,
            }),
        }
    }

    fn endpoints(&self) -> Vec<String> {
        self.endpoints.clone()
    }
}
