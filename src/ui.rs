//! The dashboard: `devloop watch` on a terminal. A subscriber of the hub
//! like the plain printer: it starts from the hub's state, follows the
//! events, and sends the keys' actions through the hub's command channel.
//!
//! The terminal is always given back: the [`Screen`] guard restores it
//! when the dashboard ends, however it ends (quit, Ctrl-C, SIGTERM, which
//! stop devloop and close the hub; a panic, which unwinds through it).
//! While it is up, stderr goes to a log file (child processes inherit it),
//! so nothing writes over the screen; its path is printed on exit.

pub mod model;
pub mod view;

pub use model::{Command, Model};
pub use view::draw;

use crate::events::{self, Format};
use crate::hub::Hub;
use ratatui::backend::CrosstermBackend;
use ratatui::crossterm::event::{Event as TermEvent, KeyEventKind};
use ratatui::Terminal;
use std::io::{self, IsTerminal, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast::error::RecvError, mpsc};
use tokio_util::sync::CancellationToken;

/// How often the clocks on screen ("12s ago", ETA) move on.
const TICK: Duration = Duration::from_millis(500);
/// How long events are taken in one go before the next frame: a burst (a
/// branch switch) is drawn a few times, not once per event, and a key
/// waits at most this long behind it.
const BURST: Duration = Duration::from_millis(4);

/// Whether `devloop watch` shows the dashboard: on a terminal, unless
/// asked not to.
pub fn wanted(no_tui: bool, json: bool) -> bool {
    !no_tui && !json && io::stdout().is_terminal() && io::stdin().is_terminal()
}

/// Colour unless `NO_COLOR` is set (https://no-color.org).
pub fn color() -> bool {
    std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Local time's offset from UTC now, in seconds.
pub fn utc_offset_s() -> i64 {
    let now = events::now_ms() as libc::time_t / 1000;
    // SAFETY: localtime_r writes the struct it is given and reads `now`.
    unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&now, &mut tm).is_null() {
            return 0;
        }
        tm.tm_gmtoff
    }
}

/// The terminal in raw mode on the alternate screen, with stderr sent to
/// the log file; restored on drop.
struct Screen {
    saved_stderr: Option<i32>,
}

impl Screen {
    fn enter(log: &std::fs::File) -> io::Result<Screen> {
        // SAFETY: dup and dup2 on descriptors this process owns; the saved
        // copy is put back (and closed) on drop.
        let saved_stderr = unsafe {
            let saved = libc::dup(2);
            if saved >= 0 && libc::dup2(log.as_raw_fd(), 2) >= 0 {
                Some(saved)
            } else {
                None
            }
        };
        let screen = Screen { saved_stderr };
        ratatui::crossterm::terminal::enable_raw_mode()?;
        ratatui::crossterm::execute!(
            io::stdout(),
            ratatui::crossterm::terminal::EnterAlternateScreen,
            ratatui::crossterm::cursor::Hide
        )?;
        Ok(screen)
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        let _ = ratatui::crossterm::execute!(
            io::stdout(),
            ratatui::crossterm::terminal::LeaveAlternateScreen,
            ratatui::crossterm::cursor::Show
        );
        let _ = ratatui::crossterm::terminal::disable_raw_mode();
        if let Some(fd) = self.saved_stderr.take() {
            // SAFETY: `fd` is the copy of stderr made in `enter`.
            unsafe {
                libc::dup2(fd, 2);
                libc::close(fd);
            }
        }
    }
}

/// Reads the terminal's events on a thread of its own (crossterm's read
/// blocks) until `stop`.
fn read_terminal(tx: mpsc::UnboundedSender<TermEvent>, stop: Arc<AtomicBool>) {
    std::thread::Builder::new()
        .name("devloop-keys".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match ratatui::crossterm::event::poll(Duration::from_millis(100)) {
                    Ok(true) => match ratatui::crossterm::event::read() {
                        Ok(ev) => {
                            if tx.send(ev).is_err() {
                                return;
                            }
                        }
                        Err(_) => return,
                    },
                    Ok(false) => {}
                    Err(_) => return,
                }
            }
        })
        .map(drop)
        .unwrap_or_else(|e| eprintln!("devloop: cannot read keys: {e}"));
}

