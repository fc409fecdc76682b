//! `@nix {json}` log lines, in exactly the shapes a calling Nix accepts from its build hook.
//!
//! The parent reads the hook's stderr line by line; a line starting with `@nix ` is parsed as
//! JSON and handled by `handleJSONLogMessage` (`src/libutil/logging.cc`, 2.8 and 2.26):
//!
//! * In **2.8 nothing there is caught**: a missing `action`, a `level` or `type` that is not a
//!   number, a missing `text` or `id` throws inside the parent. 2.26 catches JSON exceptions and
//!   only warns. In both, a `fields` element that is neither a string nor a non-negative
//!   integer throws a plain `Error("unsupported JSON type")` that the 2.26 catch does **not**
//!   cover either. So everything written here has the right types, and [`LogLine::parse`] only
//!   accepts lines with those types, so relayed lines are safe too.
//! * The parent's progress bar `assert`s the field layout of known activity and result types
//!   (`src/libmain/progress-bar.cc`); the constructors ([`LogLine::start_build`], …) fix those
//!   layouts.
//! * **`parent` key**: 2.8's JSON logger never writes it (`// FIXME: handle parent`), 2.26's
//!   does. Neither 2.8 nor 2.26 reads it: every `start` from the hook becomes a child of the
//!   parent's own activity, and ids are re-mapped per hook. It is therefore harmless to both,
//!   but the constructors leave it out (`parent: None`), which is what a 2.8 peer produces;
//!   parsed lines keep it so relaying is faithful.
//! * Keys are written in sorted order, as nlohmann's default `json` object does. The object is
//!   serialised from a `BTreeMap`, so this holds whether or not serde_json's `preserve_order`
//!   feature is enabled anywhere in the build. `fields` is omitted when empty, as Nix does
//!   (the parent reads a missing `fields` as an empty list).
//! * Text is always valid UTF-8 (byte input is converted lossily with U+FFFD, like nlohmann's
//!   `error_handler_t::replace`); control characters are escaped (`\n`, `\u001b`, …), so one
//!   message is always one line.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::Value;

/// Nix's `Verbosity` (`src/libutil/error.hh`, the same in 2.8, 2.26 and 2.35).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum Verbosity {
    /// `lvlError`: errors.
    Error = 0,
    /// `lvlWarn`: warnings.
    Warn = 1,
    /// `lvlNotice`.
    Notice = 2,
    /// `lvlInfo`: Nix's default verbosity.
    Info = 3,
    /// `lvlTalkative` (`-v`).
    Talkative = 4,
    /// `lvlChatty` (`-vv`).
    Chatty = 5,
    /// `lvlDebug` (`-vvv`).
    Debug = 6,
    /// `lvlVomit` (`-vvvv` and more).
    Vomit = 7,
}

impl Verbosity {
    /// Every value, in code order.
    pub const ALL: [Verbosity; 8] = [
        Verbosity::Error,
        Verbosity::Warn,
        Verbosity::Notice,
        Verbosity::Info,
        Verbosity::Talkative,
        Verbosity::Chatty,
        Verbosity::Debug,
        Verbosity::Vomit,
    ];

    /// The level for a numeric code; codes above 7 become `Vomit`.
    pub fn from_code(code: u64) -> Verbosity {
        Self::ALL[code.min(7) as usize]
    }

    /// The numeric code Nix uses.
    pub fn code(self) -> u64 {
        self as u64
    }
}

/// Nix's `ActivityType` (`src/libutil/logging.hh`); `FetchTree` exists only from 2.35 on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u64)]
pub enum ActivityType {
    /// `actUnknown`.
    Unknown = 0,
    /// `actCopyPath`: copying one store path.
    CopyPath = 100,
    /// `actFileTransfer`: a download or upload.
    FileTransfer = 101,
    /// `actRealise`: realising paths.
    Realise = 102,
    /// `actCopyPaths`: copying a set of store paths.
    CopyPaths = 103,
    /// `actBuilds`: the builds as a whole.
    Builds = 104,
    /// `actBuild`: one build.
    Build = 105,
    /// `actOptimiseStore`.
    OptimiseStore = 106,
    /// `actVerifyPaths`.
    VerifyPaths = 107,
    /// `actSubstitute`: substituting one path.
    Substitute = 108,
    /// `actQueryPathInfo`.
    QueryPathInfo = 109,
    /// `actPostBuildHook`: running the post-build hook.
    PostBuildHook = 110,
    /// `actBuildWaiting`.
    BuildWaiting = 111,
    /// `actFetchTree` (2.35 and later).
    FetchTree = 112,
}

