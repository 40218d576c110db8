//! The system under test: a coordinator, its broker and agents, each a real process in one
//! temp directory, all killed when the [`Fleet`] is dropped.

use std::cell::RefCell;
use std::ffi::OsString;
use std::fmt::Display;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::rc::Rc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use ed25519_dalek::SigningKey;
use protocol::messages::{NodeState, UpdateReport};
use protocol::{AppName, Digest, NodeId, ReleaseId, Topics, TrustedKeys, Version};
use tempfile::TempDir;

use crate::bins::Bins;
use crate::chunks::{paths_named, store_digests};
use crate::mosquitto::Mosquitto;
use crate::mqtt::TestClient;
use crate::netns::NetNs;
use crate::process::{free_addr, kill_processes_naming, log_tail, run, Proc};
use crate::tmpfs::Tmpfs;
use crate::wait::{wait_for, Fatal};

/// How long a CLI call may take.
const CLI_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a process gets to come up.
const STARTUP: Duration = Duration::from_secs(30);
/// Log lines shown per process when something fails.
const TAIL: usize = 40;

/// Which MQTT broker the fleet uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broker {
    /// The coordinator's own (`--broker embedded --mqtt-listen …`).
    Embedded,
    /// A separate Mosquitto process (`--broker mqtt://…`).
    Mosquitto,
}

/// Options for [`Fleet::start_with_options`].
#[derive(Debug, Clone, Default)]
pub struct FleetOptions {
    /// The address the coordinator's HTTP API and embedded broker listen on (ports are
    /// still picked free); 127.0.0.1 when `None`. Use [`NetNs::host_ip`] so agents in a
    /// namespace reach it. Only with [`Broker::Embedded`].
    pub listen_ip: Option<IpAddr>,
    /// `--public-url`: the coordinator's own chunk source in deploy commands.
    pub public_url: Option<String>,
}

/// Options for [`Fleet::agents_with`].
#[derive(Debug, Clone, Default)]
pub struct AgentOptions {
    /// `--label k=v` for each pair.
    pub labels: Vec<(String, String)>,
    /// `--max-fetch-rate BYTES_PER_SEC`.
    pub max_fetch_rate: Option<u64>,
    /// `--no-http`: fetch chunks over MQTT only.
    pub no_http: bool,
    /// `--metrics-interval DURATION` (e.g. "1s"); the agent's default when `None`.
    pub metrics_interval: Option<String>,
    /// Run the agent inside this network namespace ([`NetNs::name`]); needs root. The
    /// fleet must listen where the namespace reaches it ([`FleetOptions::listen_ip`]).
    pub netns: Option<String>,
    /// Mount a tmpfs of this many bytes as the agent's data directory; needs root.
    pub data_tmpfs: Option<u64>,
    /// Added to the agent's environment (e.g. `FLEET_AGENT_CRASH_AT`); see
    /// [`Agent::set_env`] to change it between starts.
    pub env: Vec<(String, String)>,
}

/// A coordinator with its broker, and the agents started through it.
pub struct Fleet {
    bins: Bins,
    keys: PathBuf,
    data: PathBuf,
    http: SocketAddr,
    mqtt: SocketAddr,
    token: String,
    topics: Topics,
    coordinator: RefCell<Proc>,
    mosquitto: Option<RefCell<Mosquitto>>,
    agents: RefCell<Vec<Agent>>,
    // Last, so it is removed after every process is dead.
    dir: Option<TempDir>,
}

impl Fleet {
    /// Keys, a broker and a coordinator, with the binaries of this build.
    pub fn start(broker: Broker) -> Result<Fleet> {
        Fleet::start_with(broker, Bins::of_this_build().clone())
    }

    /// Like [`Fleet::start`] with the given binaries (the bench uses release builds).
    pub fn start_with(broker: Broker, bins: Bins) -> Result<Fleet> {
        Fleet::start_with_options(broker, bins, &FleetOptions::default())
    }

