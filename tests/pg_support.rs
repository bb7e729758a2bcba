//! The PostgreSQL test support (tests/support/postgres.rs) against real servers: start, databases,
//! password authentication over TCP, stop and restart with the data kept, freeze and thaw, a
//! crash and recovery, TLS, the shared server, and cleanup on drop. Every wait is bounded.

mod support;

use std::time::{Duration, Instant};

use support::postgres::{tcp_accepts, PgServer};
use support::TestCa;

fn proc_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

#[test]
fn a_server_starts_and_runs_sql_in_its_own_database() {
    let t = Instant::now();
    let pg = PgServer::start();
    eprintln!("PgServer::start took {:?}", t.elapsed());
    assert_ne!(pg.port(), 5432);
    assert!(tcp_accepts(pg.port()));
    let db = pg.create_test_database("starts");
    assert!(db.starts_with("kg_starts_"), "{db}");
    assert_eq!(pg.psql(&db, "select 1"), "1");
    pg.psql(
        &db,
        "create table t (n int); insert into t select generate_series(1, 3)",
    );
    assert_eq!(pg.psql(&db, "select count(*) from t"), "3");
    assert_eq!(
        pg.psql("postgres", "show max_connections; show fsync"),
        "200\noff"
    );
    let err = pg.try_psql(&db, "select * from missing").unwrap_err();
    assert!(err.contains("does not exist"), "{err}");
    pg.drop_database(&db);
    let err = pg.try_psql(&db, "select 1").unwrap_err();
    assert!(err.contains("does not exist"), "{err}");
}

#[test]
fn passwords_are_checked_over_tcp() {
    let pg = PgServer::start();
    let db = pg.create_test_database("passwords");
    // PGPASSWORD with the URL without a password.
    assert_eq!(
        pg.psql_with_pgpassword("postgres", pg.password(), &db, "select current_user")
            .unwrap(),
        "postgres"
    );
    let err = pg
        .psql_with_pgpassword("postgres", "wrong", &db, "select 1")
        .unwrap_err();
    assert!(err.contains("password authentication failed"), "{err}");
    // The password in the URL; none at all.
    assert_eq!(pg.psql_url(&pg.url(&db), "select 2").unwrap(), "2");
    let err = pg
        .psql_url(&pg.url_without_password(&db), "select 1")
        .unwrap_err();
    assert!(err.contains("no password supplied"), "{err}");
    // A role of the test's own, with a password that needs percent-encoding in a URL.
    pg.create_role("kg_app", "p@ss:w/rd'\"");
    assert_eq!(
        pg.psql_url(
            &pg.url_for("kg_app", "p@ss:w/rd'\"", &db),
            "select current_user"
        )
        .unwrap(),
        "kg_app"
    );
    let err = pg
        .psql_url(&pg.url_for("kg_app", "nope", &db), "select 1")
        .unwrap_err();
    assert!(err.contains("password authentication failed"), "{err}");
}

#[test]
fn a_stopped_server_refuses_connections_and_restarts_with_its_data() {
    let pg = PgServer::start();
    let db = pg.create_test_database("restart");
    pg.psql(
        &db,
        "create table t (v text); insert into t values ('kept')",
    );
    let port = pg.port();
    pg.stop();
    assert!(!pg.is_running());
    assert!(!tcp_accepts(port), "port {port} still accepts after stop");
    assert!(pg.psql_url(&pg.url(&db), "select 1").is_err());
    let t = Instant::now();
    pg.start_again();
    eprintln!("start_again took {:?}", t.elapsed());
    assert_eq!(pg.port(), port);
    assert_eq!(
        pg.psql_url(&pg.url(&db), "select v from t").unwrap(),
        "kept"
    );
}

#[test]
fn a_frozen_server_accepts_but_never_answers_until_thawed() {
    let pg = PgServer::start();
    let db = pg.create_test_database("freeze");
    // A backend that exists before the freeze is stopped too.
    assert_eq!(pg.psql(&db, "select 1"), "1");
    pg.freeze();
    // The kernel still completes the TCP handshake (listen backlog); nothing speaks.
    assert!(tcp_accepts(pg.port()));
    let t = Instant::now();
    let err = pg
        .psql_url(&format!("{}?connect_timeout=1", pg.url(&db)), "select 1")
        .unwrap_err();
    let took = t.elapsed();
    eprintln!("psql against the frozen server failed after {took:?}: {err}");
    assert!(took < Duration::from_secs(15), "{took:?}");
    assert!(err.contains("timeout"), "{err}");
    pg.thaw();
    assert_eq!(pg.psql_url(&pg.url(&db), "select 3").unwrap(), "3");
}

#[test]
fn a_killed_server_recovers_on_restart() {
    let pg = PgServer::start();
    let db = pg.create_test_database("crash");
    // Committed for good before the crash: synchronous_commit is off server-wide.
    pg.psql(
        &db,
        "set synchronous_commit = on; create table t (n int); insert into t values (7)",
    );
    let pid = pg.pid().unwrap();
    pg.kill();
    assert!(!proc_alive(pid));
    assert!(!tcp_accepts(pg.port()));
    pg.start_again();
    assert_eq!(pg.psql(&db, "select n from t"), "7");
    assert!(pg.log().contains("not properly shut down"), "{}", pg.log());
}

#[test]
fn dropping_a_server_stops_it_and_removes_its_directory_even_when_frozen() {
    let pg = PgServer::start();
    let (pid, dir, port) = (pg.pid().unwrap(), pg.data_dir(), pg.port());
    pg.freeze();
    drop(pg);
    assert!(!proc_alive(pid), "postmaster {pid} still there");
    assert!(!dir.exists(), "{} still there", dir.display());
    assert!(!tcp_accepts(port));
}

#[test]
fn a_tls_server_verifies_against_the_test_ca_and_refuses_plain_tcp() {
    let ca = TestCa::new();
    let pg = PgServer::start_with_tls(&ca.ca);
    let db = pg.create_test_database("tls");
    let root = pg.ca_file().unwrap();
    let verified = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        pg.url(&db),
        root.display()
    );
    assert_eq!(
        pg.psql_url(
            &verified,
            "select ssl from pg_stat_ssl where pid = pg_backend_pid()"
        )
        .unwrap(),
        "t"
    );
    let err = pg
        .psql_url(&format!("{}?sslmode=disable", pg.url(&db)), "select 1")
        .unwrap_err();
    assert!(err.contains("no pg_hba.conf entry"), "{err}");
    // Trusting only some other CA fails verification.
    let other = TestCa::new();
    let err = pg
        .psql_url(
            &format!(
                "{}?sslmode=verify-full&sslrootcert={}",
                pg.url(&db),
                other.ca_file.display()
            ),
            "select 1",
        )
        .unwrap_err();
    assert!(err.contains("certificate verify failed"), "{err}");
}

#[tokio::test]
async fn the_shared_server_is_one_and_serves_a_database_per_test() {
    let (a, b) = tokio::task::spawn_blocking(|| {
        let pg = PgServer::shared();
        let a = pg.create_test_database("shared");
        let b = pg.create_test_database("shared");
        pg.psql(&a, "create table t (n int); insert into t values (1)");
        (a, b)
    })
    .await
    .unwrap();
    assert_ne!(a, b);
    let pg = PgServer::shared();
    assert!(std::ptr::eq(pg, PgServer::shared()));
    assert_eq!(pg.psql(&a, "select count(*) from t"), "1");
    assert!(pg.try_psql(&b, "select count(*) from t").is_err());
    assert_eq!(pg.psql(&b, "select 1"), "1");
}
