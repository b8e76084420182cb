//! A read cache in front of a control plane for the lookups on the request path
//! (agent token, agent, job token). Writes through this wrapper clear it before they
//! return, so a finished job's token stops working at once; changes made elsewhere
//! (another kas on a shared database) clear it when their notification arrives.

use crate::{
    Agent, AgentAuth, AgentInfo, AgentToken, AppOutcome, Change, ClusterApp, ControlPlane,
    EnvironmentRecord, Group, Job, JobStatus, Project, Result, Secret, StartAppOperation, StartJob,
};
use crate::{EksCluster, EksSpec, EksWork};
use async_trait::async_trait;
use kas_authz::JobContext;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::broadcast;

/// Entries kept per map before the map is cleared (a crude but bounded policy).
const MAX_ENTRIES: usize = 100_000;

#[derive(Default)]
struct Maps {
    agent_tokens: HashMap<[u8; 32], Arc<AgentAuth>>,
    agents: HashMap<u64, Arc<AgentInfo>>,
    jobs: HashMap<[u8; 32], Arc<JobContext>>,
}

/// Caching wrapper; see the module docs.
pub struct CachingControlPlane<C> {
    inner: C,
    maps: Arc<Mutex<Maps>>,
    generation: Arc<AtomicU64>,
    /// Changes, re-sent only after the cache dropped what they invalidate, so a
    /// subscriber that reacts by reading through this cache reads the new state.
    changes: broadcast::Sender<Change>,
    _invalidator: Option<tokio::task::JoinHandle<()>>,
}

impl<C> Drop for CachingControlPlane<C> {
    fn drop(&mut self) {
        if let Some(h) = &self._invalidator {
            h.abort();
        }
    }
}

fn clear(maps: &Mutex<Maps>, generation: &AtomicU64) {
    generation.fetch_add(1, Ordering::SeqCst);
    let mut m = maps.lock().unwrap_or_else(|p| p.into_inner());
    *m = Maps::default();
}

