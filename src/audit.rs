//! The audit trail: one event per change to a key, secret or env var, and per config reload,
//! written by the store in the same transaction as the change it records.
//!
//! The trail is tamper-evident. Events are numbered (`seq`, 1, 2, 3 …) and each carries an
//! HMAC-SHA256 over its own fields and the previous event's MAC, under a key derived from the
//! master key for this use only ([`crate::crypto::MasterKey::audit_mac`]). The store also
//! keeps a head record (the last event's number and MAC, itself MACed), so that cutting
//! events off the end shows too. Someone who can write to the database but does not hold the
//! master key cannot edit, delete, insert or reorder events without [`Verifier`] naming the
//! first one that does not fit. What remains possible for them: putting back a whole older
//! copy of the trail and of its head record (a rollback), which only a [`Mark`] kept outside
//! the database reveals (`keygate audit verify` prints one and checks it with `--expect`).
//!
//! An event never holds a key, a secret or an env var value, nor a prefix of one: the actor
//! is named by key id and preview (the preview is what every list shows already).
//!
//! ```text
//!  mac(n) = HMAC(k_audit, "keygate-audit-v1" ‖ seq ‖ id ‖ created ‖ org ‖ actor ‖ action ‖
//!                         object ‖ outcome ‖ mac(n-1))          mac(0) = 32 zero bytes
//!  head   = seq(last) ‖ mac(last) ‖ HMAC(k_audit, "keygate-audit-head-v1" ‖ seq ‖ mac)
//! ```

use serde_json::{json, Value};

use crate::crypto::MasterKey;
use crate::store::Principal;

/// Who made a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    /// An admin key, through the admin API or the settings page.
    ApiKey { id: String, preview: String },
    /// The command line, run by this OS user.
    Cli { user: String },
    /// keygate itself (the first admin key, a key flagged or revoked for cleartext, a reload).
    Keygate,
}

impl Actor {
    /// The admin key `p`, shown by its id and `preview`.
    pub fn key_from(p: &Principal, preview: String) -> Actor {
        Actor::ApiKey {
            id: p.key_id(),
            preview,
        }
    }

    /// The command line, as the OS user running it: the passwd name of the real uid, else
    /// `uid N`. Not `$USER`, which any caller sets to what it likes and cron and systemd leave
    /// unset.
    pub fn cli() -> Actor {
        let uid = nix::unistd::getuid();
        let user = nix::unistd::User::from_uid(uid)
            .ok()
            .flatten()
            .map(|u| u.name)
            .filter(|u| !u.is_empty() && u.len() <= 64 && !u.chars().any(char::is_control))
            .unwrap_or_else(|| format!("uid {uid}"));
        Actor::Cli { user }
    }

    /// The stored form: (kind, id, name).
    pub fn parts(&self) -> (&str, &str, &str) {
        match self {
            Actor::ApiKey { id, preview } => ("api_key", id, preview),
            Actor::Cli { user } => ("cli", "", user),
            Actor::Keygate => ("keygate", "", ""),
        }
    }

    /// Back from the stored form; an unknown kind reads as keygate's own (and fails the MAC
    /// check anyway, since kinds are never written other than by [`Actor::parts`]).
    pub fn from_parts(kind: &str, id: String, name: String) -> Actor {
        match kind {
            "api_key" => Actor::ApiKey { id, preview: name },
            "cli" => Actor::Cli { user: name },
            _ => Actor::Keygate,
        }
    }

    /// The wire form: `{"type": "api_key", "id": …, "preview_name": …}`, `{"type": "cli",
    /// "user": …}` or `{"type": "keygate"}`.
    pub fn to_json(&self) -> Value {
        match self {
            Actor::ApiKey { id, preview } => {
                json!({"type": "api_key", "id": id, "preview_name": preview})
            }
            Actor::Cli { user } => json!({"type": "cli", "user": user}),
            Actor::Keygate => json!({"type": "keygate"}),
        }
    }
}

impl std::fmt::Display for Actor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Actor::ApiKey { id, preview } => write!(f, "key {id} ({preview})"),
            Actor::Cli { user } => write!(f, "cli ({user})"),
            Actor::Keygate => f.write_str("keygate"),
        }
    }
}

