//! The agent connection registry in Redis, shared by every kas replica.
//!
//! Layout (prefix `kas` by default):
//! - `kas:agent:<agent id>`: a hash with one field per connection,
//!   `<kas id>/<connection key>` -> `"<expiry unix ms> <json Connection>"`. The hash
//!   itself also expires, so an agent nobody refreshes disappears entirely.
//! - channel `kas:agent-events`: `c:<agent id>` when a connection is registered (a
//!   request waiting for that agent wakes at once), `d:<agent id>` when one ends, `*`
//!   when the registry was rebuilt after Redis lost it.
//!
//! Lookups are cached per agent for a third of the expiry; every event about the agent
//! (or a `*`, or a lost subscription) drops the cached entry, so the request path
//! usually makes no Redis round trip at all.
//!
//! Each kas refreshes its own fields every third of the expiry (rewriting them whole,
//! so after Redis lost its data the registry is complete again after one refresh),
//! deletes them when a connection ends and on graceful shutdown, and sweeps expired
//! fields of dead replicas. Readers ignore expired fields, so a dead kas is never
//! chosen after its entries expire even before the sweep. Writes that touch several
//! keys or publish run as Lua scripts (atomic). Redis being down degrades routing to
//! local connections; nothing on the request path polls.

use kas_api::clock::unix_millis;
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, watch};

/// One agent connection as recorded in Redis.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connection {
    pub agent_id: u64,
    /// The connection key on its kas (the registry's replica key).
    pub connection: String,
    /// The kas instance holding it.
    pub kas_id: String,
    /// That kas's private API URL.
    pub kas_url: String,
    pub replica_id: String,
    pub agent_version: String,
    /// Unix seconds.
    pub since: u64,
    /// Where the replica runs (absent in entries of older kas).
    #[serde(default, flatten)]
    pub meta: kas_api::admin::ReplicaMeta,
}

/// Registry settings.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    pub url: String,
    pub key_prefix: String,
    /// How long an entry lives without a refresh.
    pub expiry: Duration,
}

/// Errors reaching Redis.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error("redis.url is invalid: {0}")]
    Url(#[source] redis::RedisError),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

const REGISTER: &str = r#"
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
"#;

const UNREGISTER: &str = r#"
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
"#;

/// Rewrites connections (KEYS[i] is the agent key of the i-th; ARGV: expiry ms, channel,
/// then field, value, agent id per connection). A field that was missing (Redis lost
/// its data, or this kas's entry expired) is announced like a new connection, so
/// every kas drops a cached "not connected" answer at once.
const REFRESH: &str = r#"
local ttl = ARGV[1]
local channel = ARGV[2]
local announced = {}
for i = 1, #KEYS do
  local base = 3 + (i - 1) * 3
  local created = redis.call('HSET', KEYS[i], ARGV[base], ARGV[base + 1])
  redis.call('PEXPIRE', KEYS[i], ttl)
  local agent = ARGV[base + 2]
  if created == 1 and not announced[agent] then
    announced[agent] = true
    redis.call('PUBLISH', channel, 'c:' .. agent)
  end
end
return #KEYS
"#;

const SWEEP: &str = r#"
local h = redis.call('HGETALL', KEYS[1])
local removed = 0
for i = 1, #h, 2 do
  local exp = tonumber(string.match(h[i + 1], '^(%d+) '))
  if exp == nil or exp < tonumber(ARGV[1]) then
    redis.call('HDEL', KEYS[1], h[i])
    removed = removed + 1
  end
end
return removed
"#;

/// agent id -> (when read, live connections).
type Cache = HashMap<u64, (std::time::Instant, Arc<Vec<Connection>>)>;

/// A registry change announced on the event channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Connected(u64),
    Disconnected(u64),
    /// Anything may have changed (registry rebuilt, or events were missed).
    Any,
}

impl Event {
    fn parse(s: &str) -> Option<Event> {
        if s == "*" {
            return Some(Event::Any);
        }
        let (kind, id) = s.split_once(':')?;
        let id = id.parse().ok()?;
        match kind {
            "c" => Some(Event::Connected(id)),
            "d" => Some(Event::Disconnected(id)),
            _ => None,
        }
    }
}

enum Command {
    Register(Connection),
    Unregister { agent_id: u64, connection: String },
}

