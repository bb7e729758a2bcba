//! One conformance suite over `&dyn Store`, run against both backends: SQLite (a file in a
//! temp dir) and PostgreSQL (a private server from Debian's package, a database per test).
//! Whatever the admin API, the CLI and the data plane rely on is asserted here once.

mod support;

use std::sync::{Arc, Barrier};
use std::time::Duration;

use keygate::crypto::MasterKey;
use keygate::secret::Secret;
use keygate::store::{
    issue_first_admin_key, AiSecretPatch, AiSecretWrite, EnvVarFilter, EnvVarWrite, ListQuery,
    NewApiKey, ObjectType, Page, PgSettings, PgStore, Role, SecretRef, SqliteStore, Store,
    StoreError, WriteMode,
};

/// Opens the store under test with the master key made of `byte`.
type Open = dyn Fn(u8) -> Result<Arc<dyn Store>, StoreError> + Sync;

fn key(s: &dyn Store, name: &str, digest: u8) -> keygate::store::ApiKeyRecord {
    let t = s.tenant().unwrap();
    s.create_api_key(
        NewApiKey {
            org_id: t.org_id,
            user_id: t.user_id,
            name: name.into(),
            role: Role::Proxy,
            digest: [digest; 32],
            preview_name: "sk-****abcd".into(),
            routes: Some(vec!["chat".into()]),
            limit: None,
        },
        &keygate::audit::Actor::Keygate,
    )
    .unwrap()
}

fn put(s: &dyn Store, org: &str, name: &str, value: &str) -> keygate::store::AiSecretRecord {
    s.write_ai_secret(
        org,
        AiSecretWrite {
            name: name.into(),
            secret_type: Some("openai".into()),
            metadata: None,
            secret: Some(Secret::new(value.into())),
        },
        WriteMode::SetValue,
        &keygate::audit::Actor::Keygate,
    )
    .unwrap()
}

