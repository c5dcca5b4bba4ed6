//! The executor: runs queued jobs as `whet sft --config <run dir>/job.json` child processes.
//!
//! * Order and capacity: the oldest queued job starts first (later jobs wait behind it), at
//!   most `max_concurrent_jobs` at once, each with the devices it needs from the pool
//!   (`nproc_per_node`, default 1; none when the server has no `--devices`, or the job asks for
//!   CPU with `cuda_visible_devices: ""`). CUDA_VISIBLE_DEVICES is set to the assigned devices
//!   (a `whet` built without CUDA refuses such a job before any work: its reason is in the log);
//!   the script's own variables (`launch.env`, minus those `paths` refuses) are passed on, and
//!   an outer launcher's (RANK, MASTER_PORT, NPROC_PER_NODE, ...) never reach the child.
//! * Ranks: a job with `nproc_per_node` N > 1 is still one child, `whet sft` as the launcher
//!   of N rank processes (on its N devices, or N CPU ranks when the pool is empty); their lines
//!   arrive prefixed `[rank k]`. Jobs run on this machine only: `nnodes` > 1 is refused.
//! * Master port: a multi-rank job whose config keeps torchrun's default 29500 (a config cannot
//!   say "unset", so the default means "any port" here) gets a port that is free now, one no
//!   other running job of this server holds, written into its `job.json` as `master_port`;
//!   another value is the user's choice and is kept. The port is named in the job's log.
//! * Where runs write: `<data dir>/runs/<id>/` holds `job.json` (the config with `output_dir`
//!   forced to `<run dir>/output`), `job.log` (stdout and stderr) and the output folder.
//! * What is recorded: every output line as a `log` event, every logging.jsonl record as a
//!   `metrics` event (and the job's last metrics), status changes as `status` events; exit code
//!   and times on the job row.
//! * Process control: the child leads its own process group; cancel sends SIGTERM to the group,
//!   then SIGKILL after the grace period. The child is killed if the server dies (Linux
//!   PR_SET_PDEATHSIG), and a restarted server marks such jobs `interrupted`. A launcher's ranks
//!   lead groups of their own: the launcher forwards the SIGTERM to each and waits for them,
//!   and a SIGKILLed launcher takes them with it (their PR_SET_PDEATHSIG), so cancel ends
//!   every rank either way.
//!
//! Arguments are a vector and nothing from a config reaches a shell.

use std::collections::{BTreeSet, HashMap};
use std::net::{Ipv4Addr, Ipv6Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncSeekExt, AsyncWriteExt, BufReader};
use tokio::process::Command;
use tokio::sync::{watch, Notify};
use whet_shared::api::{JobStatus, LogEvent, LogStream, StatusEvent};
use whet_shared::config::LaunchConfig;
use whet_shared::{Diagnostic, JobConfig};

use crate::db::{status, JobRow, Store};
use crate::events::{self, EventHub};
use crate::ids::now_ms;
use crate::paths::LAUNCHER_ENV;

#[derive(Debug, Clone)]
pub struct ExecutorSettings {
    pub whet_bin: PathBuf,
    pub data_dir: PathBuf,
    /// The device pool; empty = every job runs on CPU.
    pub devices: Vec<u32>,
    pub max_concurrent_jobs: usize,
    /// Between SIGTERM and SIGKILL when a job is cancelled.
    pub cancel_grace: Duration,
    /// How often a running job's logging.jsonl is read for new records.
    pub metrics_poll: Duration,
}

/// What `cancel` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelOutcome {
    /// It was queued and is now cancelled.
    Cancelled,
    /// It is running; SIGTERM is on its way and the job ends `cancelled`.
    Cancelling,
    /// It had already ended with this status.
    AlreadyFinished(String),
    NotFound,
}

#[derive(Clone)]
pub struct Executor {
    inner: Arc<Inner>,
}

struct Inner {
    settings: ExecutorSettings,
    store: Store,
    events: EventHub,
    wake: Notify,
    pool: Mutex<Pool>,
}

#[derive(Default)]
struct Pool {
    free: BTreeSet<u32>,
    running: HashMap<i64, watch::Sender<bool>>,
    /// The master ports this server chose for its running jobs.
    master_ports: HashMap<i64, u16>,
}