/// What happened, as stored and served (`key.created` …).
pub mod action {
    pub const KEY_CREATED: &str = "key.created";
    pub const KEY_DELETED: &str = "key.deleted";
    pub const KEY_CHANGED: &str = "key.changed";
    pub const KEY_EXPOSED: &str = "key.flagged_exposed";
    pub const KEY_REVOKED: &str = "key.revoked_cleartext";
    pub const SECRET_CREATED: &str = "secret.created";
    pub const SECRET_REPLACED: &str = "secret.replaced";
    pub const SECRET_CHANGED: &str = "secret.changed";
    pub const SECRET_DELETED: &str = "secret.deleted";
    pub const ENV_VAR_CREATED: &str = "env_var.created";
    pub const ENV_VAR_REPLACED: &str = "env_var.replaced";
    pub const ENV_VAR_CHANGED: &str = "env_var.changed";
    pub const ENV_VAR_DELETED: &str = "env_var.deleted";
    pub const CONFIG_RELOADED: &str = "config.reloaded";
    pub const CONFIG_REFUSED: &str = "config.refused";
}

/// An event to append: the store numbers, times and MACs it.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub org_id: Option<String>,
    pub actor: Actor,
    pub action: &'static str,
    pub object_type: &'static str,
    pub object_id: String,
    pub object_name: String,
    /// `ok`, or why not (`refused` for a config the server did not take).
    pub outcome: String,
}

impl NewEvent {
    /// A change made (`ok`) to an object.
    pub fn change(
        by: &Actor,
        org_id: &str,
        action: &'static str,
        object_type: &'static str,
        object_id: &str,
        object_name: &str,
    ) -> NewEvent {
        NewEvent {
            org_id: Some(org_id.to_owned()),
            actor: by.clone(),
            action,
            object_type,
            object_id: object_id.to_owned(),
            object_name: object_name.to_owned(),
            outcome: "ok".to_owned(),
        }
    }
}

/// A stored event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub seq: i64,
    pub id: String,
    pub created: String,
    pub org_id: Option<String>,
    pub actor: Actor,
    pub action: String,
    pub object_type: String,
    pub object_id: String,
    pub object_name: String,
    pub outcome: String,
    pub mac: Vec<u8>,
}

impl Event {
    /// Numbers, times and MACs `new` as the event after `prev` (`None`: the first event).
    pub fn seal(master: &MasterKey, prev: Option<(i64, &[u8])>, new: NewEvent) -> Event {
        let (id, created) = crate::store::new_id();
        let (seq, prev_mac) = match prev {
            Some((seq, mac)) => (seq + 1, mac),
            None => (1, &[0u8; 32][..]),
        };
        let mut ev = Event {
            seq,
            id,
            created,
            org_id: new.org_id,
            actor: new.actor,
            action: new.action.to_owned(),
            object_type: new.object_type.to_owned(),
            object_id: new.object_id,
            object_name: new.object_name,
            outcome: new.outcome,
            mac: Vec::new(),
        };
        ev.mac = master.audit_mac(&ev.canonical(prev_mac)).to_vec();
        ev
    }

    /// The bytes the MAC covers: every field, length-prefixed, then the previous MAC.
    fn canonical(&self, prev_mac: &[u8]) -> Vec<u8> {
        let (kind, actor_id, actor_name) = self.actor.parts();
        let fields: [&[u8]; 11] = [
            self.id.as_bytes(),
            self.created.as_bytes(),
            self.org_id.as_deref().unwrap_or("").as_bytes(),
            kind.as_bytes(),
            actor_id.as_bytes(),
            actor_name.as_bytes(),
            self.action.as_bytes(),
            self.object_type.as_bytes(),
            self.object_id.as_bytes(),
            self.object_name.as_bytes(),
            self.outcome.as_bytes(),
        ];
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(b"keygate-audit-v1");
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.push(u8::from(self.org_id.is_some()));
        for f in fields {
            out.extend_from_slice(&(f.len() as u32).to_be_bytes());
            out.extend_from_slice(f);
        }
        out.extend_from_slice(prev_mac);
        out
    }

    /// The wire form (`GET /v1/audit`, `keygate audit list --json`): never the MAC.
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "seq": self.seq,
            "created": self.created,
            "actor": self.actor.to_json(),
            "action": self.action,
            "object_type": self.object_type,
            "object_id": self.object_id,
            "object_name": self.object_name,
            "outcome": self.outcome,
        })
    }
}

