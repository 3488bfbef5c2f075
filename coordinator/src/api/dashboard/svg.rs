//! The dashboard's charts as inline SVG, drawn on the server: a line chart of
//! named series ([`line_chart`]) and a histogram of reference against live bin
//! shares ([`histogram`]). Pure functions of their input; every text is escaped,
//! every series downsampled to [`MAX_POINTS`] points and every chart bounded in
//! series and bins, so a page's size does not grow with the history behind it.

use std::fmt::Write as _;

use super::html::esc;

/// Most points one series of a line chart draws.
pub const MAX_POINTS: usize = 500;
/// Most series one line chart draws.
pub const MAX_SERIES: usize = 12;
/// Most bars per side one histogram draws (more bins are merged).
pub const MAX_BINS: usize = 100;

const WIDTH: f64 = 640.0;
const HEIGHT: f64 = 260.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 44.0;
const BOTTOM: f64 = 36.0;
/// Ticks wanted on an axis (the nice steps give 4 to 10).
const TICKS: usize = 5;
const COLOURS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

/// How a line chart's x values read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum XAxis {
    /// Training steps (or any count).
    Steps,
    /// Milliseconds since the epoch, labelled by how long before `now_ms`.
    Time { now_ms: u64 },
}

/// One named line.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    /// (x, y), in x order; non-finite points are skipped.
    pub points: Vec<(f64, f64)>,
}

/// A line chart of several series sharing the axes.
#[derive(Debug, Clone, PartialEq)]
pub struct LineChart {
    pub title: String,
    pub y_label: String,
    pub x: XAxis,
    /// Starts the y axis at zero (rates, shares) rather than at the lowest value.
    pub y_from_zero: bool,
    pub series: Vec<Series>,
}

/// Keeps at most `max` points of a series: the lowest and the highest of each of
/// `max / 2` runs of consecutive points, in x order, so spikes survive.
pub fn downsample(points: &[(f64, f64)], max: usize) -> Vec<(f64, f64)> {
    if points.len() <= max || max < 2 {
        return points.iter().take(max).copied().collect();
    }
    let buckets = max / 2;
    let mut out = Vec::with_capacity(max);
    for b in 0..buckets {
        let from = b * points.len() / buckets;
        let to = ((b + 1) * points.len() / buckets).max(from + 1);
        let run = &points[from..to];
        let lowest = run
            .iter()
            .enumerate()
            .min_by(|a, b| a.1 .1.total_cmp(&b.1 .1))
            .map_or(0, |(i, _)| i);
        let highest = run
            .iter()
            .enumerate()
            .max_by(|a, b| a.1 .1.total_cmp(&b.1 .1))
            .map_or(0, |(i, _)| i);
        let (first, second) = (lowest.min(highest), lowest.max(highest));
        out.push(run[first]);
        if second != first {
            out.push(run[second]);
        }
    }
    out
}

/// Tick values from at or below `lo` to at or above `hi`, a nice step apart
/// (1, 2 or 5 times a power of ten).
fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    let span = (hi - lo).abs().max(f64::MIN_POSITIVE);
    let raw = span / TICKS as f64;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * magnitude);
    let first = (lo / step).floor() * step;
    let mut out = Vec::new();
    let mut i = 0.0;
    // Bounded: the span over a step at least span / TICKS is at most TICKS + 2.
    while out.len() <= 3 * TICKS {
        let t = first + i * step;
        out.push(t);
        if t >= hi {
            break;
        }
        i += 1.0;
    }
    out
}

/// A number short enough for a tick label.
fn tick_label(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if !(1e-3..1e6).contains(&a) {
        format!("{v:.1e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        trim(format!("{v:.2}"))
    } else {
        trim(format!("{v:.3}"))
    }
}

fn trim(text: String) -> String {
    if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        text
    }
}