    /// Like [`Fleet::start_with`], with where the coordinator listens and what it tells
    /// agents.
    pub fn start_with_options(broker: Broker, bins: Bins, options: &FleetOptions) -> Result<Fleet> {
        if options.listen_ip.is_some() && broker != Broker::Embedded {
            bail!("FleetOptions::listen_ip works with the embedded broker only");
        }
        let listen_ip = options.listen_ip.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let dir = tempfile::Builder::new().prefix("fleet-").tempdir()?;
        let keys = dir.path().join("keys");
        let out = run(
            Command::new(&bins.coordinator)
                .arg("keygen")
                .arg("--out")
                .arg(&keys),
            CLI_TIMEOUT,
        )?;
        check_output("coordinator keygen", &out)?;
        for file in ["signing.key", "trust.json"] {
            anyhow::ensure!(
                keys.join(file).is_file(),
                "`coordinator keygen --out {}` wrote no {file}",
                keys.display()
            );
        }

        let mosquitto = match broker {
            Broker::Embedded => None,
            Broker::Mosquitto => Some(Mosquitto::start(dir.path())?),
        };
        let mqtt = match &mosquitto {
            Some(m) => m.addr(),
            None => free_addr_on(listen_ip)?,
        };
        let http = free_addr_on(listen_ip)?;
        let data = dir.path().join("coordinator");
        let mut args: Vec<OsString> = vec![
            "serve".into(),
            "--data".into(),
            data.clone().into(),
            "--keys".into(),
            keys.clone().into(),
            "--http".into(),
            http.to_string().into(),
        ];
        if let Some(url) = &options.public_url {
            args.extend(["--public-url".into(), url.into()]);
        }
        match &mosquitto {
            Some(m) => args.extend(["--broker".into(), m.url().into()]),
            None => args.extend([
                "--broker".into(),
                "embedded".into(),
                "--mqtt-listen".into(),
                mqtt.to_string().into(),
            ]),
        }
        let coordinator = Proc::spawn(
            "coordinator",
            &bins.coordinator,
            args,
            dir.path().join("coordinator.log"),
        )?;
        let mut fleet = Fleet {
            bins,
            keys,
            data,
            http,
            mqtt,
            token: String::new(),
            topics: Topics::default(),
            coordinator: RefCell::new(coordinator),
            mosquitto: mosquitto.map(RefCell::new),
            agents: RefCell::new(Vec::new()),
            dir: Some(dir),
        };
        let token_file = fleet.data.join("admin.token");
        fleet.token = fleet.wait_for(STARTUP, "the coordinator to write admin.token", || {
            Ok(std::fs::read_to_string(&token_file)
                .ok()
                .map(|t| t.trim().to_owned())
                .filter(|t| !t.is_empty()))
        })?;
        fleet.wait_until(STARTUP, "the coordinator's HTTP API to listen", || {
            Ok(TcpStream::connect(http).is_ok())
        })?;
        if broker == Broker::Embedded {
            fleet.wait_until(STARTUP, "the embedded MQTT broker to listen", || {
                Ok(TcpStream::connect(mqtt).is_ok())
            })?;
        }
        fleet.wait_until(STARTUP, "`coordinator nodes --json` to answer", || {
            fleet.nodes().map(|_| true)
        })?;
        Ok(fleet)
    }

    /// Starts one agent per id, each with its own data directory, and waits until the
    /// coordinator lists each of them as online.
    pub fn agents<const N: usize>(&self, ids: [&str; N]) -> Result<[Agent; N]> {
        self.agents_with(ids, &AgentOptions::default())
    }