fn keys_round_trip_and_only_data_plane_changes_move_revisions(open: &Open) {
    let s = open(1).unwrap();
    let t = s.tenant().unwrap();
    let r0 = s.revisions().unwrap();
    let rec = key(s.as_ref(), "ci", 9);
    assert_eq!(rec.routes.as_deref(), Some(&["chat".to_owned()][..]));
    let r1 = s.revisions().unwrap();
    assert!(r1.keys > r0.keys, "a new key moves the keys revision");
    let (p, rev) = s.principal_by_digest(&[9; 32]).unwrap();
    let p = p.expect("the key is found by its digest");
    assert_eq!(p.key_id(), rec.id);
    assert!(p.may_use("chat") && !p.may_use("files"));
    assert_eq!(rev, r1.keys, "the lookup reports the revision it read at");
    assert!(s.principal_by_digest(&[8; 32]).unwrap().0.is_none());

    // Stamping `exposed` changes nothing the data plane uses: no cache flush fleet-wide. The
    // event is written the first time only.
    s.flag_exposed(&rec.id, false).unwrap();
    s.flag_exposed(&rec.id, false).unwrap();
    let got = s.get_api_key(&t.org_id, &rec.id).unwrap().unwrap();
    assert!(got.exposed.is_some());
    assert_eq!(
        s.revisions().unwrap().keys,
        r1.keys,
        "flag_exposed moved the keys revision"
    );
    let actions = |s: &dyn keygate::store::Store| -> Vec<(String, String)> {
        let trail = s.audit_trail(0, 100).unwrap();
        trail.into_iter().map(|e| (e.action, e.object_id)).collect()
    };
    assert_eq!(
        actions(s.as_ref()),
        [
            ("key.created".to_owned(), rec.id.clone()),
            ("key.flagged_exposed".to_owned(), rec.id.clone())
        ]
    );
    // Revoking for cleartext flags and deletes in one step, with both events by keygate.
    let leaked = key(s.as_ref(), "leaked", 7);
    let r_leak = s.revisions().unwrap();
    s.flag_exposed(&leaked.id, true).unwrap();
    assert!(s.get_api_key(&t.org_id, &leaked.id).unwrap().is_none());
    assert!(s.principal_by_digest(&[7; 32]).unwrap().0.is_none());
    assert!(s.revisions().unwrap().keys > r_leak.keys);
    let trail = s.audit_trail(0, 100).unwrap();
    let tail: Vec<(&str, &str, &keygate::audit::Actor)> = trail[trail.len() - 2..]
        .iter()
        .map(|e| (e.action.as_str(), e.object_id.as_str(), &e.actor))
        .collect();
    assert_eq!(
        tail,
        [
            (
                "key.flagged_exposed",
                leaked.id.as_str(),
                &keygate::audit::Actor::Keygate
            ),
            (
                "key.revoked_cleartext",
                leaked.id.as_str(),
                &keygate::audit::Actor::Keygate
            )
        ]
    );
    let r1 = s.revisions().unwrap();

    // A quota change does.
    let limit = keygate::config::LimitSpec::new(2.5, 7);
    let limited = s
        .set_api_key_limit(&t.org_id, &rec.id, limit, &keygate::audit::Actor::Keygate)
        .unwrap()
        .unwrap();
    assert_eq!(limited.limit, limit);
    assert!(s.revisions().unwrap().keys > r1.keys);
    assert!(s
        .set_api_key_limit(&t.org_id, "nope", None, &keygate::audit::Actor::Keygate)
        .unwrap()
        .is_none());

    assert!(s
        .delete_api_key(Some("other-org"), &rec.id, &keygate::audit::Actor::Keygate)
        .unwrap()
        .is_none());
    let r2 = s.revisions().unwrap();
    assert_eq!(
        s.delete_api_key(Some(&t.org_id), &rec.id, &keygate::audit::Actor::Keygate)
            .unwrap()
            .unwrap()
            .id,
        rec.id
    );
    assert!(s.revisions().unwrap().keys > r2.keys);
    assert!(s
        .delete_api_key(None, &rec.id, &keygate::audit::Actor::Keygate)
        .unwrap()
        .is_none());
    assert!(s.principal_by_digest(&[9; 32]).unwrap().0.is_none());
    assert_eq!(s.count_api_keys().unwrap(), 0);
}

fn thousands_of_keys_in_one_call_keep_their_order(open: &Open) {
    let s = open(1).unwrap();
    let t = s.tenant().unwrap();
    let digest = |i: u32| {
        let mut d = [7u8; 32];
        d[..4].copy_from_slice(&i.to_be_bytes());
        d
    };
    // More than one PostgreSQL chunk (5,000).
    let n = 12_000u32;
    let new: Vec<NewApiKey> = (0..n)
        .map(|i| NewApiKey {
            org_id: t.org_id.clone(),
            user_id: t.user_id.clone(),
            name: format!("bulk-{i}"),
            role: Role::Proxy,
            digest: digest(i),
            preview_name: "sk-****".into(),
            routes: (i % 2 == 0).then(|| vec!["chat".to_owned()]),
            limit: keygate::config::LimitSpec::new(f64::from(i % 7 + 1), 3),
        })
        .collect();
    let made = s
        .create_api_keys(new, &keygate::audit::Actor::Keygate)
        .unwrap();
    assert_eq!(made.len(), n as usize);
    for i in [0, 1, 4_999, 5_000, 11_999] {
        let rec = &made[i as usize];
        assert_eq!(
            rec.name,
            format!("bulk-{i}"),
            "records come back in the order given"
        );
        let (p, _) = s.principal_by_digest(&digest(i)).unwrap();
        let p = p.expect("found by digest");
        assert_eq!(p.key_id(), rec.id);
        assert_eq!(p.may_use("files"), i % 2 == 1);
        assert_eq!(p.limit().unwrap().per_second(), f64::from(i % 7 + 1));
    }
    assert_eq!(s.count_api_keys().unwrap(), u64::from(n));
}