impl ActivityType {
    /// Every value, in code order.
    pub const ALL: [ActivityType; 14] = [
        ActivityType::Unknown,
        ActivityType::CopyPath,
        ActivityType::FileTransfer,
        ActivityType::Realise,
        ActivityType::CopyPaths,
        ActivityType::Builds,
        ActivityType::Build,
        ActivityType::OptimiseStore,
        ActivityType::VerifyPaths,
        ActivityType::Substitute,
        ActivityType::QueryPathInfo,
        ActivityType::PostBuildHook,
        ActivityType::BuildWaiting,
        ActivityType::FetchTree,
    ];

    /// The value for a numeric code, if it is one of these.
    pub fn from_code(code: u64) -> Option<ActivityType> {
        Self::ALL.into_iter().find(|t| t.code() == code)
    }

    /// The numeric code Nix uses.
    pub fn code(self) -> u64 {
        self as u64
    }
}

/// Nix's `ResultType`; `FetchStatus` exists only from 2.35 on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u64)]
pub enum ResultType {
    /// `resFileLinked`.
    FileLinked = 100,
    /// `resBuildLogLine`: one line of build output.
    BuildLogLine = 101,
    /// `resUntrustedPath`.
    UntrustedPath = 102,
    /// `resCorruptedPath`.
    CorruptedPath = 103,
    /// `resSetPhase`: the phase a build is in.
    SetPhase = 104,
    /// `resProgress`: done, expected, running and failed counts.
    Progress = 105,
    /// `resSetExpected`: how many of an activity type are expected.
    SetExpected = 106,
    /// `resPostBuildLogLine`: one line of post-build hook output.
    PostBuildLogLine = 107,
    /// `resFetchStatus` (2.35 and later).
    FetchStatus = 108,
}

impl ResultType {
    /// Every value, in code order.
    pub const ALL: [ResultType; 9] = [
        ResultType::FileLinked,
        ResultType::BuildLogLine,
        ResultType::UntrustedPath,
        ResultType::CorruptedPath,
        ResultType::SetPhase,
        ResultType::Progress,
        ResultType::SetExpected,
        ResultType::PostBuildLogLine,
        ResultType::FetchStatus,
    ];

    /// The value for a numeric code, if it is one of these.
    pub fn from_code(code: u64) -> Option<ResultType> {
        Self::ALL.into_iter().find(|t| t.code() == code)
    }

    /// The numeric code Nix uses.
    pub fn code(self) -> u64 {
        self as u64
    }
}

/// A type code a peer sent: one this crate knows, or a number from a newer Nix, kept as it is
/// (never an error).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Code<T> {
    /// A code this crate knows.
    Known(T),
    /// A code it does not (a newer Nix's), as sent.
    Unknown(u64),
}

/// The type codes [`Code`] wraps.
pub trait TypeCode: Copy {
    /// The value for a numeric code, if it is one of these.
    fn from_code(code: u64) -> Option<Self>;
    /// The numeric code Nix uses.
    fn code(self) -> u64;
}

impl TypeCode for ActivityType {
    fn from_code(code: u64) -> Option<Self> {
        ActivityType::from_code(code)
    }

    fn code(self) -> u64 {
        ActivityType::code(self)
    }
}

impl TypeCode for ResultType {
    fn from_code(code: u64) -> Option<Self> {
        ResultType::from_code(code)
    }

    fn code(self) -> u64 {
        ResultType::code(self)
    }
}

impl<T: TypeCode> Code<T> {
    /// Wraps a code a peer sent, known or not.
    pub fn from_code(code: u64) -> Code<T> {
        T::from_code(code).map_or(Code::Unknown(code), Code::Known)
    }

    /// The numeric code, as sent.
    pub fn code(self) -> u64 {
        match self {
            Code::Known(t) => t.code(),
            Code::Unknown(c) => c,
        }
    }
}

impl<T> From<T> for Code<T> {
    fn from(t: T) -> Self {
        Code::Known(t)
    }
}

/// One element of an activity's or result's `fields` (in `@nix` lines and in the daemon's
/// stderr messages alike): Nix has only these two kinds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    /// A non-negative integer.
    Int(u64),
    /// A string.
    Str(String),
}

impl From<u64> for Field {
    fn from(v: u64) -> Self {
        Field::Int(v)
    }
}