/// The head record of a trail whose last event is `last`.
pub fn head_record(master: &MasterKey, last: &Event) -> Vec<u8> {
    let mut out = Vec::with_capacity(72);
    out.extend_from_slice(&last.seq.to_be_bytes());
    out.extend_from_slice(&last.mac);
    let tag = master.audit_mac(&head_canonical(&out));
    out.extend_from_slice(&tag);
    out
}

fn head_canonical(seq_and_mac: &[u8]) -> Vec<u8> {
    let mut c = b"keygate-audit-head-v1".to_vec();
    c.extend_from_slice(seq_and_mac);
    c
}

/// Where a trail stops fitting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Broken(pub String);

/// A point of the trail noted elsewhere: an event's number and a prefix of its MAC, written
/// `SEQ:HEX` as `keygate audit verify` prints it. A later check that no longer has this event
/// with this MAC finds a rollback or a rewrite the chain alone cannot show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mark {
    pub seq: i64,
    pub mac_prefix: Vec<u8>,
}

impl Mark {
    /// The mark of event `seq` with MAC `mac` (its first 8 bytes).
    pub fn of(seq: i64, mac: &[u8]) -> Mark {
        Mark {
            seq,
            mac_prefix: mac.iter().take(8).copied().collect(),
        }
    }

    /// Where `ev` (the event of this mark's number) differs from the mark, if it does.
    pub fn check(&self, ev: &Event) -> Result<(), Broken> {
        if ev.mac.starts_with(&self.mac_prefix) {
            return Ok(());
        }
        Err(Broken(format!(
            "event #{} ({}) is not the one noted as {self}: the trail was rewritten from there \
             or before, or replaced by another (or the mark is from another store)",
            ev.seq, ev.id
        )))
    }
}

impl std::fmt::Display for Mark {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}",
            self.seq,
            *crate::crypto::encode_hex(&self.mac_prefix)
        )
    }
}

impl std::str::FromStr for Mark {
    type Err = String;

    fn from_str(s: &str) -> Result<Mark, String> {
        const FORM: &str =
            "expected SEQ:HEX as `keygate audit verify` prints it, e.g. 42:5f0c1a2b3c4d5e6f";
        let (seq, hex) = s.split_once(':').ok_or(FORM)?;
        let seq: i64 = seq.parse().map_err(|_| FORM)?;
        let mac_prefix = crate::crypto::decode_hex(hex)
            .filter(|b| seq >= 1 && (4..=32).contains(&b.len()))
            .ok_or(FORM)?;
        Ok(Mark {
            seq,
            mac_prefix: mac_prefix.to_vec(),
        })
    }
}

/// Checks a trail event by event, oldest first.
pub struct Verifier<'a> {
    master: &'a MasterKey,
    prev_mac: Vec<u8>,
    next_seq: i64,
}

impl<'a> Verifier<'a> {
    pub fn new(master: &'a MasterKey) -> Self {
        Verifier {
            master,
            prev_mac: vec![0; 32],
            next_seq: 1,
        }
    }

    /// How many events fit so far.
    pub fn checked(&self) -> i64 {
        self.next_seq - 1
    }

    /// Checks the next event.
    pub fn check(&mut self, ev: &Event) -> Result<(), Broken> {
        if ev.seq != self.next_seq {
            return Err(Broken(if ev.seq > self.next_seq {
                format!(
                    "event #{} ({}) follows #{}: {} missing (deleted from the trail)",
                    ev.seq,
                    ev.id,
                    self.next_seq - 1,
                    if ev.seq == self.next_seq + 1 {
                        format!("#{} is", self.next_seq)
                    } else {
                        format!("#{} to #{} are", self.next_seq, ev.seq - 1)
                    }
                )
            } else {
                format!(
                    "event #{} ({}) is out of order after #{}",
                    ev.seq,
                    ev.id,
                    self.next_seq - 1
                )
            }));
        }
        if !self
            .master
            .audit_mac_matches(&ev.canonical(&self.prev_mac), &ev.mac)
        {
            return Err(Broken(format!(
                "event #{} ({}, {} at {}) does not match its MAC: it was edited, moved, or \
                 written without the master key{}",
                ev.seq,
                ev.id,
                ev.action,
                ev.created,
                if ev.seq > 1 {
                    " (or the event before it was replaced)"
                } else {
                    ""
                }
            )));
        }
        self.prev_mac.clone_from(&ev.mac);
        self.next_seq += 1;
        Ok(())
    }