fn pages_are_newest_first_and_cursors_survive_deletion(open: &Open) {
    let s = open(1).unwrap();
    let org = s.tenant().unwrap().org_id;
    let mut made = Vec::new();
    for i in 0..7 {
        made.push(put(s.as_ref(), &org, &format!("S{i}"), "value-12345").id);
    }
    made.reverse(); // newest first
    let page = |p: Page, limit| {
        let q = ListQuery {
            page: p,
            limit,
            ..ListQuery::all(&org, 0)
        };
        s.list_ai_secrets(&q, &[])
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect::<Vec<_>>()
    };
    assert_eq!(page(Page::First, 100), made);
    assert_eq!(page(Page::First, 3), made[..3]);
    assert_eq!(page(Page::After(made[2].clone()), 3), made[3..6]);
    assert_eq!(page(Page::After(made[6].clone()), 3), Vec::<String>::new());
    assert_eq!(page(Page::Before(made[5].clone()), 2), made[3..5]);
    assert_eq!(page(Page::Before(made[0].clone()), 2), Vec::<String>::new());
    s.delete_ai_secret(
        &org,
        SecretRef::Id(&made[2]),
        &keygate::audit::Actor::Keygate,
    )
    .unwrap();
    assert_eq!(page(Page::After(made[2].clone()), 2), made[3..5]);
    let bogus = uuid::Uuid::new_v4().to_string();
    assert!(matches!(
        s.list_ai_secrets(
            &ListQuery {
                page: Page::After(bogus),
                ..ListQuery::all(&org, 5)
            },
            &[]
        ),
        Err(StoreError::UnknownCursor(_))
    ));
    // Filters: ids, name, type.
    let q = ListQuery {
        ids: vec![made[0].clone(), made[4].clone()],
        ..ListQuery::all(&org, 10)
    };
    assert_eq!(s.list_ai_secrets(&q, &[]).unwrap().len(), 2);
    let q = ListQuery {
        name: Some("S3".into()),
        ..ListQuery::all(&org, 10)
    };
    assert_eq!(s.list_ai_secrets(&q, &[]).unwrap().len(), 1);
    assert_eq!(
        s.list_ai_secrets(&ListQuery::all(&org, 10), &["anthropic".into()])
            .unwrap()
            .len(),
        0
    );
    assert_eq!(
        s.list_ai_secrets(&ListQuery::all(&org, 10), &["openai".into()])
            .unwrap()
            .len(),
        6
    );
}

