//! Draws the [`Model`]: the service table, the selected service's detail,
//! the log, and a footer of keys. Pure: the same model draws the same
//! frame, which is what the snapshot tests rely on. Readable without
//! colour: every state is a word, the selection is reversed, and devloop's
//! own log lines carry a `»` mark.

use super::model::{Level, LogLine, Model, Source};
use crate::events::human_bytes;
use crate::state::{AgentState, InterceptState, SessionState};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Cell, Clear, Paragraph, Row, Sparkline, Table, Wrap};
use ratatui::Frame;

pub const KEYS: &[(&str, &str)] = &[
    ("↑↓", "select"),
    ("s", "resync"),
    ("r", "restart"),
    ("c", "run on_sync"),
    ("i", "intercept"),
    ("l", "logs"),
    ("/", "filter"),
    ("?", "help"),
    ("q", "quit"),
];

const HELP: &[(&str, &str)] = &[
    ("↑ ↓  j k", "move between services and pods"),
    ("s", "resync: compare the whole source with the target again"),
    ("r", "restart the app"),
    ("c  1-9", "run the first (or the Nth) on_sync command now"),
    ("i", "take or let go the intercept (the app answers while off)"),
    ("l", "logs full screen (again to go back)"),
    ("/", "filter the logs (Enter keeps it, Esc clears it)"),
    ("PgUp PgDn", "scroll the logs; Home the oldest, End follows"),
    ("Esc", "clear the filter and the last answer"),
    ("q  Ctrl-C", "quit: devloop stops every service and restores what it changed"),
];

struct Theme {
    color: bool,
}

impl Theme {
    fn fg(&self, c: Color) -> Style {
        if self.color {
            Style::default().fg(c)
        } else {
            Style::default()
        }
    }
    fn agent(&self, a: &AgentState) -> Style {
        match a {
            AgentState::Live => self.fg(Color::Green),
            AgentState::Error { .. } => self.fg(Color::Red).add_modifier(Modifier::BOLD),
            AgentState::Stopped => self.fg(Color::DarkGray),
            _ => self.fg(Color::Yellow),
        }
    }
}

pub fn draw(f: &mut Frame, m: &Model) {
    let t = Theme { color: m.color };
    let area = f.area();
    let [title, body, footer] =
        Layout::vertical([Constraint::Length(1), Constraint::Min(3), Constraint::Length(1)]).areas(area);
    draw_title(f, m, title);
    draw_footer(f, m, footer);
    if m.logs_full {
        draw_logs(f, m, &t, body);
    } else {
        let rows = m.rows().len() as u16;
        // The table as tall as its rows (and a header and borders), at
        // most half the screen; the detail pane next; the log the rest.
        let table_h = (rows + 3).clamp(4, (body.height / 2).max(4));
        let [table, detail, logs] =
            Layout::vertical([Constraint::Length(table_h), Constraint::Length(8), Constraint::Min(3)]).areas(body);
        draw_table(f, m, &t, table);
        draw_detail(f, m, &t, detail);
        draw_logs(f, m, &t, logs);
    }
    if m.help {
        draw_help(f, area);
    }
}

fn draw_title(f: &mut Frame, m: &Model, area: Rect) {
    let mut live = 0;
    let mut sessions = 0;
    for s in m.state.services.values().flat_map(|s| s.sessions.values()) {
        sessions += 1;
        live += usize::from(s.agent == AgentState::Live);
    }
    let services = m.state.services.len();
    let text =
        format!(" {} · {services} service{} · {live}/{sessions} live", m.title, if services == 1 { "" } else { "s" });
    f.render_widget(Paragraph::new(text).style(Style::default().add_modifier(Modifier::BOLD)), area);
}

fn draw_footer(f: &mut Frame, m: &Model, area: Rect) {
    let text = if m.typing_filter {
        format!(" filter: {}▏ (Enter keeps, Esc clears)", m.filter)
    } else if let Some(s) = &m.status {
        format!(" {s}")
    } else {
        let keys: Vec<String> = KEYS.iter().map(|(k, what)| format!("{k} {what}")).collect();
        format!(" {}", keys.join("  "))
    };
    f.render_widget(Paragraph::new(text).style(Style::default().add_modifier(Modifier::REVERSED)), area);
}

/// "12s", "3m", "2h": how long ago, or how long waiting.
pub fn ago(now_ms: u64, at_ms: u64) -> String {
    let s = now_ms.saturating_sub(at_ms) / 1000;
    match s {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s => format!("{}h", s / 3600),
    }
}

