//! The QEMU migration capabilities and parameters skyferry's own device-state migration
//! relies on (see `device_state.rs`): set by skyferry before pre-copy starts, checked, and
//! the operator's values put back when skyferry lets go of the QEMU.
//!
//! An operator's QEMU may have been tuned for QEMU's own migrations: `multifd` on makes QEMU
//! refuse an `fd:` URI ("Migration requires multi-channel URIs"), `return-path` makes the
//! source wait for an answer that never comes on the state socket, `tls-creds` would wrap
//! the state in TLS, `mapped-ram` wants a file, postcopy and COLO change the stream. Found
//! only at the switchover, each would fail the migration after the whole pre-copy; here
//! they fail it (or are fixed) before iteration 1.

use serde_json::{Map, Value, json};

use super::qmp::Qmp;
use super::{BACKEND, qmp_err};
use crate::guest::GuestError;

/// Capabilities that must be off for a single-channel `fd:` migration of device state that
/// skyferry reads to its end. Only those the QEMU knows are touched.
pub const CAPABILITIES_OFF: &[&str] = &[
    "multifd",
    "return-path",
    "postcopy-ram",
    "postcopy-preempt",
    "mapped-ram",
    "background-snapshot",
    "switchover-ack",
    "x-colo",
    "block",
    "release-ram",
    "compress",
];

/// Parameters and the values skyferry needs (only those the QEMU reports are touched):
/// no TLS on the state socket, a normal (not CPR) migration, and no QEMU rate limit on a
/// transfer that runs while the guest is paused (skyferry paces the link itself).
fn parameters_needed() -> Vec<(&'static str, Value)> {
    vec![
        ("tls-creds", json!("")),
        ("mode", json!("normal")),
        // bytes/s; QEMU's own default is 128 MiB/s.
        ("max-bandwidth", json!(1u64 << 40)),
    ]
}

/// What skyferry changed, to put back.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Changed {
    /// Capabilities and the operator's states.
    pub capabilities: Vec<(String, bool)>,
    /// Parameters and the operator's values.
    pub parameters: Map<String, Value>,
}

impl Changed {
    /// Nothing was changed.
    pub fn is_empty(&self) -> bool {
        self.capabilities.is_empty() && self.parameters.is_empty()
    }
}

/// What to set, from `query-migrate-capabilities` and `query-migrate-parameters` replies:
/// the capabilities to turn off and the parameters to set, with what they were.
pub fn plan(capabilities: &Value, parameters: &Value) -> Changed {
    let capabilities = capabilities
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| {
            let name = c.get("capability")?.as_str()?;
            let on = c.get("state")?.as_bool()?;
            (on && CAPABILITIES_OFF.contains(&name)).then(|| (name.to_string(), on))
        })
        .collect();
    let parameters = parameters_needed()
        .into_iter()
        .filter_map(|(name, want)| {
            let now = parameters.get(name)?;
            (*now != want).then(|| (name.to_string(), now.clone()))
        })
        .collect();
    Changed {
        capabilities,
        parameters,
    }
}

/// What is still wrong after setting, from fresh replies; empty when all is as needed.
pub fn still_wrong(capabilities: &Value, parameters: &Value) -> Vec<String> {
    let after = plan(capabilities, parameters);
    after
        .capabilities
        .iter()
        .map(|(c, _)| format!("capability {c} is still on"))
        .chain(
            after
                .parameters
                .iter()
                .map(|(p, v)| format!("parameter {p} is still {v}")),
        )
        .collect()
}

fn refused(message: String) -> GuestError {
    GuestError::Backend {
        backend: BACKEND,
        op: "prepare QEMU's migration settings",
        message,
    }
}

/// Sets what skyferry needs on this QEMU and checks it took; returns what to put back.
pub fn apply(qmp: &mut Qmp) -> Result<Changed, GuestError> {
    let query = |qmp: &mut Qmp| -> Result<(Value, Value), GuestError> {
        let caps = qmp
            .execute("query-migrate-capabilities", None)
            .map_err(qmp_err("query QEMU's migration capabilities"))?;
        let params = qmp
            .execute("query-migrate-parameters", None)
            .map_err(qmp_err("query QEMU's migration parameters"))?;
        Ok((caps, params))
    };
    let (caps, params) = query(qmp)?;
    let changed = plan(&caps, &params);
    if changed.is_empty() {
        return Ok(changed);
    }
    tracing::info!(
        capabilities = ?changed.capabilities.iter().map(|(c, _)| c).collect::<Vec<_>>(),
        parameters = ?changed.parameters.keys().collect::<Vec<_>>(),
        "QEMU's migration settings changed for skyferry's device-state migration; \
         the operator's are put back after"
    );
    if !changed.capabilities.is_empty() {
        let off: Vec<(&str, bool)> = changed
            .capabilities
            .iter()
            .map(|(c, _)| (c.as_str(), false))
            .collect();
        if let Err(e) = qmp.set_capabilities(&off) {
            return Err(refused(format!(
                "QEMU refused to turn off {:?}, which skyferry's device-state migration \
                 cannot run with: {e}",
                changed
                    .capabilities
                    .iter()
                    .map(|(c, _)| c)
                    .collect::<Vec<_>>()
            )));
        }
    }
    if !changed.parameters.is_empty() {
        let needed: Map<String, Value> = parameters_needed()
            .into_iter()
            .filter(|(p, _)| changed.parameters.contains_key(*p))
            .map(|(p, v)| (p.to_string(), v))
            .collect();
        if let Err(e) = qmp.execute("migrate-set-parameters", Some(Value::Object(needed))) {
            restore(qmp, &changed);
            return Err(refused(format!(
                "QEMU refused the migration parameters skyferry needs: {e}"
            )));
        }
    }
    let (caps, params) = query(qmp)?;
    let wrong = still_wrong(&caps, &params);
    if !wrong.is_empty() {
        restore(qmp, &changed);
        return Err(refused(format!(
            "after setting them, {}; skyferry's device-state migration cannot run",
            wrong.join(", ")
        )));
    }
    Ok(changed)
}