fn secrets_follow_the_write_modes(open: &Open) {
    let s = open(1).unwrap();
    let org = s.tenant().unwrap().org_id;
    let r0 = s.revisions().unwrap();
    let a = put(s.as_ref(), &org, "OPENAI", "upstream-secret-value-123");
    assert!(s.revisions().unwrap().secrets > r0.secrets);
    assert_eq!(a.preview_secret.as_deref(), Some("****-123"));
    assert_eq!(
        s.ai_secret_value(&org, "OPENAI")
            .unwrap()
            .unwrap()
            .1
            .expose(),
        "upstream-secret-value-123"
    );
    let write = |mode, ty: &str, meta: Option<serde_json::Value>, value: Option<&str>| {
        s.write_ai_secret(
            &org,
            AiSecretWrite {
                name: "OPENAI".into(),
                secret_type: Some(ty.into()),
                metadata: meta.map(|m| m.as_object().unwrap().clone()),
                secret: value.map(|v| Secret::new(v.into())),
            },
            mode,
            &keygate::audit::Actor::Keygate,
        )
        .unwrap()
    };
    // POST on an existing name returns it unmodified.
    assert_eq!(
        write(WriteMode::CreateOrGet, "other", None, Some("ignored")),
        a
    );
    // PUT replaces the fields; an omitted value keeps the stored one.
    let meta = serde_json::json!({"a": {"x": 1}, "b": 2});
    let b = write(WriteMode::Replace, "azure", Some(meta), None);
    assert_eq!(b.id, a.id);
    assert_eq!(b.secret_type.as_deref(), Some("azure"));
    assert_eq!(
        s.ai_secret_value(&org, "OPENAI")
            .unwrap()
            .unwrap()
            .1
            .expose(),
        "upstream-secret-value-123"
    );
    // PATCH deep-merges metadata and renames; a taken name is a conflict.
    put(s.as_ref(), &org, "OTHER", "other-value-0000");
    let patched = s
        .patch_ai_secret(
            &org,
            &a.id,
            AiSecretPatch {
                metadata: Some(
                    serde_json::json!({"a": {"y": 2}})
                        .as_object()
                        .unwrap()
                        .clone(),
                ),
                secret: Some(Secret::new("patched-value-9876".into())),
                ..Default::default()
            },
            &keygate::audit::Actor::Keygate,
        )
        .unwrap()
        .unwrap();
    assert_eq!(
        serde_json::Value::Object(patched.metadata.unwrap()),
        serde_json::json!({"a": {"x": 1, "y": 2}, "b": 2})
    );
    assert_eq!(
        s.ai_secret_value(&org, "OPENAI")
            .unwrap()
            .unwrap()
            .1
            .expose(),
        "patched-value-9876"
    );
    let taken = s.patch_ai_secret(
        &org,
        &a.id,
        AiSecretPatch {
            name: Some("OTHER".into()),
            ..Default::default()
        },
        &keygate::audit::Actor::Keygate,
    );
    assert!(matches!(taken, Err(StoreError::Conflict(_))), "{taken:?}");
    assert!(s
        .patch_ai_secret(
            &org,
            "nope",
            AiSecretPatch::default(),
            &keygate::audit::Actor::Keygate
        )
        .unwrap()
        .is_none());
    // Delete by name and by id.
    assert!(s
        .delete_ai_secret(
            &org,
            SecretRef::Name("OTHER"),
            &keygate::audit::Actor::Keygate
        )
        .unwrap()
        .is_some());
    assert!(s
        .delete_ai_secret(&org, SecretRef::Id(&a.id), &keygate::audit::Actor::Keygate)
        .unwrap()
        .is_some());
    assert!(s.ai_secret_value(&org, "OPENAI").unwrap().is_none());
    assert!(s.get_ai_secret(&org, &a.id).unwrap().is_none());
}

