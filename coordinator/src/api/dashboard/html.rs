//! HTML pieces of the dashboard: the escape every value goes through ([`esc`]),
//! the page frame with its inline style and navigation, tables whose cells are
//! text (escaped) or markup built here, and the number, size and time formats.

use std::fmt::Write as _;

/// The sections of the navigation bar: (path, label).
const SECTIONS: [(&str, &str); 5] = [
    ("/ui", "Overview"),
    ("/ui/jobs", "Jobs"),
    ("/ui/runs", "Runs"),
    ("/ui/deployments", "Deployments"),
    ("/ui/drift", "Drift"),
];

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:0;color:#222;background:#fafafa}\
header{background:#263238;color:#fff;padding:8px 16px;display:flex;gap:16px;align-items:center}\
header a{color:#cfd8dc;text-decoration:none}header a.here{color:#fff;font-weight:bold}\
header .brand{font-weight:bold;color:#ffb74d;margin-right:12px}\
main{padding:8px 16px 32px}h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em}\
table{border-collapse:collapse;margin:6px 0;background:#fff}\
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;font-size:.9em;vertical-align:top}\
th{background:#eceff1}td.num{text-align:right;font-variant-numeric:tabular-nums}\
.bad{color:#c62828;font-weight:bold}.good{color:#2e7d32}.muted{color:#777}\
.differs{background:#fff8e1}pre{background:#fff;border:1px solid #ddd;padding:6px;\
max-height:24em;overflow:auto;font-size:.85em}figure{display:inline-block;margin:6px 12px 6px 0}\
svg.chart{background:#fff;border:1px solid #ddd}svg .title{font-weight:bold;font-size:13px}\
svg .tick,svg .legend,svg .axis{font-size:11px;fill:#444}svg .grid{stroke:#eee}\
svg .empty{fill:#999}footer{color:#777;font-size:.8em;padding:8px 16px}\
form.login{background:#fff;border:1px solid #ddd;padding:12px;display:inline-block}";

/// Returns `text` with the five HTML special characters escaped, safe inside
/// element content and quoted attributes alike.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Returns `text` percent-encoded for a URL path segment or query value (every
/// byte but letters, digits and `-._~`).
pub fn url_part(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Returns a link to `href` (a path built by the dashboard) reading `text`.
pub fn link(href: &str, text: &str) -> String {
    format!("<a href=\"{}\">{}</a>", esc(href), esc(text))
}

/// Returns a whole page: the frame, the navigation with `path`'s section marked,
/// the `body` (markup), and a footer naming the coordinator that drew it.
pub fn page(title: &str, path: &str, body: &str, footer: &str) -> String {
    let mut out = String::with_capacity(body.len() + 4096);
    let _ = write!(
        out,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} · kiln</title><style>{STYLE}</style></head><body><header>\
         <span class=\"brand\">kiln</span>",
        esc(title)
    );
    let here = SECTIONS
        .iter()
        .rev()
        .find(|(p, _)| path == *p || path.starts_with(&format!("{p}/")))
        .map_or("", |(p, _)| *p);
    for (p, label) in SECTIONS {
        let class = if p == here { " class=\"here\"" } else { "" };
        let _ = write!(out, "<a href=\"{p}\"{class}>{label}</a>");
    }
    let _ = write!(
        out,
        "</header><main><h1>{}</h1>{body}</main><footer>{}</footer></body></html>",
        esc(title),
        esc(footer)
    );
    out
}

/// One table cell.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    /// Text, escaped when drawn.
    Text(String),
    /// A number, escaped and right-aligned.
    Num(String),
    /// Markup built by the dashboard from escaped parts (a link, a mark).
    Html(String),
}

impl Cell {
    /// A text cell.
    pub fn text(text: impl Into<String>) -> Cell {
        Cell::Text(text.into())
    }
}

/// Returns a table with a header row and `rows` of cells.
pub fn table(header: &[&str], rows: &[Vec<Cell>]) -> String {
    let mut out = String::from("<table><thead><tr>");
    for h in header {
        let _ = write!(out, "<th>{}</th>", esc(h));
    }
    out.push_str("</tr></thead><tbody>");
    for row in rows {
        out.push_str("<tr>");
        for cell in row {
            match cell {
                Cell::Text(t) => {
                    let _ = write!(out, "<td>{}</td>", esc(t));
                }
                Cell::Num(t) => {
                    let _ = write!(out, "<td class=\"num\">{}</td>", esc(t));
                }
                Cell::Html(h) => {
                    let _ = write!(out, "<td>{h}</td>");
                }
            }
        }
        out.push_str("</tr>");
    }
    out.push_str("</tbody></table>");
    out
}

/// Returns a paragraph of muted text (an empty state, a note).
pub fn note(text: &str) -> String {
    format!("<p class=\"muted\">{}</p>", esc(text))
}

/// A figure: up to 4 significant decimals, "-" for NaN.
pub fn num(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else if v.is_infinite() {
        if v > 0.0 { "inf" } else { "-inf" }.into()
    } else if v != 0.0 && (v.abs() >= 1e7 || v.abs() < 1e-4) {
        format!("{v:.3e}")
    } else {
        let text = format!("{v:.4}");
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// A share as a percentage with one decimal.
pub fn percent(share: f64) -> String {
    if share.is_finite() {
        format!("{:.1}%", share * 100.0)
    } else {
        "-".into()
    }
}

/// A size in bytes, in binary units.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// How long before `now_ms` the time `at_ms` was ("-" for 0, never set).
pub fn ago(at_ms: u64, now_ms: u64) -> String {
    if at_ms == 0 {
        return "-".into();
    }
    let seconds = now_ms.saturating_sub(at_ms) / 1000;
    match seconds {
        s if s < 120 => format!("{s} s ago"),
        s if s < 7200 => format!("{} min ago", s / 60),
        s if s < 172_800 => format!("{} h ago", s / 3600),
        s => format!("{} days ago", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_special_character_is_escaped() {
        assert_eq!(
            esc("<a href=\"x\" onclick='y'>&</a>"),
            "&lt;a href=&quot;x&quot; onclick=&#39;y&#39;&gt;&amp;&lt;/a&gt;"
        );
        assert_eq!(esc("plain café"), "plain café");
    }

    #[test]
    fn url_parts_encode_everything_but_unreserved_bytes() {
        assert_eq!(url_part("a b/c?d&e=é"), "a%20b%2Fc%3Fd%26e%3D%C3%A9");
        assert_eq!(url_part("train_loss-1.x~"), "train_loss-1.x~");
    }

    #[test]
    fn a_page_marks_its_section_and_escapes_title_and_cells() {
        let body = table(
            &["name", "value"],
            &[vec![
                Cell::text("<script>"),
                Cell::Html(link("/ui/jobs/1", "job \"1\"")),
            ]],
        );
        let html = page("Jobs <1>", "/ui/jobs/1", &body, "coordinator 1");
        assert!(html.starts_with("<!DOCTYPE html>"));
        assert!(html.contains("<a href=\"/ui/jobs\" class=\"here\">Jobs</a>"));
        assert!(!html.contains("<a href=\"/ui\" class=\"here\">"));
        assert!(html.contains("Jobs &lt;1&gt;"));
        assert!(html.contains("<td>&lt;script&gt;</td>"));
        assert!(html.contains("<a href=\"/ui/jobs/1\">job &quot;1&quot;</a>"));
        assert!(!html.contains("<script"));
    }

    #[test]
    fn figures_read_well() {
        assert_eq!(num(f64::NAN), "-");
        assert_eq!(num(0.5), "0.5");
        assert_eq!(num(2.0), "2");
        assert_eq!(num(1.23456789), "1.2346");
        assert_eq!(num(0.00001234), "1.234e-5");
        assert_eq!(percent(0.1234), "12.3%");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 * 1024 * 1024 * 1024), "3.0 GiB");
        assert_eq!(ago(0, 5), "-");
        assert_eq!(ago(1_000, 31_000), "30 s ago");
        assert_eq!(ago(1_000, 3 * 3_600_000 + 1_000), "3 h ago");
    }
}
