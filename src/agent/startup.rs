//! The startup script the controller puts on every VM (metadata key
//! `startup-script`): it fetches the agent from the agent API, checks its
//! sha256, and runs it. The same script runs on Compute Engine and in the
//! emulator, so every test goes through the real delivery path.
//!
//! Where the agent is put: the first of these folders where a file may be
//! executed (tried with a small script, since many images mount writable
//! folders `noexec`):
//!
//! 1. `$TESTRUN_AGENT_DIR`, when the image (or the emulator) sets it;
//! 2. `/var/lib/testrun-agent` (Debian, Ubuntu, most images);
//! 3. `/var/lib/cloud/testrun-agent` and `/var/lib/docker/testrun-agent`
//!    (Container-Optimized OS, where only these are writable and exec-able);
//! 4. `/tmp/testrun-agent`.
//!
//! The file is named after its sha256. A folder that keeps the build the
//! script names (a reboot, a folder VMs share) runs it at once, with no
//! request: the agent says which build it is when it registers, and one
//! the controller no longer serves is refused (the agent exits 3), after
//! which the script fetches the current build, sending the kept one as
//! `If-None-Match`.

use super::binary::{ARCH_HEADER, BINARY_PATH, SHA256_HEADER, SIZE_HEADER};
use super::protocol::{BUILD_ENV, PARENT_ENV, STALE_BUILD_EXIT};

/// How VMs start the agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AgentLaunch {
    /// Fetch the controller's own executable from the agent API (the
    /// default in every mode).
    Fetch {
        /// The agent API's URL as VMs reach it.
        agent_url: String,
        /// The sha256 of the executable the controller serves.
        sha256: String,
        /// Its size in bytes.
        size: u64,
    },
    /// Run this command (followed by `agent`), for images that carry the
    /// agent already (`--agent-command`).
    Command(String),
}

/// `value` as one shell word.
pub fn sh_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', "'\\''"))
}

/// The startup script for `launch`.
pub fn startup_script(launch: &AgentLaunch) -> String {
    let version = env!("CARGO_PKG_VERSION");
    match launch {
        AgentLaunch::Command(command) => {
            format!("#!/bin/sh\n# Written by testrun-controller {version}: start the agent.\nexec {command} agent\n")
        }
        AgentLaunch::Fetch { agent_url, sha256, size } => {
            let url = format!("{}{BINARY_PATH}", agent_url.trim_end_matches('/'));
            FETCH_SCRIPT
                .replace("@VERSION@", version)
                .replace("@URL@", &sh_quote(&url))
                .replace("@SHA256@", &sh_quote(sha256))
                .replace("@SIZE@", &size.to_string())
                .replace("@BUILD_ENV@", BUILD_ENV)
                .replace("@PARENT_ENV@", PARENT_ENV)
                .replace("@STALE@", &STALE_BUILD_EXIT.to_string())
                .replace("@HEADER@", SHA256_HEADER)
                .replace("@SIZE_HEADER@", SIZE_HEADER)
                .replace("@ARCH_HEADER@", ARCH_HEADER)
        }
    }
}

/// The fetching script: POSIX sh, curl or wget, sha256sum or openssl.
const FETCH_SCRIPT: &str = r#"#!/bin/sh
# Written by testrun-controller @VERSION@: fetch the agent (the controller's
# own executable) from the agent API, check its sha256, and run it.
url=@URL@
want=@SHA256@
size_want=@SIZE@
refused=
log() { echo "testrun-agent: $*" >&2; }

# whole FILE SIZE: FILE is there, may run, and has SIZE bytes.
whole() {
  [ -x "$1" ] || return 1
  n=$(wc -c <"$1" 2>/dev/null) || return 1
  [ "$((n))" = "$2" ]
}

# is_refused BUILD: the agent API refused BUILD while this script ran.
is_refused() {
  case " $refused " in *" $1 "*) return 0 ;; esac
  return 1
}

# start AGENT BUILD: runs the agent as BUILD and ends with its exit code,
# unless the agent API refused it as another build than its own (exit
# @STALE@): then it returns, and the current build is fetched. The agent
# ends when this script does (it checks that its parent is this shell).
start() {
  @BUILD_ENV@=$2 @PARENT_ENV@=$$ "$1" agent
  rc=$?
  [ "$rc" = @STALE@ ] || exit "$rc"
  refused="$refused $2"
  log "the agent API serves another build than $2 now: fetching it"
}