/// Puts the operator's values back; failures are logged (the migration's outcome stands).
pub fn restore(qmp: &mut Qmp, changed: &Changed) {
    if !changed.parameters.is_empty()
        && let Err(e) = qmp.execute(
            "migrate-set-parameters",
            Some(Value::Object(changed.parameters.clone())),
        )
    {
        tracing::warn!("could not put QEMU's migration parameters back: {e}");
    }
    if !changed.capabilities.is_empty() {
        let back: Vec<(&str, bool)> = changed
            .capabilities
            .iter()
            .map(|(c, on)| (c.as_str(), *on))
            .collect();
        if let Err(e) = qmp.set_capabilities(&back) {
            tracing::warn!("could not put QEMU's migration capabilities back: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::qemu::testutil::TempDir;
    use std::time::Duration;

    fn caps(on: &[&str], off: &[&str]) -> Value {
        Value::Array(
            on.iter()
                .map(|c| json!({"capability": c, "state": true}))
                .chain(off.iter().map(|c| json!({"capability": c, "state": false})))
                .collect(),
        )
    }

    #[test]
    fn an_operators_multifd_and_tls_are_planned_off_and_remembered() {
        let c = caps(&["multifd", "xbzrle", "return-path"], &["postcopy-ram"]);
        let p = json!({"tls-creds": "tls0", "mode": "normal", "max-bandwidth": 1000,
                       "multifd-channels": 4});
        let plan = plan(&c, &p);
        assert_eq!(
            plan.capabilities,
            vec![("multifd".into(), true), ("return-path".into(), true)],
            "xbzrle is harmless: RAM is not in QEMU's stream"
        );
        assert_eq!(plan.parameters.get("tls-creds"), Some(&json!("tls0")));
        assert_eq!(plan.parameters.get("max-bandwidth"), Some(&json!(1000)));
        assert!(!plan.parameters.contains_key("mode"));
        assert!(!plan.parameters.contains_key("multifd-channels"));
        let wrong = still_wrong(&c, &p);
        assert!(wrong.iter().any(|w| w.contains("multifd")), "{wrong:?}");
    }

    /// The scripted QMP server, with one line per reply.
    fn serve(replies: Vec<String>) -> (TempDir, std::thread::JoinHandle<Vec<Value>>) {
        crate::guest::qemu::testutil::scripted_qmp(replies.into_iter().map(|r| r + "\n").collect())
    }

    fn ret(v: Value) -> String {
        json!({ "return": v }).to_string()
    }

    #[test]
    fn apply_turns_multifd_off_checks_it_and_restore_puts_it_back() {
        let before = caps(&["multifd"], &["return-path"]);
        let after = caps(&[], &["multifd", "return-path"]);
        let params = json!({"tls-creds": "", "max-bandwidth": 1u64 << 40});
        let (dir, server) = serve(vec![
            "{\"return\": {}}".into(), // qmp_capabilities
            ret(before),
            ret(params.clone()),
            ret(json!({})), // migrate-set-capabilities
            ret(after),
            ret(params),
            ret(json!({})), // restore
        ]);
        let mut q = Qmp::connect(&dir.path().join("qmp"), Duration::from_secs(5)).unwrap();
        let changed = apply(&mut q).unwrap();
        assert_eq!(changed.capabilities, vec![("multifd".into(), true)]);
        restore(&mut q, &changed);
        drop(q);
        let got = server.join().unwrap();
        let set = &got[3];
        assert_eq!(set["execute"], "migrate-set-capabilities");
        assert_eq!(
            set["arguments"]["capabilities"],
            json!([{"capability": "multifd", "state": false}])
        );
        assert_eq!(
            got[6]["arguments"]["capabilities"],
            json!([{"capability": "multifd", "state": true}]),
            "the operator's value comes back"
        );
    }

    #[test]
    fn a_qemu_that_keeps_multifd_on_fails_before_pre_copy_with_the_reason() {
        let on = caps(&["multifd"], &[]);
        let params = json!({"tls-creds": ""});
        let (dir, server) = serve(vec![
            "{\"return\": {}}".into(),
            ret(on.clone()),
            ret(params.clone()),
            ret(json!({})),
            ret(on),
            ret(params),
            ret(json!({})), // the restore
        ]);
        let mut q = Qmp::connect(&dir.path().join("qmp"), Duration::from_secs(5)).unwrap();
        let e = apply(&mut q).unwrap_err().to_string();
        assert!(e.contains("capability multifd is still on"), "{e}");
        drop(q);
        server.join().unwrap();
    }

    #[test]
    fn a_default_qemu_needs_nothing_and_unknown_settings_are_left_alone() {
        // An older QEMU without `mode` or `mapped-ram`: nothing to do.
        let c = caps(&["x-ignore-shared-not-yet"], &["multifd", "return-path"]);
        let p = json!({"tls-creds": "", "max-bandwidth": 1u64 << 40});
        assert!(plan(&c, &p).is_empty());
        assert!(still_wrong(&c, &p).is_empty());
    }
}