/// How long before now a time tick is ("now", "45s", "12m", "3h", "2d").
fn time_label(now_ms: u64, at_ms: f64) -> String {
    let seconds = ((now_ms as f64 - at_ms) / 1000.0).max(0.0).round() as u64;
    match seconds {
        0 => "now".into(),
        s if s < 120 => format!("-{s}s"),
        s if s < 7200 => format!("-{}m", s / 60),
        s if s < 172_800 => format!("-{}h", s / 3600),
        s => format!("-{}d", s / 86_400),
    }
}

/// The opening of a chart's `<svg>` with its title.
fn open(out: &mut String, class: &str, title: &str) {
    let _ = write!(
        out,
        "<svg class=\"{class}\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" \
         viewBox=\"0 0 {WIDTH} {HEIGHT}\" role=\"img\" aria-label=\"{t}\">\
         <text x=\"{LEFT}\" y=\"16\" class=\"title\">{t}</text>",
        t = esc(title)
    );
}

/// A legend of coloured names in a row under the title.
fn legend(out: &mut String, names: &[(&str, &str)]) {
    let mut x = LEFT;
    for (name, colour) in names {
        let _ = write!(
            out,
            "<rect x=\"{x:.0}\" y=\"24\" width=\"10\" height=\"10\" fill=\"{colour}\"/>\
             <text x=\"{:.0}\" y=\"33\" class=\"legend\">{}</text>",
            x + 14.0,
            esc(name)
        );
        x += 24.0 + 6.5 * name.chars().count().min(40) as f64;
    }
}

/// The y axis: grid lines and labels from `lo` to `hi` (values of the ticks).
fn y_axis(out: &mut String, ticks: &[f64], y_of: impl Fn(f64) -> f64, label: &str) {
    for t in ticks {
        let y = y_of(*t);
        let _ = write!(
            out,
            "<line x1=\"{LEFT}\" x2=\"{:.0}\" y1=\"{y:.1}\" y2=\"{y:.1}\" class=\"grid\"/>\
             <text x=\"{:.0}\" y=\"{:.1}\" text-anchor=\"end\" class=\"tick\">{}</text>",
            WIDTH - RIGHT,
            LEFT - 6.0,
            y + 4.0,
            esc(&tick_label(*t))
        );
    }
    let _ = write!(
        out,
        "<text x=\"12\" y=\"{:.0}\" transform=\"rotate(-90 12 {:.0})\" text-anchor=\"middle\" class=\"axis\">{}</text>",
        TOP + (HEIGHT - TOP - BOTTOM) / 2.0,
        TOP + (HEIGHT - TOP - BOTTOM) / 2.0,
        esc(label)
    );
}