impl<C: ControlPlane> CachingControlPlane<C> {
    /// Wraps `inner`; must be called inside a tokio runtime (it listens for changes).
    pub fn new(inner: C) -> Self {
        let maps = Arc::new(Mutex::new(Maps::default()));
        let generation = Arc::new(AtomicU64::new(0));
        let mut rx = inner.subscribe();
        let (m, g) = (maps.clone(), generation.clone());
        let (changes, _) = broadcast::channel(1024);
        let out = changes.clone();
        let task = tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(c) => {
                        clear(&m, &g);
                        let _ = out.send(c);
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        clear(&m, &g);
                        let _ = out.send(Change::Resync);
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        CachingControlPlane {
            inner,
            maps,
            generation,
            changes,
            _invalidator: Some(task),
        }
    }

    fn invalidate(&self) {
        clear(&self.maps, &self.generation);
    }

    async fn cached<K, V, F, Fut>(
        &self,
        key: K,
        pick: fn(&mut Maps) -> &mut HashMap<K, Arc<V>>,
        load: F,
    ) -> Result<Option<Arc<V>>>
    where
        K: std::hash::Hash + Eq,
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Option<Arc<V>>>>,
    {
        {
            let mut m = self.maps.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(v) = pick(&mut m).get(&key) {
                return Ok(Some(v.clone()));
            }
        }
        let gen = self.generation.load(Ordering::SeqCst);
        let v = load().await?;
        if let Some(v) = &v {
            let mut m = self.maps.lock().unwrap_or_else(|p| p.into_inner());
            // Only cache what was read after the last invalidation.
            if self.generation.load(Ordering::SeqCst) == gen {
                let map = pick(&mut m);
                if map.len() >= MAX_ENTRIES {
                    map.clear();
                }
                map.insert(key, v.clone());
            }
        }
        Ok(v)
    }
}

#[async_trait]
impl<C: ControlPlane> ControlPlane for CachingControlPlane<C> {
    async fn create_group(&self, path: &str, id: Option<u64>) -> Result<Group> {
        self.inner.create_group(path, id).await
    }
    async fn list_groups(&self) -> Result<Vec<Group>> {
        self.inner.list_groups().await
    }
    async fn create_project(&self, path: &str, id: Option<u64>) -> Result<Project> {
        self.inner.create_project(path, id).await
    }
    async fn list_projects(&self) -> Result<Vec<Project>> {
        self.inner.list_projects().await
    }
    async fn create_agent(&self, project: &str, name: &str) -> Result<(Agent, Secret)> {
        self.inner.create_agent(project, name).await
    }
    async fn list_agents(&self) -> Result<Vec<Agent>> {
        self.inner.list_agents().await
    }
    async fn delete_agent(&self, agent_id: u64) -> Result<Agent> {
        let r = self.inner.delete_agent(agent_id).await;
        self.invalidate();
        r
    }
    async fn create_agent_token(
        &self,
        agent_id: u64,
        name: Option<&str>,
    ) -> Result<(AgentToken, Secret)> {
        self.inner.create_agent_token(agent_id, name).await
    }
    async fn list_agent_tokens(&self, agent_id: u64) -> Result<Vec<AgentToken>> {
        self.inner.list_agent_tokens(agent_id).await
    }
    async fn revoke_agent_token(&self, agent_id: u64, token: &str) -> Result<AgentToken> {
        let r = self.inner.revoke_agent_token(agent_id, token).await;
        self.invalidate();
        r
    }
    async fn touch_agent_token(&self, token_id: u64) -> Result<()> {
        self.inner.touch_agent_token(token_id).await
    }
    async fn get_agent(&self, project: &str, name: &str) -> Result<Agent> {
        self.inner.get_agent(project, name).await
    }
    async fn set_agent_config(
        &self,
        project: &str,
        name: &str,
        yaml: &str,
        limits: &kas_authz::CiAccessLimits,
    ) -> Result<(u64, Vec<kas_authz::ConfigWarning>)> {
        let r = self
            .inner
            .set_agent_config(project, name, yaml, limits)
            .await;
        self.invalidate();
        r
    }
    async fn create_environment(
        &self,
        project: &str,
        name: &str,
        tier: Option<&str>,
    ) -> Result<EnvironmentRecord> {
        self.inner.create_environment(project, name, tier).await
    }
    async fn list_environments(&self, project: Option<&str>) -> Result<Vec<EnvironmentRecord>> {
        self.inner.list_environments(project).await
    }
    async fn start_job(&self, req: &StartJob) -> Result<(Job, Secret)> {
        self.inner.start_job(req).await
    }
    async fn finish_job(&self, id: u64, status: JobStatus) -> Result<Job> {
        let r = self.inner.finish_job(id, status).await;
        self.invalidate();
        r
    }
    async fn list_jobs(&self) -> Result<Vec<Job>> {
        self.inner.list_jobs().await
    }
    async fn authenticate_agent(&self, token: &str) -> Result<Option<Arc<AgentAuth>>> {
        let key = crate::hash_token(token);
        self.cached(
            key,
            |m| &mut m.agent_tokens,
            || self.inner.authenticate_agent(token),
        )
        .await
    }
    async fn agent_info(&self, agent_id: u64) -> Result<Option<Arc<AgentInfo>>> {
        self.cached(
            agent_id,
            |m| &mut m.agents,
            || self.inner.agent_info(agent_id),
        )
        .await
    }
    async fn all_agent_infos(&self) -> Result<Vec<Arc<AgentInfo>>> {
        self.inner.all_agent_infos().await
    }
    async fn job_context(&self, project: &str, environment: Option<&str>) -> Result<JobContext> {
        self.inner.job_context(project, environment).await
    }

