//! One kubectl story through kas against the test API server: `get pods`, `apply -f`
//! of a ConfigMap, `get pods --watch` receiving an event and `exec` echoing stdin. Used
//! with one kas and across replicas.

use crate::fixture::wait_for;
use crate::{Recorded, TestApiServer};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// Where the story runs: the cluster, kubectl bound to a job and context, a scratch
/// directory, and the logs to show on failure.
pub struct Target<'a> {
    pub api: &'a TestApiServer,
    pub kubectl: &'a dyn Fn(&[&str]) -> Command,
    pub dir: &'a Path,
    pub logs: &'a dyn Fn() -> String,
}

fn run(t: &Target, args: &[&str]) -> Output {
    (t.kubectl)(args).output().expect("run kubectl")
}

/// kubectl's stdout, after asserting it succeeded (showing kas's logs otherwise).
pub fn ok(out: &Output, logs: &dyn Fn() -> String) -> String {
    assert!(
        out.status.success(),
        "kubectl failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        logs()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The last request the cluster saw for `path`.
pub fn last(api: &TestApiServer, path: &str) -> Recorded {
    api.recorded()
        .into_iter()
        .rev()
        .find(|r| r.path == path)
        .unwrap_or_else(|| panic!("the cluster saw no request for {path}"))
}

/// `kubectl get pods --watch` prints the event of a pod created meanwhile; returns the
/// watch request as the cluster recorded it.
fn watch_event(t: &Target, ns: &str, tag: &str) -> Recorded {
    let watches = || {
        t.api
            .recorded()
            .iter()
            .filter(|r| {
                r.path == format!("/api/v1/namespaces/{ns}/pods") && r.query.contains("watch=true")
            })
            .count()
    };
    let before = watches();
    let mut child = (t.kubectl)(&["get", "pods", "-n", ns, "--watch"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl watch");
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let header = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("watch printed the list");
    assert!(header.contains("NAME"), "{header}");
    // The list is printed; the watch request follows it. Create the pod once the
    // cluster has seen the watch request, so the event cannot be missed.
    wait_for(Duration::from_secs(20), "the watch request", || {
        (watches() > before).then_some(())
    });
    let pod = format!("watched-{tag}");
    t.api.create_pod(ns, &pod);
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("no watch event for {pod}\n{}", (t.logs)()));
        if line.contains(&pod) {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    t.api
        .recorded()
        .into_iter()
        .rev()
        .find(|r| {
            r.path == format!("/api/v1/namespaces/{ns}/pods") && r.query.contains("watch=true")
        })
        .expect("watch request recorded")
}

/// get pods, apply -f a ConfigMap, get pods --watch receiving an event, exec echoing
/// stdin; returns what the cluster recorded for each.
pub fn exercise(t: &Target, ns: &str, tag: &str) -> Vec<Recorded> {
    let mut seen = Vec::new();
    // get pods (the context's namespace comes from default_namespace)
    let out = ok(&run(t, &["get", "pods", "-n", ns]), t.logs);
    assert!(out.contains("NAME"), "{out}");
    seen.push(last(t.api, &format!("/api/v1/namespaces/{ns}/pods")));

    // apply -f of a ConfigMap
    let cm = t.dir.join(format!("cm-{tag}.yaml"));
    std::fs::write(&cm, format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cm-{tag}\n  namespace: {ns}\ndata:\n  color: blue\n")).expect("write");
    let out = ok(
        &run(t, &["apply", "-f", cm.to_str().expect("path")]),
        t.logs,
    );
    assert!(
        out.contains(&format!("configmap/cm-{tag} created")),
        "{out}"
    );
    seen.push(last(t.api, &format!("/api/v1/namespaces/{ns}/configmaps")));
    let out = ok(
        &run(
            t,
            &[
                "get",
                "configmap",
                &format!("cm-{tag}"),
                "-n",
                ns,
                "-o",
                "jsonpath={.data.color}",
            ],
        ),
        t.logs,
    );
    assert_eq!(out, "blue");

    // get pods --watch receives the event of a pod created meanwhile
    seen.push(watch_event(t, ns, tag));

    // exec echoing input
    let pod = if ns == "shop" { "cart-0" } else { "web-0" };
    let mut child = (t.kubectl)(&["exec", "-i", "-n", ns, pod, "--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl exec");
    let input = format!("hello through the tunnel {tag}\n");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("exec output");
    assert!(
        out.status.success(),
        "exec failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        (t.logs)()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), input);
    seen.push(last(
        t.api,
        &format!("/api/v1/namespaces/{ns}/pods/{pod}/exec"),
    ));
    seen
}