/// Handle on the registry. Writes go through a background task (so the agent path
/// never waits on Redis); reads are made by the caller.
pub struct RedisRegistry {
    opts: RedisOptions,
    kas_id: String,
    conn: ConnectionManager,
    commands: mpsc::UnboundedSender<Command>,
    events: broadcast::Sender<Event>,
    /// agent id -> (when read, live connections): see the module docs.
    cache: Mutex<Cache>,
    /// Scripts, hashed once (EVALSHA, loaded on first use).
    register_script: Script,
    unregister_script: Script,
    refresh_script: Script,
    sweep_script: Script,
    stop: watch::Sender<bool>,
    /// Connections this kas registered (what a refresh rewrites).
    own: Arc<Mutex<HashMap<(u64, String), Connection>>>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Failed operations since start (for metrics).
    errors: std::sync::atomic::AtomicU64,
}

impl RedisRegistry {
    /// Connects (failing fast on a bad URL, but not on Redis being down: the manager
    /// reconnects) and starts the writer, refresher, sweeper and event listener.
    pub async fn start(opts: RedisOptions, kas_id: &str) -> Result<Arc<Self>, RedisError> {
        let client = redis::Client::open(opts.url.as_str()).map_err(RedisError::Url)?;
        let cfg = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Duration::from_secs(2))
            .set_response_timeout(Duration::from_secs(2))
            .set_number_of_retries(1)
            .set_max_delay(1000);
        let conn = ConnectionManager::new_with_config(client.clone(), cfg).await?;
        let (commands, rx) = mpsc::unbounded_channel();
        let (events, _) = broadcast::channel(1024);
        let (stop, _) = watch::channel(false);
        let reg = Arc::new(RedisRegistry {
            opts,
            kas_id: kas_id.to_string(),
            conn,
            commands,
            events,
            cache: Mutex::default(),
            register_script: Script::new(REGISTER),
            unregister_script: Script::new(UNREGISTER),
            refresh_script: Script::new(REFRESH),
            sweep_script: Script::new(SWEEP),
            stop,
            own: Arc::default(),
            tasks: Mutex::new(Vec::new()),
            errors: Default::default(),
        });
        let tasks = vec![
            tokio::spawn(writer(reg.clone(), rx)),
            tokio::spawn(refresher(reg.clone())),
            tokio::spawn(sweeper(reg.clone())),
            tokio::spawn(listener(reg.clone(), client)),
        ];
        *reg.tasks.lock().unwrap_or_else(|p| p.into_inner()) = tasks;
        Ok(reg)
    }

    /// Records a failed operation (the metrics count them).
    pub fn count_error(&self) {
        self.errors
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Failed operations since start.
    pub fn errors(&self) -> u64 {
        self.errors.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn agent_key(&self, agent_id: u64) -> String {
        format!("{}:agent:{agent_id}", self.opts.key_prefix)
    }

    fn channel(&self) -> String {
        format!("{}:agent-events", self.opts.key_prefix)
    }

    fn field(&self, connection: &str) -> String {
        format!("{}/{connection}", self.kas_id)
    }

    fn value(&self, c: &Connection) -> String {
        let exp = unix_millis() + self.opts.expiry.as_millis() as u64;
        format!("{exp} {}", serde_json::to_string(c).unwrap_or_default())
    }

    /// Records a connection held by this kas (and announces it).
    pub fn register(&self, c: Connection) {
        self.own
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((c.agent_id, c.connection.clone()), c.clone());
        let _ = self.commands.send(Command::Register(c));
    }

    /// Updates what is known of a connection held by this kas (written with the next
    /// refresh).
    pub fn update(&self, c: Connection) {
        if let Some(own) = self
            .own
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&(c.agent_id, c.connection.clone()))
        {
            *own = c;
        }
    }

    /// Forgets a connection held by this kas.
    pub fn unregister(&self, agent_id: u64, connection: &str) {
        self.own
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(agent_id, connection.to_string()));
        let _ = self.commands.send(Command::Unregister {
            agent_id,
            connection: connection.to_string(),
        });
    }

    /// Registry events from every kas.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Live connections of an agent on every kas (expired entries left out), from
    /// the cache when fresh.
    pub async fn connections(&self, agent_id: u64) -> Result<Arc<Vec<Connection>>, RedisError> {
        let ttl = self.opts.expiry / 3;
        if let Some((at, c)) = self.lock_cache().get(&agent_id) {
            if at.elapsed() < ttl {
                return Ok(c.clone());
            }
        }
        let read_at = std::time::Instant::now();
        let mut conn = self.conn.clone();
        let all: HashMap<String, String> = conn.hgetall(self.agent_key(agent_id)).await?;
        let live = Arc::new(live(all.into_values()));
        self.lock_cache().insert(agent_id, (read_at, live.clone()));
        Ok(live)
    }

    /// Drops the cached connections of an agent (one of them failed).
    pub fn forget(&self, agent_id: u64) {
        self.lock_cache().remove(&agent_id);
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies an event to the cache and passes it on.
    fn deliver(&self, e: Event) {
        match e {
            Event::Connected(id) | Event::Disconnected(id) => {
                self.lock_cache().remove(&id);
            }
            Event::Any => self.lock_cache().clear(),
        }
        let _ = self.events.send(e);
    }

    /// Every live connection of every agent (for listings; scans the keyspace).
    pub async fn all_connections(&self) -> Result<Vec<Connection>, RedisError> {
        let mut out = Vec::new();
        for key in self.agent_keys().await? {
            let mut conn = self.conn.clone();
            let all: HashMap<String, String> = conn.hgetall(&key).await?;
            out.extend(live(all.into_values()));
        }
        out.sort_by(|a, b| {
            (a.agent_id, &a.kas_id, &a.connection).cmp(&(b.agent_id, &b.kas_id, &b.connection))
        });
        Ok(out)
    }

    async fn agent_keys(&self) -> Result<Vec<String>, RedisError> {
        let mut conn = self.conn.clone();
        let pattern = format!("{}:agent:*", self.opts.key_prefix);
        let mut keys = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await?;
            keys.extend(batch);
            if next == 0 {
                return Ok(keys);
            }
            cursor = next;
        }
    }

    /// Adds one to the counter `<prefix>:<key>` (which expires after `ttl_secs`) and
    /// returns its new value.
    pub async fn count_in_window(&self, key: &str, ttl_secs: i64) -> Result<u64, RedisError> {
        let key = format!("{}:{key}", self.opts.key_prefix);
        let mut conn = self.conn.clone();
        let (n,): (u64,) = redis::pipe()
            .atomic()
            .incr(&key, 1)
            .expire(&key, ttl_secs)
            .ignore()
            .query_async(&mut conn)
            .await?;
        Ok(n)
    }

    /// Whether Redis answers (for readiness).
    pub async fn ping(&self) -> bool {
        let mut conn = self.conn.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .is_ok()
    }

    /// Rewrites every connection this kas holds (what the periodic refresh does),
    /// announcing the ones Redis had lost.
    pub async fn refresh(&self) -> Result<usize, RedisError> {
        let own: Vec<Connection> = self
            .own
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        let ttl = self.opts.expiry.as_millis() as u64;
        for chunk in own.chunks(1000) {
            let mut inv = self.refresh_script.prepare_invoke();
            inv.arg(ttl).arg(self.channel());
            for c in chunk {
                inv.key(self.agent_key(c.agent_id))
                    .arg(self.field(&c.connection))
                    .arg(self.value(c))
                    .arg(c.agent_id);
            }
            let mut conn = self.conn.clone();
            inv.invoke_async::<i64>(&mut conn).await?;
        }
        Ok(own.len())
    }

    /// Removes expired fields (of kas replicas that died) everywhere.
    pub async fn sweep(&self) -> Result<u64, RedisError> {
        let mut removed = 0;
        for key in self.agent_keys().await? {
            let mut conn = self.conn.clone();
            let n: u64 = self
                .sweep_script
                .key(&key)
                .arg(unix_millis())
                .invoke_async(&mut conn)
                .await?;
            removed += n;
        }
        Ok(removed)
    }

    /// Stops the background tasks and deletes this kas's entries.
    pub async fn shutdown(&self) {
        let _ = self.stop.send(true);
        for t in self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            t.abort();
        }
        let own: Vec<(u64, String)> = self
            .own
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .map(|(k, _)| k)
            .collect();
        if own.is_empty() {
            return;
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        for (agent_id, connection) in &own {
            pipe.hdel(self.agent_key(*agent_id), self.field(connection))
                .ignore();
        }
        let mut conn = self.conn.clone();
        if let Err(e) = pipe.query_async::<()>(&mut conn).await {
            tracing::warn!(error = %e, "could not remove this kas's entries from Redis; they expire by themselves");
        }
    }

    async fn apply(&self, cmd: &Command) -> Result<(), RedisError> {
        let mut conn = self.conn.clone();
        match cmd {
            Command::Register(c) => {
                self.register_script
                    .key(self.agent_key(c.agent_id))
                    .arg(self.field(&c.connection))
                    .arg(self.value(c))
                    .arg(self.opts.expiry.as_millis() as u64)
                    .arg(self.channel())
                    .arg(format!("c:{}", c.agent_id))
                    .invoke_async::<i64>(&mut conn)
                    .await?;
            }
            Command::Unregister {
                agent_id,
                connection,
            } => {
                self.unregister_script
                    .key(self.agent_key(*agent_id))
                    .arg(self.field(connection))
                    .arg(self.channel())
                    .arg(format!("d:{agent_id}"))
                    .invoke_async::<i64>(&mut conn)
                    .await?;
            }
        }
        Ok(())
    }
}

