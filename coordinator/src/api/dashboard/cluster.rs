//! The overview page: the coordinators and the leader, the workers with their
//! last host telemetry, the deployments' replicas, the active jobs and the drift
//! alerts that fire.

use std::fmt::Write as _;

use kiln_common::status::worker_state_name;
use kiln_proto::v1::{ClusterStatusResponse, DriftAlert};

use super::html::{ago, bytes, esc, link, note, percent, table, url_part, Cell};

/// Returns the overview's body; `scheme` (`https` or `http`) is how the other
/// coordinators' dashboards are linked.
pub fn overview(
    status: &ClusterStatusResponse,
    firing: &[DriftAlert],
    scheme: &str,
    now_ms: u64,
) -> String {
    let mut out = String::new();
    let leader = status
        .coordinators
        .iter()
        .find(|c| c.id == status.leader_id);
    match leader {
        Some(c) => {
            let _ = write!(
                out,
                "<p>Leader: <b id=\"leader\">coordinator {}</b> at {} (term {}, commit index {}).</p>",
                c.id,
                esc(&c.addr),
                status.term,
                status.commit_index
            );
        }
        None => out.push_str("<p class=\"bad\" id=\"leader\">no leader known</p>"),
    }

    out.push_str("<h2>Coordinators</h2>");
    let rows: Vec<Vec<Cell>> = status
        .coordinators
        .iter()
        .map(|c| {
            let http = if c.http_addr.is_empty() {
                Cell::text("-")
            } else {
                Cell::Html(link(
                    &format!("{scheme}://{}/ui", c.http_addr),
                    &c.http_addr,
                ))
            };
            vec![
                Cell::Num(c.id.to_string()),
                Cell::text(&c.role),
                Cell::text(&c.addr),
                http,
                health(c.healthy),
                Cell::Num(c.applied_index.to_string()),
            ]
        })
        .collect();
    out.push_str(&table(
        &["id", "role", "address", "dashboard", "health", "applied"],
        &rows,
    ));

    out.push_str("<h2>Workers</h2>");
    if status.workers.is_empty() {
        out.push_str(&note("no worker has registered"));
    } else {
        let rows: Vec<Vec<Cell>> = status
            .workers
            .iter()
            .map(|w| {
                let resources = w.resources.clone().unwrap_or_default();
                let host = status
                    .hosts
                    .iter()
                    .find(|h| h.worker_id == w.id)
                    .and_then(|h| h.host.clone().map(|host| (h.reported_at_ms, host)));
                let (cpu, memory, reported) = match host {
                    Some((at, h)) => (
                        percent(h.cpu_percent / 100.0),
                        format!(
                            "{} of {}",
                            bytes(h.memory_used_bytes),
                            bytes(h.memory_total_bytes)
                        ),
                        ago(at, now_ms),
                    ),
                    None => ("-".into(), "-".into(), "-".into()),
                };
                let state = worker_state_name(w.state);
                vec![
                    Cell::text(&w.id),
                    if state == "alive" {
                        Cell::Html(format!("<span class=\"good\">{state}</span>"))
                    } else {
                        Cell::Html(format!("<span class=\"bad\">{}</span>", esc(state)))
                    },
                    Cell::text(&w.addr),
                    Cell::text(&w.inference_http_addr),
                    Cell::Num(resources.cpu_cores.to_string()),
                    Cell::Num(resources.gpus.len().to_string()),
                    Cell::Num(cpu),
                    Cell::text(memory),
                    Cell::text(reported),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "id",
                "state",
                "address",
                "inference",
                "cores",
                "GPUs",
                "CPU busy",
                "memory",
                "reported",
            ],
            &rows,
        ));
    }

    out.push_str("<h2>Deployments</h2>");
    if status.deployments.is_empty() {
        out.push_str(&note("no deployment"));
    } else {
        let rows: Vec<Vec<Cell>> = status
            .deployments
            .iter()
            .map(|d| {
                vec![
                    Cell::Html(link(
                        &format!("/ui/deployments/{}", url_part(&d.name)),
                        &d.name,
                    )),
                    Cell::text(&d.model),
                    Cell::text(if d.canary.is_empty() {
                        "-"
                    } else {
                        d.canary.as_str()
                    }),
                    Cell::Num(format!("{} / {}", d.ready, d.wanted)),
                    Cell::Num(d.starting.to_string()),
                    Cell::Num(d.failed.to_string()),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "name",
                "model",
                "canary",
                "ready / wanted",
                "starting",
                "failed",
            ],
            &rows,
        ));
    }

    out.push_str("<h2>Active jobs</h2>");
    if status.jobs.is_empty() {
        out.push_str(&note("no job is pending or running"));
    } else {
        let rows: Vec<Vec<Cell>> = status
            .jobs
            .iter()
            .map(|j| {
                vec![
                    Cell::Html(link(&format!("/ui/jobs/{}", j.id), &j.id.to_string())),
                    Cell::text(&j.name),
                    Cell::text(&j.state),
                    Cell::text(&j.reason),
                ]
            })
            .collect();
        out.push_str(&table(&["id", "name", "state", "reason"], &rows));
    }

    out.push_str("<h2>Drift alerts firing</h2>");
    if firing.is_empty() {
        out.push_str(&note("none"));
    } else {
        out.push_str(&super::drift::alerts_table(firing, now_ms));
    }
    out
}

fn health(healthy: bool) -> Cell {
    if healthy {
        Cell::Html("<span class=\"good\">healthy</span>".into())
    } else {
        Cell::Html("<span class=\"bad\">unreachable</span>".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::v1::{CoordinatorStatus, DeploymentHealth, WorkerRecord, WorkerState};

    #[test]
    fn the_overview_names_the_leader_workers_and_deployments() {
        let status = ClusterStatusResponse {
            leader_id: 2,
            term: 7,
            coordinators: vec![
                CoordinatorStatus {
                    id: 1,
                    role: "follower".into(),
                    healthy: true,
                    ..Default::default()
                },
                CoordinatorStatus {
                    id: 2,
                    addr: "127.0.0.1:7070".into(),
                    http_addr: "127.0.0.1:7080".into(),
                    role: "leader".into(),
                    healthy: true,
                    ..Default::default()
                },
            ],
            workers: vec![WorkerRecord {
                id: "w-<1>".into(),
                state: WorkerState::Alive as i32,
                ..Default::default()
            }],
            deployments: vec![DeploymentHealth {
                name: "iris".into(),
                model: "iris@3".into(),
                wanted: 2,
                ready: 1,
                ..Default::default()
            }],
            ..Default::default()
        };
        let body = overview(&status, &[], "https", 0);
        assert!(body.contains("<b id=\"leader\">coordinator 2</b> at 127.0.0.1:7070"));
        assert!(
            body.contains("<a href=\"https://127.0.0.1:7080/ui\">127.0.0.1:7080</a>"),
            "{body}"
        );
        assert!(body.contains("w-&lt;1&gt;"));
        assert!(body.contains("<a href=\"/ui/deployments/iris\">iris</a>"));
        assert!(body.contains("1 / 2"));
        let leaderless = overview(&ClusterStatusResponse::default(), &[], "https", 0);
        assert!(leaderless.contains("no leader known"));
    }
}