impl Pool {
    /// A port free on every interface now that no running job of ours was given (bind port 0
    /// where the launcher will bind its store, read the port, let it go). Racy by nature:
    /// another program may take it before the job's launcher binds it, which then exits before
    /// starting any rank, naming the port (the job fails with that in its log).
    fn take_master_port(&mut self, id: i64) -> std::io::Result<u16> {
        for _ in 0..16 {
            let listener = TcpListener::bind((Ipv6Addr::UNSPECIFIED, 0))
                .or_else(|_| TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)))?;
            let port = listener.local_addr()?.port();
            if !self.master_ports.values().any(|&taken| taken == port) {
                self.master_ports.insert(id, port);
                return Ok(port);
            }
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "no free TCP port for the job's store after 16 tries",
        ))
    }
}

impl Executor {
    pub fn new(settings: ExecutorSettings, store: Store, events: EventHub) -> Executor {
        let pool = Pool {
            free: settings.devices.iter().copied().collect(),
            ..Pool::default()
        };
        Executor {
            inner: Arc::new(Inner {
                settings,
                store,
                events,
                wake: Notify::new(),
                pool: Mutex::new(pool),
            }),
        }
    }

    pub fn settings(&self) -> &ExecutorSettings {
        &self.inner.settings
    }

    /// Devices a job needs from the pool.
    pub fn devices_needed(&self, config: &JobConfig) -> usize {
        if self.inner.settings.devices.is_empty()
            || config.launch.cuda_visible_devices.as_deref() == Some("")
        {
            0
        } else {
            config.launch.nproc_per_node.unwrap_or(1).max(1) as usize
        }
    }

    /// Why this server cannot run a job (empty when it can): it needs more devices than the
    /// pool has, or more than one node (every rank of a job runs on this machine).
    pub fn refusals(&self, config: &JobConfig) -> Vec<Diagnostic> {
        let mut found = Vec::new();
        let need = self.devices_needed(config);
        let have = self.inner.settings.devices.len();
        if need > have {
            found.push(
                Diagnostic::error(
                    "nproc_per_node",
                    "not_enough_devices",
                    format!("the job needs {need} devices and this server has {have}"),
                    format!("该任务需要 {need} 个设备，而服务器只有 {have} 个"),
                )
                .with_fix(
                    format!(
                        "use at most {have} processes, or start whet-server with more --devices"
                    ),
                    format!("最多使用 {have} 个进程，或用更多 --devices 启动 whet-server"),
                ),
            );
        }
        let nnodes = config.launch.nnodes;
        if nnodes > 1 {
            found.push(
                Diagnostic::error(
                    "nnodes",
                    "multi_node_not_served",
                    format!("nnodes is {nnodes}: this server runs every rank of a job on its own machine, so a job has one node"),
                    format!("nnodes 为 {nnodes}：服务器在本机运行任务的全部进程，任务只能有一个节点"),
                )
                .with_fix(
                    "set nnodes to 1 and nproc_per_node to the ranks wanted, or run `whet sft` on each machine yourself",
                    "将 nnodes 设为 1 并用 nproc_per_node 指定进程数，或在每台机器上自行运行 `whet sft`",
                ),
            );
        }
        found
    }

    /// Marks jobs a dead server left `running` as `interrupted` (call once, before `start`).
    pub async fn recover(&self) -> anyhow::Result<Vec<i64>> {
        let ids = self.inner.store.running_jobs().await?;
        for &id in &ids {
            self.finish(id, JobStatus::Interrupted, None).await?;
        }
        Ok(ids)
    }