fn agent_cell(s: &SessionState, now_ms: u64) -> String {
    let waited = ago(now_ms, s.since_ms);
    match &s.agent {
        AgentState::Syncing => match &s.progress {
            Some(p) if p.bytes_total > 0 => format!("syncing {}%", p.bytes_done * 100 / p.bytes_total),
            _ => format!("syncing {waited}"),
        },
        AgentState::Live => "live".into(),
        AgentState::Reconnecting { attempt, .. } => format!("retry #{attempt} {waited}"),
        AgentState::Connecting | AgentState::Injecting | AgentState::Waiting => {
            format!("{} {waited}", s.agent.label())
        }
        a => a.label().into(),
    }
}

fn last_sync_cell(s: &SessionState, now_ms: u64) -> String {
    match &s.last_sync {
        Some(l) => format!(
            "{} file{} {} {:.1}ms {}",
            l.files + l.deleted,
            if l.files + l.deleted == 1 { "" } else { "s" },
            human_bytes(l.bytes).replace(' ', ""),
            l.latency_ms,
            ago(now_ms, l.at_ms)
        ),
        None => "-".into(),
    }
}

fn intercept_cell(s: &SessionState, now_ms: u64) -> String {
    match &s.intercept {
        InterceptState::Off => "off".into(),
        InterceptState::On(i) => format!("{} {}c {:.0}/s", s.intercept.label(), i.open, i.per_sec(now_ms)),
    }
}

fn on_sync_cell(s: &SessionState) -> String {
    match &s.on_sync {
        None => "-".into(),
        Some(c) if c.running => "running".into(),
        Some(c) => match c.code {
            Some(0) => "ok".into(),
            Some(code) => format!("exit {code}"),
            None => "killed".into(),
        },
    }
}

fn draw_table(f: &mut Frame, m: &Model, t: &Theme, area: Rect) {
    let header = Row::new(["SERVICE / POD", "AGENT", "LAST SYNC, AGO", "PEND", "INTERCEPT", "ON_SYNC", "RST"])
        .style(Style::default().add_modifier(Modifier::BOLD));
    let rows: Vec<Row> = m
        .rows()
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let svc = &m.state.services[&r.service];
            // The selection is reversed, and marked for screens (and
            // snapshots) that show no attributes.
            let mark = if i == m.selected { '›' } else { ' ' };
            let name = match &r.pod {
                Some(p) => format!("{mark}  {p}"),
                None => format!("{mark}{}", r.service),
            };
            // A Kubernetes service's own row sums up its pods.
            let pods = svc.sessions.keys().filter(|k| !k.is_empty()).count();
            let row = if r.pod.is_none() && pods > 0 {
                let live = svc.sessions.values().filter(|s| s.agent == AgentState::Live).count();
                Row::new(vec![
                    Cell::from(name),
                    Cell::from(format!("{live}/{pods} live")),
                    Cell::from(svc.note.clone().unwrap_or_default()),
                ])
            } else if r.pod.is_none() && svc.sessions.is_empty() {
                let since = svc.note_ms.map(|at| format!(" {}", ago(m.now_ms, at))).unwrap_or_default();
                Row::new(vec![
                    Cell::from(name),
                    Cell::from(format!("waiting{since}")),
                    Cell::from(svc.note.clone().unwrap_or_default()),
                ])
            } else {
                let s = m.session(r).expect("a row's session");
                Row::new(vec![
                    Cell::from(name),
                    Cell::from(agent_cell(s, m.now_ms)).style(t.agent(&s.agent)),
                    Cell::from(last_sync_cell(s, m.now_ms)),
                    Cell::from(s.pending.to_string()),
                    Cell::from(intercept_cell(s, m.now_ms)),
                    Cell::from(on_sync_cell(s)),
                    Cell::from(s.restarts.to_string()),
                ])
            };
            if i == m.selected {
                row.style(Style::default().add_modifier(Modifier::REVERSED))
            } else {
                row
            }
        })
        .collect();
    let widths = [
        Constraint::Min(13),
        Constraint::Length(13),
        Constraint::Length(22),
        Constraint::Length(4),
        Constraint::Length(10),
        Constraint::Length(7),
        Constraint::Length(3),
    ];
    let table =
        Table::new(rows, widths).header(header).block(Block::default().borders(Borders::ALL).title(" Services "));
    f.render_widget(table, area);
}

