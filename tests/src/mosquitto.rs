//! A Mosquitto broker on a free port, killable and restartable on the same port.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};

use crate::process::{free_addr, wait_for_listener, Proc};

const CANDIDATES: &[&str] = &["/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"];

/// The mosquitto executable; an error that says how to install it when there is none.
pub fn mosquitto_binary() -> Result<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("mosquitto"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    CANDIDATES
        .iter()
        .map(PathBuf::from)
        .chain(on_path)
        .find(|p| p.is_file())
        .context("mosquitto not found: apt-get install mosquitto")
}

/// A running `mosquitto` with a generated config: one listener on 127.0.0.1, anonymous
/// clients allowed, no persistence (a restart loses retained messages, like a broker that
/// was replaced), and its `$SYS/broker/...` counters refreshed every second (benches read
/// `$SYS/broker/bytes/sent`; the default is every 10 s).
pub struct Mosquitto {
    addr: SocketAddr,
    proc: Proc,
}

impl Mosquitto {
    /// Starts mosquitto on a free port, config and log in `dir`, and waits until it listens.
    pub fn start(dir: &Path) -> Result<Mosquitto> {
        let binary = mosquitto_binary()?;
        let addr = free_addr()?;
        let config = dir.join("mosquitto.conf");
        std::fs::write(
            &config,
            format!(
                "listener {port} 127.0.0.1\n\
                 allow_anonymous true\n\
                 persistence false\n\
                 log_dest stderr\n\
                 log_type error\nlog_type warning\nlog_type notice\nlog_type information\n\
                 connection_messages true\n\
                 sys_interval 1\n",
                port = addr.port()
            ),
        )?;
        let proc = Proc::spawn(
            "mosquitto",
            &binary,
            ["-c".into(), config.into_os_string()],
            dir.join("mosquitto.log"),
        )?;
        let mut me = Mosquitto { addr, proc };
        me.wait_ready()?;
        Ok(me)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `mqtt://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("mqtt://{}", self.addr)
    }

    /// SIGKILL: no goodbye to any client.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// Starts it again on the same port and waits until it listens.
    pub fn restart(&mut self) -> Result<()> {
        self.proc.restart()?;
        self.wait_ready()
    }

    pub fn proc(&self) -> &Proc {
        &self.proc
    }

    pub fn proc_mut(&mut self) -> &mut Proc {
        &mut self.proc
    }

    fn wait_ready(&mut self) -> Result<()> {
        let ready = wait_for_listener(
            self.addr,
            format_args!("mosquitto to listen on {}", self.addr),
            Duration::from_secs(10),
        );
        if let Some(status) = self.proc.exit_status() {
            bail!(
                "mosquitto exited ({status}) instead of listening on {}\n{}",
                self.addr,
                self.proc.log_tail(30)
            );
        }
        ready.with_context(|| self.proc.log_tail(30))
    }
}