# The build this script names, kept whole in a folder: run it, no request.
for dir in ${TESTRUN_AGENT_DIR:+"$TESTRUN_AGENT_DIR"} /var/lib/testrun-agent /var/lib/cloud/testrun-agent \
  /var/lib/docker/testrun-agent /tmp/testrun-agent; do
  if whole "$dir/testrun-agent-$want" "$size_want"; then
    log "running the agent kept in $dir (build $want)"
    start "$dir/testrun-agent-$want" "$want"
    break
  fi
done

machine=$(uname -m)
command -v curl >/dev/null 2>&1 || command -v wget >/dev/null 2>&1 || {
  log "neither curl nor wget is on PATH: the agent cannot be fetched (bake it into the image, set --agent-command)"
  exit 1
}
command -v sha256sum >/dev/null 2>&1 || command -v openssl >/dev/null 2>&1 || {
  log "neither sha256sum nor openssl is on PATH: the agent cannot be checked"
  exit 1
}

# A folder where a file may be executed: one that keeps this build already
# (it was tried when the build was put there), else the first where a
# two-line script runs.
exec_dir() {
  for dir in ${TESTRUN_AGENT_DIR:+"$TESTRUN_AGENT_DIR"} /var/lib/testrun-agent /var/lib/cloud/testrun-agent \
    /var/lib/docker/testrun-agent /tmp/testrun-agent; do
    [ -x "$dir/testrun-agent-$want" ] && { echo "$dir"; return 0; }
  done
  for dir in ${TESTRUN_AGENT_DIR:+"$TESTRUN_AGENT_DIR"} /var/lib/testrun-agent /var/lib/cloud/testrun-agent \
    /var/lib/docker/testrun-agent /tmp/testrun-agent; do
    mkdir -p "$dir" 2>/dev/null || continue
    probe="$dir/.probe.$$"
    printf '#!/bin/sh\nexit 0\n' >"$probe" 2>/dev/null && chmod 0755 "$probe" && "$probe" 2>/dev/null
    ok=$?
    rm -f "$probe"
    [ "$ok" = 0 ] && { echo "$dir"; return 0; }
  done
  return 1
}

sha256() {
  if command -v sha256sum >/dev/null 2>&1; then
    sha256sum "$1" | cut -d' ' -f1
  else
    openssl dgst -sha256 -r "$1" | cut -d' ' -f1
  fi
}

# fetch OUT HEADERS [TAGS]: the answer's body into OUT, its headers into
# HEADERS; TAGS (If-None-Match) names the builds kept here.
fetch() {
  if command -v curl >/dev/null 2>&1; then
    curl -sS --connect-timeout 10 --max-time 900 ${3:+-H "If-None-Match: $3"} -D "$2" -o "$1" "$url"
  else
    wget -q -S -T 30 -t 1 ${3:+--header="If-None-Match: $3"} -O "$1" "$url" 2>"$2"
    # wget exits non-zero on 304 and on HTTP errors; the status line decides.
    [ -s "$2" ]
  fi
}

# A header dump's last status code and the agent headers, in one pass:
# "CODE SHA256 SIZE ARCH", `-` for what is missing.
headers() {
  awk '{ sub(/\r$/, "") }
    $1 ~ /^HTTP\// { code = $2 }
    tolower($1) == "@HEADER@:" { sha = $2 }
    tolower($1) == "@SIZE_HEADER@:" { size = $2 }
    tolower($1) == "@ARCH_HEADER@:" { arch = $2 }
    END { printf "%s %s %s %s\n", code ? code : "-", sha ? sha : "-", size ? size : "-", arch ? arch : "-" }' "$1"
}

# VMs that share a folder (an image's shared mount, or the emulator's VMs)
# fetch a build once: one holds "$dir/.fetching" while it downloads, the
# others wait for the file, or take over when the holder died.
# Returns 1 (holding nothing) when the build this script names is kept
# there, unless it was refused.
lock() {
  usable && return 1
  while ! mkdir "$dir/.fetching" 2>/dev/null; do
    holder=$(cat "$dir/.fetching/pid" 2>/dev/null)
    if [ -n "$holder" ] && ! kill -0 "$holder" 2>/dev/null; then
      rm -rf "$dir/.fetching"
      continue
    fi
    sleep 1
    usable && return 1
  done
  echo $$ >"$dir/.fetching/pid"
  locked=1
  # The previous holder may have finished between the look and the lock.
  if usable; then
    unlock
    return 1
  fi
}
usable() { [ -x "$dir/testrun-agent-$want" ] && ! is_refused "$want"; }