fn draw_detail(f: &mut Frame, m: &Model, t: &Theme, area: Rect) {
    let Some(row) = m.selected_row() else {
        let p = Paragraph::new(" starting: no service has reported yet")
            .block(Block::default().borders(Borders::ALL).title(" Detail "));
        f.render_widget(p, area);
        return;
    };
    let svc = &m.state.services[&row.service];
    let s = m.session(&row);
    let title = match (&row.pod, s) {
        (Some(p), _) => format!(" {}/{p} ", row.service),
        (None, Some(s)) if !s.target.is_empty() => format!(" {}: {} ", row.service, s.target),
        _ => format!(" {} ", row.service),
    };
    let block = Block::default().borders(Borders::ALL).title(title);
    let inner = block.inner(area);
    f.render_widget(block, area);
    let [left, right] =
        Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)]).spacing(2).areas(inner);

    // Left: what it is doing or waiting for, the latencies, the last batch.
    let mut lines: Vec<Line> = Vec::new();
    if let Some(s) = s {
        lines.push(Line::from(waiting(s, svc.note.as_deref(), m.now_ms)));
        if let Some(p) = &s.progress {
            lines.push(Line::from(progress_bar(p, left.width.saturating_sub(1) as usize, m.now_ms)));
            lines.extend(progress_text(p, m.now_ms).into_iter().map(Line::from));
        }
    } else if let Some(n) = &svc.note {
        let since = svc.note_ms.map(|at| format!(" {}", ago(m.now_ms, at))).unwrap_or_default();
        lines.push(Line::from(format!("waiting{since}: {n}")));
    }
    let spark_h = u16::from(s.is_some_and(|s| !s.latencies.is_empty() && s.progress.is_none()));
    if spark_h == 1 {
        let s = s.expect("a session");
        let last = s.latencies.back().copied().unwrap_or(0.0);
        let max = s.latencies.iter().copied().fold(0.0, f64::max);
        lines.push(Line::from(format!("latency last {last:.1} ms, max {max:.1} ms:")));
    }
    if let Some(l) = s.and_then(|s| s.last_sync.as_ref()) {
        lines.push(Line::from(format!("last batch: {}", l.paths.join(" "))));
    }
    // The sparkline on the last line, the text above it.
    let [text_area, spark_area] = Layout::vertical([Constraint::Min(0), Constraint::Length(spark_h)]).areas(left);
    f.render_widget(Paragraph::new(lines).wrap(Wrap { trim: false }), text_area);
    if spark_h == 1 {
        let data: Vec<u64> = s.expect("a session").latencies.iter().map(|l| (l * 1000.0) as u64).collect();
        let w = spark_area.width as usize;
        let data = &data[data.len().saturating_sub(w)..];
        f.render_widget(Sparkline::default().data(data).style(t.fg(Color::Cyan)), spark_area);
    }

    // Right: the last errors (newest first) with their hints, in full,
    // then the last on_sync.
    let mut lines: Vec<Line> = Vec::new();
    let errors: Vec<_> = svc.errors.iter().chain(s.map(|s| s.errors.iter()).into_iter().flatten()).collect();
    if errors.is_empty() {
        lines.push(Line::from("errors: none"));
    }
    for e in errors.iter().rev().take(3) {
        lines.push(Line::from(Span::styled(
            format!("error {} ago: {}", ago(m.now_ms, e.at_ms), e.message),
            t.fg(Color::Red),
        )));
        if let Some(h) = &e.hint {
            lines.push(Line::from(format!("  hint: {h}")));
        }
    }
    if errors.len() > 3 {
        lines.push(Line::from(format!("({} earlier errors in the log)", errors.len() - 3)));
    }
    if let Some(c) = s.and_then(|s| s.on_sync.as_ref()) {
        lines.push(Line::from(format!("on_sync `{}`: {}", c.command, on_sync_cell(s.expect("a session")))));
        let room = (right.height as usize).saturating_sub(lines.len());
        let from = c.output.len().saturating_sub(room);
        lines.extend(c.output.iter().skip(from).map(|l| Line::from(format!("  {l}"))));
    }
    f.render_widget(Paragraph::new(lines).wrap(Wrap { trim: false }), right);
}

/// Why a session is not live yet, and since when; or that it is.
fn waiting(s: &SessionState, note: Option<&str>, now_ms: u64) -> String {
    let since = ago(now_ms, s.since_ms);
    match &s.agent {
        AgentState::Live => {
            format!("live for {since}{}", s.app.as_ref().map(|a| format!(", app {a}")).unwrap_or_default())
        }
        AgentState::Connecting => format!("waiting {since}: connecting to the agent"),
        AgentState::Injecting => format!("waiting {since}: copying the agent into the pod"),
        AgentState::Syncing => format!("initial sync, {since}"),
        AgentState::Waiting => format!("waiting {since}: another pod's first sync runs (they take turns)"),
        AgentState::Reconnecting { attempt, in_ms } => {
            let why = s.errors.back().map(|e| format!(" after: {}", e.message)).unwrap_or_default();
            format!("waiting {since}: reconnecting (attempt {attempt}, next in {in_ms} ms){why}")
        }
        AgentState::Error { message } => format!("stopped by an error: {message}"),
        AgentState::Stopped => "stopped".into(),
    }
    .to_string()
        + &note.map(|n| format!(" ({n})")).unwrap_or_default()
}