    /// Checks the end of the trail against the stored head record (`None`: there is none).
    pub fn finish(&self, head: Option<&[u8]>) -> Result<(), Broken> {
        let last = self.next_seq - 1;
        let Some(head) = head else {
            return if last == 0 {
                Ok(())
            } else {
                Err(Broken(format!(
                    "the trail has {last} events but its head record is missing (deleted)"
                )))
            };
        };
        if head.len() != 72
            || !self
                .master
                .audit_mac_matches(&head_canonical(&head[..40]), &head[40..])
        {
            return Err(Broken(
                "the head record does not match its MAC: it was edited, or written without \
                 the master key"
                    .into(),
            ));
        }
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&head[..8]);
        let head_seq = i64::from_be_bytes(seq);
        if head_seq != last || head[8..40] != self.prev_mac[..] {
            return Err(Broken(if head_seq > last {
                format!(
                    "the trail ends at #{last} but its head record says #{head_seq}: the last \
                     {} deleted",
                    if head_seq - last == 1 {
                        "event was".to_owned()
                    } else {
                        format!("{} events were", head_seq - last)
                    }
                )
            } else {
                format!(
                    "the trail ends at #{last} but its head record says #{head_seq}: events \
                     were added without the master key, or the head was replaced"
                )
            }));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn master() -> MasterKey {
        MasterKey::from_bytes(&[9; 32])
    }

    fn trail(m: &MasterKey, n: usize) -> Vec<Event> {
        let mut out: Vec<Event> = Vec::new();
        for i in 0..n {
            let prev = out.last().map(|e| (e.seq, e.mac.as_slice()));
            let ev = Event::seal(
                m,
                prev,
                NewEvent::change(
                    &Actor::Cli { user: "ops".into() },
                    "org",
                    action::KEY_CREATED,
                    "api_key",
                    &format!("id-{i}"),
                    "name",
                ),
            );
            out.push(ev);
        }
        out
    }

    fn verify(m: &MasterKey, evs: &[Event], head: Option<&[u8]>) -> Result<i64, Broken> {
        let mut v = Verifier::new(m);
        for e in evs {
            v.check(e)?;
        }
        v.finish(head)?;
        Ok(v.checked())
    }

    #[test]
    fn an_honest_trail_verifies_and_any_tampering_is_named() {
        let m = master();
        let evs = trail(&m, 5);
        let head = head_record(&m, evs.last().unwrap());
        assert_eq!(verify(&m, &evs, Some(&head)), Ok(5));
        assert_eq!(verify(&m, &[], None), Ok(0));

        let mut edited = evs.clone();
        edited[2].object_name = "other".into();
        let e = verify(&m, &edited, Some(&head)).unwrap_err().0;
        assert!(e.starts_with("event #3 "), "{e}");

        let mut deleted = evs.clone();
        deleted.remove(1);
        let e = verify(&m, &deleted, Some(&head)).unwrap_err().0;
        assert!(e.contains("#2 is missing"), "{e}");

        let mut swapped = evs.clone();
        swapped.swap(1, 2);
        let e = verify(&m, &swapped, Some(&head)).unwrap_err().0;
        assert!(e.contains("#3") && e.contains("follows #1"), "{e}");
        // Swapping the contents but keeping the numbers breaks the MACs instead.
        let mut renumbered = swapped.clone();
        renumbered[1].seq = 2;
        renumbered[2].seq = 3;
        let e = verify(&m, &renumbered, Some(&head)).unwrap_err().0;
        assert!(e.starts_with("event #2 "), "{e}");

        let e = verify(&m, &evs[..4], Some(&head)).unwrap_err().0;
        assert!(e.contains("the last event was deleted"), "{e}");
        let e = verify(&m, &evs, None).unwrap_err().0;
        assert!(e.contains("head record is missing"), "{e}");

        // Another master key can neither verify nor forge.
        let other = MasterKey::from_bytes(&[8; 32]);
        assert!(verify(&other, &evs, Some(&head)).is_err());
    }
}