impl From<&str> for Field {
    fn from(s: &str) -> Self {
        Field::Str(s.to_owned())
    }
}

impl From<String> for Field {
    fn from(s: String) -> Self {
        Field::Str(s)
    }
}

impl Field {
    fn to_json(&self) -> Value {
        match self {
            Field::Int(i) => Value::from(*i),
            Field::Str(s) => Value::from(s.as_str()),
        }
    }
}

/// Text for a log line: `str`/`String` as is, bytes converted lossily to UTF-8.
pub trait LogText {
    /// The text as UTF-8.
    fn into_log_text(self) -> String;
}

impl LogText for String {
    fn into_log_text(self) -> String {
        self
    }
}

impl LogText for &String {
    fn into_log_text(self) -> String {
        self.clone()
    }
}

impl LogText for &str {
    fn into_log_text(self) -> String {
        self.to_owned()
    }
}

impl LogText for &[u8] {
    fn into_log_text(self) -> String {
        String::from_utf8_lossy(self).into_owned()
    }
}

impl<const N: usize> LogText for &[u8; N] {
    fn into_log_text(self) -> String {
        String::from_utf8_lossy(self).into_owned()
    }
}

impl LogText for Vec<u8> {
    fn into_log_text(self) -> String {
        match String::from_utf8(self) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        }
    }
}

impl LogText for &Vec<u8> {
    fn into_log_text(self) -> String {
        String::from_utf8_lossy(self).into_owned()
    }
}

/// One `@nix` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogLine {
    /// `{"action":"msg","level":…,"msg":…}`; the parent logs `msg` at `level` (filtered by
    /// its own verbosity). Extra keys of Nix's error messages (`raw_msg`, `line`, …) are not
    /// kept: the parent ignores them.
    Msg {
        /// The level to log at.
        level: Verbosity,
        /// The message.
        msg: String,
    },
    /// `{"action":"start",…}`: the parent creates its own activity and maps `id` to it.
    Start {
        /// The activity's id, unique within this hook.
        id: u64,
        /// The activity's verbosity.
        level: Verbosity,
        /// An [`ActivityType`] code, kept raw so relayed lines of newer Nix survive.
        typ: u64,
        /// The activity's description.
        text: String,
        /// The activity's fields; their layout depends on `typ`.
        fields: Vec<Field>,
        /// Written only if `Some`; ignored by 2.8 and 2.26 parents (see the module docs).
        parent: Option<u64>,
    },
    /// `{"action":"stop","id":…}`
    Stop {
        /// The activity.
        id: u64,
    },
    /// `{"action":"result",…}`: applied to the activity `id` if the parent knows it.
    Result {
        /// The activity.
        id: u64,
        /// A [`ResultType`] code, kept raw.
        typ: u64,
        /// The result's fields; their layout depends on `typ`.
        fields: Vec<Field>,
    },
    /// `{"action":"setPhase","phase":…}`: sets the phase of the parent's current activity.
    SetPhase {
        /// The phase's name (`buildPhase`, …).
        phase: String,
    },
}

/// Why a line is not an `@nix` message the parent would accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogParseError {
    /// Not an `@nix` line.
    #[error("the line does not start with '@nix '")]
    NoPrefix,
    /// What follows the prefix is not JSON (serde_json's category, and where it noticed).
    #[error("bad JSON: {kind} at column {column}")]
    Json {
        /// `syntax error`, `unexpected end`, `invalid data` or `I/O error`.
        kind: &'static str,
        /// 1-based column in the JSON after the prefix.
        column: usize,
    },
    /// The JSON is not an object.
    #[error("the JSON is not an object")]
    NotAnObject,
    /// `action` is none of `msg`, `start`, `stop`, `result`, `setPhase`.
    #[error("unknown action {0:?}")]
    UnknownAction(String),
    /// A key the action needs is missing or has the wrong JSON type.
    #[error("key {key:?} is missing or not {expected}")]
    BadKey {
        /// The key.
        key: &'static str,
        /// The type it must have.
        expected: &'static str,
    },
}

/// The prefix that marks a JSON log line.
pub const PREFIX: &str = "@nix ";

fn str_key(o: &serde_json::Map<String, Value>, key: &'static str) -> Result<String, LogParseError> {
    o.get(key)
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or(LogParseError::BadKey {
            key,
            expected: "a string",
        })
}

