//! A job's event stream: `log` lines, `metrics` records and `status` changes, each with a
//! sequence number that is monotonic per job. Every event is written to the database first and
//! then broadcast, so a reader that subscribes and then reads the history misses nothing; the
//! per-job writer lock makes "update the job row + record its status event" one step as seen by
//! readers. `stream` turns that into what the SSE endpoint sends: history after `Last-Event-ID`,
//! then live events, ending after the job's final status.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use futures_util::Stream;
use serde::Serialize;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::sync::OwnedMutexGuard;
use whet_shared::api::StatusEvent;

use crate::db::{status, EventRow, Store};

pub use whet_shared::api::{LOG_EVENT as LOG, METRICS_EVENT as METRICS, STATUS_EVENT as STATUS};

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobEvent {
    pub seq: i64,
    pub kind: String,
    /// JSON text.
    pub data: String,
}

impl JobEvent {
    /// A `status` event whose status is final: nothing follows it.
    pub fn is_final(&self) -> bool {
        self.kind == STATUS
            && serde_json::from_str::<StatusEvent>(&self.data)
                .is_ok_and(|event| event.status.is_terminal())
    }
}

impl From<EventRow> for JobEvent {
    fn from(row: EventRow) -> Self {
        JobEvent {
            seq: row.seq,
            kind: row.kind,
            data: row.data,
        }
    }
}

struct Channel {
    /// The next sequence number, read from the database when the channel is made.
    next_seq: Arc<tokio::sync::Mutex<Option<i64>>>,
    sender: broadcast::Sender<JobEvent>,
}

/// Live channels of the jobs that have them (running, or just written to).
#[derive(Clone)]
pub struct EventHub {
    store: Store,
    channels: Arc<Mutex<HashMap<i64, Arc<Channel>>>>,
}

/// Holds the job's writer lock: events published through it get consecutive numbers, and
/// database changes made while holding it are seen by readers together with those events.
pub struct EventWriter {
    job_id: i64,
    store: Store,
    next_seq: OwnedMutexGuard<Option<i64>>,
    sender: broadcast::Sender<JobEvent>,
}

impl EventWriter {
    /// `data` is one of whet-shared's `api` event types (or a metrics record).
    pub async fn publish(
        &mut self,
        kind: &str,
        data: &(impl Serialize + Sync),
    ) -> sqlx::Result<JobEvent> {
        let seq = match *self.next_seq {
            Some(seq) => seq,
            None => self.store.last_event_seq(self.job_id).await? + 1,
        };
        let event = JobEvent {
            seq,
            kind: kind.to_string(),
            // These types always serialise (string keys only).
            data: serde_json::to_string(data).unwrap_or_default(),
        };
        self.store
            .insert_event(self.job_id, seq, kind, &event.data)
            .await?;
        *self.next_seq = Some(seq + 1);
        // No receiver is fine: nobody is watching.
        let _ = self.sender.send(event.clone());
        Ok(event)
    }
}

impl EventHub {
    pub fn new(store: Store) -> EventHub {
        EventHub {
            store,
            channels: Arc::default(),
        }
    }

    fn channel(&self, job_id: i64) -> Arc<Channel> {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        channels
            .entry(job_id)
            .or_insert_with(|| {
                Arc::new(Channel {
                    next_seq: Arc::new(tokio::sync::Mutex::new(None)),
                    sender: broadcast::channel(1024).0,
                })
            })
            .clone()
    }

    pub async fn writer(&self, job_id: i64) -> EventWriter {
        let channel = self.channel(job_id);
        EventWriter {
            job_id,
            store: self.store.clone(),
            next_seq: channel.next_seq.clone().lock_owned().await,
            sender: channel.sender.clone(),
        }
    }

    /// One event, on its own.
    pub async fn publish(
        &self,
        job_id: i64,
        kind: &str,
        data: &(impl Serialize + Sync),
    ) -> sqlx::Result<JobEvent> {
        self.writer(job_id).await.publish(kind, data).await
    }

    /// Drops the job's live channel once its final event is out: live readers drain and end.
    pub fn close(&self, job_id: i64) {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        channels.remove(&job_id);
    }