fn env_vars_scope_and_stamping_is_not_a_change(open: &Open) {
    let s = open(1).unwrap();
    let t = s.tenant().unwrap();
    let org = t.org_id.clone();
    let write = |ot, oid: &str, name: &str, value: &str, mode| {
        s.write_env_var(
            &org,
            EnvVarWrite {
                object_type: ot,
                object_id: oid.into(),
                name: name.into(),
                value: Some(Secret::new(value.into())),
            },
            mode,
            &keygate::audit::Actor::Keygate,
        )
        .unwrap()
    };
    let org_var = write(
        ObjectType::Organization,
        &org,
        "REGION",
        "eu",
        WriteMode::CreateOrGet,
    );
    let p = write(
        ObjectType::Project,
        "p1",
        "REGION",
        "us",
        WriteMode::CreateOrGet,
    );
    assert_eq!(
        write(
            ObjectType::Project,
            "p1",
            "REGION",
            "ignored",
            WriteMode::CreateOrGet
        )
        .id,
        p.id
    );
    write(
        ObjectType::Project,
        "p1",
        "REGION",
        "ap",
        WriteMode::Replace,
    );
    let env = keygate::store::scope_env(s.as_ref(), (&org, &t.org_name), ObjectType::Project, "p1")
        .unwrap();
    assert_eq!(env.len(), 1);
    assert_eq!(
        env[0].1.expose(),
        "ap",
        "the project's value wins over the org's"
    );
    let listed = s
        .list_env_vars(
            &ListQuery::all(&org, 10),
            &EnvVarFilter {
                object_type: Some(ObjectType::Project),
                object_id: None,
            },
        )
        .unwrap();
    assert_eq!(listed.len(), 1);
    let before = s.revisions().unwrap();
    s.mark_env_vars_used(&org, &[org_var.id.clone(), p.id.clone()])
        .unwrap();
    assert!(s.get_env_var(&org, &p.id).unwrap().unwrap().used.is_some());
    assert_eq!(
        s.revisions().unwrap().env_vars,
        before.env_vars,
        "stamping `used` moved the env_vars revision"
    );
    // Renaming onto a taken name is a conflict; a free one works and moves the revision.
    write(
        ObjectType::Project,
        "p1",
        "OTHER",
        "x",
        WriteMode::CreateOrGet,
    );
    assert!(matches!(
        s.patch_env_var(&org, &p.id, "OTHER", None, &keygate::audit::Actor::Keygate),
        Err(StoreError::Conflict(_))
    ));
    let renamed = s
        .patch_env_var(&org, &p.id, "ZONE", None, &keygate::audit::Actor::Keygate)
        .unwrap()
        .unwrap();
    assert_eq!(renamed.name, "ZONE");
    assert!(s.revisions().unwrap().env_vars > before.env_vars);
    assert!(s
        .delete_env_var(&org, &p.id, &keygate::audit::Actor::Keygate)
        .unwrap()
        .is_some());
    assert!(s
        .delete_env_var(&org, &p.id, &keygate::audit::Actor::Keygate)
        .unwrap()
        .is_none());
}