fn u64_key(o: &serde_json::Map<String, Value>, key: &'static str) -> Result<u64, LogParseError> {
    o.get(key)
        .and_then(Value::as_u64)
        .ok_or(LogParseError::BadKey {
            key,
            expected: "a non-negative integer",
        })
}

fn fields_key(o: &serde_json::Map<String, Value>) -> Result<Vec<Field>, LogParseError> {
    const BAD: LogParseError = LogParseError::BadKey {
        key: "fields",
        expected: "a list of strings and non-negative integers",
    };
    match o.get("fields") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(Field::Str(s.clone())),
                v => v.as_u64().map(Field::Int).ok_or(BAD),
            })
            .collect(),
        Some(_) => Err(BAD),
    }
}

/// Drops one trailing `\n` (and a `\r` before it): the parent adds its own.
fn chomp_newline(mut s: String) -> String {
    if s.ends_with('\n') {
        s.pop();
        if s.ends_with('\r') {
            s.pop();
        }
    }
    s
}

fn with_prefix(prefix: &str, msg: String) -> String {
    if msg.starts_with(prefix) {
        msg
    } else {
        format!("{prefix}{msg}")
    }
}

/// The text Nix gives an `actCopyPath` activity (`makeCopyPathMessage`, `src/libstore/store-api.cc`).
fn copy_path_message(path: &str, from: &str, to: &str) -> String {
    let local = |u: &str| u == "local" || u == "daemon";
    if local(from) {
        format!("copying path '{path}' to '{to}'")
    } else if local(to) {
        format!("copying path '{path}' from '{from}'")
    } else {
        format!("copying path '{path}' from '{from}' to '{to}'")
    }
}

impl LogLine {
    /// A message at any level.
    pub fn msg(level: Verbosity, msg: impl LogText) -> LogLine {
        LogLine::Msg {
            level,
            msg: msg.into_log_text(),
        }
    }

    /// An error message (level 0). `error: ` is put in front unless the text starts with it,
    /// so the user sees what Nix's own errors look like.
    pub fn error(msg: impl LogText) -> LogLine {
        LogLine::Msg {
            level: Verbosity::Error,
            msg: with_prefix("error: ", msg.into_log_text()),
        }
    }

    /// A warning (level 1), with `warning: ` in front unless already there.
    pub fn warn(msg: impl LogText) -> LogLine {
        LogLine::Msg {
            level: Verbosity::Warn,
            msg: with_prefix("warning: ", msg.into_log_text()),
        }
    }

    /// `actBuild` (105) with the layout the progress bar asserts: `[drvPath, machine, 1, 1]`
    /// (current round, number of rounds), text as the parent's own:
    /// `building '<drv>' on '<machine>'`.
    pub fn start_build(id: u64, drv: impl LogText, machine: impl LogText) -> LogLine {
        let drv = drv.into_log_text();
        let machine = machine.into_log_text();
        LogLine::Start {
            id,
            level: Verbosity::Info,
            typ: ActivityType::Build.code(),
            text: format!("building '{drv}' on '{machine}'"),
            fields: vec![
                Field::Str(drv),
                Field::Str(machine),
                Field::Int(1),
                Field::Int(1),
            ],
            parent: None,
        }
    }

    /// `actCopyPath` (100), fields `[path, srcUri, dstUri]` as in `copyStorePath`, text as
    /// Nix's `makeCopyPathMessage`.
    pub fn start_copy_path(
        id: u64,
        path: impl LogText,
        from: impl LogText,
        to: impl LogText,
    ) -> LogLine {
        let (path, from, to) = (
            path.into_log_text(),
            from.into_log_text(),
            to.into_log_text(),
        );
        LogLine::Start {
            id,
            level: Verbosity::Info,
            typ: ActivityType::CopyPath.code(),
            text: copy_path_message(&path, &from, &to),
            fields: vec![Field::Str(path), Field::Str(from), Field::Str(to)],
            parent: None,
        }
    }

    /// `actCopyPaths` (103), no fields (Nix's text is `copying N paths`).
    pub fn start_copy_paths(id: u64, text: impl LogText) -> LogLine {
        LogLine::Start {
            id,
            level: Verbosity::Info,
            typ: ActivityType::CopyPaths.code(),
            text: text.into_log_text(),
            fields: Vec::new(),
            parent: None,
        }
    }

