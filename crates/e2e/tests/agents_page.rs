//! The agents page, rendered by a real browser (Debian's headless Chromium): connected
//! and disconnected agents, and pod counts that arrive through the reactive cache.

use kas_test_support::fixture::{wait_for, Env};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

fn chromium(env: &Env, args: &[&str]) -> std::process::Output {
    let profile = format!("--user-data-dir={}", env.path("chromium-profile").display());
    Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
        ])
        .args(["--disable-dev-shm-usage", "--no-first-run", &profile])
        .args(args)
        .output()
        .expect("chromium is required (Debian package chromium)")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agents_page_renders_in_chromium() {
    let mut env = Env::start().await;
    let config = "ci_access:\n  projects:\n    - id: acme/web/shop\n";
    let (prod, token) = env.create_agent("acme/platform/agents", "prod", config);
    let (_staging, _) = env.create_agent("acme/platform/agents", "staging", config);
    env.api.create_pod("default", "web-0");
    env.api.create_pod("monitoring", "prometheus-0");
    env.start_agentk(&token, &[]);
    env.wait_connected(prod, 1);

    let admin = std::fs::read_to_string(&env.kas_info.admin_token_file)
        .expect("admin token")
        .trim()
        .to_string();
    let url = format!("{}/ui/agents", env.kas_info.api);
    let client = kas_test_support::http::client(&[], false);
    // Without the token: refused.
    let (code, _) = kas_test_support::http::get(&client, &url, None).await;
    assert_eq!(code, 401);
    // The first view answers at once with "loading"; the counts come from the cache.
    let (code, first) = kas_test_support::http::get(&client, &url, Some(&admin)).await;
    assert_eq!(code, 200);
    assert!(
        first.contains("prod") && first.contains("staging"),
        "{first}"
    );
    let rt = tokio::runtime::Handle::current();
    tokio::task::block_in_place(|| {
        wait_for(Duration::from_secs(15), "pod counts on the page", || {
            let (_, page) = rt.block_on(kas_test_support::http::get(&client, &url, Some(&admin)));
            page.contains("monitoring: 1").then_some(())
        })
    });

    // A real browser: sign in through ?token= (cookie + redirect), then render.
    let signin = format!("{url}?token={admin}");
    let out = chromium(&env, &["--dump-dom", &signin]);
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        dom.contains("<h1>Agents</h1>"),
        "no page: {dom}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "acme/platform/agents",
        "prod",
        "staging",
        ">connected<",
        ">disconnected<",
        "default: ",
        "monitoring: 1",
        "<th>Kubernetes</th>",
        "v1.32.0-kas-test-apiserver",
    ] {
        assert!(dom.contains(needle), "missing {needle} in:\n{dom}");
    }
    assert!(!dom.contains(&admin), "the admin token is on the page");

    let dir: PathBuf = std::env::var_os("KAS_SCREENSHOT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| env.path("screenshots"));
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    let shot = dir.join("agents-page.png");
    let arg = format!("--screenshot={}", shot.display());
    let out = chromium(&env, &[&arg, "--window-size=1280,300", &signin]);
    let png = std::fs::read(&shot).unwrap_or_else(|e| {
        panic!(
            "no screenshot ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 5_000,
        "not a real screenshot"
    );
}