    async fn authenticate_job(&self, token: &str) -> Result<Option<Arc<JobContext>>> {
        let key = crate::hash_token(token);
        self.cached(key, |m| &mut m.jobs, || self.inner.authenticate_job(token))
            .await
    }
    async fn begin_app_operation(&self, op: &StartAppOperation) -> Result<ClusterApp> {
        self.inner.begin_app_operation(op).await
    }
    async fn finish_app_operation(
        &self,
        agent_id: u64,
        name: &str,
        outcome: &AppOutcome,
    ) -> Result<ClusterApp> {
        self.inner
            .finish_app_operation(agent_id, name, outcome)
            .await
    }
    async fn renew_app_lease(
        &self,
        agent_id: u64,
        name: &str,
        owner: &str,
        until: i64,
    ) -> Result<bool> {
        self.inner
            .renew_app_lease(agent_id, name, owner, until)
            .await
    }
    async fn claim_app_operations(&self, owner: &str, until: i64) -> Result<Vec<ClusterApp>> {
        self.inner.claim_app_operations(owner, until).await
    }
    async fn list_apps(&self, agent_id: Option<u64>) -> Result<Vec<ClusterApp>> {
        self.inner.list_apps(agent_id).await
    }

    async fn prepare_eks(&self, name: &str, project: &str) -> Result<EksCluster> {
        self.inner.prepare_eks(name, project).await
    }
    async fn request_eks(
        &self,
        name: &str,
        spec: &EksSpec,
        owner: &str,
        lease_until: i64,
    ) -> Result<EksWork> {
        self.inner.request_eks(name, spec, owner, lease_until).await
    }
    async fn delete_eks(&self, name: &str, owner: &str, lease_until: i64) -> Result<EksWork> {
        self.inner.delete_eks(name, owner, lease_until).await
    }
    async fn save_eks(&self, owner: &str, work: &EksWork, lease_until: i64) -> Result<bool> {
        self.inner.save_eks(owner, work, lease_until).await
    }
    async fn claim_eks(&self, owner: &str, until: i64) -> Result<Vec<EksWork>> {
        self.inner.claim_eks(owner, until).await
    }
    async fn get_eks(&self, name: &str) -> Result<EksCluster> {
        self.inner.get_eks(name).await
    }
    async fn list_eks(&self) -> Result<Vec<EksCluster>> {
        self.inner.list_eks().await
    }

    fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SqliteControlPlane;

    #[tokio::test]
    async fn finishing_a_job_invalidates_at_once() {
        let cp = CachingControlPlane::new(SqliteControlPlane::in_memory().expect("db"));
        cp.create_project("a/b", None).await.expect("p");
        let (job, token) = cp
            .start_job(&StartJob {
                project: "a/b".into(),
                username: "u".into(),
                ..Default::default()
            })
            .await
            .expect("job");
        assert!(cp
            .authenticate_job(token.expose())
            .await
            .expect("a")
            .is_some());
        assert!(cp
            .authenticate_job(token.expose())
            .await
            .expect("a")
            .is_some()); // cached
        cp.finish_job(job.id, JobStatus::Success)
            .await
            .expect("finish");
        assert!(cp
            .authenticate_job(token.expose())
            .await
            .expect("a")
            .is_none());
    }

    /// A change made elsewhere (another kas on the same database): whoever hears it
    /// from the cache and reads through the cache sees the new state.
    #[tokio::test]
    async fn subscribers_hear_changes_after_the_cache_dropped_them() {
        let db = SqliteControlPlane::in_memory().expect("db");
        let cp = CachingControlPlane::new(db.clone());
        cp.create_project("a/agents", None).await.expect("p");
        let (agent, _) = cp.create_agent("a/agents", "x").await.expect("agent");
        let v0 = cp.agent_info(agent.id).await.expect("info").expect("found");
        assert_eq!(v0.config_version, 0);
        let mut changes = cp.subscribe();
        for round in 1..=20u64 {
            db.set_agent_config("a/agents", "x", "ci_access: {}\n", &Default::default())
                .await
                .expect("config");
            assert_eq!(
                changes.recv().await.expect("change"),
                Change::AgentConfig { agent_id: agent.id }
            );
            let now = cp.agent_info(agent.id).await.expect("info").expect("found");
            assert_eq!(now.config_version, round);
        }
    }
}