# The builds kept in "$dir", as an If-None-Match value.
kept_tags() {
  tags=
  for f in "$dir"/testrun-agent-*; do
    [ -x "$f" ] && tags="${tags:+$tags, }\"${f##*/testrun-agent-}\""
  done
  echo "$tags"
}
unlock() {
  [ -n "$locked" ] && rm -rf "$dir/.fetching"
  locked=
}

# One try: returns only when it failed.
try() {
  dir=$(exec_dir) || { log "no writable folder lets files run: set TESTRUN_AGENT_DIR in the image"; exit 1; }
  part="$dir/.download.$$"
  if ! lock; then
    # A VM sharing the folder has just kept the build this script names.
    if whole "$dir/testrun-agent-$want" "$size_want"; then
      log "running the agent kept in $dir (build $want)"
      start "$dir/testrun-agent-$want" "$want"
      return 1
    fi
  fi
  fetch "$part" "$part.headers" "$(kept_tags)" || { log "fetching $url failed"; rm -f "$part" "$part.headers"; unlock; return 1; }
  # shellcheck disable=SC2046 # four words, none with spaces
  set -- $(headers "$part.headers")
  code=$1 sha=${2#-} size=${3#-} arch=${4#-}
  if [ -n "$arch" ] && [ "$arch" != "$machine" ]; then
    log "the agent API serves a $arch agent and this VM is $machine: use a machine type of the controller's architecture, or bake the agent into the image and set --agent-command"
    rm -f "$part" "$part.headers"
    unlock
    exit 1
  fi
  case "$code" in
  304)
    # One of the kept builds is the one served: the answer names it.
    rm -f "$part" "$part.headers"
    unlock
    kept="$dir/testrun-agent-$sha"
    if [ -n "$sha" ] && whole "$kept" "$size"; then
      log "running the agent kept in $dir (build $sha)"
      start "$kept" "$sha"
      return 1
    fi
    log "the agent kept in $dir is gone or cut short: fetching it again"
    rm -f "$kept"
    return 1
    ;;
  200) rm -f "$part.headers" ;;
  *)
    log "$url answered ${code#-}"
    rm -f "$part" "$part.headers"
    unlock
    return 1
    ;;
  esac
  got=$(sha256 "$part") || { rm -f "$part"; unlock; return 1; }
  if [ -z "$sha" ] || [ "$got" != "$sha" ]; then
    log "the download's sha256 is $got, the agent API said ${sha:-nothing}: discarded"
    rm -f "$part"
    unlock
    return 1
  fi
  [ "$sha" = "$want" ] || log "the controller serves build $sha now (this VM was made by build $want)"
  # On disk before it takes its name: a crash never leaves a short copy named as whole.
  sync "$part" 2>/dev/null || sync
  chmod 0755 "$part" && mv -f "$part" "$dir/testrun-agent-$sha" || { rm -f "$part"; unlock; return 1; }
  unlock
  log "fetched the agent into $dir (build $sha)"
  start "$dir/testrun-agent-$sha" "$sha"
  return 1
}

# The agent API may not be reachable yet (a new controller, a network being
# set up): try until it is. A VM whose agent never registers is deleted by
# the controller after its registration timeout.
pause=1
while :; do
  try
  sleep "$pause"
  pause=$((pause * 2))
  [ "$pause" -gt 30 ] && pause=30
done
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_launch_runs_the_command() {
        let script = startup_script(&AgentLaunch::Command("/opt/bin/agent".into()));
        assert!(script.ends_with("exec /opt/bin/agent agent\n"), "{script}");
    }

    #[test]
    fn a_fetch_launch_names_the_route_and_the_build_quoted() {
        let script = startup_script(&AgentLaunch::Fetch {
            agent_url: "http://10.0.0.2:8090/it's/".into(),
            sha256: "ab".repeat(32),
            size: 1234,
        });
        assert!(script.contains("url='http://10.0.0.2:8090/it'\\''s/agent/v1/binary'\n"), "{script}");
        assert!(script.contains(&format!("want='{}'\n", "ab".repeat(32))), "{script}");
        assert!(script.contains("size_want=1234\n"), "{script}");
        assert!(script.contains("TESTRUN_AGENT_BUILD=$2 TESTRUN_AGENT_PARENT=$$ \"$1\" agent"), "{script}");
        assert!(script.contains("tolower($1) == \"testrun-agent-sha256:\" { sha = $2 }"), "{script}");
        assert!(!script.contains('@'), "a placeholder was left: {script}");
    }

    #[test]
    fn sh_quote_makes_one_word() {
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("'"), "''\\'''");
    }
}