    pub fn agents_with<const N: usize>(
        &self,
        ids: [&str; N],
        options: &AgentOptions,
    ) -> Result<[Agent; N]> {
        let mut started = Vec::with_capacity(N);
        for id in ids {
            let agent = self.spawn_agent(id, options)?;
            self.agents.borrow_mut().push(agent.clone());
            started.push(agent);
        }
        let ids_list = ids.join(", ");
        self.wait_until(
            STARTUP,
            format_args!("agents {ids_list} to be online in `nodes --json`"),
            || {
                let nodes = self.nodes()?;
                Ok(ids
                    .iter()
                    .all(|id| node_entry(&nodes, id).is_some_and(is_online)))
            },
        )?;
        Ok(started
            .try_into()
            .unwrap_or_else(|_| unreachable!("one agent per id")))
    }

    fn spawn_agent(&self, id: &str, options: &AgentOptions) -> Result<Agent> {
        let node = NodeId::new(id)?;
        let dir = self.dir().join("agents").join(id);
        std::fs::create_dir_all(&dir)?;
        let data = dir.join("data");
        let tmpfs = match options.data_tmpfs {
            Some(size) => Some(Tmpfs::mount(&data, size)?),
            None => None,
        };
        let (program, mut args) = match &options.netns {
            Some(name) => NetNs::command_in(name, &self.bins.agent)?,
            None => (self.bins.agent.clone(), Vec::new()),
        };
        args.extend::<[OsString; 9]>([
            "run".into(),
            "--data".into(),
            data.clone().into(),
            "--node-id".into(),
            id.into(),
            "--broker".into(),
            self.broker_url().into(),
            "--trust".into(),
            self.keys.join("trust.json").into(),
        ]);
        for (k, v) in &options.labels {
            args.extend(["--label".into(), format!("{k}={v}").into()]);
        }
        if let Some(rate) = options.max_fetch_rate {
            args.extend(["--max-fetch-rate".into(), rate.to_string().into()]);
        }
        if options.no_http {
            args.push("--no-http".into());
        }
        if let Some(interval) = &options.metrics_interval {
            args.extend(["--metrics-interval".into(), interval.into()]);
        }
        let proc = Proc::spawn_with_env(
            &format!("agent {id}"),
            &program,
            args,
            os_env(&options.env),
            dir.join("agent.log"),
        )?;
        Ok(Agent(Rc::new(AgentInner {
            node,
            data,
            bin: self.bins.agent.clone(),
            proc: RefCell::new(proc),
            tmpfs,
        })))
    }

    /// `coordinator release publish SRC --app APP --version VER`.
    pub fn publish(&self, src: &Path, app: &str, version: &str) -> Result<Output> {
        let src = src.to_str().context("source path is not UTF-8")?;
        self.cli(&[
            "release",
            "publish",
            src,
            "--app",
            app,
            "--version",
            version,
        ])
    }

    /// `coordinator release publish SRC --app APP --version VER --mirror URL…`: agents try
    /// the mirrors in order, then the coordinator.
    pub fn publish_with_mirrors(
        &self,
        src: &Path,
        app: &str,
        version: &str,
        mirrors: &[&str],
    ) -> Result<Output> {
        let src = src.to_str().context("source path is not UTF-8")?;
        let mut args = vec![
            "release",
            "publish",
            src,
            "--app",
            app,
            "--version",
            version,
        ];
        for mirror in mirrors {
            args.extend(["--mirror", mirror]);
        }
        self.cli(&args)
    }

    /// `coordinator rollout start --app APP --version VER`.
    pub fn rollout(&self, app: &str, version: &str) -> Result<Output> {
        self.cli(&["rollout", "start", "--app", app, "--version", version])
    }

    /// `coordinator nodes --json`, parsed.
    pub fn nodes(&self) -> Result<serde_json::Value> {
        let out = self.cli(&["nodes", "--json"])?;
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "`nodes --json` printed no JSON: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Runs the operator CLI against this coordinator; fails with its output and the
    /// coordinator's log tail when it exits non-zero.
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        let out = self.try_cli(args)?;
        check_output(&format!("coordinator {}", args.join(" ")), &out)
            .map_err(|e| anyhow!("{e:#}\n{}", self.coordinator.borrow().log_tail(TAIL)))?;
        Ok(out)
    }

