//! The control plane's behaviour, checked on both backends: the embedded SQLite file
//! and a real PostgreSQL started for the test.

use kas_controlplane::*;
use kas_test_support::services::Postgres;

async fn sqlite() -> SqliteControlPlane {
    SqliteControlPlane::in_memory().expect("db")
}

/// A fresh PostgreSQL server and a control plane on it (the server lives as long as
/// the returned guard).
async fn postgres() -> (Postgres, PostgresControlPlane) {
    let pg = tokio::task::spawn_blocking(Postgres::start)
        .await
        .expect("start postgres");
    let cp = PostgresControlPlane::connect(&pg.url())
        .await
        .expect("connect");
    (pg, cp)
}

macro_rules! on_both {
    ($($check:ident),* $(,)?) => {
        mod on_sqlite {
            $(#[tokio::test]
            async fn $check() {
                super::$check(&super::sqlite().await).await;
            })*
        }
        mod on_postgres {
            $(#[tokio::test]
            async fn $check() {
                let (_pg, cp) = super::postgres().await;
                super::$check(&cp).await;
            })*
        }
    };
}

on_both!(
    groups_are_created_like_mkdir_p,
    project_creates_parents_and_job_context_has_group_chain,
    agents_tokens_and_config,
    explicit_ids_do_not_collide_with_generated_ones,
    paths_compare_case_insensitively,
    agent_tokens_rotate_revoke_and_die_with_the_agent,
    managed_apps_run_one_operation_at_a_time_under_a_lease,
);

async fn managed_apps_run_one_operation_at_a_time_under_a_lease(cp: &dyn ControlPlane) {
    cp.create_project("acme/agents", None).await.expect("p");
    let (agent, _) = cp.create_agent("acme/agents", "prod").await.expect("agent");
    let op = |operation, owner: &str, lease_until| StartAppOperation {
        agent_id: agent.id,
        name: "ingress-nginx".into(),
        operation,
        version: Some("4.12.1".into()),
        values_yaml: "controller: {}\n".into(),
        owner: owner.into(),
        lease_until,
    };
    let far = i64::MAX / 2;
    let conflict = |r: Result<ClusterApp>| match r {
        Err(Error::Conflict(m)) => m,
        other => panic!("expected a conflict, got {other:?}"),
    };
    let m = conflict(
        cp.begin_app_operation(&op(AppOperation::Upgrade, "a", far))
            .await,
    );
    assert!(m.contains("not installed"), "{m}");
    let started = cp
        .begin_app_operation(&op(AppOperation::Install, "a", far))
        .await
        .expect("install");
    assert_eq!(started.state, AppState::Installing);
    assert_eq!(started.pod, "install-ingress-nginx");
    let m = conflict(
        cp.begin_app_operation(&op(AppOperation::Uninstall, "b", far))
            .await,
    );
    assert!(m.contains("installing (pod install-ingress-nginx)"), "{m}");

    // Only the owner renews; a live lease is not claimed; a released one is.
    assert!(cp
        .renew_app_lease(agent.id, "ingress-nginx", "a", far)
        .await
        .expect("renew"));
    assert!(!cp
        .renew_app_lease(agent.id, "ingress-nginx", "b", far)
        .await
        .expect("renew"));
    assert!(cp
        .claim_app_operations("b", far)
        .await
        .expect("claim")
        .is_empty());
    assert!(cp
        .renew_app_lease(agent.id, "ingress-nginx", "a", 0)
        .await
        .expect("release"));
    let claimed = cp.claim_app_operations("b", far).await.expect("claim");
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].values_yaml, "controller: {}\n");
    assert!(cp
        .claim_app_operations("c", far)
        .await
        .expect("claim")
        .is_empty());

    let done = cp
        .finish_app_operation(
            agent.id,
            "ingress-nginx",
            &AppOutcome {
                state: AppState::Installed,
                version: Some("4.12.1".into()),
                error_code: None,
            },
        )
        .await
        .expect("finish");
    assert_eq!(done.state, AppState::Installed);
    assert!(!cp
        .renew_app_lease(agent.id, "ingress-nginx", "b", far)
        .await
        .expect("renew"));
    let m = conflict(
        cp.begin_app_operation(&op(AppOperation::Install, "a", far))
            .await,
    );
    assert!(m.contains("already installed (version 4.12.1)"), "{m}");
    let up = cp
        .begin_app_operation(&op(AppOperation::Upgrade, "a", far))
        .await
        .expect("upgrade");
    assert_eq!(
        (up.state, up.pod.as_str()),
        (AppState::Upgrading, "upgrade-ingress-nginx")
    );
    let listed = cp.list_apps(Some(agent.id)).await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(
        cp.list_apps(Some(agent.id + 1)).await.expect("list").len(),
        0
    );
    cp.delete_agent(agent.id)
        .await
        .expect("the agent goes with its applications");
    assert!(cp.list_apps(None).await.expect("list").is_empty());
}

