//! Task events to containerd, in order, from a thread of their own: the
//! publisher's ttrpc client blocks, and a slow containerd must not hold up
//! the task service.

use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc;
use containerd_shim::publisher::RemotePublisher;

/// How long one publish may take.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an event is retried while containerd is away.
const RECONNECT_FOR: Duration = Duration::from_secs(30);
/// How long the connection to containerd is kept without events.
const IDLE_CLOSE: Duration = Duration::from_secs(2);

/// A protobuf timestamp of `t`.
pub fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
        ..Default::default()
    }
}

/// One event for containerd.
pub enum Event {
    /// A task was created.
    Create(TaskCreate),
    /// A task's init started.
    Start(TaskStart),
    /// A process ended.
    Exit(TaskExit),
    /// A task was deleted.
    Delete(TaskDelete),
    /// The OOM killer killed a process of a task.
    Oom(TaskOOM),
    /// An exec was added.
    ExecAdded(TaskExecAdded),
    /// An exec started.
    ExecStarted(TaskExecStarted),
    /// A task was paused.
    Paused(TaskPaused),
    /// A task was resumed.
    Resumed(TaskResumed),
}

impl Event {
    fn into_parts(self) -> (&'static str, Box<dyn MessageDyn>) {
        match self {
            Event::Create(e) => (topics::TASK_CREATE_EVENT_TOPIC, Box::new(e)),
            Event::Start(e) => (topics::TASK_START_EVENT_TOPIC, Box::new(e)),
            Event::Exit(e) => (topics::TASK_EXIT_EVENT_TOPIC, Box::new(e)),
            Event::Delete(e) => (topics::TASK_DELETE_EVENT_TOPIC, Box::new(e)),
            Event::Oom(e) => (topics::TASK_OOM_EVENT_TOPIC, Box::new(e)),
            Event::ExecAdded(e) => (topics::TASK_EXEC_ADDED_EVENT_TOPIC, Box::new(e)),
            Event::ExecStarted(e) => (topics::TASK_EXEC_STARTED_EVENT_TOPIC, Box::new(e)),
            Event::Paused(e) => (topics::TASK_PAUSED_EVENT_TOPIC, Box::new(e)),
            Event::Resumed(e) => (topics::TASK_RESUMED_EVENT_TOPIC, Box::new(e)),
        }
    }
}

/// Sends events to containerd from a thread of its own.
pub struct Events {
    tx: std::sync::Mutex<Option<mpsc::Sender<Event>>>,
    done: std::sync::Mutex<Option<mpsc::Receiver<()>>>,
}

impl Events {
    /// Starts the publishing thread for `namespace`. With containerd's
    /// `ttrpc_address`, a publisher whose connection broke (containerd
    /// restarted) is replaced, for up to [`RECONNECT_FOR`] per event, and
    /// the connection is closed after [`IDLE_CLOSE`] without events and
    /// made again for the next: ttrpc's client polls its socket every
    /// 10 ms while it is open, which an idle pod should not pay for.
    pub fn start(
        publisher: RemotePublisher,
        namespace: String,
        ttrpc_address: Option<String>,
    ) -> Events {
        let (tx, rx) = mpsc::channel::<Event>();
        let (done_tx, done_rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("events".into())
            .spawn(move || {
                let mut publisher = Some(publisher);
                loop {
                    let event = match rx.recv_timeout(IDLE_CLOSE) {
                        Ok(e) => e,
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            // Nothing to send: let the connection go (its
                            // ttrpc client wakes every 10 ms while it
                            // exists) and make a new one for the next event.
                            if ttrpc_address.is_some() {
                                publisher = None;
                            }
                            match rx.recv() {
                                Ok(e) => e,
                                Err(_) => break,
                            }
                        }
                        Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    };
                    let (topic, msg) = event.into_parts();
                    let started = Instant::now();
                    loop {
                        if publisher.is_none() {
                            if let Some(address) = ttrpc_address.as_deref() {
                                match RemotePublisher::new(address) {
                                    Ok(p) => publisher = Some(p),
                                    Err(e) => tracing::debug!("connecting to {address}: {e}"),
                                }
                            }
                        }
                        let sent = match &publisher {
                            Some(p) => p
                                .publish(
                                    ttrpc::context::with_duration(PUBLISH_TIMEOUT),
                                    topic,
                                    &namespace,
                                    msg.clone_box(),
                                )
                                .map_err(|e| e.to_string()),
                            None => Err("no connection to containerd".to_owned()),
                        };
                        let Err(e) = sent else {
                            tracing::debug!("published {topic}");
                            break;
                        };
                        if ttrpc_address.is_none() || started.elapsed() >= RECONNECT_FOR {
                            tracing::warn!("publishing {topic}: {e}; event dropped");
                            break;
                        }
                        // containerd may be restarting: try a new connection.
                        tracing::debug!("publishing {topic}: {e}; reconnecting");
                        publisher = None;
                        std::thread::sleep(Duration::from_millis(500));
                    }
                }
                let _ = done_tx.send(());
            })
            .map_err(|e| tracing::error!("starting the events thread: {e}"))
            .ok();
        Events {
            tx: std::sync::Mutex::new(Some(tx)),
            done: std::sync::Mutex::new(Some(done_rx)),
        }
    }

    /// Queues `event`.
    pub fn send(&self, event: Event) {
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        match tx.as_ref() {
            Some(tx) => {
                if tx.send(event).is_err() {
                    tracing::warn!("the events thread is gone; event dropped");
                }
            }
            None => tracing::warn!("event after the shim closed its events"),
        }
    }

    /// Stops taking events and waits up to `timeout` for the queued ones
    /// to be sent.
    pub fn flush(&self, timeout: Duration) {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        let deadline = Instant::now() + timeout;
        if let Some(done) = self.done.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let left = deadline.saturating_duration_since(Instant::now());
            if done.recv_timeout(left).is_err() {
                tracing::warn!("events not all sent within {timeout:?}");
            }
        }
    }
}