    /// Runs the operator CLI and returns its output whatever the exit status.
    pub fn try_cli(&self, args: &[&str]) -> Result<Output> {
        self.try_cli_within(args, CLI_TIMEOUT)
    }

    fn try_cli_within(&self, args: &[&str], timeout: Duration) -> Result<Output> {
        run(
            Command::new(&self.bins.coordinator)
                .arg("--server")
                .arg(format!("http://{}", self.http))
                .arg("--token")
                .arg(&self.token)
                .args(args),
            timeout,
        )
    }

    /// Waits until every agent of the fleet reports `app@version` as its current release.
    pub fn wait_all_on(&self, app: &str, version: &str, timeout: Duration) -> Result<()> {
        let want = release(app, version)?;
        let agents = self.agents.borrow().clone();
        self.wait_until(timeout, format_args!("every agent to run {want}"), || {
            for agent in &agents {
                if agent.current_release()?.as_ref() != Some(&want) {
                    return Ok(false);
                }
            }
            Ok(true)
        })
    }

    /// [`crate::wait_until`], failing at once if a process died on its own, and with the
    /// fleet's [`Fleet::report`] on timeout.
    pub fn wait_until(
        &self,
        timeout: Duration,
        what: impl Display,
        mut cond: impl FnMut() -> Result<bool>,
    ) -> Result<()> {
        self.wait_for(timeout, what, || Ok(cond()?.then_some(())))
    }

    /// Like [`Fleet::wait_until`], for a probe that yields a value.
    pub fn wait_for<T>(
        &self,
        timeout: Duration,
        what: impl Display,
        mut probe: impl FnMut() -> Result<Option<T>>,
    ) -> Result<T> {
        wait_for(timeout, what, || {
            self.check_alive()?;
            probe()
        })
        .map_err(|e| anyhow!("{e:#}\n{}", self.report()))
    }

    /// Fails with [`Fatal`] if a process that should run has exited.
    fn check_alive(&self) -> Result<()> {
        let mut dead = Vec::new();
        if let Some(status) = self.coordinator.borrow_mut().exit_status() {
            dead.push(format!("the coordinator exited ({status})"));
        }
        if let Some(m) = &self.mosquitto {
            if let Some(status) = m.borrow_mut().proc_mut().exit_status() {
                dead.push(format!("mosquitto exited ({status})"));
            }
        }
        for agent in self.agents.borrow().iter() {
            if let Some(status) = agent.exit_status() {
                dead.push(format!("agent {} exited ({status})", agent.node()));
            }
        }
        if dead.is_empty() {
            Ok(())
        } else {
            Err(Fatal(dead.join("; ")).into())
        }
    }

    /// What the fleet looks like now, for failure messages: the coordinator's node list,
    /// each agent's own status, and the tail of every log.
    pub fn report(&self) -> String {
        let mut out = String::from("\n===== fleet state\n");
        match self.try_cli_within(&["nodes", "--json"], Duration::from_secs(10)) {
            Ok(o) if o.status.success() => {
                out += &format!(
                    "coordinator nodes --json:\n{}\n",
                    String::from_utf8_lossy(&o.stdout)
                )
            }
            Ok(o) => {
                out += &format!(
                    "coordinator nodes --json failed ({}): {}\n",
                    o.status,
                    String::from_utf8_lossy(&o.stderr)
                )
            }
            Err(e) => out += &format!("coordinator nodes --json: {e:#}\n"),
        }
        for agent in self.agents.borrow().iter() {
            match agent.status_output() {
                Ok(o) => {
                    out += &format!(
                        "agent {} status --json ({}): {}{}\n",
                        agent.node(),
                        o.status,
                        String::from_utf8_lossy(&o.stdout),
                        String::from_utf8_lossy(&o.stderr)
                    )
                }
                Err(e) => out += &format!("agent {} status: {e:#}\n", agent.node()),
            }
        }
        if let Some(m) = &self.mosquitto {
            out += &m.borrow().proc().log_tail(TAIL);
        }
        out += &self.coordinator.borrow().log_tail(TAIL);
        for agent in self.agents.borrow().iter() {
            out += &agent.log_tail(TAIL);
        }
        out
    }