async fn agent_tokens_rotate_revoke_and_die_with_the_agent(cp: &dyn ControlPlane) {
    cp.create_project("acme/agents", None).await.expect("p");
    let (agent, first) = cp.create_agent("acme/agents", "prod").await.expect("agent");
    let mut changes = cp.subscribe();
    let tokens = cp.list_agent_tokens(agent.id).await.expect("list");
    assert_eq!(tokens.len(), 1);
    assert_eq!(tokens[0].name, "default");
    assert!(tokens[0].is_active() && tokens[0].last_used_at.is_none());

    // Rotation: a second token works alongside the first; a third is refused.
    let (t2, second) = cp
        .create_agent_token(agent.id, Some("rotation-2026"))
        .await
        .expect("second token");
    assert_eq!(t2.name, "rotation-2026");
    let err = cp
        .create_agent_token(agent.id, None)
        .await
        .expect_err("a third active token");
    assert!(matches!(err, Error::Conflict(_)), "{err:?}");
    assert!(err.to_string().contains("2 active tokens"), "{err}");
    for bad in ["", "has space", "x/y"] {
        assert!(matches!(
            cp.create_agent_token(agent.id, Some(bad)).await,
            Err(Error::Invalid(_) | Error::Conflict(_))
        ));
    }
    let auth = |t: String| async move { cp.authenticate_agent(&t).await.expect("auth") };
    let a1 = auth(first.expose().to_string()).await.expect("first works");
    let a2 = auth(second.expose().to_string())
        .await
        .expect("second works");
    assert_ne!(a1.token_id, a2.token_id);
    assert_eq!(a2.token_id, t2.id);

    // Last use is recorded.
    cp.touch_agent_token(a2.token_id).await.expect("touch");
    let listed = cp.list_agent_tokens(agent.id).await.expect("list");
    assert!(listed[1].last_used_at.is_some(), "{listed:?}");

    // Revoking by name: the token stops working at once and the change is announced.
    let revoked = cp
        .revoke_agent_token(agent.id, "default")
        .await
        .expect("revoke");
    assert!(revoked.revoked_at.is_some());
    assert!(auth(first.expose().to_string()).await.is_none());
    assert!(auth(second.expose().to_string()).await.is_some());
    let change = tokio::time::timeout(std::time::Duration::from_secs(5), changes.recv())
        .await
        .expect("change in time")
        .expect("change");
    assert_eq!(
        change,
        Change::AgentTokenRevoked {
            agent_id: agent.id,
            token_id: a1.token_id
        }
    );
    assert!(matches!(
        cp.revoke_agent_token(agent.id, "default").await,
        Err(Error::Conflict(_))
    ));
    assert!(matches!(
        cp.revoke_agent_token(agent.id, "nope").await,
        Err(Error::NotFound(_))
    ));
    // With one active token left, a new one may be made (and revoked by id).
    let (t3, third) = cp.create_agent_token(agent.id, None).await.expect("third");
    assert_eq!(t3.name, "token-3");
    cp.revoke_agent_token(agent.id, &t3.id.to_string())
        .await
        .expect("revoke by id");
    assert!(auth(third.expose().to_string()).await.is_none());
    assert_eq!(cp.list_agent_tokens(agent.id).await.expect("list").len(), 3);

    // Deleting the agent deletes its tokens.
    cp.delete_agent(agent.id).await.expect("delete");
    assert!(auth(second.expose().to_string()).await.is_none());
    assert!(cp.agent_info(agent.id).await.expect("info").is_none());
    assert!(matches!(
        cp.delete_agent(agent.id).await,
        Err(Error::NotFound(_))
    ));
    let deleted = async {
        loop {
            if let Ok(Change::AgentDeleted { agent_id }) = changes.recv().await {
                return agent_id;
            }
        }
    };
    let id = tokio::time::timeout(std::time::Duration::from_secs(5), deleted)
        .await
        .expect("deletion announced");
    assert_eq!(id, agent.id);
    // The name is free again.
    cp.create_agent("acme/agents", "prod").await.expect("again");
}

