//! The verdict on a canary a retrain policy started: promote it when it answers
//! no worse than the primary over the same time, roll it back otherwise.
//!
//! Both versions are judged on the serving windows recorded since the canary
//! started (`state::serving`), summed over the cluster: the error rate (failed
//! and timed-out requests over the requests judged: those answered, failed or
//! timed out; requests refused because a queue was full are the replica's
//! back-pressure and malformed ones (400) the caller's fault, not errors of the
//! model, and are not judged) and the p99 latency from the merged histograms. The tolerances are `[canary]` settings: a canary is no worse when
//! its error rate is at most the primary's plus `error_tolerance`, and its p99 at
//! most the primary's times `1 + latency_tolerance` (or within
//! `latency_slack_ms` of it, as histogram buckets are coarse). When the feedback
//! endpoint brought labels for at least `min_labelled` answers of each version,
//! the answers must be no worse either: the canary's accuracy at least the
//! primary's less `quality_tolerance` (classification), or its RMSE at most the
//! primary's times `1 + quality_tolerance` (regression).

use kiln_common::config::CanarySettings;
use kiln_common::drift::latency_quantile;
use kiln_proto::v1::ServingWindow;

/// What to do with a canary now.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Not enough time or traffic yet; says how far along it is.
    Wait(String),
    Promote(String),
    RollBack(String),
}

/// Judges `canary` against `primary`, both summed over the windows since the
/// canary started `elapsed_ms` ago.
pub fn judge(
    settings: &CanarySettings,
    canary: &ServingWindow,
    primary: &ServingWindow,
    elapsed_ms: u64,
) -> Verdict {
    if elapsed_ms < settings.judge_after_ms || judged(canary) < settings.min_requests {
        let progress = format!(
            "{} of {} requests, {} of {} s",
            judged(canary),
            settings.min_requests,
            elapsed_ms / 1000,
            settings.judge_after_ms / 1000
        );
        if elapsed_ms >= settings.max_wait_ms {
            return Verdict::RollBack(format!(
                "too little traffic to judge within {} s ({progress})",
                settings.max_wait_ms / 1000
            ));
        }
        return Verdict::Wait(progress);
    }
    let (canary_errors, primary_errors) = (error_rate(canary), error_rate(primary));
    let canary_p99 = latency_quantile(&canary.latency_counts, 0.99);
    let primary_p99 = latency_quantile(&primary.latency_counts, 0.99);
    let mut summary = format!(
        "{} requests, error rate {} vs {} for the primary, p99 {} vs {}",
        judged(canary),
        percent(canary_errors),
        percent(primary_errors),
        millis(canary_p99),
        millis(primary_p99)
    );
    let labelled = canary.labelled.min(primary.labelled) >= settings.min_labelled;
    let quality_worse = if !labelled {
        false
    } else if canary.classification {
        let (c, p) = (accuracy(canary), accuracy(primary));
        summary.push_str(&format!(", accuracy {} vs {}", percent(c), percent(p)));
        c < p - settings.quality_tolerance
    } else {
        let (c, p) = (rmse(canary), rmse(primary));
        summary.push_str(&format!(", RMSE {c:.4} vs {p:.4}"));
        c > p * (1.0 + settings.quality_tolerance)
    };
    if canary_errors > primary_errors + settings.error_tolerance {
        return Verdict::RollBack(format!("error rate worse: {summary}"));
    }
    if let (Some(c), Some(p)) = (canary_p99, primary_p99) {
        if c > p * (1.0 + settings.latency_tolerance) && c - p > settings.latency_slack_ms {
            return Verdict::RollBack(format!("p99 latency worse: {summary}"));
        }
    }
    if quality_worse {
        return Verdict::RollBack(format!("answers worse against the labels: {summary}"));
    }
    Verdict::Promote(summary)
}

/// Labelled answers that were right (0 without labels).
pub fn accuracy(w: &ServingWindow) -> f64 {
    if w.labelled == 0 {
        0.0
    } else {
        w.correct as f64 / w.labelled as f64
    }
}

/// Root mean squared error of the labelled answers (0 without labels).
pub fn rmse(w: &ServingWindow) -> f64 {
    if w.labelled == 0 {
        0.0
    } else {
        (w.squared_error_sum / w.labelled as f64).sqrt()
    }
}

/// Requests that failed or timed out. A replica counts every error in
/// `failures`: the refused (`rejected`), malformed (`invalid`, the caller's
/// fault, not the model's) and timed-out ones among them.
fn errors(w: &ServingWindow) -> u64 {
    w.failures
        .saturating_sub(w.rejected)
        .saturating_sub(w.invalid)
}

/// Requests that tell about the model: answered, failed or timed out (those
/// refused with a full queue tell about the load).
pub fn judged(w: &ServingWindow) -> u64 {
    w.requests.saturating_add(errors(w))
}

/// Failed and timed-out requests over the requests judged (0 without any).
pub fn error_rate(w: &ServingWindow) -> f64 {
    match judged(w) {
        0 => 0.0,
        judged => errors(w) as f64 / judged as f64,
    }
}

fn percent(share: f64) -> String {
    format!("{:.2}%", share * 100.0)
}