    /// SIGKILLs the Mosquitto broker.
    pub fn kill_broker(&self) -> Result<()> {
        self.mosquitto_ref()?.borrow_mut().kill();
        Ok(())
    }

    /// Starts the Mosquitto broker again on the same port.
    pub fn restart_broker(&self) -> Result<()> {
        self.mosquitto_ref()?.borrow_mut().restart()
    }

    fn mosquitto_ref(&self) -> Result<&RefCell<Mosquitto>> {
        match &self.mosquitto {
            Some(m) => Ok(m),
            None => bail!("this fleet uses the embedded broker, not Mosquitto"),
        }
    }

    /// SIGKILLs the coordinator (and so an embedded broker).
    pub fn kill_coordinator(&self) {
        self.coordinator.borrow_mut().kill();
    }

    /// Starts the coordinator again with the same data, keys and addresses.
    pub fn restart_coordinator(&self) -> Result<()> {
        self.coordinator.borrow_mut().restart()?;
        self.wait_until(
            STARTUP,
            "the restarted coordinator's HTTP API to listen",
            || Ok(TcpStream::connect(self.http).is_ok()),
        )
    }

    /// A test MQTT client connected to the fleet's broker.
    pub fn mqtt_client(&self) -> Result<TestClient> {
        TestClient::connect(self.mqtt)
    }

    /// `mqtt://HOST:PORT` of the broker the agents use.
    pub fn broker_url(&self) -> String {
        format!("mqtt://{}", self.mqtt)
    }

    pub fn topics(&self) -> &Topics {
        &self.topics
    }

    /// The coordinator's signing key (`KEYS/signing.key`, hex of the 32-byte secret).
    pub fn signing_key(&self) -> Result<SigningKey> {
        let path = self.keys.join("signing.key");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let mut secret = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut secret)
            .with_context(|| format!("{} is not 64 hex digits", path.display()))?;
        Ok(SigningKey::from_bytes(&secret))
    }

    /// The keys the agents trust (`KEYS/trust.json`).
    pub fn trusted_keys(&self) -> Result<TrustedKeys> {
        let bytes = std::fs::read(self.keys.join("trust.json"))?;
        Ok(TrustedKeys::from_json(&bytes)?)
    }

    /// The coordinator's `--data` directory.
    pub fn coordinator_data(&self) -> &Path {
        &self.data
    }

    /// The coordinator's chunk store (`DATA/chunks`).
    pub fn chunks_dir(&self) -> PathBuf {
        self.data.join("chunks")
    }

    /// Waits until `agent` reports an update of `app@version` as finished, either way, and
    /// returns the report.
    pub fn wait_update(
        &self,
        agent: &Agent,
        app: &str,
        version: &str,
        timeout: Duration,
    ) -> Result<UpdateReport> {
        let want = release(app, version)?;
        self.wait_for(
            timeout,
            format_args!("{} to finish updating to {want}", agent.node()),
            || Ok(agent.status()?.last_update.filter(|u| u.release == want)),
        )
    }

    /// Every file in the coordinator's chunk store (`DATA/chunks`, any depth), sorted.
    pub fn chunk_files(&self) -> Result<Vec<PathBuf>> {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return Ok(());
            };
            for entry in entries {
                let entry = entry?;
                if entry.file_type()?.is_dir() {
                    walk(&entry.path(), out)?;
                } else {
                    out.push(entry.path());
                }
            }
            Ok(())
        }
        let mut out = Vec::new();
        walk(&self.data.join("chunks"), &mut out)?;
        out.sort();
        Ok(out)
    }

    /// A fresh directory inside the fleet's temp dir, for test data.
    pub fn scratch(&self, name: &str) -> Result<PathBuf> {
        let path = self.dir().join("scratch").join(name);
        std::fs::create_dir_all(&path)?;
        Ok(path)
    }

    /// The binaries this fleet runs.
    pub fn bins(&self) -> &Bins {
        &self.bins
    }

    /// The PID of the coordinator process, while it runs.
    pub fn coordinator_pid(&self) -> Option<u32> {
        self.coordinator.borrow().pid()
    }

    /// The PID of the Mosquitto process, while it runs; `None` with the embedded broker
    /// (which runs inside the coordinator).
    pub fn mosquitto_pid(&self) -> Option<u32> {
        self.mosquitto
            .as_ref()
            .and_then(|m| m.borrow().proc().pid())
    }

    /// The broker's MQTT address.
    pub fn mqtt_addr(&self) -> SocketAddr {
        self.mqtt
    }

    fn dir(&self) -> &Path {
        self.dir
            .as_ref()
            .expect("the temp dir lives as long as the fleet")
            .path()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let dir = self.dir().to_owned();
        if std::thread::panicking() {
            eprintln!("{}", self.report());
            if let Some(dir) = self.dir.take() {
                eprintln!("===== keeping {} for inspection", dir.keep().display());
            }
        }
        for agent in self.agents.borrow().iter() {
            agent.kill();
        }
        self.coordinator.borrow_mut().kill();
        if let Some(m) = &self.mosquitto {
            m.borrow_mut().kill();
        }
        // The apps the agents ran (releases with a run section) outlive a SIGKILLed agent by
        // design: the next agent stops them, and there is none. They run from the agents'
        // slots, so their command lines name this fleet's directory.
        kill_processes_naming(&dir);
        for agent in self.agents.borrow().iter() {
            // Before the temp dir goes, whoever still holds a handle to the agent.
            if let Some(disk) = agent.tmpfs() {
                disk.unmount();
            }
        }
    }
}