/// Draws a line chart; a chart with no finite point says so instead.
pub fn line_chart(chart: &LineChart) -> String {
    let series: Vec<(String, Vec<(f64, f64)>)> = chart
        .series
        .iter()
        .take(MAX_SERIES)
        .map(|s| {
            let finite: Vec<(f64, f64)> = s
                .points
                .iter()
                .copied()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect();
            (s.name.clone(), downsample(&finite, MAX_POINTS))
        })
        .filter(|(_, points)| !points.is_empty())
        .collect();
    let mut out = String::new();
    open(&mut out, "chart line", &chart.title);
    let all = || series.iter().flat_map(|(_, p)| p.iter());
    let (Some(x_lo), Some(x_hi), Some(y_lo), Some(y_hi)) = (
        all().map(|p| p.0).reduce(f64::min),
        all().map(|p| p.0).reduce(f64::max),
        all().map(|p| p.1).reduce(f64::min),
        all().map(|p| p.1).reduce(f64::max),
    ) else {
        let _ = write!(
            out,
            "<text x=\"{:.0}\" y=\"{:.0}\" text-anchor=\"middle\" class=\"empty\">no data yet</text></svg>",
            WIDTH / 2.0,
            HEIGHT / 2.0
        );
        return out;
    };
    let (x_lo, x_hi) = if x_hi > x_lo {
        (x_lo, x_hi)
    } else {
        (x_lo - 1.0, x_hi + 1.0)
    };
    let y_lo = if chart.y_from_zero {
        y_lo.min(0.0)
    } else {
        y_lo
    };
    let (y_lo, y_hi) = if y_hi > y_lo {
        (y_lo, y_hi)
    } else {
        let pad = (y_hi.abs() * 0.1).max(1e-9);
        (y_lo - pad, y_hi + pad)
    };
    let y_ticks = ticks(y_lo, y_hi);
    let y_lo = y_ticks.first().copied().unwrap_or(y_lo).min(y_lo);
    let y_hi = y_ticks.last().copied().unwrap_or(y_hi).max(y_hi);
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let x_of = |x: f64| LEFT + (x - x_lo) / (x_hi - x_lo) * plot_w;
    let y_of = |y: f64| TOP + plot_h - (y - y_lo) / (y_hi - y_lo) * plot_h;
    y_axis(&mut out, &y_ticks, y_of, &chart.y_label);
    let x_ticks: Vec<f64> = match chart.x {
        XAxis::Steps => ticks(x_lo, x_hi)
            .into_iter()
            .filter(|t| *t >= x_lo && *t <= x_hi)
            .collect(),
        XAxis::Time { .. } => (0..TICKS)
            .map(|i| x_lo + (x_hi - x_lo) * i as f64 / (TICKS - 1) as f64)
            .collect(),
    };
    for t in x_ticks {
        let label = match chart.x {
            XAxis::Steps => tick_label(t),
            XAxis::Time { now_ms } => time_label(now_ms, t),
        };
        let _ = write!(
            out,
            "<text x=\"{:.1}\" y=\"{:.0}\" text-anchor=\"middle\" class=\"tick\">{}</text>",
            x_of(t),
            HEIGHT - BOTTOM + 16.0,
            esc(&label)
        );
    }
    let _ = write!(
        out,
        "<text x=\"{:.0}\" y=\"{:.0}\" text-anchor=\"middle\" class=\"axis\">{}</text>",
        LEFT + plot_w / 2.0,
        HEIGHT - 4.0,
        match chart.x {
            XAxis::Steps => "step",
            XAxis::Time { .. } => "time before now",
        }
    );
    let names: Vec<(&str, &str)> = series
        .iter()
        .enumerate()
        .map(|(i, (name, _))| (name.as_str(), COLOURS[i % COLOURS.len()]))
        .collect();
    legend(&mut out, &names);
    for (i, (name, points)) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let mut coords = String::new();
        for (x, y) in points {
            let _ = write!(coords, "{:.1},{:.1} ", x_of(*x), y_of(*y));
        }
        let _ = write!(
            out,
            "<polyline class=\"series\" data-series=\"{}\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.5\" points=\"{}\"/>",
            esc(name),
            coords.trim_end()
        );
        if let [(x, y)] = points.as_slice() {
            let _ = write!(
                out,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{colour}\"/>",
                x_of(*x),
                y_of(*y)
            );
        }
    }
    out.push_str("</svg>");
    out
}

/// A histogram of one column: the reference's and the live window's share of
/// rows in each bin, side by side.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram<'a> {
    pub title: &'a str,
    /// Inner bin edges: bin 0 is below `edges[0]`, the last is from the last up.
    pub edges: &'a [f32],
    pub reference: &'a [u64],
    pub live: &'a [u64],
}

/// Sums `counts` into `bins` bins of `group` consecutive ones each.
fn merged(counts: &[u64], bins: usize, group: usize) -> Vec<u64> {
    let mut out = vec![0u64; bins];
    for (i, c) in counts.iter().enumerate() {
        if let Some(slot) = out.get_mut(i / group) {
            *slot = slot.saturating_add(*c);
        }
    }
    out
}

fn shares(counts: &[u64]) -> Vec<f64> {
    let total = counts.iter().fold(0u64, |a, c| a.saturating_add(*c));
    counts
        .iter()
        .map(|c| {
            if total == 0 {
                0.0
            } else {
                *c as f64 / total as f64
            }
        })
        .collect()
}

