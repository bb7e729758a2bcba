//! Private PostgreSQL servers for tests: Debian's `postgresql` package (the newest version under
//! /usr/lib/postgresql), one `initdb` per server in a temporary directory under /tmp, listening
//! on 127.0.0.1 on a free port and on a Unix socket inside that directory. Never port 5432: the
//! cluster the Debian package may create and start on install plays no part.
//!
//! PostgreSQL refuses to run as root, so `initdb` and `postgres` run as the `postgres` system
//! user (made by the package) through `setpriv`, which execs: the child we spawn *is* the
//! postmaster. Its parent-death signal is SIGINT (fast shutdown) and every postmaster is spawned
//! from one thread that lives as long as the test process, so a server whose `PgServer` is never
//! dropped (the shared one, or any after an abort) stops when the test process ends.
//!
//! Authentication: trust on the Unix socket (the helpers here connect that way, as `postgres`),
//! scram-sha-256 over TCP with the superuser `postgres` and a password made per server, so tests
//! can use PGPASSWORD or passwords in URLs. With TLS ([`PgServer::start_with_tls`]) TCP
//! connections must use TLS (`hostssl` only).
//!
//! The API blocks, and every call is bounded in time (a deadline, then a panic or an `Err`
//! saying what did not happen). From a `#[tokio::test]` that also runs something on its runtime
//! that must make progress meanwhile, call it through `spawn_blocking` (a `PgServer` is
//! `Send + Sync`; share it with an `Arc`).
//!
//! When the package is missing, the first start installs it with apt-get (as `.ci/run` does),
//! once per process, or fails saying what to install.

use std::fs;
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill as send_signal, Signal};
use nix::unistd::Pid;

/// How long a start (initdb included) or a stop may take before the helper gives up.
const START_DEADLINE: Duration = Duration::from_secs(60);
const STOP_DEADLINE: Duration = Duration::from_secs(30);
/// The limit for one psql run.
const PSQL_DEADLINE: Duration = Duration::from_secs(30);
/// The temporary directories' name prefix; the owner's pid follows it.
const DIR_PREFIX: &str = "kg-pg-";

/// A PostgreSQL server this test process owns. Dropping it stops the server (thawing it first
/// when frozen) and removes its directory, also when the test panicked.
pub struct PgServer {
    bin: PathBuf,
    /// Owned by the postgres user; holds `data/`, `sock/`, `postgres.log` and the TLS files.
    dir: tempfile::TempDir,
    port: u16,
    password: String,
    tls: bool,
    shared: bool,
    state: Mutex<State>,
}

struct State {
    /// The postmaster while it runs (setpriv execs it, so this is its pid).
    child: Option<Child>,
    frozen: bool,
}

/// What a bounded command run gave: the exit status (None when it was killed at the deadline).
struct Ran {
    status: Option<ExitStatus>,
    stdout: String,
    stderr: String,
}

impl PgServer {
    /// Makes a new cluster and starts it; returns once it accepts connections over TCP.
    pub fn start() -> PgServer {
        Self::start_inner(None, false)
    }

    /// Like [`PgServer::start`], with `ssl=on` and a server certificate for 127.0.0.1/localhost
    /// issued by `ca`; TCP connections without TLS are refused (`hostssl` only). The CA
    /// certificate is in [`PgServer::ca_file`] for `sslrootcert`.
    pub fn start_with_tls(ca: &keygate::tls::Ca) -> PgServer {
        Self::start_inner(Some(ca), false)
    }