    /// `actFileTransfer` (101), fields `[uri]` as Nix's downloads have: its progress
    /// (`resProgress` bytes done/expected) is what `nix build`'s bar sums as "MiB DL".
    pub fn start_file_transfer(id: u64, text: impl LogText, uri: impl LogText) -> LogLine {
        LogLine::Start {
            id,
            level: Verbosity::Info,
            typ: ActivityType::FileTransfer.code(),
            text: text.into_log_text(),
            fields: vec![Field::Str(uri.into_log_text())],
            parent: None,
        }
    }

    /// `actUnknown` (0) with a text and no fields: what Nix's progress bar shows for a step
    /// that has no activity type of its own (starting a builder, say) while it lasts.
    pub fn start_step(id: u64, text: impl LogText) -> LogLine {
        LogLine::Start {
            id,
            level: Verbosity::Info,
            typ: ActivityType::Unknown.code(),
            text: text.into_log_text(),
            fields: Vec::new(),
            parent: None,
        }
    }

    /// `resProgress` (105): `[done, expected, running, failed]`, all integers.
    pub fn result_progress(
        id: u64,
        done: u64,
        expected: u64,
        running: u64,
        failed: u64,
    ) -> LogLine {
        LogLine::Result {
            id,
            typ: ResultType::Progress.code(),
            fields: vec![
                Field::Int(done),
                Field::Int(expected),
                Field::Int(running),
                Field::Int(failed),
            ],
        }
    }

    /// `resSetExpected` (106): `[activityType, count]`, both integers.
    pub fn result_set_expected(id: u64, activity_type: ActivityType, n: u64) -> LogLine {
        LogLine::Result {
            id,
            typ: ResultType::SetExpected.code(),
            fields: vec![Field::Int(activity_type.code()), Field::Int(n)],
        }
    }

    /// `resBuildLogLine` (101): `[line]`. One trailing newline is dropped (the parent adds its
    /// own when it writes the line to the build log).
    pub fn build_log_line(id: u64, line: impl LogText) -> LogLine {
        LogLine::Result {
            id,
            typ: ResultType::BuildLogLine.code(),
            fields: vec![Field::Str(chomp_newline(line.into_log_text()))],
        }
    }

    /// `{"action":"setPhase","phase":…}`.
    pub fn set_phase(phase: impl LogText) -> LogLine {
        LogLine::SetPhase {
            phase: phase.into_log_text(),
        }
    }

    /// `{"action":"stop","id":…}`.
    pub fn stop(id: u64) -> LogLine {
        LogLine::Stop { id }
    }