/// One agent process and its data directory. Cheap to clone; the process is killed when
/// the fleet is dropped.
#[derive(Clone)]
pub struct Agent(Rc<AgentInner>);

struct AgentInner {
    node: NodeId,
    data: PathBuf,
    bin: PathBuf,
    proc: RefCell<Proc>,
    // After `proc`, so the agent is dead before its disk is unmounted (the fleet unmounts
    // it earlier when dropped first).
    tmpfs: Option<Tmpfs>,
}

impl Agent {
    pub fn node(&self) -> &NodeId {
        &self.0.node
    }

    /// The agent's `--data` directory.
    pub fn data_dir(&self) -> &Path {
        &self.0.data
    }

    /// The chunks in the agent's fetch store (`DATA/fetch`): verified chunks of the release
    /// being staged.
    pub fn fetch_store(&self) -> Result<std::collections::BTreeSet<Digest>> {
        store_digests(&self.0.data.join("fetch"))
    }

    /// Leftovers of an interrupted assembly: `*.partial-*` entries anywhere under `DATA`.
    pub fn partial_dirs(&self) -> Result<Vec<PathBuf>> {
        paths_named(&self.0.data, ".partial-")
    }

    /// The tmpfs mounted as the data directory ([`AgentOptions::data_tmpfs`]).
    pub fn tmpfs(&self) -> Option<&Tmpfs> {
        self.0.tmpfs.as_ref()
    }