fn millis(ms: Option<f64>) -> String {
    ms.map_or_else(|| "n/a".into(), |ms| format!("{ms:.2} ms"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_common::drift::LATENCY_BUCKETS_MS;

    /// `requests` requests, `failures` of them failed, the answered ones all in
    /// one latency bucket.
    fn served(requests: u64, failures: u64, bucket: usize) -> ServingWindow {
        let mut latency_counts = vec![0; LATENCY_BUCKETS_MS.len() + 1];
        latency_counts[bucket] = requests - failures;
        ServingWindow {
            requests: requests - failures,
            failures,
            latency_counts,
            ..ServingWindow::default()
        }
    }

    fn settings() -> CanarySettings {
        CanarySettings {
            judge_after_ms: 10_000,
            min_requests: 100,
            max_wait_ms: 60_000,
            ..CanarySettings::default()
        }
    }

    #[test]
    fn a_canary_waits_for_time_and_traffic_then_gives_up() {
        let s = settings();
        let primary = served(1000, 0, 2);
        assert!(matches!(
            judge(&s, &served(500, 0, 2), &primary, 9_999),
            Verdict::Wait(_)
        ));
        let Verdict::Wait(progress) = judge(&s, &served(99, 0, 2), &primary, 20_000) else {
            panic!("too few requests must wait");
        };
        assert!(progress.contains("99 of 100 requests"), "{progress}");
        let Verdict::RollBack(why) = judge(&s, &served(99, 0, 2), &primary, 60_000) else {
            panic!("a canary without traffic for max_wait_ms is rolled back");
        };
        assert!(why.contains("too little traffic"), "{why}");
    }

    #[test]
    fn a_canary_no_worse_is_promoted_and_a_worse_one_rolled_back() {
        let s = settings();
        let primary = served(1000, 10, 3); // 1% errors, p99 in (2.5, 5] ms
        let Verdict::Promote(summary) = judge(&s, &served(200, 3, 3), &primary, 10_000) else {
            panic!("1.5% vs 1% errors is within one point");
        };
        assert!(summary.contains("1.50% vs 1.00%"), "{summary}");
        let Verdict::RollBack(why) = judge(&s, &served(200, 10, 3), &primary, 10_000) else {
            panic!("5% vs 1% errors is worse");
        };
        assert!(why.starts_with("error rate worse"), "{why}");
        // Two buckets slower: p99 about 24.85 ms vs 4.975 ms.
        let Verdict::RollBack(why) = judge(&s, &served(200, 0, 5), &primary, 10_000) else {
            panic!("a slower canary is worse");
        };
        assert!(why.starts_with("p99 latency worse"), "{why}");
        // Faster is fine, and so is a canary whose primary had no traffic.
        assert!(matches!(
            judge(&s, &served(200, 0, 1), &primary, 10_000),
            Verdict::Promote(_)
        ));
        assert!(matches!(
            judge(&s, &served(200, 0, 1), &ServingWindow::default(), 10_000),
            Verdict::Promote(_)
        ));
    }

    #[test]
    fn with_enough_labels_the_answers_must_be_no_worse() {
        let s = settings();
        let labelled = |correct: u64, labelled: u64| ServingWindow {
            labelled,
            correct,
            classification: true,
            ..served(1000, 0, 2)
        };
        let Verdict::Promote(summary) = judge(&s, &labelled(93, 100), &labelled(58, 100), 10_000)
        else {
            panic!("a more accurate canary passes");
        };
        assert!(summary.ends_with("accuracy 93.00% vs 58.00%"), "{summary}");
        let Verdict::RollBack(why) = judge(&s, &labelled(50, 100), &labelled(60, 100), 10_000)
        else {
            panic!("ten points less accurate is worse");
        };
        assert!(why.starts_with("answers worse against the labels"), "{why}");
        // Too few labels: the accuracy is not judged.
        assert!(matches!(
            judge(&s, &labelled(5, 10), &labelled(60, 100), 10_000),
            Verdict::Promote(_)
        ));
        // Regression: RMSE.
        let errors = |squared_error_sum: f64| ServingWindow {
            labelled: 100,
            squared_error_sum,
            ..served(1000, 0, 2)
        };
        assert!(matches!(
            judge(&s, &errors(100.0), &errors(100.0), 10_000),
            Verdict::Promote(_)
        ));
        assert!(matches!(
            judge(&s, &errors(400.0), &errors(100.0), 10_000),
            Verdict::RollBack(_)
        ));
    }

    #[test]
    fn timeouts_count_once_and_rejections_and_bad_requests_are_not_judged() {
        // As a replica counts them: `requests` answered, `failures` every error,
        // the 50 refused with a full queue, the 10 malformed and the 2 timeouts
        // among them.
        let w = ServingWindow {
            requests: 97,
            failures: 63,
            timeouts: 2,
            rejected: 50,
            invalid: 10,
            ..ServingWindow::default()
        };
        assert_eq!(judged(&w), 100, "answered, failed and timed out");
        assert!(
            (error_rate(&w) - 0.03).abs() < 1e-12,
            "1 failure and 2 timeouts of 100 judged: {}",
            error_rate(&w)
        );
        assert_eq!(error_rate(&ServingWindow::default()), 0.0);
        let all_failed = ServingWindow {
            failures: 5,
            ..ServingWindow::default()
        };
        assert_eq!(
            error_rate(&all_failed),
            1.0,
            "errors over all judged, not over successes"
        );
    }
}
