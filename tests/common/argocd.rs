//! Runs the repository's Argo CD health checks (`argocd/testrun.dev/*/health.lua`)
//! in a real Lua 5.1 interpreter, the Lua version Argo CD embeds.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_json::Value;

/// The health check script of a kind.
pub fn script_path(kind: &str) -> PathBuf {
    super::repo_root().join("argocd/testrun.dev").join(kind).join("health.lua")
}

/// An object as a Lua table constructor, as Argo CD hands it to a health
/// check in `obj`.
pub fn lua_literal(value: &Value) -> String {
    match value {
        Value::Null => "nil".to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => lua_string(s),
        Value::Array(items) => format!("{{{}}}", items.iter().map(lua_literal).collect::<Vec<_>>().join(", ")),
        Value::Object(map) => format!(
            "{{{}}}",
            map.iter().map(|(k, v)| format!("[{}] = {}", lua_string(k), lua_literal(v))).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// A Lua string literal: every byte that is not plain printable ASCII as a
/// decimal escape.
fn lua_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for b in s.bytes() {
        match b {
            b'"' | b'\\' => {
                out.push('\\');
                out.push(b as char);
            }
            0x20..=0x7e => out.push(b as char),
            _ => out.push_str(&format!("\\{b:03}")),
        }
    }
    out.push('"');
    out
}

/// Runs a kind's health check on an object; returns (status, message).
pub fn health(kind: &str, object: &Value) -> (String, String) {
    let script = std::fs::read_to_string(script_path(kind)).expect("reading the health check");
    let program = format!(
        "obj = {}\nlocal hs = (function()\n{script}\nend)()\nio.write(hs.status, \"\\n\", hs.message or \"\")\n",
        lua_literal(object)
    );
    let mut child = Command::new("lua5.1")
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running lua5.1 (scripts/ensure-lua.sh installs it)");
    child.stdin.take().expect("stdin").write_all(program.as_bytes()).expect("writing the program");
    let out = child.wait_with_output().expect("lua5.1 output");
    assert!(out.status.success(), "the {kind} health check failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).expect("UTF-8");
    let (status, message) = text.split_once('\n').unwrap_or((&text, ""));
    (status.to_string(), message.to_string())
}

/// Runs a kind's health check on a live object and checks its status;
/// returns the message. With `TESTRUN_CAPTURE_HEALTH_FIXTURES=1` the object
/// is also written to the check's `testdata/<fixture>.yaml`.
pub fn expect_health(kind: &str, object: &impl serde::Serialize, fixture: &str, want: &str) -> String {
    let mut object = serde_json::to_value(object).expect("JSON");
    if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("managedFields");
    }
    let (status, message) = health(kind, &object);
    assert_eq!(status, want, "{kind} health of {fixture}: {message}\n{object:#}");
    if std::env::var_os("TESTRUN_CAPTURE_HEALTH_FIXTURES").is_some() {
        let path = script_path(kind).with_file_name("testdata").join(format!("{fixture}.yaml"));
        std::fs::write(&path, serde_norway::to_string(&object).expect("YAML")).expect("writing the fixture");
    }
    message
}