    /// Starts the scheduling loop.
    pub fn start(&self) -> tokio::task::JoinHandle<()> {
        let executor = self.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = executor.start_ready_jobs().await {
                    eprintln!("whet-server: scheduling jobs: {e:#}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                executor.inner.wake.notified().await;
            }
        })
    }

    /// Cancels a queued job at once, or asks a running one to stop (SIGTERM, then SIGKILL
    /// after the grace period; it then ends `cancelled`).
    pub async fn cancel(&self, id: i64) -> anyhow::Result<CancelOutcome> {
        let inner = &self.inner;
        {
            let mut writer = inner.events.writer(id).await;
            if inner.store.cancel_queued(id, now_ms()).await? {
                writer
                    .publish(
                        events::STATUS,
                        &StatusEvent::finished(JobStatus::Cancelled, None),
                    )
                    .await?;
                drop(writer);
                inner.events.close(id);
                return Ok(CancelOutcome::Cancelled);
            }
        }
        if let Some(cancel) = inner
            .pool
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .running
            .get(&id)
        {
            cancel.send_replace(true);
            return Ok(CancelOutcome::Cancelling);
        }
        Ok(match inner.store.job(id).await? {
            None => {
                inner.events.close(id);
                CancelOutcome::NotFound
            }
            Some(job) => {
                // Ended: no live channel is needed (the writer above made one).
                if status::is_terminal(&job.status) {
                    inner.events.close(id);
                }
                CancelOutcome::AlreadyFinished(job.status)
            }
        })
    }

    /// A job was queued or ended: look at the queue again.
    pub fn wake(&self) {
        self.inner.wake.notify_one();
    }

    async fn start_ready_jobs(&self) -> anyhow::Result<()> {
        let inner = &self.inner;
        while let Some(job) = inner.store.oldest_queued().await? {
            let config: JobConfig = match serde_json::from_str(&job.config) {
                Ok(config) => config,
                Err(e) => {
                    let why = format!("its stored config cannot be read ({e})");
                    self.fail_unstartable(&job, &why).await?;
                    continue;
                }
            };
            // Admitted jobs pass; one stored by an older server might not.
            if let Some(refusal) = self.refusals(&config).first() {
                self.fail_unstartable(&job, &refusal.message_en).await?;
                continue;
            }
            let need = self.devices_needed(&config);
            let (devices, cancel) = {
                let mut pool = inner.pool.lock().unwrap_or_else(|e| e.into_inner());
                if pool.running.len() >= inner.settings.max_concurrent_jobs
                    || pool.free.len() < need
                {
                    return Ok(());
                }
                let devices: Vec<u32> = pool.free.iter().copied().take(need).collect();
                for d in &devices {
                    pool.free.remove(d);
                }
                // Registered before the job is marked running, so a cancel never misses it.
                let (cancel, cancelled) = watch::channel(false);
                pool.running.insert(job.id, cancel);
                (devices, cancelled)
            };
            let run_dir = inner
                .settings
                .data_dir
                .join("runs")
                .join(job.id.to_string());
            let device_list = join_devices(&devices);
            let started = async {
                let mut writer = inner.events.writer(job.id).await;
                let started = inner
                    .store
                    .mark_running(job.id, &device_list, &run_dir.to_string_lossy(), now_ms())
                    .await?;
                if started {
                    writer
                        .publish(events::STATUS, &StatusEvent::running(device_list.clone()))
                        .await?;
                }
                Ok::<bool, sqlx::Error>(started)
            };
            match started.await {
                Ok(true) => {}
                Ok(false) => {
                    // Cancelled while we were picking it.
                    self.release(job.id, &devices);
                    continue;
                }
                Err(e) => {
                    self.release(job.id, &devices);
                    // Never leave a job marked running with nothing running it.
                    if let Ok(Some(row)) = inner.store.job(job.id).await {
                        if row.status == status::RUNNING {
                            let _ = self.finish(job.id, JobStatus::Failed, None).await;
                        }
                    }
                    return Err(anyhow::Error::from(e).context("marking a job running"));
                }
            }
            let executor = self.clone();
            tokio::spawn(async move {
                executor.run(job, config, run_dir, devices, cancel).await;
            });
        }
        Ok(())
    }

    async fn fail_unstartable(&self, job: &JobRow, why: &str) -> anyhow::Result<()> {
        let line = format!("whet-server: job {} cannot start: {why}", job.id);
        self.inner
            .events
            .publish(job.id, events::LOG, &server_line(line))
            .await?;
        self.finish(job.id, JobStatus::Failed, None).await
    }

    fn release(&self, id: i64, devices: &[u32]) {
        let mut pool = self.inner.pool.lock().unwrap_or_else(|e| e.into_inner());
        pool.running.remove(&id);
        pool.master_ports.remove(&id);
        pool.free.extend(devices.iter().copied());
    }

    /// Records the final status (row and event together) and closes the job's live channel.
    async fn finish(
        &self,
        id: i64,
        final_status: JobStatus,
        exit_code: Option<i64>,
    ) -> anyhow::Result<()> {
        let inner = &self.inner;
        {
            let mut writer = inner.events.writer(id).await;
            inner
                .store
                .finish(id, final_status.as_str(), exit_code, now_ms())
                .await?;
            writer
                .publish(
                    events::STATUS,
                    &StatusEvent::finished(final_status, exit_code),
                )
                .await?;
        }
        inner.events.close(id);
        Ok(())
    }

    async fn run(
        &self,
        job: JobRow,
        config: JobConfig,
        run_dir: PathBuf,
        devices: Vec<u32>,
        mut cancel: watch::Receiver<bool>,
    ) {
        let id = job.id;
        let (final_status, exit_code) = match self
            .run_child(id, config, &run_dir, &devices, &mut cancel)
            .await
        {
            Ok(outcome) => outcome,
            Err(e) => {
                let line = format!("whet-server: the job could not run: {e:#}");
                let _ = self
                    .inner
                    .events
                    .publish(id, events::LOG, &server_line(line))
                    .await;
                let final_status = if *cancel.borrow() {
                    JobStatus::Cancelled
                } else {
                    JobStatus::Failed
                };
                (final_status, None)
            }
        };
        if let Err(e) = self.finish(id, final_status, exit_code).await {
            eprintln!("whet-server: recording the end of job {id}: {e:#}");
        }
        self.release(id, &devices);
        self.wake();
    }

    async fn run_child(
        &self,
        id: i64,
        mut config: JobConfig,
        run_dir: &Path,
        devices: &[u32],
        cancel: &mut watch::Receiver<bool>,
    ) -> anyhow::Result<(JobStatus, Option<i64>)> {
        let settings = &self.inner.settings;
        let output_dir = crate::runs::output_dir(run_dir);
        tokio::fs::create_dir_all(&output_dir)
            .await
            .with_context(|| format!("creating {}", output_dir.display()))?;
        let device_list = join_devices(devices);
        config.sft.output_dir = Some(output_dir.to_string_lossy().into_owned());
        config.launch.cuda_visible_devices = Some(device_list.clone());
        if let Some(line) = self.settle_master_port(id, &mut config.launch)? {
            self.inner
                .events
                .publish(id, events::LOG, &server_line(line))
                .await?;
        }
        let job_json = run_dir.join("job.json");
        let text = whet_shared::to_config_text(&config, whet_shared::Format::Json, false);
        tokio::fs::write(&job_json, text)
            .await
            .with_context(|| format!("writing {}", job_json.display()))?;
        if *cancel.borrow() {
            return Ok((JobStatus::Cancelled, None));
        }

        let mut command = Command::new(&settings.whet_bin);
        command
            .arg("sft")
            .arg("--config")
            .arg(&job_json)
            // The script's own variables (NCCL_*, ...; `paths` refused the dangerous ones), then
            // the server's, which win.
            .envs(&config.launch.env)
            .env("CUDA_VISIBLE_DEVICES", &device_list)
            .env_remove("WHET_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        // The job's config alone says how many ranks run and where they meet.
        for var in LAUNCHER_ENV {
            command.env_remove(var);
        }
        die_with_parent(&mut command);
        let mut child = command
            .spawn()
            .with_context(|| format!("starting `{}`", settings.whet_bin.display()))?;
        let pid = child.id().map(|p| p as i32);

        let log_file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(run_dir.join("job.log"))
            .await?;
        let log_file = Arc::new(tokio::sync::Mutex::new(log_file));
        let mut readers = tokio::task::JoinSet::new();
        if let Some(stdout) = child.stdout.take() {
            readers.spawn(
                self.clone()
                    .pump_lines(id, LogStream::Stdout, stdout, log_file.clone()),
            );
        }
        if let Some(stderr) = child.stderr.take() {
            readers.spawn(
                self.clone()
                    .pump_lines(id, LogStream::Stderr, stderr, log_file.clone()),
            );
        }
        let (stop_tail, tail_stopped) = watch::channel(false);
        let tail = tokio::spawn(self.clone().tail_metrics(id, output_dir, tail_stopped));

        let mut cancelled = false;
        let exit = tokio::select! {
            exit = child.wait() => exit?,
            _ = cancel_requested(cancel) => {
                cancelled = true;
                signal_group(pid, libc::SIGTERM);
                match tokio::time::timeout(settings.cancel_grace, child.wait()).await {
                    Ok(exit) => exit?,
                    Err(_) => {
                        signal_group(pid, libc::SIGKILL);
                        child.wait().await?
                    }
                }
            }
        };
        if cancelled {
            // Whatever the child left behind in its group goes too.
            signal_group(pid, libc::SIGKILL);
        }
        // Output ends when every holder of the pipes has exited; don't wait forever on an
        // orphan that keeps them open.
        let drained = tokio::time::timeout(Duration::from_secs(5), async {
            while readers.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            readers.abort_all();
        }
        let _ = stop_tail.send(true);
        let _ = tail.await;

        let exit_code = exit.code().map(i64::from);
        let summary = match (exit.code(), signal_of(&exit)) {
            (Some(code), _) => format!("whet-server: `whet sft` exited with code {code}"),
            (None, Some(signal)) => {
                format!("whet-server: `whet sft` was killed by signal {signal}")
            }
            (None, None) => "whet-server: `whet sft` ended".to_string(),
        };
        self.inner
            .events
            .publish(id, events::LOG, &server_line(summary))
            .await?;
        let final_status = if cancelled {
            JobStatus::Cancelled
        } else if exit.success() {
            JobStatus::Succeeded
        } else {
            JobStatus::Failed
        };
        Ok((final_status, exit_code))
    }

    /// Gives a multi-rank job the port its ranks meet on (see the module's "Master port") and
    /// says which in a line for its log; `None` for a one-process job.
    fn settle_master_port(
        &self,
        id: i64,
        launch: &mut LaunchConfig,
    ) -> anyhow::Result<Option<String>> {
        let ranks = launch.nproc_per_node.unwrap_or(1);
        if ranks <= 1 {
            return Ok(None);
        }
        let whose = if server_chooses_master_port(launch) {
            let port = self
                .inner
                .pool
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take_master_port(id)
                .context("choosing a free master_port for the job's ranks")?;
            launch.master_port = i64::from(port);
            "a free port the server chose; set master_port to choose one"
        } else {
            "the config's master_port"
        };
        Ok(Some(format!(
            "whet-server: the job's {ranks} ranks meet on port {} ({whose})",
            launch.master_port
        )))
    }

    /// Copies one output stream, line by line, into job.log and `log` events.
    async fn pump_lines(
        self,
        id: i64,
        stream: LogStream,
        pipe: impl AsyncRead + Unpin,
        log_file: Arc<tokio::sync::Mutex<tokio::fs::File>>,
    ) {
        let mut reader = BufReader::new(pipe);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let _ = log_file.lock().await.write_all(&buf).await;
            let line = String::from_utf8_lossy(&buf);
            let line = line.trim_end_matches(['\n', '\r']);
            let data = LogEvent {
                stream,
                line: line.to_string(),
            };
            if let Err(e) = self.inner.events.publish(id, events::LOG, &data).await {
                eprintln!("whet-server: recording output of job {id}: {e}");
            }
        }
    }

    /// Follows `<output>/v*-*/logging.jsonl` until told to stop, then reads it one last time.
    async fn tail_metrics(self, id: i64, output_dir: PathBuf, mut stop: watch::Receiver<bool>) {
        let mut tail = JsonlTail::default();
        loop {
            let stopping = *stop.borrow();
            if let Some(file) = find_logging_jsonl(&output_dir) {
                for record in tail.read_new(&file).await {
                    let text = record.to_string();
                    let stored = async {
                        self.inner.store.set_last_metrics(id, &text).await?;
                        self.inner
                            .events
                            .publish(id, events::METRICS, &record)
                            .await
                    };
                    if let Err(e) = stored.await {
                        eprintln!("whet-server: recording metrics of job {id}: {e}");
                    }
                }
            }
            if stopping {
                return;
            }
            let _ = tokio::time::timeout(self.inner.settings.metrics_poll, stop.changed()).await;
        }
    }
}

