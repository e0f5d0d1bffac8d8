//! Long-lived work as named tasks under one owner: [`Tasks`] starts them
//! under a cancellation token, joins them, and reports a task that
//! panicked, by name, with its message (an `error` event, not a silent
//! end).

use crate::events::{Kind, Reporter};
use std::collections::HashMap;
use std::future::Future;
use tokio::task::{Id, JoinError, JoinSet};
use tokio_util::sync::CancellationToken;

/// Tasks with names, cancelled together.
pub struct Tasks<T> {
    set: JoinSet<T>,
    names: HashMap<Id, String>,
    cancel: CancellationToken,
    rep: Reporter,
}

impl<T: Send + 'static> Tasks<T> {
    /// Tasks cancelled by `cancel` (and by [`Tasks::shutdown`]); panics are
    /// reported through `rep`.
    pub fn new(cancel: CancellationToken, rep: Reporter) -> Tasks<T> {
        Tasks { set: JoinSet::new(), names: HashMap::new(), cancel, rep }
    }

    /// The token the tasks watch: a task ends when it is cancelled.
    pub fn token(&self) -> &CancellationToken {
        &self.cancel
    }

    pub fn spawn(&mut self, name: impl Into<String>, task: impl Future<Output = T> + Send + 'static) {
        let h = self.set.spawn(task);
        self.names.insert(h.id(), name.into());
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    /// The next task to end: its name, and what it returned (None if it
    /// panicked, which is reported, or was aborted). None when no task is
    /// left.
    pub async fn next(&mut self) -> Option<(String, Option<T>)> {
        let r = self.set.join_next_with_id().await?;
        Some(self.ended(r))
    }

    fn ended(&mut self, r: Result<(Id, T), JoinError>) -> (String, Option<T>) {
        match r {
            Ok((id, v)) => (self.names.remove(&id).unwrap_or_default(), Some(v)),
            Err(e) => {
                let name = self.names.remove(&e.id()).unwrap_or_default();
                if e.is_panic() {
                    report_panic(&self.rep, &name, &*e.into_panic());
                }
                (name, None)
            }
        }
    }

    /// Cancels every task and waits for them all to end.
    pub async fn shutdown(mut self) -> Vec<(String, Option<T>)> {
        self.cancel.cancel();
        let mut out = Vec::new();
        while let Some(r) = self.set.join_next_with_id().await {
            out.push(self.ended(r));
        }
        out
    }
}

/// Reports a panic of the task `name` as an error event.
pub fn report_panic(rep: &Reporter, name: &str, payload: &(dyn std::any::Any + Send)) {
    let message = devloop_agent::index::panic_message(payload);
    rep.send(Kind::Error {
        message: format!("{name} panicked: {message}"),
        hint: Some("this is a bug in devloop: please report it with the lines above".into()),
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A task that panics is reported by its name, with the message; the
    /// others are cancelled and joined by shutdown.
    #[tokio::test]
    async fn a_panicking_task_is_reported_by_name_and_the_rest_are_cancelled() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let rep = Reporter::new("web", tx);
        let mut tasks: Tasks<u32> = Tasks::new(CancellationToken::new(), rep);
        tasks.spawn("sync of web", async { panic!("boom") });
        let token = tasks.token().clone();
        tasks.spawn("logs of web", async move {
            token.cancelled().await;
            7
        });
        let (name, value) = tasks.next().await.unwrap();
        assert_eq!((name.as_str(), value), ("sync of web", None));
        let ev = rx.try_recv().unwrap();
        assert!(matches!(&ev.kind, Kind::Error { message, .. } if message == "sync of web panicked: boom"), "{ev:?}");
        let rest = tasks.shutdown().await;
        assert_eq!(rest, vec![("logs of web".to_string(), Some(7))]);
    }
}