/// A database written before agents had several tokens (and jobs a protected flag)
/// keeps working: each agent's one token becomes its token `default`.
#[tokio::test]
async fn agents_from_before_token_rotation_keep_their_token() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("cp.sqlite");
    let token = "kasagent-legacylegacylegacylegacylegacylegacy";
    {
        let c = rusqlite::Connection::open(&path).expect("open");
        c.execute_batch(
            "CREATE TABLE groups (id INTEGER PRIMARY KEY, parent_id INTEGER REFERENCES groups(id), path TEXT NOT NULL UNIQUE COLLATE NOCASE);
             CREATE TABLE projects (id INTEGER PRIMARY KEY, group_id INTEGER NOT NULL REFERENCES groups(id), path TEXT NOT NULL UNIQUE COLLATE NOCASE);
             CREATE TABLE agents (id INTEGER PRIMARY KEY, project_id INTEGER NOT NULL REFERENCES projects(id), name TEXT NOT NULL,
                 token_hash BLOB NOT NULL UNIQUE, config_yaml TEXT NOT NULL DEFAULT '', config_version INTEGER NOT NULL DEFAULT 0,
                 created_at INTEGER NOT NULL, UNIQUE (project_id, name));
             CREATE TABLE jobs (id INTEGER PRIMARY KEY, project_id INTEGER NOT NULL REFERENCES projects(id), pipeline_id INTEGER NOT NULL,
                 environment_id INTEGER, username TEXT NOT NULL, token_hash BLOB NOT NULL UNIQUE, status TEXT NOT NULL,
                 started_at INTEGER NOT NULL, finished_at INTEGER);
             INSERT INTO groups (id, path) VALUES (1, 'acme');
             INSERT INTO projects (id, group_id, path) VALUES (2, 1, 'acme/agents');",
        )
        .expect("old schema");
        c.execute(
            "INSERT INTO agents (id, project_id, name, token_hash, created_at) VALUES (7, 2, 'prod', ?1, 1700000000)",
            [hash_token(token).to_vec()],
        )
        .expect("old agent");
    }
    for _ in 0..2 {
        // Opening twice: the migration adds the token once.
        let cp = SqliteControlPlane::open(&path).expect("open");
        let a = cp
            .authenticate_agent(token)
            .await
            .expect("auth")
            .expect("the old token works");
        assert_eq!(a.info.agent.id, 7);
        let tokens = cp.list_agent_tokens(7).await.expect("list");
        assert_eq!(tokens.len(), 1, "{tokens:?}");
        assert_eq!(tokens[0].name, "default");
        // The jobs table gained its protected_ref column.
        cp.start_job(&StartJob {
            project: "acme/agents".into(),
            username: "alice".into(),
            ..Default::default()
        })
        .await
        .expect("a job in the old table");
    }
}