/// Reads whole new lines from a growing JSON-lines file.
#[derive(Default)]
struct JsonlTail {
    path: Option<PathBuf>,
    offset: u64,
    partial: Vec<u8>,
}

impl JsonlTail {
    async fn read_new(&mut self, path: &Path) -> Vec<Value> {
        if self.path.as_deref() != Some(path) {
            *self = JsonlTail {
                path: Some(path.to_path_buf()),
                ..JsonlTail::default()
            };
        }
        let mut bytes = Vec::new();
        let read = async {
            let mut file = tokio::fs::File::open(path).await?;
            file.seek(std::io::SeekFrom::Start(self.offset)).await?;
            file.read_to_end(&mut bytes).await
        };
        if read.await.is_err() {
            return Vec::new();
        }
        self.offset += bytes.len() as u64;
        self.partial.extend_from_slice(&bytes);
        let Some(end) = self.partial.iter().rposition(|&b| b == b'\n') else {
            return Vec::new();
        };
        let complete: Vec<u8> = self.partial.drain(..=end).collect();
        complete
            .split(|&b| b == b'\n')
            .filter_map(|line| serde_json::from_slice::<Value>(line).ok())
            .filter(Value::is_object)
            .collect()
    }
}

/// The run folder ms-swift's layout makes under output_dir (`v<N>-<timestamp>`), newest first.
fn find_logging_jsonl(output_dir: &Path) -> Option<PathBuf> {
    crate::runs::version_dir_with(output_dir, "logging.jsonl").map(|dir| dir.join("logging.jsonl"))
}