fn live(values: impl Iterator<Item = String>) -> Vec<Connection> {
    let now = unix_millis();
    values
        .filter_map(|v| {
            let (exp, json) = v.split_once(' ')?;
            (exp.parse::<u64>().ok()? > now).then_some(())?;
            serde_json::from_str(json).ok()
        })
        .collect()
}

/// Applies register/unregister commands in order. A failed write is not retried
/// here: the next refresh rewrites everything this kas holds.
async fn writer(reg: Arc<RedisRegistry>, mut rx: mpsc::UnboundedReceiver<Command>) {
    while let Some(cmd) = rx.recv().await {
        if let Err(e) = reg.apply(&cmd).await {
            reg.count_error();
            tracing::warn!(error = %e, "redis registry write failed; the next refresh repairs it");
        }
    }
}

async fn refresher(reg: Arc<RedisRegistry>) {
    let mut tick = tokio::time::interval(reg.opts.expiry / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut failing = false;
    loop {
        tick.tick().await;
        match reg.refresh().await {
            Ok(_) if failing => {
                failing = false;
                tracing::info!("redis registry restored");
                let mut conn = reg.conn.clone();
                let _ = conn.publish::<_, _, i64>(reg.channel(), "*").await;
            }
            Ok(_) => {}
            Err(e) => {
                reg.count_error();
                failing = true;
                tracing::warn!(error = %e, "redis registry refresh failed");
            }
        }
    }
}

async fn sweeper(reg: Arc<RedisRegistry>) {
    // Jittered so replicas do not all sweep at once.
    let period = reg.opts.expiry / 4;
    loop {
        let jitter = rand::random::<f64>() * 0.5 + 0.75;
        tokio::time::sleep(period.mul_f64(jitter)).await;
        match reg.sweep().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(removed = n, "swept expired agent connections from Redis"),
            Err(e) => tracing::debug!(error = %e, "redis sweep failed"),
        }
    }
}

/// Forwards connect events from Redis pub/sub; reconnects with backoff when Redis
/// goes away.
async fn listener(reg: Arc<RedisRegistry>, client: redis::Client) {
    use futures::StreamExt;
    let mut delay = Duration::from_millis(100);
    loop {
        match client.get_async_pubsub().await {
            Ok(mut ps) => match ps.subscribe(reg.channel()).await {
                Ok(()) => {
                    delay = Duration::from_millis(100);
                    // Events may have been missed while unsubscribed.
                    reg.deliver(Event::Any);
                    let mut stream = ps.on_message();
                    while let Some(msg) = stream.next().await {
                        let Ok(payload) = msg.get_payload::<String>() else {
                            continue;
                        };
                        if let Some(e) = Event::parse(&payload) {
                            reg.deliver(e);
                        }
                    }
                    tracing::warn!("redis event subscription ended; reconnecting");
                    // Until resubscribed nothing invalidates the cache.
                    reg.lock_cache().clear();
                }
                Err(e) => {
                    reg.count_error();
                    tracing::warn!(error = %e, "redis subscribe failed")
                }
            },
            Err(e) => tracing::debug!(error = %e, "redis pub/sub connect failed"),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}