async fn explicit_ids_do_not_collide_with_generated_ones(cp: &dyn ControlPlane) {
    cp.create_group("g", Some(23)).await.expect("explicit");
    let next = cp.create_group("h", None).await.expect("generated");
    assert!(next.id > 23, "{next:?}");
    assert!(matches!(
        cp.create_group("i", Some(23)).await,
        Err(Error::AlreadyExists(_))
    ));
    let p = cp.create_project("g/p", Some(150)).await.expect("explicit");
    let q = cp.create_project("g/q", None).await.expect("generated");
    assert!(q.id > p.id);
}

async fn paths_compare_case_insensitively(cp: &dyn ControlPlane) {
    cp.create_project("Acme/Web/Shop", None).await.expect("p");
    assert!(matches!(
        cp.create_project("acme/web/shop", None).await,
        Err(Error::AlreadyExists(_))
    ));
    assert_eq!(cp.list_groups().await.expect("groups").len(), 2);
    cp.create_agent("ACME/web/SHOP", "a")
        .await
        .expect("found by any case");
}

async fn groups_are_created_like_mkdir_p(cp: &dyn ControlPlane) {
    let g = cp.create_group("acme/platform", None).await.expect("group");
    assert_eq!(g.path, "acme/platform");
    let all = cp.list_groups().await.expect("list");
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].path, "acme");
    assert_eq!(g.parent_id, Some(all[0].id));
    // Idempotent without an explicit id.
    assert_eq!(
        cp.create_group("acme/platform", None)
            .await
            .expect("again")
            .id,
        g.id
    );
    // Explicit id on an existing group is a conflict.
    assert!(matches!(
        cp.create_group("acme", Some(5)).await,
        Err(Error::AlreadyExists(_))
    ));
    assert!(matches!(
        cp.create_group("bad//path", None).await,
        Err(Error::Invalid(_))
    ));
    assert!(matches!(
        cp.create_group("-x", None).await,
        Err(Error::Invalid(_))
    ));
}

async fn project_creates_parents_and_job_context_has_group_chain(cp: &dyn ControlPlane) {
    cp.create_group("group1", Some(23)).await.expect("g");
    cp.create_group("group1/group1-1", Some(25))
        .await
        .expect("g");
    let p = cp
        .create_project("group1/group1-1/project1", Some(150))
        .await
        .expect("p");
    assert_eq!(p.id, 150);
    assert!(matches!(
        cp.create_project("group1/group1-1/project1", None).await,
        Err(Error::AlreadyExists(_))
    ));
    assert!(matches!(
        cp.create_project("toplevel", None).await,
        Err(Error::Invalid(_))
    ));
    cp.create_environment("group1/group1-1/project1", "prod", Some("production"))
        .await
        .expect("env");
    assert!(matches!(
        cp.create_environment("group1/group1-1/project1", "x", Some("prod"))
            .await,
        Err(Error::Invalid(_))
    ));
    let (job, token) = cp
        .start_job(&StartJob {
            project: "group1/group1-1/project1".into(),
            environment: Some("prod".into()),
            username: "alice".into(),
            pipeline_id: None,
            protected_ref: true,
        })
        .await
        .expect("job");
    assert_eq!(job.status, JobStatus::Running);
    assert!(job.protected_ref);
    let ctx = cp
        .authenticate_job(token.expose())
        .await
        .expect("auth")
        .expect("running");
    assert!(ctx.protected_ref);
    assert_eq!(
        ctx.groups.iter().map(|g| g.id).collect::<Vec<_>>(),
        [23, 25]
    );
    assert_eq!(ctx.project.id, 150);
    let env = ctx.environment.as_ref().expect("env");
    assert_eq!(
        (env.slug.as_str(), env.tier.as_str()),
        ("prod", "production")
    );
    let mut changes = cp.subscribe();
    cp.finish_job(job.id, JobStatus::Success)
        .await
        .expect("finish");
    assert_eq!(
        changes.recv().await.expect("change"),
        Change::JobFinished { job_id: job.id }
    );
    assert!(cp
        .authenticate_job(token.expose())
        .await
        .expect("auth")
        .is_none());
    assert!(cp
        .authenticate_job("kasjob-unknown")
        .await
        .expect("auth")
        .is_none());
    assert!(matches!(
        cp.finish_job(job.id, JobStatus::Success).await,
        Err(Error::Invalid(_))
    ));
    assert!(matches!(
        cp.finish_job(999, JobStatus::Success).await,
        Err(Error::NotFound(_))
    ));
}