    /// `agent status --data DIR --json`, parsed.
    pub fn status(&self) -> Result<NodeState> {
        let out = self.status_output()?;
        check_output(&format!("agent status for {}", self.node()), &out)?;
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "agent status for {} is not a NodeState: {}",
                self.node(),
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    fn status_output(&self) -> Result<Output> {
        run(
            Command::new(&self.0.bin)
                .arg("status")
                .arg("--data")
                .arg(&self.0.data)
                .arg("--json"),
            CLI_TIMEOUT,
        )
    }

    /// The release the agent runs now, if any.
    pub fn current_release(&self) -> Result<Option<ReleaseId>> {
        Ok(self.status()?.current.map(|s| s.release))
    }

    /// The version the agent runs now, if any.
    pub fn current_version(&self) -> Result<Option<String>> {
        Ok(self.current_release()?.map(|r| r.version.to_string()))
    }

    /// The slot directory of the current release.
    pub fn current_slot(&self) -> Result<PathBuf> {
        let status = self.status()?;
        let slot = status
            .current
            .with_context(|| format!("{} has no current release", self.node()))?;
        Ok(self.resolve(&slot.slot_dir))
    }

    /// The slot directory of the previous release.
    pub fn previous_slot(&self) -> Result<PathBuf> {
        let status = self.status()?;
        let slot = status
            .previous
            .with_context(|| format!("{} has no previous release", self.node()))?;
        Ok(self.resolve(&slot.slot_dir))
    }

    /// Where `DATA/current` points, resolved.
    pub fn current_link(&self) -> Result<PathBuf> {
        let link = self.0.data.join("current");
        std::fs::canonicalize(&link).with_context(|| format!("resolving {}", link.display()))
    }

    fn resolve(&self, slot_dir: &str) -> PathBuf {
        let path = Path::new(slot_dir);
        if path.is_absolute() {
            path.to_owned()
        } else {
            self.0.data.join(path)
        }
    }

    /// SIGKILLs the agent.
    pub fn kill(&self) {
        self.0.proc.borrow_mut().kill();
    }

    /// Starts the agent again with the same arguments (after [`Agent::kill`]).
    pub fn restart(&self) -> Result<()> {
        self.0.proc.borrow_mut().restart()
    }

    /// Replaces the variables added to the agent's environment ([`AgentOptions::env`]); they
    /// take effect at the next [`Agent::restart`].
    pub fn set_env(&self, env: &[(&str, &str)]) {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.0.proc.borrow_mut().set_env(os_env(&env));
    }

    /// Whether the agent process is alive.
    pub fn is_running(&self) -> bool {
        self.0.proc.borrow_mut().is_running()
    }

    /// How the agent exited, if it did so on its own.
    pub fn exit_status(&self) -> Option<std::process::ExitStatus> {
        self.0.proc.borrow_mut().exit_status()
    }

    pub fn pid(&self) -> Option<u32> {
        self.0.proc.borrow().pid()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let proc = self.0.proc.borrow();
        log_tail(proc.name(), proc.log_path(), lines)
    }
}

fn os_env(env: &[(String, String)]) -> Vec<(OsString, OsString)> {
    env.iter().map(|(k, v)| (k.into(), v.into())).collect()
}

/// A port on `ip` that was free a moment ago.
fn free_addr_on(ip: IpAddr) -> Result<SocketAddr> {
    if ip == IpAddr::V4(Ipv4Addr::LOCALHOST) {
        return free_addr();
    }
    let listener = TcpListener::bind((ip, 0)).with_context(|| format!("binding {ip}:0"))?;
    Ok(listener.local_addr()?)
}

/// `app@version` as a [`ReleaseId`].
pub fn release(app: &str, version: &str) -> Result<ReleaseId> {
    Ok(ReleaseId::new(AppName::new(app)?, Version::new(version)?))
}

/// The entry for `id` in the output of `nodes --json`.
pub fn node_entry<'a>(nodes: &'a serde_json::Value, id: &str) -> Option<&'a serde_json::Value> {
    nodes
        .as_array()?
        .iter()
        .find(|n| n.get("node").and_then(|v| v.as_str()) == Some(id))
}

/// Whether an entry of `nodes --json` says the node is online (absent field: assume so).
fn is_online(entry: &serde_json::Value) -> bool {
    entry
        .get("online")
        .and_then(|v| v.as_bool())
        .unwrap_or(true)
}

fn check_output(what: &str, out: &Output) -> Result<()> {
    if out.status.success() {
        return Ok(());
    }
    bail!(
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim_end(),
        String::from_utf8_lossy(&out.stderr).trim_end()
    )
}