/// Draws a histogram: per bin, the reference bar then the live bar, as shares of
/// each side's rows.
pub fn histogram(h: &Histogram<'_>) -> String {
    let raw_bins = h.reference.len().max(h.live.len()).max(1);
    let group = raw_bins.div_ceil(MAX_BINS);
    let bins = raw_bins.div_ceil(group);
    let reference = shares(&merged(h.reference, bins, group));
    let live = shares(&merged(h.live, bins, group));
    let top = reference
        .iter()
        .chain(&live)
        .copied()
        .fold(0.01f64, f64::max);
    let y_ticks = ticks(0.0, top);
    let top = y_ticks.last().copied().unwrap_or(top).max(top);
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let y_of = |share: f64| TOP + plot_h - share / top * plot_h;
    let slot = plot_w / bins as f64;
    let mut out = String::new();
    open(&mut out, "chart histogram", h.title);
    y_axis(&mut out, &y_ticks, y_of, "share of rows");
    legend(&mut out, &[("reference", COLOURS[0]), ("live", COLOURS[3])]);
    let bin_text = |b: usize| -> String {
        let lower = (b * group).checked_sub(1).and_then(|i| h.edges.get(i));
        let upper = h.edges.get((b + 1) * group - 1);
        match (lower, upper) {
            (None, Some(u)) => format!("below {}", tick_label(f64::from(*u))),
            (Some(l), None) => format!("{} and above", tick_label(f64::from(*l))),
            (Some(l), Some(u)) => {
                format!(
                    "{} to {}",
                    tick_label(f64::from(*l)),
                    tick_label(f64::from(*u))
                )
            }
            (None, None) => format!("bin {b}"),
        }
    };
    for (side, values, offset, colour) in [
        ("reference", &reference, 0.1, COLOURS[0]),
        ("live", &live, 0.5, COLOURS[3]),
    ] {
        let _ = write!(
            out,
            "<g class=\"bars\" data-series=\"{side}\" fill=\"{colour}\">"
        );
        for (b, share) in values.iter().enumerate() {
            let y = y_of(*share);
            let _ = write!(
                out,
                "<rect x=\"{:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{:.1}\"><title>{side} {}: {:.1}%</title></rect>",
                LEFT + (b as f64 + offset) * slot,
                slot * 0.4,
                (TOP + plot_h - y).max(0.0),
                esc(&bin_text(b)),
                share * 100.0
            );
        }
        out.push_str("</g>");
    }
    // A few edge values under the bin boundaries they separate.
    let step = bins.div_ceil(6).max(1);
    for b in (1..bins).step_by(step) {
        if let Some(edge) = h.edges.get(b * group - 1) {
            let _ = write!(
                out,
                "<text x=\"{:.1}\" y=\"{:.0}\" text-anchor=\"middle\" class=\"tick\">{}</text>",
                LEFT + b as f64 * slot,
                HEIGHT - BOTTOM + 16.0,
                esc(&tick_label(f64::from(*edge)))
            );
        }
    }
    out.push_str("</svg>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn polyline_points(svg: &str) -> Vec<usize> {
        svg.split("points=\"")
            .skip(1)
            .map(|rest| rest.split('"').next().unwrap_or("").split(' ').count())
            .collect()
    }

    #[test]
    fn a_long_series_is_cut_to_the_bound_and_keeps_its_spike() {
        let mut points: Vec<(f64, f64)> = (0..10_000).map(|i| (i as f64, 1.0)).collect();
        points[7_777].1 = 50.0;
        let kept = downsample(&points, MAX_POINTS);
        assert!(kept.len() <= MAX_POINTS, "{}", kept.len());
        assert!(kept.contains(&(7_777.0, 50.0)));
        assert!(kept.windows(2).all(|w| w[0].0 < w[1].0), "x order kept");
        let short = [(1.0, 2.0), (2.0, 3.0)];
        assert_eq!(downsample(&short, MAX_POINTS), short);
    }

    #[test]
    fn a_line_chart_draws_each_series_with_its_escaped_name() {
        let chart = LineChart {
            title: "loss <per> step".into(),
            y_label: "loss".into(),
            x: XAxis::Steps,
            y_from_zero: false,
            series: vec![
                Series {
                    name: "train_loss".into(),
                    points: (1..=20).map(|s| (s as f64, 1.0 / s as f64)).collect(),
                },
                Series {
                    name: "a\"<b>".into(),
                    points: vec![(3.0, 0.5), (4.0, f64::NAN)],
                },
            ],
        };
        let svg = line_chart(&chart);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert_eq!(polyline_points(&svg), [20, 1]);
        assert!(svg.contains("loss &lt;per&gt; step"));
        assert!(svg.contains("a&quot;&lt;b&gt;"));
        assert!(!svg.contains("<b>"));
        assert!(svg.contains("<circle"), "a lone point is drawn as a dot");
        let long = LineChart {
            series: vec![Series {
                name: "x".into(),
                points: (0..100_000).map(|i| (i as f64, (i % 7) as f64)).collect(),
            }],
            ..chart.clone()
        };
        assert!(polyline_points(&line_chart(&long))[0] <= MAX_POINTS);
        let empty = LineChart {
            series: vec![],
            ..chart
        };
        assert!(line_chart(&empty).contains("no data yet"));
    }

    #[test]
    fn time_ticks_read_as_time_before_now() {
        let chart = LineChart {
            title: "requests".into(),
            y_label: "per second".into(),
            x: XAxis::Time { now_ms: 600_000 },
            y_from_zero: true,
            series: vec![Series {
                name: "m@1".into(),
                points: vec![(0.0, 5.0), (300_000.0, 5.0), (600_000.0, 5.0)],
            }],
        };
        let svg = line_chart(&chart);
        assert!(svg.contains(">-10m<") && svg.contains(">now<"), "{svg}");
        assert!(svg.contains(">0<"), "starts at zero: {svg}");
    }

    #[test]
    fn ticks_are_nice_and_cover_the_range() {
        let labels: Vec<String> = ticks(0.0, 1.0).into_iter().map(tick_label).collect();
        assert_eq!(labels, ["0", "0.2", "0.4", "0.6", "0.8", "1"]);
        let t = ticks(0.37, 0.91);
        assert!(t[0] <= 0.37 && *t.last().expect("ticks") >= 0.91, "{t:?}");
        assert!(t.len() <= 3 * TICKS + 1);
        let t = ticks(5.0, 5.0 + 1e-12);
        assert!(t.len() <= 3 * TICKS + 1);
    }

    #[test]
    fn a_histogram_draws_both_sides_as_shares_and_merges_many_bins() {
        let edges = [-1.0f32, 0.0, 1.0];
        let svg = histogram(&Histogram {
            title: "f0",
            edges: &edges,
            reference: &[10, 40, 40, 10],
            live: &[0, 0, 50, 50],
        });
        assert_eq!(svg.matches("<g class=\"bars\"").count(), 2);
        assert_eq!(svg.matches("</title></rect>").count(), 8);
        assert!(svg.contains("reference below -1: 10.0%"), "{svg}");
        assert!(svg.contains("live 1 and above: 50.0%"), "{svg}");
        let many: Vec<u64> = (0..1000).collect();
        let edges: Vec<f32> = (0..999).map(|e| e as f32).collect();
        let svg = histogram(&Histogram {
            title: "wide",
            edges: &edges,
            reference: &many,
            live: &[],
        });
        assert_eq!(svg.matches("</title></rect>").count(), 2 * MAX_BINS);
        // Nothing counted on one side: zero-height bars, no division by zero.
        assert!(!svg.contains("NaN"));
    }
}