/// Where the dashboard's run logs: `.devloop/watch.log` beside the config.
pub fn log_path(config: &Path) -> PathBuf {
    config.parent().unwrap_or(Path::new(".")).join(".devloop").join("watch.log")
}

/// Runs the dashboard until the hub closes (devloop stopped). `cancel`
/// stops devloop (the quit key). Returns the log file's path.
pub async fn run(hub: Hub, title: String, log: PathBuf, cancel: CancellationToken) -> io::Result<PathBuf> {
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let file = std::fs::File::create(&log)?;
    let Some((state, mut rx)) = hub.subscribe().await else { return Ok(log) };
    // Every event as a plain line in the log too: what scrolled away, and
    // what to attach to a bug report.
    if let Some((_, file_rx)) = hub.subscribe().await {
        let out = file.try_clone()?;
        tokio::spawn(events::print_to(file_rx, Format::Plain, out));
    }
    let screen = Screen::enter(&file)?;
    let mut term = Terminal::new(CrosstermBackend::new(io::stdout()))?;
    term.clear()?;
    let (key_tx, mut keys) = mpsc::unbounded_channel();
    let stop = Arc::new(AtomicBool::new(false));
    read_terminal(key_tx, stop.clone());
    let mut model = Model::new(state, &title, color(), events::now_ms(), utc_offset_s());
    let mut tick = tokio::time::interval(TICK);
    // A frame after every wake-up: a key, a burst of events, or the tick.
    let result = loop {
        model.now_ms = events::now_ms();
        if let Err(e) = term.draw(|f| draw(f, &model)) {
            break Err(e);
        }
        // Tests: a dashboard that panics must still give the terminal back.
        if devloop_agent::fault::hit("ui-panic")
            && model
                .state
                .services
                .values()
                .flat_map(|s| s.sessions.values())
                .any(|s| s.agent == crate::state::AgentState::Live)
        {
            panic!("injected fault: ui-panic");
        }
        tokio::select! {
            biased;
            Some(k) = keys.recv() => {
                if let TermEvent::Key(k) = k {
                    if k.kind != KeyEventKind::Press {
                        continue;
                    }
                    match model.key(k) {
                        Some(Command::Quit) => {
                            model.status = Some("stopping: every service ends, and what devloop changed is put back…".into());
                            cancel.cancel();
                        }
                        Some(Command::Act { service, pod, kind }) => {
                            // The answer comes back as an `action_done` event.
                            let hub = hub.clone();
                            tokio::spawn(async move { hub.act(&service, pod.as_deref(), kind).await });
                        }
                        None => {}
                    }
                }
            }
            r = rx.recv() => {
                match r {
                    Ok(ev) => {
                        model.apply(&ev);
                        let t0 = std::time::Instant::now();
                        while t0.elapsed() < BURST {
                            match rx.try_recv() {
                                Ok(ev) => model.apply(&ev),
                                Err(_) => break,
                            }
                        }
                    }
                    // Behind: start again from a fresh snapshot (the log
                    // keeps what it had, and says what it missed).
                    Err(RecvError::Lagged(n)) => match hub.subscribe().await {
                        Some((state, new_rx)) => {
                            model.state = state;
                            model.status = Some(format!("the dashboard fell behind by {n} events; caught up"));
                            rx = new_rx;
                        }
                        None => break Ok(()),
                    },
                    Err(RecvError::Closed) => break Ok(()),
                }
            }
            _ = tick.tick() => {}
        }
    };
    stop.store(true, Ordering::Relaxed);
    drop(term);
    drop(screen);
    let _ = io::stderr().flush();
    result.map(|()| log)
}