    /// The job's events after `after`: history first, then live ones; ends after the final
    /// status. `None` if there is no such job.
    pub async fn stream(
        &self,
        job_id: i64,
        after: i64,
    ) -> sqlx::Result<Option<impl Stream<Item = JobEvent> + Send + 'static>> {
        if self.store.job(job_id).await?.is_none() {
            return Ok(None);
        }
        // Under the writer lock nothing is half-written: the history and the job row agree, and
        // the subscription starts exactly where the history ends.
        let writer = self.writer(job_id).await;
        let receiver = writer.sender.subscribe();
        let Some(job) = self.store.job(job_id).await? else {
            return Ok(None);
        };
        let history: VecDeque<JobEvent> = self
            .store
            .events_after(job_id, after)
            .await?
            .into_iter()
            .map(JobEvent::from)
            .collect();
        drop(writer);
        if status::is_terminal(&job.status) {
            // Nothing will be written any more; don't keep a channel for it.
            self.close(job_id);
        }
        // A finished job whose final event the client already has: nothing more will come.
        let closed = status::is_terminal(&job.status) && !history.iter().any(JobEvent::is_final);
        let cursor = Cursor {
            job_id,
            store: self.store.clone(),
            last: after,
            pending: history,
            receiver,
            closed,
        };
        Ok(Some(futures_util::stream::unfold(cursor, Cursor::next)))
    }
}

struct Cursor {
    job_id: i64,
    store: Store,
    /// The last sequence number sent.
    last: i64,
    pending: VecDeque<JobEvent>,
    receiver: broadcast::Receiver<JobEvent>,
    /// No more live events will come: end when `pending` is drained.
    closed: bool,
}

impl Cursor {
    async fn next(mut self) -> Option<(JobEvent, Cursor)> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                if event.seq <= self.last {
                    continue;
                }
                self.last = event.seq;
                if event.is_final() {
                    self.pending.clear();
                    self.closed = true;
                }
                return Some((event, self));
            }
            if self.closed {
                return None;
            }
            match self.receiver.recv().await {
                Ok(event) if event.seq <= self.last => {}
                Ok(event) if event.seq == self.last + 1 => self.pending.push_back(event),
                // A gap (we lagged behind the live channel): catch up from the database, where
                // every broadcast event already is.
                Ok(_) | Err(RecvError::Lagged(_)) => self.catch_up().await?,
                Err(RecvError::Closed) => {
                    self.catch_up().await?;
                    self.closed = true;
                }
            }
        }
    }

    async fn catch_up(&mut self) -> Option<()> {
        match self.store.events_after(self.job_id, self.last).await {
            Ok(rows) => {
                self.pending.extend(rows.into_iter().map(JobEvent::from));
                Some(())
            }
            Err(e) => {
                eprintln!("whet-server: reading events of job {}: {e}", self.job_id);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;
    use serde_json::json;

    use super::*;

    async fn hub_with_job() -> (Store, EventHub, i64) {
        let store = Store::open("sqlite::memory:").await.unwrap();
        let id = store.allocate_job_id();
        store.insert_job(id, "{}", 0).await.unwrap();
        (store.clone(), EventHub::new(store), id)
    }

    async fn finish(store: &Store, hub: &EventHub, id: i64) {
        let mut writer = hub.writer(id).await;
        store
            .finish(id, status::SUCCEEDED, Some(0), 1)
            .await
            .unwrap();
        writer
            .publish(STATUS, &json!({"status": "succeeded"}))
            .await
            .unwrap();
        drop(writer);
        hub.close(id);
    }

    #[tokio::test]
    async fn a_reader_that_falls_behind_catches_up_from_the_database() {
        let (store, hub, id) = hub_with_job().await;
        let stream = hub.stream(id, 0).await.unwrap().unwrap();
        // More than the live channel holds, before the reader reads anything.
        for i in 0..1500 {
            hub.publish(id, LOG, &json!({"line": i})).await.unwrap();
        }
        finish(&store, &hub, id).await;
        let events: Vec<JobEvent> = stream.collect().await;
        let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=1501).collect::<Vec<_>>());
        assert!(events.last().unwrap().is_final());
    }

    #[tokio::test]
    async fn history_then_live_without_gaps_or_repeats() {
        let (store, hub, id) = hub_with_job().await;
        for i in 0..3 {
            hub.publish(id, LOG, &json!({"line": i})).await.unwrap();
        }
        let mut stream = Box::pin(hub.stream(id, 1).await.unwrap().unwrap());
        assert_eq!(stream.next().await.unwrap().seq, 2);
        hub.publish(id, METRICS, &json!({"loss": 1.0}))
            .await
            .unwrap();
        assert_eq!(stream.next().await.unwrap().seq, 3);
        let live = stream.next().await.unwrap();
        assert_eq!((live.seq, live.kind.as_str()), (4, METRICS));
        finish(&store, &hub, id).await;
        assert!(stream.next().await.unwrap().is_final());
        assert!(
            stream.next().await.is_none(),
            "the stream ends after the final status"
        );
        assert!(hub.stream(999, 0).await.unwrap().is_none(), "no such job");
    }
}