    /// The JSON object alone, keys sorted.
    pub fn to_json(&self) -> String {
        let mut o: BTreeMap<&'static str, Value> = BTreeMap::new();
        let fields = |o: &mut BTreeMap<&'static str, Value>, f: &[Field]| {
            if !f.is_empty() {
                o.insert(
                    "fields",
                    Value::Array(f.iter().map(Field::to_json).collect()),
                );
            }
        };
        match self {
            LogLine::Msg { level, msg } => {
                o.insert("action", "msg".into());
                o.insert("level", level.code().into());
                o.insert("msg", msg.as_str().into());
            }
            LogLine::Start {
                id,
                level,
                typ,
                text,
                fields: f,
                parent,
            } => {
                o.insert("action", "start".into());
                fields(&mut o, f);
                o.insert("id", (*id).into());
                o.insert("level", level.code().into());
                if let Some(p) = parent {
                    o.insert("parent", (*p).into());
                }
                o.insert("text", text.as_str().into());
                o.insert("type", (*typ).into());
            }
            LogLine::Stop { id } => {
                o.insert("action", "stop".into());
                o.insert("id", (*id).into());
            }
            LogLine::Result { id, typ, fields: f } => {
                o.insert("action", "result".into());
                fields(&mut o, f);
                o.insert("id", (*id).into());
                o.insert("type", (*typ).into());
            }
            LogLine::SetPhase { phase } => {
                o.insert("action", "setPhase".into());
                o.insert("phase", phase.as_str().into());
            }
        }
        // A BTreeMap of strings, integers and arrays of those cannot fail to serialise.
        serde_json::to_string(&o).expect("serialising a log line")
    }

    /// The complete line: `@nix {…}\n`.
    pub fn to_line(&self) -> String {
        format!("{PREFIX}{}\n", self.to_json())
    }

    /// Parses one line (with or without its trailing newline), accepting only what every
    /// parent version handles without an exception: integer `id`/`level`/`type`, string
    /// `text`/`msg`/`phase`, `fields` of strings and non-negative integers (absent = empty).
    /// Unknown keys are ignored, as the parent does; unknown actions are an error (the parent
    /// would silently ignore them, so there is nothing to relay).
    pub fn parse(line: &str) -> Result<LogLine, LogParseError> {
        let line = line.strip_suffix('\n').unwrap_or(line);
        let json = line.strip_prefix(PREFIX).ok_or(LogParseError::NoPrefix)?;
        let v: Value = serde_json::from_str(json).map_err(|e| LogParseError::Json {
            kind: match e.classify() {
                serde_json::error::Category::Syntax => "syntax error",
                serde_json::error::Category::Eof => "unexpected end",
                serde_json::error::Category::Data => "invalid data",
                serde_json::error::Category::Io => "I/O error",
            },
            column: e.column(),
        })?;
        let Value::Object(o) = v else {
            return Err(LogParseError::NotAnObject);
        };
        let action = str_key(&o, "action")?;
        let level = |o| u64_key(o, "level").map(Verbosity::from_code);
        Ok(match action.as_str() {
            "msg" => LogLine::Msg {
                level: level(&o)?,
                msg: str_key(&o, "msg")?,
            },
            "start" => LogLine::Start {
                id: u64_key(&o, "id")?,
                level: level(&o)?,
                typ: u64_key(&o, "type")?,
                text: str_key(&o, "text")?,
                fields: fields_key(&o)?,
                parent: o.get("parent").and_then(Value::as_u64),
            },
            "stop" => LogLine::Stop {
                id: u64_key(&o, "id")?,
            },
            "result" => LogLine::Result {
                id: u64_key(&o, "id")?,
                typ: u64_key(&o, "type")?,
                fields: fields_key(&o)?,
            },
            "setPhase" => LogLine::SetPhase {
                phase: str_key(&o, "phase")?,
            },
            _ => return Err(LogParseError::UnknownAction(action)),
        })
    }

    /// [`LogLine::parse`] for raw bytes, converting invalid UTF-8 lossily first.
    pub fn parse_bytes(line: &[u8]) -> Result<LogLine, LogParseError> {
        Self::parse(&String::from_utf8_lossy(line))
    }

    /// The activity id this line refers to, if any.
    pub fn id(&self) -> Option<u64> {
        match self {
            LogLine::Start { id, .. } | LogLine::Stop { id } | LogLine::Result { id, .. } => {
                Some(*id)
            }
            LogLine::Msg { .. } | LogLine::SetPhase { .. } => None,
        }
    }
}

impl std::fmt::Display for LogLine {
    /// The line without its trailing newline.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{PREFIX}{}", self.to_json())
    }
}

/// Where a Nix store keeps the build log of derivation `drv`, relative to its log directory
/// (`/nix/var/log/nix` by default): `drvs/<first two characters of the base name>/<the rest>`,
/// with `.bz2` appended when `compress-build-log` is on (`openLogFile` and
/// `LocalFSStore::getBuildLog`, the same in 2.8, 2.26 and 2.34). A store path's base name
/// starts with its nix32 hash, so no component is empty, `.` or `..`.
pub fn build_log_rel_path(drv: &crate::store_path::StorePath) -> [String; 3] {
    let base = drv.base_name();
    let (dir, file) = base.split_at(2);
    ["drvs".to_owned(), dir.to_owned(), file.to_owned()]
}

/// Hands out unique activity ids, starting at `pid << 32` like Nix (`nextId` in
/// `src/libutil/logging.cc`), so ids from different hook processes do not collide. The parent
/// re-maps them anyway; 0 (Nix's "no activity") is never handed out.
#[derive(Debug)]
pub struct ActivityIds(AtomicU64);

impl ActivityIds {
    /// Starts at `pid << 32`.
    pub fn new() -> ActivityIds {
        ActivityIds::starting_at(u64::from(std::process::id()) << 32)
    }

    /// Starts at `first` (or 1 if `first` is 0).
    pub fn starting_at(first: u64) -> ActivityIds {
        ActivityIds(AtomicU64::new(first.max(1)))
    }

    /// The next id.
    pub fn next_id(&self) -> u64 {
        let id = self.0.fetch_add(1, Ordering::Relaxed);
        if id == 0 {
            // Wrapped around; skip 0.
            self.0.fetch_add(1, Ordering::Relaxed)
        } else {
            id
        }
    }
}

impl Default for ActivityIds {
    fn default() -> Self {
        ActivityIds::new()
    }
}