fn progress_bar(p: &crate::state::Progress, width: usize, _now_ms: u64) -> String {
    let frac = if p.bytes_total > 0 {
        p.bytes_done as f64 / p.bytes_total as f64
    } else if p.files_total > 0 {
        p.files_done as f64 / p.files_total as f64
    } else {
        0.0
    };
    let inner = width.saturating_sub(7).max(4);
    let full = ((frac * inner as f64) as usize).min(inner);
    format!("[{}{}] {:>3}%", "#".repeat(full), ".".repeat(inner - full), (frac * 100.0) as u32)
}

fn progress_text(p: &crate::state::Progress, now_ms: u64) -> [String; 3] {
    let secs = now_ms.saturating_sub(p.started_ms) as f64 / 1000.0;
    let rate = if secs > 0.0 { p.bytes_done as f64 / secs } else { 0.0 };
    let eta = if rate > 0.0 && p.bytes_total > p.bytes_done {
        format!(", ETA {:.0}s", (p.bytes_total - p.bytes_done) as f64 / rate)
    } else {
        String::new()
    };
    [
        format!("{}/{} files", p.files_done, p.files_total),
        format!("{} of {}", human_bytes(p.bytes_done), human_bytes(p.bytes_total)),
        format!("{}/s{eta}", human_bytes(rate as u64)),
    ]
}

/// HH:MM:SS in local time.
fn clock(at_ms: u64, offset_s: i64) -> String {
    let s = (at_ms / 1000) as i64 + offset_s;
    let d = s.rem_euclid(86_400);
    format!("{:02}:{:02}:{:02}", d / 3600, d / 60 % 60, d % 60)
}

fn draw_logs(f: &mut Frame, m: &Model, t: &Theme, area: Rect) {
    let title = match (m.filter.is_empty(), m.scroll) {
        (true, 0) => " Logs ".to_string(),
        (true, n) => format!(" Logs (scrolled up {n}; End follows) "),
        (false, 0) => format!(" Logs matching \"{}\" ", m.filter),
        (false, n) => format!(" Logs matching \"{}\" (scrolled up {n}) ", m.filter),
    };
    let block = Block::default().borders(Borders::ALL).title(title);
    let inner = block.inner(area);
    f.render_widget(block, area);
    let lines: Vec<&LogLine> = m.visible_logs().collect();
    let h = inner.height as usize;
    let end = lines.len().saturating_sub(m.scroll);
    let start = end.saturating_sub(h);
    let shown: Vec<Line> = lines[start..end].iter().map(|l| log_line(l, m, t)).collect();
    f.render_widget(Paragraph::new(shown), inner);
}

fn log_line<'a>(l: &'a LogLine, m: &Model, t: &Theme) -> Line<'a> {
    let mark = match l.source {
        Source::Devloop => "» ",
        Source::Command => "$ ",
        Source::App => "  ",
    };
    let style = match (l.source, l.level) {
        (_, Level::Error) => t.fg(Color::Red),
        (_, Level::Warn) => t.fg(Color::Yellow),
        (Source::Devloop, _) => t.fg(Color::Blue),
        _ => Style::default(),
    };
    Line::from(vec![
        Span::styled(format!("{} ", clock(l.at_ms, m.utc_offset_s)), t.fg(Color::DarkGray)),
        Span::raw(format!("{:<10} ", l.who)),
        Span::styled(format!("{mark}{}", l.text), style),
    ])
}

fn draw_help(f: &mut Frame, area: Rect) {
    let w = area.width.min(76);
    let h = (HELP.len() as u16 + 4).min(area.height);
    let r = Rect { x: area.x + (area.width - w) / 2, y: area.y + (area.height - h) / 2, width: w, height: h };
    let mut lines: Vec<Line> = HELP.iter().map(|(k, what)| Line::from(format!(" {k:<10} {what}"))).collect();
    lines.push(Line::from(""));
    lines.push(Line::from(" any key closes this help"));
    f.render_widget(Clear, r);
    f.render_widget(
        Paragraph::new(lines).wrap(Wrap { trim: false }).block(Block::default().borders(Borders::ALL).title(" Keys ")),
        r,
    );
}