async fn agents_tokens_and_config(cp: &dyn ControlPlane) {
    cp.create_project("acme/platform/agents", None)
        .await
        .expect("p");
    let (agent, token) = cp
        .create_agent("acme/platform/agents", "prod")
        .await
        .expect("agent");
    assert!(matches!(
        cp.create_agent("acme/platform/agents", "prod").await,
        Err(Error::AlreadyExists(_))
    ));
    assert!(matches!(
        cp.create_agent("acme/platform/agents", "Bad_Name").await,
        Err(Error::Invalid(_))
    ));
    assert!(matches!(
        cp.create_agent("acme/none", "x").await,
        Err(Error::NotFound(_))
    ));
    let info = cp
        .authenticate_agent(token.expose())
        .await
        .expect("auth")
        .expect("found");
    assert_eq!(info.info.agent.id, agent.id);
    assert_eq!(info.info.config_version, 0);
    assert!(cp
        .authenticate_agent("kasagent-wrong")
        .await
        .expect("auth")
        .is_none());
    let err = cp
        .set_agent_config(
            "acme/platform/agents",
            "prod",
            "ci_access:\n  projects:\n    - id: acme/x\n      access_as: {bogus: {}}\n",
            &Default::default(),
        )
        .await
        .expect_err("invalid");
    assert!(
        err.to_string().contains("ci_access.projects[0].access_as"),
        "{err}"
    );
    let (v, w) = cp
        .set_agent_config(
            "acme/platform/agents",
            "prod",
            "ci_access:\n  projects:\n    - id: acme/web/shop\n",
            &Default::default(),
        )
        .await
        .expect("valid");
    assert_eq!(v, 1);
    assert!(w.is_empty());
    let info = cp.agent_info(agent.id).await.expect("info").expect("found");
    assert_eq!(info.config_version, 1);
    assert_eq!(info.config.ci_access.projects[0].id, "acme/web/shop");
}