    /// The one server of this test process, started on first use and shared by its tests
    /// (each makes its own database: [`PgServer::create_test_database`]). It is never dropped:
    /// the postmaster stops when the process ends (parent-death signal) and its directory stays
    /// in /tmp until a later `PgServer` start in any process removes it (directories whose
    /// owner process is gone are swept). Stopping, freezing or killing it panics: tests that do
    /// that start their own.
    pub fn shared() -> &'static PgServer {
        static SHARED: OnceLock<PgServer> = OnceLock::new();
        SHARED.get_or_init(|| Self::start_inner(None, true))
    }

    fn start_inner(ca: Option<&keygate::tls::Ca>, shared: bool) -> PgServer {
        let bin = bin_dir().to_path_buf();
        sweep_stale_dirs();
        let (uid, gid) = postgres_ids();
        let dir = tempfile::Builder::new()
            .prefix(&format!("{DIR_PREFIX}{}-", std::process::id()))
            .tempdir_in("/tmp")
            .expect("make a temporary directory in /tmp");
        let root = dir.path();
        let own = |p: &Path| {
            std::os::unix::fs::chown(p, Some(uid), Some(gid))
                .unwrap_or_else(|e| panic!("chown {} to postgres: {e}", p.display()))
        };
        own(root);
        fs::create_dir(root.join("sock")).unwrap();
        own(&root.join("sock"));

        let password = random_hex(24);
        let pwfile = root.join("pwfile");
        fs::write(&pwfile, format!("{password}\n")).unwrap();
        own(&pwfile);
        let mut initdb = as_postgres(&bin.join("initdb"), root);
        initdb
            .arg("-D")
            .arg(root.join("data"))
            .args([
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ])
            .arg(format!("--pwfile={}", pwfile.display()));
        let ran = run_bounded(initdb, START_DEADLINE);
        let _ = fs::remove_file(&pwfile);
        assert!(
            ran.status.is_some_and(|s| s.success()),
            "initdb failed ({:?}): {}{}",
            ran.status,
            ran.stdout,
            ran.stderr
        );

        // Only what is used: the socket for the helpers, 127.0.0.1 for tests and keygate.
        let host_kind = if ca.is_some() { "hostssl" } else { "host" };
        let hba = format!(
            "local all all trust\n{host_kind} all all 127.0.0.1/32 scram-sha-256\n\
             {host_kind} replication all 127.0.0.1/32 scram-sha-256\n"
        );
        let hba_file = root.join("data/pg_hba.conf");
        fs::write(&hba_file, hba).unwrap();
        own(&hba_file);
        if let Some(ca) = ca {
            let (cert, key) = ca
                .issue_server(&["localhost", "127.0.0.1"])
                .expect("issue the PostgreSQL server certificate");
            for (name, pem, mode) in [
                ("server.crt", cert.as_str(), 0o644),
                ("server.key", key.as_str(), 0o600),
                ("ca.crt", ca.cert_pem(), 0o644),
            ] {
                let p = root.join(name);
                fs::write(&p, pem).unwrap();
                fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
                own(&p);
            }
        }

        let mut server = PgServer {
            bin,
            dir,
            port: 0,
            password,
            tls: ca.is_some(),
            shared,
            state: Mutex::new(State {
                child: None,
                frozen: false,
            }),
        };
        // A port found free may be taken before postgres binds it: try a few.
        let mut last = String::new();
        for _ in 0..5 {
            server.port = free_port();
            match server.launch() {
                Ok(()) => return server,
                Err(e) if e.contains("could not bind") || e.contains("already in use") => last = e,
                Err(e) => panic!("{e}"),
            }
        }
        panic!("postgres found no free port: {last}");
    }

    /// The `postgres` command for this server (same data directory, port and settings).
    fn postgres_command(&self) -> Command {
        let root = self.dir.path();
        let mut c = as_postgres(&self.bin.join("postgres"), root);
        c.arg("-D")
            .arg(root.join("data"))
            .arg("-k")
            .arg(root.join("sock"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-c", "fsync=off"])
            .args(["-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off"])
            .args(["-c", "max_connections=200"]);
        if self.tls {
            c.args(["-c", "ssl=on"])
                .arg("-c")
                .arg(format!(
                    "ssl_cert_file={}",
                    root.join("server.crt").display()
                ))
                .arg("-c")
                .arg(format!(
                    "ssl_key_file={}",
                    root.join("server.key").display()
                ));
        }
        c
    }

    /// Spawns the postmaster and waits until it accepts connections; Err (with its log) when it
    /// exits first or the deadline passes.
    fn launch(&self) -> Result<(), String> {
        let mut st = self.lock();
        assert!(st.child.is_none(), "the server is already running");
        let log_path = self.log_path();
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap();
        let mut cmd = self.postgres_command();
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let child =
            spawn_from_lasting_thread(cmd).map_err(|e| format!("spawn setpriv/postgres: {e}"))?;
        st.child = Some(child);
        st.frozen = false;
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if let Some(status) = st.child.as_mut().unwrap().try_wait().unwrap() {
                st.child = None;
                return Err(format!(
                    "postgres exited before accepting connections ({status}); its log:\n{}",
                    self.log()
                ));
            }
            // Over TCP: that is what tests and keygate use.
            let mut ready = Command::new(self.bin.join("pg_isready"));
            ready
                .args(["-q", "-t", "2", "-h", "127.0.0.1", "-p"])
                .arg(self.port.to_string());
            clean_env(&mut ready);
            if run_bounded(ready, Duration::from_secs(10))
                .status
                .is_some_and(|s| s.success())
            {
                break;
            }
            if Instant::now() > deadline {
                drop(st);
                self.kill_inner();
                return Err(format!(
                    "postgres did not accept connections within {START_DEADLINE:?}; its log:\n{}",
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(st);
        self.try_psql("postgres", "select 1")
            .map(|_| ())
            .map_err(|e| format!("postgres is up but `select 1` failed: {e}"))
    }

    /// The TCP port (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// 127.0.0.1 and the port.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The superuser `postgres`'s password (made for this server).
    pub fn password(&self) -> &str {
        &self.password
    }

    /// `postgres://postgres:PASSWORD@127.0.0.1:PORT/db`.
    pub fn url(&self, db: &str) -> String {
        self.url_for("postgres", &self.password, db)
    }

    /// `postgres://postgres@127.0.0.1:PORT/db` (the password given some other way, PGPASSWORD).
    pub fn url_without_password(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// `postgres://USER:PASSWORD@127.0.0.1:PORT/db`, user and password percent-encoded.
    pub fn url_for(&self, user: &str, password: &str, db: &str) -> String {
        format!(
            "postgres://{}:{}@127.0.0.1:{}/{db}",
            percent(user),
            percent(password),
            self.port
        )
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The Unix socket directory (`host=` for libpq; trust authentication there).
    pub fn socket_dir(&self) -> PathBuf {
        self.dir.path().join("sock")
    }

    /// The CA certificate that issued the server certificate (TLS servers only).
    pub fn ca_file(&self) -> Option<PathBuf> {
        self.tls.then(|| self.dir.path().join("ca.crt"))
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// A database name unique to this run: `kg_<tag>_<random>` (tag lowercased, other
    /// characters than [a-z0-9_] replaced, cut to fit PostgreSQL's 63 bytes).
    pub fn unique_name(tag: &str) -> String {
        let tag: String = tag
            .chars()
            .map(|c| c.to_ascii_lowercase())
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .take(40)
            .collect();
        format!("kg_{tag}_{}", random_hex(8))
    }

    /// Creates a database named `name`.
    pub fn create_database(&self, name: &str) {
        self.psql("postgres", &format!("CREATE DATABASE {}", ident(name)));
    }

    /// Creates a database with a [`PgServer::unique_name`] for `tag`; returns the name.
    pub fn create_test_database(&self, tag: &str) -> String {
        let name = Self::unique_name(tag);
        self.create_database(&name);
        name
    }

    /// Drops a database (if it exists), ending the sessions still connected to it.
    pub fn drop_database(&self, name: &str) {
        self.psql(
            "postgres",
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", ident(name)),
        );
    }

    /// Creates a login role with a password (scram-sha-256 over TCP).
    pub fn create_role(&self, name: &str, password: &str) {
        self.psql(
            "postgres",
            &format!(
                "CREATE ROLE {} LOGIN PASSWORD {}",
                ident(name),
                literal(password)
            ),
        );
    }

    /// Runs `sql` in `db` as `postgres` over the Unix socket; returns its output unaligned,
    /// tuples only (`select count(*) ...` gives `"3"`). Panics when psql fails.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        self.try_psql(db, sql)
            .unwrap_or_else(|e| panic!("psql in {db}: {sql}: {e}"))
    }

    /// Like [`PgServer::psql`], returning psql's stderr as the error.
    pub fn try_psql(&self, db: &str, sql: &str) -> Result<String, String> {
        let conninfo = format!(
            "host={} port={} user=postgres dbname={}",
            self.socket_dir().display(),
            self.port,
            conn_value(db)
        );
        self.run_psql(&conninfo, None, sql, PSQL_DEADLINE)
    }

    /// Runs `sql` with psql over TCP as given by `url` (a libpq URI or `key=value` string;
    /// the password, if any, in it), without PGPASSWORD or a password file, with
    /// `connect_timeout` 2 s unless the URL says otherwise, killed after 20 s.
    pub fn psql_url(&self, url: &str, sql: &str) -> Result<String, String> {
        self.run_psql(url, None, sql, Duration::from_secs(20))
    }

    /// Runs `sql` with psql over TCP as `user` in `db`, the password in PGPASSWORD.
    pub fn psql_with_pgpassword(
        &self,
        user: &str,
        password: &str,
        db: &str,
        sql: &str,
    ) -> Result<String, String> {
        let url = format!("postgres://{}@127.0.0.1:{}/{db}", percent(user), self.port);
        self.run_psql(&url, Some(password), sql, Duration::from_secs(20))
    }

    fn run_psql(
        &self,
        conninfo: &str,
        pgpassword: Option<&str>,
        sql: &str,
        limit: Duration,
    ) -> Result<String, String> {
        let mut c = Command::new(self.bin.join("psql"));
        clean_env(&mut c);
        // No ~/.pgpass either (a path that does not exist: /dev/null makes libpq warn).
        c.env("PGCONNECT_TIMEOUT", "2")
            .env("PGPASSFILE", self.dir.path().join("no-pgpass"));
        if let Some(p) = pgpassword {
            c.env("PGPASSWORD", p);
        }
        if let Some(ca) = self.ca_file() {
            c.env("PGSSLROOTCERT", ca);
        }
        c.args(["-X", "-q", "-A", "-t", "-w", "-v", "ON_ERROR_STOP=1", "-d"])
            .arg(conninfo)
            .arg("-c")
            .arg(sql);
        let ran = run_bounded(c, limit);
        match ran.status {
            Some(s) if s.success() => Ok(ran.stdout.trim_end_matches('\n').to_owned()),
            Some(s) => Err(format!("psql {s}: {}", ran.stderr.trim())),
            None => Err(format!(
                "psql did not finish within {limit:?} (killed): {}",
                ran.stderr.trim()
            )),
        }
    }

    /// Whether the postmaster process is running (frozen counts as running).
    pub fn is_running(&self) -> bool {
        let mut st = self.lock();
        match st.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The postmaster's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.lock().child.as_ref().map(|c| c.id())
    }

    /// Fast shutdown (SIGINT: sessions are ended), waiting until the postmaster has exited;
    /// thaws it first when frozen. The port is then refused; [`PgServer::start_again`]
    /// restarts it.
    pub fn stop(&self) {
        self.not_shared("stop");
        if !self.shutdown() {
            self.kill_inner();
            panic!("postgres did not stop within {STOP_DEADLINE:?} (killed it)");
        }
    }

    /// Fast shutdown; false when the postmaster is still there at the deadline. Never panics
    /// (Drop uses it).
    fn shutdown(&self) -> bool {
        self.thaw_inner();
        let mut st = self.lock();
        let Some(child) = st.child.as_mut() else {
            return true;
        };
        let _ = send_signal(pid_of(child.id()), Signal::SIGINT);
        let deadline = Instant::now() + STOP_DEADLINE;
        loop {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() > deadline => return false,
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        st.child = None;
        true
    }

    /// Starts the stopped (or killed) server again: same data directory, port and password.
    pub fn start_again(&self) {
        self.not_shared("start_again");
        self.launch().unwrap_or_else(|e| panic!("{e}"));
    }

    /// SIGSTOP to the postmaster and every process it started (backends, checkpointer, ...):
    /// connections are still accepted by the kernel but nothing answers.
    pub fn freeze(&self) {
        self.not_shared("freeze");
        let mut st = self.lock();
        let pid = st
            .child
            .as_ref()
            .expect("freeze: the server is not running")
            .id();
        // The postmaster first, so that it starts no new child meanwhile.
        let _ = send_signal(pid_of(pid), Signal::SIGSTOP);
        for c in children_of(pid) {
            let _ = send_signal(pid_of(c), Signal::SIGSTOP);
        }
        st.frozen = true;
    }

    /// SIGCONT to the postmaster and its children.
    pub fn thaw(&self) {
        self.not_shared("thaw");
        self.thaw_inner();
    }

    fn thaw_inner(&self) {
        let mut st = self.lock();
        if !st.frozen {
            return;
        }
        if let Some(c) = st.child.as_ref() {
            let pid = c.id();
            for c in children_of(pid) {
                let _ = send_signal(pid_of(c), Signal::SIGCONT);
            }
            let _ = send_signal(pid_of(pid), Signal::SIGCONT);
        }
        st.frozen = false;
    }

    /// SIGKILL to the postmaster and its children (a crash: the next start recovers), waiting
    /// until they are gone. With `synchronous_commit=off` the last few hundred milliseconds of
    /// commits may be lost, as in a real crash: a test that needs them kept commits them with
    /// `set synchronous_commit = on` (cheap with `fsync=off`) or runs `checkpoint` first.
    pub fn kill(&self) {
        self.not_shared("kill");
        self.kill_inner();
    }

    fn kill_inner(&self) {
        let mut st = self.lock();
        st.frozen = false;
        let Some(mut child) = st.child.take() else {
            return;
        };
        let pid = child.id();
        // The children first: once the postmaster is gone they are no longer its children.
        let children = children_of(pid);
        let _ = send_signal(pid_of(pid), Signal::SIGKILL);
        for &c in &children {
            let _ = send_signal(pid_of(c), Signal::SIGKILL);
        }
        let _ = child.wait();
        // Reparented children are reaped by whoever adopts them; wait until they are gone so
        // that a restart does not find their shared memory still attached.
        let deadline = Instant::now() + STOP_DEADLINE;
        while children.iter().any(|&c| alive(c)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn not_shared(&self, what: &str) {
        assert!(
            !self.shared,
            "{what} on PgServer::shared(): start a server of the test's own with PgServer::start()"
        );
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        // Nothing here panics (a test may already be panicking): stop, else kill.
        if !self.shutdown() {
            self.kill_inner();
        }
        // The TempDir removes the directory (root may remove the postgres user's files).
    }
}

/// The newest /usr/lib/postgresql/N/bin holding `postgres`, installing Debian's `postgresql`
/// package with apt-get when there is none (once per process; a failure is kept and repeated).
pub fn bin_dir() -> &'static Path {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let found = BIN.get_or_init(|| {
        if let Some(b) = newest_bin_dir() {
            return Ok(b);
        }
        let ok = super::apt_install(&["postgresql"]);
        match newest_bin_dir() {
            Some(b) if ok => Ok(b),
            _ => Err(
                "/usr/lib/postgresql/*/bin/postgres is missing and apt-get could not \
                      install it: install Debian's postgresql package (as .ci/run does)"
                    .to_owned(),
            ),
        }
    });
    match found {
        Ok(b) => b,
        Err(e) => panic!("{e}"),
    }
}

fn newest_bin_dir() -> Option<PathBuf> {
    fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((version, bin))
        })
        .max_by_key(|(v, _)| *v)
        .map(|(_, b)| b)
}

/// The postgres system user's uid and gid (from /etc/passwd).
fn postgres_ids() -> (u32, u32) {
    let passwd = fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
    passwd
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() > 3 && f[0] == "postgres").then(|| (f[2].parse().ok(), f[3].parse().ok()))
        })
        .and_then(|(u, g)| Some((u?, g?)))
        .expect("the postgres system user (made by Debian's postgresql package) is missing")
}

/// `program` run as the postgres user in `cwd`, its parent-death signal SIGINT.
fn as_postgres(program: &Path, cwd: &Path) -> Command {
    let mut c = Command::new("setpriv");
    c.args([
        "--reuid",
        "postgres",
        "--regid",
        "postgres",
        "--clear-groups",
        "--pdeathsig",
        "INT",
        "--",
    ])
    .arg(program)
    .current_dir(cwd);
    clean_env(&mut c);
    c
}

/// No PG* variable (PGHOST, PGDATA, PGPASSWORD, ...) of the test's environment leaks in.
fn clean_env(c: &mut Command) {
    c.env_clear().env("LC_ALL", "C");
    if let Ok(path) = std::env::var("PATH") {
        c.env("PATH", path);
    }
}

/// Spawns `cmd` from a thread that lives as long as the process: a parent-death signal fires
/// when the spawning *thread* ends, and test threads (or spawn_blocking threads) end early.
fn spawn_from_lasting_thread(cmd: Command) -> std::io::Result<Child> {
    type Job = (Command, mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: OnceLock<mpsc::Sender<Job>> = OnceLock::new();
    let tx = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("pg-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("spawn the pg-spawner thread");
        tx
    });
    let (reply, answer) = mpsc::channel();
    tx.send((cmd, reply)).expect("pg-spawner thread alive");
    answer.recv().expect("pg-spawner answered")
}

/// Runs `cmd` (stdin closed, output captured), killing it at `limit`.
fn run_bounded(mut cmd: Command, limit: Duration) -> Ran {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {:?}: {e}", cmd.get_program()));
    let reader = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = r.read_to_end(&mut s);
            String::from_utf8_lossy(&s).into_owned()
        })
    };
    let out = reader(Box::new(child.stdout.take().unwrap()));
    let err = reader(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Ran {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

/// Removes /tmp/kg-pg-<pid>-* directories whose owner process is gone and whose postmaster (if
/// any) is not running: what the shared servers, or a killed test process, left behind.
fn sweep_stale_dirs() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let Ok(entries) = fs::read_dir("/tmp") else {
            return;
        };
        for e in entries.filter_map(|e| e.ok()) {
            let name = e.file_name();
            let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(DIR_PREFIX)) else {
                continue;
            };
            let Some(owner) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            if alive(owner) {
                continue;
            }
            let postmaster = fs::read_to_string(e.path().join("data/postmaster.pid"))
                .ok()
                .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<u32>().ok()));
            if postmaster.is_some_and(alive) {
                continue;
            }
            let _ = fs::remove_dir_all(e.path());
        }
    });
}

/// Whether `pid` exists and is not a zombie.
fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| stat_fields(&s).map(|(state, _)| state != 'Z'))
        .unwrap_or(false)
}

/// The processes whose parent is `parent` (from /proc/*/stat).
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| stat_fields(&s))
                .is_some_and(|(_, ppid)| ppid == parent)
        })
        .collect()
}

/// (state, ppid) from a /proc/PID/stat line; the command name may hold spaces and parens.
fn stat_fields(stat: &str) -> Option<(char, u32)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_whitespace();
    let state = f.next()?.chars().next()?;
    let ppid = f.next()?.parse().ok()?;
    Some((state, ppid))
}

fn pid_of(pid: u32) -> Pid {
    Pid::from_raw(pid as i32)
}

/// A port that was free on 127.0.0.1 a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// Whether a TCP connection to 127.0.0.1:`port` is accepted within a second.
pub fn tcp_accepts(port: u16) -> bool {
    TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(1),
    )
    .is_ok()
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).expect("random");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A quoted SQL identifier.
fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// A quoted SQL string literal.
fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A libpq `key=value` value, quoted.
fn conn_value(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// Percent-encodes everything but unreserved characters (for URL user info).
fn percent(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