fn concurrent_starts_mint_one_first_admin_key(open: &Open) {
    let first = open(1).unwrap();
    let master = Arc::new(MasterKey::from_bytes(&[1; 32]));
    let stores: Vec<Arc<dyn Store>> = (0..6).map(|_| open(1).unwrap()).collect();
    drop(first);
    let barrier = Arc::new(Barrier::new(stores.len()));
    let minted: Vec<bool> = std::thread::scope(|scope| {
        let handles: Vec<_> = stores
            .iter()
            .map(|s| {
                let (barrier, master) = (barrier.clone(), master.clone());
                scope.spawn(move || {
                    barrier.wait();
                    issue_first_admin_key(s.as_ref(), &master)
                        .unwrap()
                        .is_some()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(minted.iter().filter(|m| **m).count(), 1, "{minted:?}");
    assert_eq!(stores[0].count_api_keys().unwrap(), 1);
    let keys = stores[0]
        .list_api_keys(&ListQuery::all(&stores[0].tenant().unwrap().org_id, 10))
        .unwrap();
    assert_eq!(keys[0].role, Role::Admin);
}

fn another_master_key_is_refused_before_anything_is_written(open: &Open) {
    let s = open(1).unwrap();
    let org = s.tenant().unwrap().org_id;
    put(s.as_ref(), &org, "KEEP", "keep-this-value-1");
    let err = open(2).err().expect("another master key is refused");
    assert!(matches!(err, StoreError::WrongMasterKey), "{err}");
    assert_eq!(
        s.ai_secret_value(&org, "KEEP").unwrap().unwrap().1.expose(),
        "keep-this-value-1"
    );
}

/// Usage merges (the latest time wins, counts add, a deleted key is skipped) and moves no
/// revision; every change leaves one chained event with its actor, concurrent writers included.
fn usage_merges_and_the_audit_trail_chains_every_change(open: &Open) {
    use keygate::audit::{Actor, NewEvent, Verifier};
    let s = open(1).unwrap();
    let master = MasterKey::from_bytes(&[1; 32]);
    let t = s.tenant().unwrap();
    let alice = Actor::Cli {
        user: "alice".into(),
    };
    let a = key(s.as_ref(), "a", 1);
    let b = key(s.as_ref(), "b", 2);
    let rev = s.revisions().unwrap();
    let usage = |id: &str, ms: u64, n: u64, l: u64| keygate::store::KeyUsage {
        key_id: id.to_owned(),
        last_used_ms: ms,
        requests: n,
        rate_limited: l,
    };
    let t2 = 1_800_000_000_000; // 2027-01-15T08:00:00.000Z
    s.record_usage(&[usage(&a.id, t2, 5, 2), usage(&b.id, t2 - 1, 1, 0)])
        .unwrap();
    // Another instance's flush: an older time, more counts; and a key deleted meanwhile.
    s.record_usage(&[
        usage(&a.id, t2 - 60_000, 3, 1),
        usage("0190a000-0000-7000-8000-000000000000", t2, 9, 9),
    ])
    .unwrap();
    let a2 = s.get_api_key(&t.org_id, &a.id).unwrap().unwrap();
    assert_eq!(a2.last_used.as_deref(), Some("2027-01-15T08:00:00.000Z"));
    assert_eq!((a2.request_count, a2.rate_limited_count), (8, 3));
    let b2 = s.get_api_key(&t.org_id, &b.id).unwrap().unwrap();
    assert_eq!(b2.last_used.as_deref(), Some("2027-01-15T07:59:59.999Z"));
    assert_eq!(s.revisions().unwrap(), rev, "usage moved a revision");
    assert!(s
        .list_api_keys(&ListQuery::all(&t.org_id, 10))
        .unwrap()
        .iter()
        .any(|k| k.request_count == 8));

    // Changes by an actor, then a config event of no org.
    s.delete_api_key(Some(&t.org_id), &b.id, &alice).unwrap();
    put(s.as_ref(), &t.org_id, "S", "secret-value-0001");
    s.record_event(NewEvent {
        org_id: None,
        actor: Actor::Keygate,
        action: keygate::audit::action::CONFIG_RELOADED,
        object_type: "config",
        object_id: "1".into(),
        object_name: "/etc/keygate.toml".into(),
        outcome: "ok".into(),
    })
    .unwrap();
    // Writers in parallel (four connections on PostgreSQL): the chain never forks.
    let barrier = Barrier::new(4);
    std::thread::scope(|sc| {
        for w in 0..4 {
            let (s, barrier, alice) = (s.clone(), &barrier, alice.clone());
            sc.spawn(move || {
                barrier.wait();
                for i in 0..10 {
                    let org = s.tenant().unwrap().org_id;
                    s.write_env_var(
                        &org,
                        EnvVarWrite {
                            object_type: ObjectType::Project,
                            object_id: format!("p{w}"),
                            name: format!("V{i}"),
                            value: Some(Secret::new(format!("v-{w}-{i}"))),
                        },
                        WriteMode::Replace,
                        &alice,
                    )
                    .unwrap();
                }
            });
        }
    });
    let events = |org: &str, page: Page, limit: u32| {
        s.audit_events(&keygate::store::AuditQuery {
            org_id: org.to_owned(),
            page,
            limit,
        })
        .unwrap()
    };
    let page = events(&t.org_id, Page::First, 1000);
    // key a, key b, b deleted, S created, the reload, 40 env vars; newest first.
    assert_eq!(page.len(), 45);
    let seqs: Vec<i64> = page.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=45).rev().collect::<Vec<_>>());
    assert_eq!(page[44].action, "key.created");
    assert_eq!(
        (page[42].action.as_str(), page[42].object_name.as_str()),
        ("key.deleted", "b")
    );
    assert_eq!(page[42].actor, alice);
    assert_eq!(page[42].object_id, b.id);
    assert_eq!(page[41].action, "secret.created");
    assert_eq!(
        (page[40].action.as_str(), page[40].org_id.as_deref()),
        ("config.reloaded", None)
    );
    assert!(page[..40]
        .iter()
        .all(|e| e.action == "env_var.created" && e.actor == alice));
    let older = events(&t.org_id, Page::After(page[9].id.clone()), 5);
    assert_eq!(older, page[10..15]);
    let newer = events(&t.org_id, Page::Before(page[9].id.clone()), 3);
    assert_eq!(newer, page[6..9]);
    // Another org sees the config event only.
    let other = events("other-org", Page::First, 100);
    assert_eq!(other.len(), 1);

    let mut v = Verifier::new(&master);
    let mut after = 0;
    loop {
        let batch = s.audit_trail(after, 7).unwrap();
        let Some(last) = batch.last() else { break };
        after = last.seq;
        for e in &batch {
            v.check(e).unwrap();
        }
    }
    v.finish(s.audit_head().unwrap().as_deref()).unwrap();
    assert_eq!(v.checked(), 45);
    // A verifier with another master key finds the first event forged.
    let other = MasterKey::from_bytes(&[2; 32]);
    let mut wrong = Verifier::new(&other);
    let first = s.audit_trail(0, 1).unwrap();
    assert!(wrong
        .check(&first[0])
        .unwrap_err()
        .0
        .starts_with("event #1 "));
}

macro_rules! suite {
    ($backend:ident, $opener:expr) => {
        mod $backend {
            use super::*;

            #[test]
            fn keys_round_trip_and_only_data_plane_changes_move_revisions() {
                super::keys_round_trip_and_only_data_plane_changes_move_revisions(&$opener);
            }
            #[test]
            fn thousands_of_keys_in_one_call_keep_their_order() {
                super::thousands_of_keys_in_one_call_keep_their_order(&$opener);
            }
            #[test]
            fn pages_are_newest_first_and_cursors_survive_deletion() {
                super::pages_are_newest_first_and_cursors_survive_deletion(&$opener);
            }
            #[test]
            fn secrets_follow_the_write_modes() {
                super::secrets_follow_the_write_modes(&$opener);
            }
            #[test]
            fn env_vars_scope_and_stamping_is_not_a_change() {
                super::env_vars_scope_and_stamping_is_not_a_change(&$opener);
            }
            #[test]
            fn concurrent_starts_mint_one_first_admin_key() {
                super::concurrent_starts_mint_one_first_admin_key(&$opener);
            }
            #[test]
            fn another_master_key_is_refused_before_anything_is_written() {
                super::another_master_key_is_refused_before_anything_is_written(&$opener);
            }
            #[test]
            fn usage_merges_and_the_audit_trail_chains_every_change() {
                super::usage_merges_and_the_audit_trail_chains_every_change(&$opener);
            }
        }
    };
}

/// A SQLite store in a temp dir of the test's own.
struct SqliteOpener(tempfile::TempDir);

impl SqliteOpener {
    fn opener() -> impl Fn(u8) -> Result<Arc<dyn Store>, StoreError> + Sync {
        let dir = SqliteOpener(tempfile::tempdir().unwrap());
        move |byte| {
            let master = Arc::new(MasterKey::from_bytes(&[byte; 32]));
            Ok(Arc::new(SqliteStore::open(&dir.0.path().join("k.db"), master)?) as Arc<dyn Store>)
        }
    }
}

/// A database of the test's own on the shared private PostgreSQL server, dropped at the end.
struct TestDb(String);

impl Drop for TestDb {
    fn drop(&mut self) {
        support::postgres::PgServer::shared().drop_database(&self.0);
    }
}

struct PgOpener;

impl PgOpener {
    fn opener() -> impl Fn(u8) -> Result<Arc<dyn Store>, StoreError> + Sync {
        let pg = support::postgres::PgServer::shared();
        let db = TestDb(pg.create_test_database("conformance"));
        move |byte| {
            let master = Arc::new(MasterKey::from_bytes(&[byte; 32]));
            let settings = PgSettings::from_url(&pg.url(&db.0), None, 4, Duration::from_secs(5))?;
            Ok(Arc::new(PgStore::open(&settings, master)?) as Arc<dyn Store>)
        }
    }
}

suite!(sqlite, SqliteOpener::opener());
suite!(postgres, PgOpener::opener());

/// TLS to PostgreSQL: the server's certificate is verified against the system roots plus
/// `store.ca_file`; there is no way to skip it.
#[test]
fn postgres_over_tls_verifies_the_server_certificate() {
    let ca = support::TestCa::new();
    let pg = support::postgres::PgServer::start_with_tls(&ca.ca);
    let db = pg.create_test_database("tls");
    let url = format!("{}?sslmode=require", pg.url(&db));
    let open = |ca_file: Option<std::path::PathBuf>| {
        let settings = PgSettings::from_url(&url, ca_file, 2, Duration::from_secs(5))?;
        PgStore::open(&settings, Arc::new(MasterKey::from_bytes(&[1; 32])))
    };
    let trusted = open(Some(ca.ca_file.clone())).expect("TLS with the CA trusted");
    assert!(trusted.tenant().is_ok());
    drop(trusted);
    let err = open(None).expect_err("an untrusted certificate is refused");
    assert!(
        err.to_string().to_lowercase().contains("certificate"),
        "{err}"
    );
    assert!(!err.to_string().contains(pg.password()));
}

/// A PostgreSQL store of schema version 1 (before key usage and the audit trail) is migrated in
/// place on open: its keys and secrets stay, usage starts at zero, and the trail starts empty
/// and chains from there.
#[test]
fn postgres_version_1_store_migrates_to_usage_and_the_audit_trail() {
    let pg = support::postgres::PgServer::shared();
    let db = TestDb(pg.create_test_database("upgrade"));
    let settings = PgSettings::from_url(&pg.url(&db.0), None, 2, Duration::from_secs(5)).unwrap();
    let master = || Arc::new(MasterKey::from_bytes(&[1; 32]));
    let (rec, org) = {
        let s = PgStore::open(&settings, master()).unwrap();
        let org = s.tenant().unwrap().org_id;
        put(&s, &org, "KEEP", "keep-this-value-1");
        (key(&s, "old", 1), org)
    };
    // Back to version 1, as the release before this one left it.
    pg.psql(
        &db.0,
        "BEGIN; DROP TABLE audit_events; DELETE FROM meta WHERE k = 'audit_head'; \
         ALTER TABLE api_keys DROP COLUMN last_used, DROP COLUMN request_count, \
         DROP COLUMN rate_limited_count; DELETE FROM keygate_migrations WHERE version = 2; COMMIT;",
    );
    let s = PgStore::open(&settings, master()).unwrap();
    let k = s.get_api_key(&org, &rec.id).unwrap().unwrap();
    assert_eq!((k.last_used, k.request_count), (None, 0));
    assert_eq!(
        s.ai_secret_value(&org, "KEEP").unwrap().unwrap().1.expose(),
        "keep-this-value-1"
    );
    assert!(s.audit_trail(0, 10).unwrap().is_empty());
    s.delete_api_key(Some(&org), &rec.id, &keygate::audit::Actor::Keygate)
        .unwrap();
    let trail = s.audit_trail(0, 10).unwrap();
    assert_eq!(trail.len(), 1);
    assert_eq!(trail[0].seq, 1);
    let m = MasterKey::from_bytes(&[1; 32]);
    let mut v = keygate::audit::Verifier::new(&m);
    v.check(&trail[0]).unwrap();
    v.finish(s.audit_head().unwrap().as_deref()).unwrap();
    assert_eq!(
        pg.psql(
            &db.0,
            "SELECT string_agg(version::text, ',' ORDER BY version) FROM keygate_migrations"
        )
        .trim(),
        "1,2"
    );
}