/// Several kas replicas on one database: they start together safely, see each other's
/// writes, and hear each other's changes.
#[tokio::test]
async fn postgres_replicas_share_data_and_changes() {
    let pg = tokio::task::spawn_blocking(Postgres::start)
        .await
        .expect("start");
    let url = pg.url();
    let starts = (0..4).map(|_| {
        let url = url.clone();
        tokio::spawn(async move { PostgresControlPlane::connect(&url).await })
    });
    let mut replicas: Vec<PostgresControlPlane> = Vec::new();
    for start in starts.collect::<Vec<_>>() {
        replicas.push(start.await.expect("task").expect("connect"));
    }
    let (a, b) = (&replicas[0], &replicas[1]);
    let mut changes_b = b.subscribe();
    a.create_project("acme/agents", None).await.expect("p");
    let (agent, token) = a.create_agent("acme/agents", "prod").await.expect("agent");
    let seen = b
        .authenticate_agent(token.expose())
        .await
        .expect("auth")
        .expect("replica b sees the agent");
    assert_eq!(seen.info.agent.id, agent.id);
    a.set_agent_config(
        "acme/agents",
        "prod",
        "ci_access: {}\n",
        &Default::default(),
    )
    .await
    .expect("config");
    let change = tokio::time::timeout(std::time::Duration::from_secs(5), changes_b.recv())
        .await
        .expect("a change within 5 s")
        .expect("change");
    assert_eq!(change, Change::AgentConfig { agent_id: agent.id });

    // A job finished through one replica stops working on another at once (its cache
    // is cleared by the notification, and the database says so anyway).
    let cached_b = CachingControlPlane::new(b.clone());
    let (job, jt) = a
        .start_job(&StartJob {
            project: "acme/agents".into(),
            username: "alice".into(),
            ..Default::default()
        })
        .await
        .expect("job");
    assert!(cached_b
        .authenticate_job(jt.expose())
        .await
        .expect("a")
        .is_some());
    a.finish_job(job.id, JobStatus::Success)
        .await
        .expect("finish");
    let revoked = async {
        while cached_b
            .authenticate_job(jt.expose())
            .await
            .expect("a")
            .is_some()
        {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(5), revoked)
        .await
        .expect("revoked on the other replica");
}

async fn plain_connection(url: &str) -> sqlx::PgConnection {
    use sqlx::Connection;
    sqlx::PgConnection::connect(url).await.expect("connect")
}

/// The LISTEN connection dies (a restart, a proxy timeout): the backend reconnects and
/// only then announces a resync, and changes keep coming.
#[tokio::test]
async fn postgres_listener_reconnects_and_announces_resync() {
    let (pg, cp) = postgres().await;
    let mut changes = cp.subscribe();
    let mut admin = plain_connection(&format!("{}?sslmode=disable", pg.url())).await;
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE query LIKE 'LISTEN%'",
    )
    .fetch_one(&mut admin)
    .await
    .expect("terminate the listener");
    assert_eq!(killed, 1);
    let within = std::time::Duration::from_secs(10);
    let resync = tokio::time::timeout(within, changes.recv()).await;
    assert_eq!(resync.expect("resync").expect("open"), Change::Resync);
    cp.create_project("acme/agents", None).await.expect("p");
    cp.create_agent("acme/agents", "prod").await.expect("agent");
    cp.set_agent_config(
        "acme/agents",
        "prod",
        "ci_access: {}\n",
        &Default::default(),
    )
    .await
    .expect("config");
    let after = tokio::time::timeout(within, changes.recv()).await;
    assert!(matches!(
        after.expect("a change after the resync").expect("open"),
        Change::AgentConfig { .. }
    ));
}

/// TLS to PostgreSQL as the URL's libpq `sslmode` asks: `verify-full` checks the
/// server's certificate against `sslrootcert`; a wrong CA, or `require` against a
/// server without TLS, is refused rather than falling back to plain text.
#[tokio::test]
async fn postgres_over_tls_as_sslmode_asks() {
    use kas_test_support::certs::LocalhostCert;
    let dir = tempfile::tempdir().expect("dir");
    let cert = LocalhostCert::generate();
    let (ca, wrong_ca) = (dir.path().join("ca.pem"), dir.path().join("wrong.pem"));
    std::fs::write(&ca, &cert.ca).expect("ca");
    std::fs::write(&wrong_ca, LocalhostCert::generate().ca).expect("wrong ca");
    let (tls, plain) =
        tokio::task::spawn_blocking(move || (Postgres::start_tls(&cert), Postgres::start()))
            .await
            .expect("start postgres");

    let url = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        tls.url(),
        ca.display()
    );
    let cp = PostgresControlPlane::connect(&url)
        .await
        .expect("verify-full");
    cp.create_project("acme/tls", None).await.expect("write");
    let mut admin = plain_connection(&format!("{}?sslmode=disable", tls.url())).await;
    let (with_tls, without): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl) \
         FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE a.backend_type = 'client backend' AND a.pid <> pg_backend_pid()",
    )
    .fetch_one(&mut admin)
    .await
    .expect("pg_stat_ssl");
    assert!(with_tls >= 2, "pool and listener use TLS ({with_tls})");
    assert_eq!(without, 0, "no plain-text connection besides this check");

    let wrong = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        tls.url(),
        wrong_ca.display()
    );
    assert!(PostgresControlPlane::connect(&wrong).await.is_err());
    let require = format!("{}?sslmode=require", plain.url());
    assert!(PostgresControlPlane::connect(&require).await.is_err());
}