/// Whether the server picks the job's master_port: it has several ranks and its config keeps
/// torchrun's default port (which two jobs at once would both try to bind).
pub fn server_chooses_master_port(launch: &LaunchConfig) -> bool {
    launch.nproc_per_node.unwrap_or(1) > 1
        && launch.master_port == LaunchConfig::default().master_port
}

/// Resolves when a cancel is asked for (never if the sender is gone).
async fn cancel_requested(cancel: &mut watch::Receiver<bool>) {
    if cancel.wait_for(|c| *c).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// A line the server writes into a job's log.
fn server_line(line: String) -> LogEvent {
    LogEvent {
        stream: LogStream::Server,
        line,
    }
}

fn join_devices(devices: &[u32]) -> String {
    devices
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn signal_group(pid: Option<i32>, signal: i32) {
    if let Some(pid) = pid.filter(|&p| p > 0) {
        // SAFETY: kill(2) with a negative pid signals that process group; no memory is touched.
        unsafe {
            libc::kill(-pid, signal);
        }
    }
}

fn signal_of(exit: &std::process::ExitStatus) -> Option<i32> {
    use std::os::unix::process::ExitStatusExt;
    exit.signal()
}

#[cfg(target_os = "linux")]
fn die_with_parent(command: &mut Command) {
    // SAFETY: prctl is async-signal-safe and only changes this child's own death signal.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_command: &mut Command) {}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[tokio::test]
    async fn jsonl_tail_returns_only_complete_new_lines() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("logging.jsonl");
        std::fs::write(&file, "{\"loss\": 1.0}\n{\"loss\": 0.").unwrap();
        let mut tail = JsonlTail::default();
        assert_eq!(tail.read_new(&file).await, vec![json!({"loss": 1.0})]);
        assert!(tail.read_new(&file).await.is_empty());
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&file)
            .unwrap();
        std::io::Write::write_all(&mut f, b"5}\nnot json\n{\"eval_loss\": 2}\n").unwrap();
        assert_eq!(
            tail.read_new(&file).await,
            vec![json!({"loss": 0.5}), json!({"eval_loss": 2})]
        );
    }

    #[test]
    fn the_server_chooses_the_master_port_of_multi_rank_jobs_left_on_the_default() {
        let launch = |nproc_per_node: Option<i64>, master_port: i64| LaunchConfig {
            nproc_per_node,
            master_port,
            ..LaunchConfig::default()
        };
        assert!(server_chooses_master_port(&launch(Some(2), 29500)));
        assert!(server_chooses_master_port(&launch(Some(8), 29500)));
        // The user's own port is kept; one process has no store.
        assert!(!server_chooses_master_port(&launch(Some(2), 29600)));
        assert!(!server_chooses_master_port(&launch(Some(1), 29500)));
        assert!(!server_chooses_master_port(&launch(None, 29500)));
    }

    #[test]
    fn a_chosen_master_port_is_free_and_never_given_twice_while_held() {
        let mut pool = Pool::default();
        let mut ports = BTreeSet::new();
        for id in 0..20 {
            let port = pool.take_master_port(id).unwrap();
            assert!(ports.insert(port), "port {port} given twice");
            // Free on every interface, as the launcher binds it.
            let bound = TcpListener::bind((Ipv6Addr::UNSPECIFIED, port))
                .or_else(|_| TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)));
            assert!(bound.is_ok(), "port {port}: {bound:?}");
        }
        assert_eq!(pool.master_ports.len(), 20);
    }

    #[test]
    fn finds_the_newest_version_folder() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(find_logging_jsonl(dir.path()), None);
        for v in [
            "v0-20260101-000000",
            "v2-20260101-000002",
            "v10-20260101-000010",
        ] {
            std::fs::create_dir(dir.path().join(v)).unwrap();
        }
        std::fs::write(dir.path().join("v2-20260101-000002/logging.jsonl"), "").unwrap();
        assert_eq!(
            find_logging_jsonl(dir.path()),
            Some(dir.path().join("v2-20260101-000002/logging.jsonl"))
        );
        std::fs::write(dir.path().join("v10-20260101-000010/logging.jsonl"), "").unwrap();
        assert_eq!(
            find_logging_jsonl(dir.path()),
            Some(dir.path().join("v10-20260101-000010/logging.jsonl"))
        );
    }
}
